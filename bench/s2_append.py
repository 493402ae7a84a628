"""Scenario 2: append throughput of one executor process.

- one session: `EventStore.append` called one after the other, as an executor
  appends a session's events (each append waits for its ack: `seq` must be dense);
- 100 sessions: 100 tasks in the same process, each appending to its own session;
- limit: raw pipelined `js.publish_async` of the same bytes to one subject,
  waiting for all acks at the end.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import nats
from stepwise_libs import subjects
from stepwise_libs.events import encode_event, new_event

from .context import Bench
from .stats import Results, Target
from .workload import action, new_session

NAME = "2 append"
SESSIONS = 100


def _counts(bench: Bench) -> tuple[int, int]:
    """Events for the one-session run, and per session for the 100-session run."""
    return (1000, 20) if bench.short else (10000, 100)


async def one_session(bench: Bench, count: int) -> float:
    nc, store = await bench.event_store("bench-executor")
    try:
        session_id = await new_session(store)
        start = time.perf_counter()
        for i in range(count):
            await store.append(session_id, action(i))
        return count / (time.perf_counter() - start)
    finally:
        await nc.close()


async def many_sessions(bench: Bench, per_session: int) -> float:
    nc, store = await bench.event_store("bench-executor")
    try:
        sessions = [await new_session(store) for _ in range(SESSIONS)]

        async def write(session_id: str) -> None:
            for i in range(per_session):
                await store.append(session_id, action(i))

        start = time.perf_counter()
        await asyncio.gather(*(write(session_id) for session_id in sessions))
        return SESSIONS * per_session / (time.perf_counter() - start)
    finally:
        await nc.close()


async def raw_pipelined(bench: Bench, count: int) -> float:
    nc = await nats.connect(bench.nats_url)
    js = nc.jetstream()
    session_id = str(uuid.uuid4())
    subject = subjects.session_events_subject(session_id)
    bodies = [encode_event(new_event(session_id, i + 1, action(i))) for i in range(count)]
    try:
        start = time.perf_counter()
        futures = [await js.publish_async(subject, body) for body in bodies]
        await asyncio.gather(*futures)
        return count / (time.perf_counter() - start)
    finally:
        await nc.close()


async def run_once(bench: Bench, results: Results) -> None:
    count, per_session = _counts(bench)
    results.add(NAME, "stepwise append, 1 session", "ev/s", await one_session(bench, count))
    results.add(
        NAME,
        f"stepwise append, {SESSIONS} sessions",
        "ev/s",
        await many_sessions(bench, per_session),
    )
    results.add(NAME, "raw pipelined js.publish", "ev/s", await raw_pipelined(bench, count))


def targets(results: Results) -> list[Target]:
    m = results.median
    return [
        Target(
            f"append ({SESSIONS} sessions) vs raw pipelined publish",
            ">= 0.5x",
            lambda: (
                m(NAME, f"stepwise append, {SESSIONS} sessions")
                / m(NAME, "raw pipelined js.publish")
            ),
            lambda ratio: ratio >= 0.5,
            "x",
        ),
        Target(
            "append (1 session) vs raw pipelined publish",
            ">= 0.5x",
            lambda: m(NAME, "stepwise append, 1 session") / m(NAME, "raw pipelined js.publish"),
            lambda ratio: ratio >= 0.5,
            "x",
        ),
    ]
