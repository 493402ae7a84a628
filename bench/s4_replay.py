"""Scenario 4: replay of a long session over the gateway's WebSocket.

One session holds 100,000 events (10,000 with --short). A client connects with
`since=0`, `since=50,000` and `since=99,900` (scaled with --short) and reads to
the last event. Time to first event runs from opening the connection to the
first event; events/s from the first event to the last. The client reads as
fast as it can; a close before the last event (for example 4008, "client too
slow") is reported as a note and the run counts as failed.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import websockets

from .context import Bench
from .servers import BenchError
from .stats import Results, Target
from .workload import new_session, preload

NAME = "4 replay"
_seq = msgspec.json.Decoder(dict)


def _size(bench: Bench) -> int:
    return 5_000 if bench.short else 100_000


def _starts(size: int) -> list[int]:
    return [0, size // 2, size - 100]


async def replay(url: str, last_seq: int, since: int) -> tuple[float, float]:
    """(ms to first event, events/s) for a client reading `since+1 .. last_seq`."""
    opened = time.perf_counter()
    async with websockets.connect(url, max_size=None, ping_interval=None) as ws:
        first = _seq.decode(await asyncio.wait_for(ws.recv(), 30))
        first_at = time.perf_counter()
        if first["seq"] != since + 1:
            raise BenchError(
                f"since={since}: first event has seq {first['seq']}, expected {since + 1}"
            )
        seq, received = first["seq"], 1
        try:
            while seq < last_seq:
                seq = _seq.decode(await asyncio.wait_for(ws.recv(), 30))["seq"]
                received += 1
        except websockets.ConnectionClosed as closed:
            close = f"{closed.rcvd.code} {closed.rcvd.reason}" if closed.rcvd else "no close frame"
            raise BenchError(
                f"since={since}: gateway closed the socket after seq {seq} of {last_seq}: {close}"
            ) from None
        done = time.perf_counter()
    if received != last_seq - since:
        raise BenchError(f"since={since}: received {received} events, expected {last_seq - since}")
    rate = (received - 1) / (done - first_at) if received > 1 else float("nan")
    return (first_at - opened) * 1000, rate


async def run_once(bench: Bench, results: Results) -> None:
    size = _size(bench)
    bench.servers.new_nats()
    nc, store = await bench.event_store("bench-replay")
    try:
        session_id = await new_session(store)
        await preload(nc.jetstream(), session_id, 2, size - 1)
    finally:
        await nc.close()
    database_url = bench.servers.fresh_database()
    with bench.servers.gateway(database_url) as gateway:
        # One unmeasured read first, so no measured start pays for the gateway's first connection.
        await replay(gateway.ws_url(session_id, size - 1), size, size - 1)
        for since in _starts(size):
            first_ms, rate = await replay(gateway.ws_url(session_id, since), size, since)
            results.add(NAME, f"since={since:,} first event", "ms", first_ms)
            results.add(NAME, f"since={since:,} events/s", "ev/s", rate)


def targets(results: Results) -> list[Target]:
    names = [
        name
        for scenario, name in results.figures
        if scenario == NAME and name.endswith("first event")
    ]

    def ratio() -> float:
        if len(names) < 3:
            raise KeyError("replay not measured")
        return results.median(NAME, names[2]) / results.median(NAME, names[0])

    return [
        Target(
            "replay first event: last 100 vs since=0",
            "<= 1.5x",
            ratio,
            lambda value: value <= 1.5,
            "x",
        )
    ]
