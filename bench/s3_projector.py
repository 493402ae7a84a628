"""Scenario 3: the projector, from the events stream into the Postgres read models.

- throughput: a backlog of events over 20 sessions is in the stream; the
  `stepwise-projector` process (its own process, default settings) projects it;
  events/s is measured from its first committed batch to the last one;
- lag: with the projector caught up, 20 sessions append at 100 events/s each
  (2,000 events/s in all); lag is the time from the start of an append to the
  commit that makes its rows visible (the projector's NOTIFY, sent on commit);
- limit: a raw loop over the same backlog: pull 500 messages, decode them, COPY
  the same `events` rows into a copy of that table, commit, acknowledge (ack-all).
  It keeps no session state and writes no session rows: it is the floor of
  "stream -> Postgres", not a projector.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict

import asyncpg
from nats.js import api
from stepwise_libs import subjects
from stepwise_libs.events import decode_event

from .context import Bench
from .servers import BenchError, _stop
from .stats import Results, Target
from .workload import action as make_action
from .workload import new_session, paced, preload

NAME = "3 projector"
SESSIONS = 20
STEADY_RATE = 2000
NOTIFY_CHANNEL = "stepwise_projection"  # stepwise_projector.database.NOTIFY_CHANNEL


def _sizes(bench: Bench) -> tuple[int, float]:
    """Backlog events, and seconds of steady load."""
    return (5000, 2.0) if bench.short else (50000, 10.0)


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def _position(db: asyncpg.Connection) -> int:
    return await db.fetchval("SELECT coalesce(max(position), 0) FROM projector_position") or 0


async def build_backlog(bench: Bench, total: int) -> tuple[list[str], int]:
    """Sessions with `total` events between them; return their ids and the last stream position."""
    nc, store = await bench.event_store("bench-backlog")
    try:
        sessions = [await new_session(store) for _ in range(SESSIONS)]
        last = 0
        for session_id in sessions:
            last = max(last, await preload(nc.jetstream(), session_id, 2, total // SESSIONS))
        return sessions, last
    finally:
        await nc.close()


async def projector_throughput(
    bench: Bench, db: asyncpg.Connection, last: int, within: float
) -> float:
    """events/s from the projector's first committed batch to the one that reaches `last`."""
    first_seen: tuple[float, int] | None = None
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        position = await _position(db)
        now = time.perf_counter()
        if position and first_seen is None:
            first_seen = (now, position)
        if position >= last:
            assert first_seen is not None
            if position == first_seen[1]:
                raise BenchError("the backlog was projected in one batch; make it larger")
            return (position - first_seen[1]) / (now - first_seen[0])
        await asyncio.sleep(0.01)
    raise BenchError(f"the projector did not reach position {last} in {within} s")


async def steady_lag(
    bench: Bench, db: asyncpg.Connection, seconds: float
) -> tuple[list[float], float]:
    """Lags (ms) of appends at STEADY_RATE over SESSIONS sessions, and the achieved rate."""
    notices: dict[str, list[tuple[float, int]]] = defaultdict(list)

    def on_notice(_connection, _pid, _channel, payload: str) -> None:
        session_id, last_seq = payload.rsplit(":", 1)
        notices[session_id].append((time.time(), int(last_seq)))

    await db.add_listener(NOTIFY_CHANNEL, on_notice)
    nc, store = await bench.event_store("bench-executor")
    appended: list[tuple[str, int, float]] = []
    try:
        sessions = [await new_session(store) for _ in range(SESSIONS)]
        per_session = int(STEADY_RATE / SESSIONS * seconds)

        async def write(session_id: str) -> None:
            async for i in paced(STEADY_RATE / SESSIONS, per_session, within=seconds):
                event = await store.append(session_id, make_action(i))
                appended.append((session_id, event.seq, event.at.timestamp()))

        start = time.perf_counter()
        await asyncio.gather(*(write(session_id) for session_id in sessions))
        achieved = len(appended) / (time.perf_counter() - start)
        last_seqs = {session_id: seq for session_id, seq, _ in appended}

        def caught_up() -> bool:
            return all(notices[s] and notices[s][-1][1] >= seq for s, seq in last_seqs.items())

        deadline = time.monotonic() + 60
        while not caught_up():
            if time.monotonic() > deadline:
                raise BenchError("the projector did not catch up within 60 s of the steady load")
            await asyncio.sleep(0.02)
    finally:
        await nc.close()
        await db.remove_listener(NOTIFY_CHANNEL, on_notice)
    lags = []
    for session_id, seq, at in appended:
        visible = next(t for t, last_seq in notices[session_id] if last_seq >= seq)
        lags.append((visible - at) * 1000)
    return lags, achieved


async def copy_loop(bench: Bench, database_url: str, count: int, first: int) -> float:
    """The raw floor: pull 500, decode, COPY the events rows, commit, ack; events/s."""
    db = await asyncpg.connect(_dsn(database_url))
    await db.execute("CREATE TABLE copy_events (LIKE events INCLUDING ALL)")
    nc, _ = await bench.event_store("bench-copy")
    js = nc.jetstream()
    pull = await js.pull_subscribe(
        f"{subjects.EVENTS_PREFIX}.*",
        stream=subjects.EVENTS_STREAM,
        config=api.ConsumerConfig(
            ack_policy=api.AckPolicy.ALL,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=first,
            max_ack_pending=-1,
        ),
    )
    columns = [
        "position",
        "session_id",
        "seq",
        "event_id",
        "type",
        "at",
        "command_id",
        "version",
        "data",
    ]
    copied = 0
    try:
        start = time.perf_counter()
        while copied < count:
            messages = await pull.fetch(500, timeout=5)
            rows = []
            for message in messages:
                event = decode_event(message.data, message.metadata.sequence.stream)
                rows.append(
                    (event.position, event.session_id, event.seq, event.id, event.type, event.at,
                     event.command_id, event.version, json.dumps(event.data))
                )  # fmt: skip
            async with db.transaction():
                await db.copy_records_to_table("copy_events", records=rows, columns=columns)
            await messages[-1].ack()
            copied += len(messages)
        return copied / (time.perf_counter() - start)
    finally:
        await nc.close()
        await db.close()


async def run_once(bench: Bench, results: Results) -> None:
    backlog, seconds = _sizes(bench)
    bench.servers.new_nats()  # an empty stream: the projector starts from position 1
    database_url = bench.servers.fresh_database()
    _, last = await build_backlog(bench, backlog)
    db = await asyncpg.connect(_dsn(database_url))
    projector = bench.servers.projector(database_url)
    try:
        rate = await projector_throughput(bench, db, last, within=300)
        results.add(NAME, "stepwise-projector backlog", "ev/s", rate)
        lags, achieved = await steady_lag(bench, db, seconds)
        results.add(NAME, f"steady load achieved (target {STEADY_RATE})", "ev/s", achieved)
        results.add_latencies(NAME, "lag append->row", lags)
    finally:
        _stop(projector)
        await db.close()
    results.add(NAME, "raw pull + COPY loop", "ev/s", await copy_loop(bench, database_url, last, 1))


def targets(results: Results) -> list[Target]:
    m = results.median
    return [
        Target(
            "projector vs raw pull + COPY",
            ">= 0.5x",
            lambda: m(NAME, "stepwise-projector backlog") / m(NAME, "raw pull + COPY loop"),
            lambda ratio: ratio >= 0.5,
            "x",
        ),
        Target(
            f"projector lag p99 at {STEADY_RATE}/s",
            "< 1,000 ms",
            lambda: m(NAME, "lag append->row p99"),
            lambda value: value < 1000,
            " ms",
        ),
    ]
