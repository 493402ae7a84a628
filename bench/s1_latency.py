"""Scenario 1: event latency, executor-side append -> WebSocket client, for one session.

Three paths, measured one after the other in the same run:
- stepwise: `EventStore.append` (what the executor calls) -> JetStream -> the real
  `stepwise-gateway` process -> its WebSocket -> this client;
- limit: raw nats-py `js.publish` -> an ordered consumer on the same nats-server;
- baseline: INSERT + COMMIT into Postgres, PUBLISH on Redis -> a WebSocket
  endpoint forwarding from Redis (`bench/baseline.py`).
Latency is measured from the start of the append to the client receiving the
message, by the wall clock of this one machine. Each path also runs flat out,
one append after the other as one executor does, to give its sustained rate.
Stepwise runs flat out a second time with its appends pipelined: batches of
`PIPELINE` appends started together, which the event store writes as atomic
batches in call order. The baseline has no such form: a session's events must
commit one after the other to keep their order, so its sustained rate is the
one-after-the-other one.
Each path sends for a fixed time; a path that cannot keep a rate sends fewer
events, and its "achieved" figure says how many per second it managed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime

import msgspec
import nats
import websockets
from nats.js import api

from .baseline import BaselineWriter
from .context import BaselineEndpoint, Bench
from .servers import Gateway
from .stats import Results, Target
from .workload import action, new_session, paced

NAME = "1 latency"
RATES = (200, 2000)
# Appends started together in the pipelined flat-out run.
PIPELINE = 500
_at = msgspec.json.Decoder(dict)


def _seconds(bench: Bench) -> float:
    """Seconds each path sends for, at each rate and flat out."""
    return 1.5 if bench.short else 10.0


class Receiver:
    """Reads a WebSocket into (receive time, message) pairs until told how many to expect."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.received: list[tuple[float, str]] = []
        self.expected: int | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while self.expected is None or len(self.received) < self.expected:
            message = await self.ws.recv()
            self.received.append((time.time(), message))

    async def wait_for(self, expected: int, within: float) -> None:
        """Wait until `expected` messages arrived; raise TimeoutError after `within` seconds."""
        self.expected = expected
        if len(self.received) >= expected:
            self.task.cancel()
            return
        await asyncio.wait_for(self.task, within)


async def _connect(url: str) -> websockets.ClientConnection:
    return await websockets.connect(url, max_size=None, ping_interval=None)


async def stepwise_path(
    bench: Bench, gateway: Gateway, rate: float | None, seconds: float
) -> tuple[list[float], float]:
    """Latencies (ms) of appends at `rate` (None: flat out) for `seconds`, and the events/s."""
    nc, store = await bench.event_store("bench-executor")
    try:
        session_id = await new_session(store)
        async with await _connect(gateway.ws_url(session_id)) as ws:
            await asyncio.wait_for(ws.recv(), 10)  # session_created: the tail is live
            receiver = Receiver(ws)
            start = time.perf_counter()
            sent = 0
            async for i in paced(rate, 10**9, within=seconds):
                await store.append(session_id, action(i))
                sent += 1
            await receiver.wait_for(sent, 60)
            elapsed = time.perf_counter() - start
    finally:
        await nc.close()
    latencies = [(t - _at_seconds(m)) * 1000 for t, m in receiver.received]
    return latencies, sent / elapsed


async def stepwise_pipelined(bench: Bench, gateway: Gateway, seconds: float) -> float:
    """Events/s from pipelined appends to a WebSocket client that received all of them."""
    nc, store = await bench.event_store("bench-executor")
    try:
        session_id = await new_session(store)
        async with await _connect(gateway.ws_url(session_id)) as ws:
            await asyncio.wait_for(ws.recv(), 10)  # session_created: the tail is live
            receiver = Receiver(ws)
            start = time.perf_counter()
            sent = 0
            while time.perf_counter() - start < seconds:
                await asyncio.gather(
                    *(store.append(session_id, action(sent + i)) for i in range(PIPELINE))
                )
                sent += PIPELINE
            await receiver.wait_for(sent, 60)
            elapsed = time.perf_counter() - start
    finally:
        await nc.close()
    return sent / elapsed


def _at_seconds(message: str) -> float:
    return datetime.fromisoformat(_at.decode(message)["at"]).timestamp()


async def raw_path(bench: Bench, rate: float, seconds: float) -> list[float]:
    """Raw nats-py: `js.publish` awaited per message -> ordered push consumer."""
    publisher = await nats.connect(bench.nats_url)
    consumer = await nats.connect(bench.nats_url)
    js, js_in = publisher.jetstream(), consumer.jetstream()
    stream = "BENCH_RAW"
    await js.add_stream(
        api.StreamConfig(name=stream, subjects=["bench.raw.>"], storage=api.StorageType.FILE)
    )
    subject = f"bench.raw.{uuid.uuid4().hex}"
    latencies: list[float] = []
    expected = [10**9]
    done = asyncio.Event()

    async def on_message(message) -> None:
        latencies.append(time.time() * 1000 - json.loads(message.data)["t"])
        if len(latencies) >= expected[0]:
            done.set()

    subscription = await js_in.subscribe(
        subject, stream=stream, ordered_consumer=True, cb=on_message
    )
    try:
        sent = 0
        async for i in paced(rate, 10**9, within=seconds):
            await js.publish(subject, json.dumps({"t": time.time() * 1000, "i": i}).encode())
            sent += 1
        expected[0] = sent
        if len(latencies) < sent:
            await asyncio.wait_for(done.wait(), 60)
    finally:
        await subscription.unsubscribe()
        await js.delete_stream(stream)
        await publisher.close()
        await consumer.close()
    return latencies


async def baseline_path(
    bench: Bench, endpoint: BaselineEndpoint, rate: float | None, seconds: float
) -> tuple[list[float], float]:
    """Postgres INSERT + COMMIT, Redis PUBLISH -> the forwarding WebSocket endpoint."""
    assert bench.redis is not None
    writer = await BaselineWriter.open(bench.postgres_dsn, bench.redis.port)
    session_id = str(uuid.uuid4())
    try:
        async with await _connect(endpoint.ws_url(session_id)) as ws:
            await asyncio.wait_for(ws.recv(), 10)  # {"type": "subscribed"}
            receiver = Receiver(ws)
            start = time.perf_counter()
            sent = 0
            async for i in paced(rate, 10**9, within=seconds):
                data = msgspec.to_builtins(action(i))
                data["t"] = time.time()
                await writer.append(session_id, data)
                sent += 1
            await receiver.wait_for(sent, 60)
            elapsed = time.perf_counter() - start
    finally:
        await writer.close()
    latencies = [(t - json.loads(m)["data"]["t"]) * 1000 for t, m in receiver.received]
    return latencies, sent / elapsed


async def run_once(bench: Bench, results: Results) -> None:
    seconds = _seconds(bench)
    database_url = bench.servers.fresh_database()
    with bench.servers.gateway(database_url) as gateway:
        for rate in RATES:
            latencies, achieved = await stepwise_path(bench, gateway, rate, seconds)
            results.add_latencies(NAME, f"stepwise @{rate}/s", latencies)
            results.add(NAME, f"stepwise @{rate}/s achieved", "ev/s", achieved)
        _, sustained = await stepwise_path(bench, gateway, None, seconds)
        results.add(NAME, "stepwise sustained append->ws", "ev/s", sustained)
        pipelined = await stepwise_pipelined(bench, gateway, seconds)
        results.add(NAME, "stepwise sustained append->ws, pipelined", "ev/s", pipelined)
    for rate in RATES:
        results.add_latencies(NAME, f"raw js @{rate}/s", await raw_path(bench, rate, seconds))
    if bench.redis is None:
        return
    with bench.baseline_endpoint() as endpoint:
        for rate in RATES:
            latencies, achieved = await baseline_path(bench, endpoint, rate, seconds)
            results.add_latencies(NAME, f"baseline @{rate}/s", latencies)
            results.add(NAME, f"baseline @{rate}/s achieved", "ev/s", achieved)
        _, sustained = await baseline_path(bench, endpoint, None, seconds)
        results.add(NAME, "baseline sustained append->ws", "ev/s", sustained)


def targets(results: Results) -> list[Target]:
    m = results.median
    return [
        Target(
            "p99 @200/s vs raw JetStream",
            "<= 3x",
            lambda: m(NAME, "stepwise @200/s p99") / m(NAME, "raw js @200/s p99"),
            lambda ratio: ratio <= 3,
            "x",
        ),
        Target(
            "p99 @200/s vs baseline",
            "< 1x",
            lambda: m(NAME, "stepwise @200/s p99") / m(NAME, "baseline @200/s p99"),
            lambda ratio: ratio < 1,
            "x",
        ),
        Target(
            "sustained append->ws rate (pipelined) vs baseline",
            ">= 10x",
            lambda: (
                m(NAME, "stepwise sustained append->ws, pipelined")
                / m(NAME, "baseline sustained append->ws")
            ),
            lambda ratio: ratio >= 10,
            "x",
        ),
    ]
