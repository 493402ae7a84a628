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
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import msgspec
import nats
import websockets
from nats.js import api

from .baseline import BaselineWriter
from .context import Bench
from .servers import Gateway
from .stats import Results, Target
from .workload import action, age_ms, new_session, paced

NAME = "1 latency"
RATES = (200, 2000)
_at = msgspec.json.Decoder(dict)


def _sizes(bench: Bench) -> tuple[float, int]:
    """Seconds per rate, and events for the flat-out run."""
    return (1.5, 1000) if bench.short else (10.0, 10000)


async def _ws_events(url: str):
    return await websockets.connect(url, max_size=None, ping_interval=None)


async def stepwise_path(bench: Bench, gateway: Gateway, rate: float | None, count: int) -> tuple[list[float], float]:
    """Latencies (ms) of `count` appends at `rate` (None: flat out), and the achieved events/s."""
    nc, store = await bench.event_store("bench-executor")
    try:
        session_id = await new_session(store)
        async with await _ws_events(gateway.ws_url(session_id)) as ws:
            await asyncio.wait_for(ws.recv(), 10)  # session_created: the tail is live
            received: list[tuple[float, str]] = []

            async def receive() -> None:
                while len(received) < count:
                    message = await ws.recv()
                    received.append((time.time(), message))

            receiver = asyncio.create_task(receive())
            start = time.perf_counter()
            if rate is None:
                for i in range(count):
                    await store.append(session_id, action(i))
            else:
                async for i in paced(rate, count):
                    await store.append(session_id, action(i))
            await asyncio.wait_for(receiver, 30 + count / 200)
            elapsed = time.perf_counter() - start
    finally:
        await nc.close()
    latencies = [(t - _at_seconds(m)) * 1000 for t, m in received]
    return latencies, count / elapsed


def _at_seconds(message: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(_at.decode(message)["at"]).timestamp()


async def raw_path(bench: Bench, rate: float, count: int) -> list[float]:
    """Raw nats-py: `js.publish` awaited per message -> ordered push consumer."""
    publisher = await nats.connect(bench.nats_url)
    consumer = await nats.connect(bench.nats_url)
    js, js_in = publisher.jetstream(), consumer.jetstream()
    stream = "BENCH_RAW"
    await js.add_stream(api.StreamConfig(name=stream, subjects=["bench.raw.>"], storage=api.StorageType.FILE))
    subject = f"bench.raw.{uuid.uuid4().hex}"
    latencies: list[float] = []
    done = asyncio.Event()

    async def on_message(message) -> None:
        latencies.append(time.time() * 1000 - json.loads(message.data)["t"])
        if len(latencies) == count:
            done.set()

    subscription = await js_in.subscribe(subject, stream=stream, ordered_consumer=True, cb=on_message)
    try:
        async for i in paced(rate, count):
            await js.publish(subject, json.dumps({"t": time.time() * 1000, "i": i}).encode())
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await subscription.unsubscribe()
        await js.delete_stream(stream)
        await publisher.close()
        await consumer.close()
    return latencies


async def baseline_path(bench: Bench, rate: float | None, count: int) -> tuple[list[float], float]:
    """Postgres INSERT + COMMIT, Redis PUBLISH -> the forwarding WebSocket endpoint."""
    assert bench.redis is not None
    writer = await BaselineWriter.open(bench.postgres_dsn, bench.redis.port)
    session_id = str(uuid.uuid4())
    try:
        with bench.baseline_endpoint() as endpoint:
            async with await _ws_events(endpoint.ws_url(session_id)) as ws:
                await asyncio.wait_for(ws.recv(), 10)  # {"type": "subscribed"}
                received: list[tuple[float, str]] = []

                async def receive() -> None:
                    while len(received) < count:
                        message = await ws.recv()
                        received.append((time.time() * 1000, message))

                receiver = asyncio.create_task(receive())
                start = time.perf_counter()
                indices = paced(rate, count) if rate is not None else _all(count)
                async for i in indices:
                    data = msgspec.to_builtins(action(i))
                    data["t"] = time.time() * 1000
                    await writer.append(session_id, data)
                await asyncio.wait_for(receiver, 30 + count / 100)
                elapsed = time.perf_counter() - start
    finally:
        await writer.close()
    latencies = [t - json.loads(m)["data"]["t"] for t, m in received]
    return latencies, count / elapsed


async def _all(count: int):
    for i in range(count):
        yield i


async def run_once(bench: Bench, results: Results) -> None:
    seconds, flat_out = _sizes(bench)
    database_url = bench.servers.fresh_database()
    with bench.servers.gateway(database_url) as gateway:
        for rate in RATES:
            count = int(rate * seconds)
            latencies, achieved = await stepwise_path(bench, gateway, rate, count)
            results.add_latencies(NAME, f"stepwise @{rate}/s", latencies)
            results.add(NAME, f"stepwise @{rate}/s achieved", "ev/s", achieved)
        _, sustained = await stepwise_path(bench, gateway, None, flat_out)
        results.add(NAME, "stepwise sustained append->ws", "ev/s", sustained)
    for rate in RATES:
        results.add_latencies(NAME, f"raw js @{rate}/s", await raw_path(bench, rate, int(rate * seconds)))
    if bench.redis is None:
        return
    for rate in RATES:
        latencies, achieved = await baseline_path(bench, rate, int(rate * seconds))
        results.add_latencies(NAME, f"baseline @{rate}/s", latencies)
        results.add(NAME, f"baseline @{rate}/s achieved", "ev/s", achieved)
    _, sustained = await baseline_path(bench, None, flat_out)
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
            "sustained append->ws rate vs baseline",
            ">= 10x",
            lambda: m(NAME, "stepwise sustained append->ws") / m(NAME, "baseline sustained append->ws"),
            lambda ratio: ratio >= 10,
            "x",
        ),
    ]
