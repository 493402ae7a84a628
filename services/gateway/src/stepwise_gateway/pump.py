"""A bounded outbox per streaming client, fed by a tail of the session's events on JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from stepwise_libs.events import Event
from stepwise_libs.jetstream import EventStore

logger = logging.getLogger(__name__)

# WebSocket close codes this gateway uses (4000-4999 are free for applications).
CLOSE_TOO_SLOW = (
    4008  # the client fell more than the buffer behind; reconnect with since=<last seq>
)
CLOSE_NOT_FOUND = 4404  # no session with this id
CLOSE_INVALID = 4422  # invalid query parameter
CLOSE_UNAVAILABLE = 1013  # NATS is not connected; try again later


class Outbox:
    """Queue of what one client still has to receive; full means the client is too slow."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._queue: asyncio.Queue[Any] = asyncio.Queue(capacity)
        self.overflowed = asyncio.Event()
        self.last_sent_seq = 0

    def put(self, item: Any) -> bool:
        """Queue an item; on a full queue mark the client as too slow and return False."""
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed.set()
            return False
        return True

    async def get(self) -> Any:
        return await self._queue.get()


async def pump_events(store: EventStore, session_id: str, since: int, outbox: Outbox) -> None:
    """Copy every event after `since`, then live ones, into the outbox until it overflows."""
    async for event in store.tail(session_id, since):
        if not outbox.put(event):
            logger.warning(
                "streaming client fell behind; closing it",
                extra={"session_id": session_id, "seq": event.seq, "buffer": outbox.capacity},
            )
            return


def is_event(item: Any) -> bool:
    return isinstance(item, Event)


async def cancel_all(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task
