"""Scenario 2: append throughput of one executor process.

- one session, one at a time: `EventStore.append` awaited before the next one
  starts, as the executor appends a step's events today;
- one session, pipelined: every `EventStore.append` started at once and awaited
  together. The store writes the waiting events of a session as atomic batches
  of up to 1,000, each checked against the session's last stored event, so `seq`
  stays dense and in call order;
- 100 sessions: 100 tasks in the same process, each appending to its own session
  one at a time;
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
from .servers import BenchError
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


async def one_session_pipelined(bench: Bench, count: int) -> float:
    nc, store = await bench.event_store("bench-executor")
    try:
        session_id = await new_session(store)
        start = time.perf_counter()
        events = await asyncio.gather(*(store.append(session_id, action(i)) for i in range(count)))
        elapsed = time.perf_counter() - start
        seqs = [event.seq for event in events]
        if seqs != list(range(2, count + 2)):
            raise BenchError(f"pipelined appends got seqs {seqs[:5]}..., not 2..{count + 1}")
        return count / elapsed
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
        "stepwise append, 1 session, pipelined",
        "ev/s",
        await one_session_pipelined(bench, count),
    )
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
            "append (1 session, pipelined) vs raw pipelined publish",
            ">= 0.5x",
            lambda: (
                m(NAME, "stepwise append, 1 session, pipelined")
                / m(NAME, "raw pipelined js.publish")
            ),
            lambda ratio: ratio >= 0.5,
            "x",
        ),
    ]
