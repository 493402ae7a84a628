"""Reads of a session's stored events by time, for clients that resume by timestamp."""

from __future__ import annotations

from datetime import datetime

from nats.js import JetStreamContext
from stepwise_libs import subjects
from stepwise_libs.events import Event, decode_event
from stepwise_libs.jetstream import EventStore


async def event_by_seq(js: JetStreamContext, store: EventStore, session_id: str, seq: int) -> Event:
    """Return the session's event with this seq, which must exist."""
    position = await store.position_after(session_id, seq - 1)
    assert position is not None, f"session {session_id} has no event {seq}"
    message = await js.get_msg(subjects.EVENTS_STREAM, seq=position, direct=True)
    return decode_event(message.data or b"", position)


async def first_seq_after(
    js: JetStreamContext,
    store: EventStore,
    session_id: str,
    since_time: datetime,
    since: int,
    last_seq: int,
) -> int:
    """Return the lowest seq above `since` stamped after `since_time`, or `last_seq + 1`.

    A binary search over seq, so the cost grows with the log of the session's length.
    NOTE: it assumes stamps grow with seq. Writers on hosts with skewed clocks can break
    that by the skew, and events misplaced that way may be left out.
    """
    low, high = since + 1, last_seq + 1
    while low < high:
        middle = (low + high) // 2
        event = await event_by_seq(js, store, session_id, middle)
        if event.at > since_time:
            high = middle
        else:
            low = middle + 1
    return low


async def read_after_time(
    js: JetStreamContext,
    store: EventStore,
    session_id: str,
    since_time: datetime,
    since: int,
    last_seq: int,
    limit: int,
) -> list[Event]:
    """Return up to `limit` events with seq above `since` stamped after `since_time`."""
    first = await first_seq_after(js, store, session_id, since_time, since, last_seq)
    if first > last_seq:
        return []
    events = await store.read(session_id, first - 1, limit)
    return [event for event in events if event.at > since_time]
