"""The events every scenario sends, and the pacing that sends them at a steady rate."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

from nats.js import JetStreamContext
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.events import encode_event, new_event
from stepwise_libs.jetstream import EventStore

TASK_ID = "bench-task"


def action(i: int) -> ev.ActionExecuted:
    """A typical executor event: one browser action and its result (about 400 bytes on the wire)."""
    return ev.ActionExecuted(
        task_id=TASK_ID,
        step_number=1 + i // 10,
        action=ev.ActionRecord(
            name="click_element_by_index",
            params={"index": i % 40, "while_holding_ctrl": False},
            result=f"Clicked button with index {i % 40}: Add to cart",
        ),
    )


def created() -> ev.SessionCreated:
    return ev.SessionCreated(
        test_case="Open the login page", target_url="http://127.0.0.1:1/", llm_model="offline"
    )


async def new_session(store: EventStore) -> str:
    """A session with its `session_created` event, as the gateway makes it."""
    session_id = str(uuid.uuid4())
    await store.append(session_id, created())
    return session_id


async def paced(rate: float | None, count: int, within: float | None = None) -> AsyncIterator[int]:
    """Yield 0..count-1 at `rate` per second (None: flat out) on an absolute schedule.

    A sender that falls behind catches up without sleeping. With `within`, it stops
    after that many seconds even if it sent fewer than `count`: a path that cannot
    keep the rate sends what it can, and its achieved rate shows that.
    """
    start = time.perf_counter()
    for i in range(count):
        now = time.perf_counter()
        if within is not None and now - start >= within:
            return
        if rate is not None and start + i / rate > now:
            await asyncio.sleep(start + i / rate - now)
        yield i


def age_ms(at: datetime | str) -> float:
    """Milliseconds since an event's `at` (the moment its append began), by the wall clock."""
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    return (time.time() - at.timestamp()) * 1000


async def preload(js: JetStreamContext, session_id: str, first_seq: int, count: int) -> int:
    """Store `count` events of a session quickly, pipelined; return the last stream position.

    The messages are byte for byte what `EventStore.append` writes (envelope, Nats-Msg-Id and
    seq header), but sent without waiting for each ack: this only builds a long history for the
    replay and projector scenarios, it is not a measurement.
    """
    subject = subjects.session_events_subject(session_id)
    futures = []
    for i in range(count):
        event = new_event(session_id, first_seq + i, action(i))
        futures.append(
            await js.publish_async(
                subject,
                encode_event(event),
                headers={"Nats-Msg-Id": event.id, subjects.SEQ_HEADER: str(event.seq)},
            )
        )
    acks = await asyncio.gather(*futures)
    return max(ack.seq for ack in acks)
