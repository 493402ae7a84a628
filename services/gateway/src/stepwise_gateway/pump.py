"""One shared JetStream tail per session, fanned out to a bounded outbox per streaming client.

A gateway process reads each session it streams with one ordered consumer (a
`SessionFeed`), however many WebSocket and SSE clients follow that session. Each
event is encoded to JSON once, and the same `Frame` goes to every client. A
WebSocket client with nothing queued gets the frame written to its socket at once
(`wsframes.py`); the others get it through their outbox.

A client that joins with `since=N` first gets the events after N that the feed
has already passed. They come from the feed's cache of recent frames when it
contains them all, otherwise from a replay of its own: a temporary ordered
consumer that stops as soon as it has caught up with the feed. Live frames that
arrive during that replay are held and sent after it, so every client gets each
event once, in seq order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import msgspec
from stepwise_libs.events import Event
from stepwise_libs.jetstream import EventStore

from .wsframes import FrameWriter, text_frame

logger = logging.getLogger(__name__)

# WebSocket close codes this gateway uses (4000-4999 are free for applications).
CLOSE_TOO_SLOW = (
    4008  # the client fell more than the buffer behind; reconnect with since=<last seq>
)
CLOSE_NOT_FOUND = 4404  # no session with this id
CLOSE_INVALID = 4422  # invalid query parameter
CLOSE_UNAVAILABLE = 1013  # NATS is not connected; try again later

# Recent frames a feed keeps for clients that join, bounded by count and by JSON characters.
CACHE_FRAMES = 1000
CACHE_BYTES = 4 * 1024 * 1024

_encoder = msgspec.json.Encoder()


class Frame:
    """One event, encoded once and sent as is to every client of its session."""

    __slots__ = ("_sse", "_ws", "seq", "text", "type")

    def __init__(self, event: Event) -> None:
        self.seq = event.seq
        self.type = event.type
        self.text = _encoder.encode(event).decode()
        self._sse: bytes | None = None
        self._ws: bytes | None = None

    def ws(self) -> bytes:
        """Build the WebSocket text frame of this event on first use, then reuse it."""
        if self._ws is None:
            self._ws = text_frame(self.text.encode())
        return self._ws

    def sse(self) -> bytes:
        """Build the server-sent-events frame of this event on first use, then reuse it."""
        if self._sse is None:
            self._sse = b"id: %d\nevent: %s\ndata: %s\n\n" % (
                self.seq,
                self.type.encode(),
                self.text.encode(),
            )
        return self._sse


class Outbox:
    """Queue of what one client still has to receive; full means the client is too slow."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.overflowed = asyncio.Event()
        self.last_sent_seq = 0
        # True from `get` until the sender calls `done`: an item is on its way out.
        self._sending = False

    @property
    def idle(self) -> bool:
        """Whether nothing is queued or being sent, so a new frame may bypass the queue."""
        return not self._items and not self._sending

    def put(self, item: Any) -> bool:
        """Queue an item; on a full queue mark the client as too slow and return False."""
        if len(self._items) >= self.capacity:
            self.overflowed.set()
            return False
        self._items.append(item)
        self._ready.set()
        if len(self._items) > self.capacity // 2:
            self._room.clear()
        return True

    async def get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        self._sending = True
        if len(self._items) <= self.capacity // 2:
            self._room.set()
        return item

    def done(self) -> None:
        """Mark the item from the last `get` as sent."""
        self._sending = False

    async def wait_for_room(self) -> None:
        """Wait until at most half the queue is used, leaving the rest for live items."""
        await self._room.wait()


class Subscriber:
    """One streaming client of a feed: its outbox, and what it has been given so far."""

    def __init__(
        self, session_id: str, since: int, capacity: int, writer: FrameWriter | None = None
    ) -> None:
        self.session_id = session_id
        self.outbox = Outbox(capacity)
        # Writes a frame to a WebSocket client's socket at once, or returns False. None for SSE.
        self.writer = writer
        # Highest seq queued for this client. Frames at or below it are not queued again.
        self.queued = since
        # Live frames that arrived while the client's own replay runs, or None once it is live.
        self.held: list[Frame] | None = None
        self.failed = asyncio.Event()
        self.error: BaseException | None = None

    def offer(self, frame: Frame) -> None:
        """Take one live frame from the feed."""
        if self.held is None:
            self.queue(frame)
        elif len(self.held) < self.outbox.capacity:
            self.held.append(frame)
        else:
            # The replay is far behind, so drop the held frames: it reads them from the stream.
            self.held.clear()

    def queue(self, frame: Frame) -> None:
        """Queue a frame newer than the last one queued, unless the outbox has overflowed."""
        if frame.seq <= self.queued or self.outbox.overflowed.is_set():
            return
        # Only with nothing queued before it, so frames still reach the client in seq order.
        if self.writer is not None and self.outbox.idle and self.writer(frame.ws()):
            self.queued = frame.seq
            self.outbox.last_sent_seq = frame.seq
            return
        if self.outbox.put(frame):
            self.queued = frame.seq
        else:
            logger.warning(
                "streaming client fell behind; closing it",
                extra={
                    "session_id": self.session_id,
                    "seq": frame.seq,
                    "buffer": self.outbox.capacity,
                },
            )

    def go_live(self) -> None:
        """Queue the held frames and take live frames directly from now on."""
        held, self.held = self.held or [], None
        for frame in held:
            self.queue(frame)

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.failed.set()


class SessionFeed:
    """The one tail of a session's events that all of its clients in this process share."""

    def __init__(self, store: EventStore, session_id: str, since: int, on_end: Any) -> None:
        self.store = store
        self.session_id = session_id
        # Seq of the last frame handed to the subscribers (or the seq the tail starts after).
        self.last_seq = since
        self.subscribers: set[Subscriber] = set()
        self._cache: deque[Frame] = deque()
        self._cache_bytes = 0
        self._on_end = on_end
        self.task = asyncio.create_task(self._run(since), name=f"feed-{session_id}")

    async def _run(self, since: int) -> None:
        try:
            async with contextlib.aclosing(self.store.tail(self.session_id, since)) as events:
                async for event in events:
                    frame = Frame(event)
                    self.last_seq = frame.seq
                    self._remember(frame)
                    for subscriber in tuple(self.subscribers):
                        subscriber.offer(frame)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # NATS went away or the tail broke, so every client fails
            logger.warning("event tail failed: %s", error, extra={"session_id": self.session_id})
            for subscriber in tuple(self.subscribers):
                subscriber.fail(error)
        finally:
            self._on_end(self)

    def _remember(self, frame: Frame) -> None:
        self._cache.append(frame)
        self._cache_bytes += len(frame.text)
        while len(self._cache) > CACHE_FRAMES or (
            self._cache_bytes > CACHE_BYTES and len(self._cache) > 1
        ):
            self._cache_bytes -= len(self._cache.popleft().text)

    def attach(self, subscriber: Subscriber) -> list[Frame] | None:
        """Add a subscriber and return the frames it misses before it can take live ones.

        Returns [] when it is live already, the cached frames it misses, or None when
        it must replay from the stream. Runs without awaiting, so no frame passes
        between reading `last_seq` and joining: frames up to `last_seq` come from the
        cache or the stream, later ones from the feed.
        """
        self.subscribers.add(subscriber)
        if subscriber.queued >= self.last_seq:
            return []
        subscriber.held = []
        if self._cache and self._cache[0].seq <= subscriber.queued + 1:
            missed = [frame for frame in self._cache if frame.seq > subscriber.queued]
            if len(missed) <= subscriber.outbox.capacity // 2:
                for frame in missed:
                    subscriber.queue(frame)
                subscriber.go_live()
                return []
            return missed
        return None

    def detach(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    async def replay(self, subscriber: Subscriber, cached: list[Frame] | None) -> None:
        """Give the subscriber what it misses until it catches up with the feed.

        Cached frames and events read from the stream both wait for room in the outbox,
        so a client resuming far behind reads its backlog at its own pace. Live frames
        that arrive meanwhile are held, and dropped to be read from the stream when the
        held list outgrows the buffer.
        """
        try:
            for frame in cached or ():
                await subscriber.outbox.wait_for_room()
                subscriber.queue(frame)
                if self._caught_up(subscriber):
                    return
            if self._caught_up(subscriber):
                return
            tail = self.store.tail(self.session_id, subscriber.queued)
            async with contextlib.aclosing(tail) as events:
                async for event in events:
                    await subscriber.outbox.wait_for_room()
                    subscriber.queue(Frame(event))
                    if subscriber.outbox.overflowed.is_set() or self._caught_up(subscriber):
                        return
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.warning("event replay failed: %s", error, extra={"session_id": self.session_id})
            subscriber.fail(error)

    def _caught_up(self, subscriber: Subscriber) -> bool:
        """Switch the subscriber to live frames once nothing lies between its replay and them."""
        held = subscriber.held
        if held is None:
            return True
        if (held and held[0].seq <= subscriber.queued + 1) or (
            not held and self.last_seq <= subscriber.queued
        ):
            subscriber.go_live()
            return True
        return False


class FeedHub:
    """The session feeds of one gateway process, started on a session's first client."""

    def __init__(self) -> None:
        self._feeds: dict[str, SessionFeed] = {}

    def feed_count(self) -> int:
        return len(self._feeds)

    def join(
        self,
        store: EventStore,
        session_id: str,
        since: int,
        capacity: int,
        last_seq: int,
        writer: FrameWriter | None = None,
    ) -> tuple[SessionFeed, Subscriber, asyncio.Task[None] | None]:
        """Subscribe a client to the session's feed, starting the feed if it has none.

        `last_seq` is the session's last seq as the caller read it; a new feed starts
        after min(since, last_seq). `writer` writes frames straight to a WebSocket
        client's socket. Returns the feed, the subscriber and the task of its replay,
        if it needs one.
        """
        feed = self._feeds.get(session_id)
        if feed is None or feed.task.done():
            feed = SessionFeed(store, session_id, min(since, last_seq), self._ended)
            self._feeds[session_id] = feed
        subscriber = Subscriber(session_id, since, capacity, writer)
        missed = feed.attach(subscriber)
        replay = None
        if missed is None or missed:
            replay = asyncio.create_task(
                feed.replay(subscriber, missed), name=f"replay-{session_id}"
            )
        return feed, subscriber, replay

    async def leave(
        self, feed: SessionFeed, subscriber: Subscriber, replay: asyncio.Task[None] | None
    ) -> None:
        """Unsubscribe a client, and stop the feed when it was the last one."""
        feed.detach(subscriber)
        tasks = [replay] if replay is not None else []
        if not feed.subscribers and self._feeds.get(feed.session_id) is feed:
            del self._feeds[feed.session_id]
            tasks.append(feed.task)
        await cancel_all(*tasks)

    def _ended(self, feed: SessionFeed) -> None:
        if self._feeds.get(feed.session_id) is feed:
            del self._feeds[feed.session_id]

    async def stop(self) -> None:
        feeds, self._feeds = list(self._feeds.values()), {}
        await cancel_all(*(feed.task for feed in feeds))


def is_event(item: Any) -> bool:
    return isinstance(item, Frame)


async def cancel_all(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task
