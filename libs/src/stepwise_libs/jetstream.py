"""Connection, topology and the append / read / tail helpers on JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext, api
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)

from . import subjects
from .commands import Command, encode_command
from .events import Event, Payload, decode_event, encode_event, new_event

logger = logging.getLogger(__name__)

# JetStream error code returned when Nats-Expected-Last-Subject-Sequence does not match.
WRONG_LAST_SEQUENCE = 10071

CONTROL_TTL_SECONDS = 300.0
LEASE_TTL_SECONDS = 10.0
COMMAND_DUPLICATE_WINDOW_SECONDS = 600.0
EVENT_DUPLICATE_WINDOW_SECONDS = 120.0
# Secret values expire a day after a session was created, unless the session's run
# ends first (the executor purges them then).
SECRETS_TTL_SECONDS = 24 * 3600.0
# Seconds without a message after which a tail checks whether its consumer has stalled.
TAIL_IDLE_SECONDS = 5.0
# The same for a read, which starts only when more events are stored, so it checks sooner.
READ_IDLE_SECONDS = 1.0


class AppendConflictError(RuntimeError):
    """Raised when an append keeps losing the race for a session's next `seq`."""

    def __init__(self, session_id: str, attempts: int) -> None:
        super().__init__(
            f"could not append to session {session_id} after {attempts} attempts: "
            "other writers kept moving its last sequence"
        )
        self.session_id = session_id
        self.attempts = attempts


class EventReadStalledError(RuntimeError):
    """Raised when a read gets no event for a while although the stream contains more."""

    def __init__(self, session_id: str, received: int, expected: int, seconds: float) -> None:
        super().__init__(
            f"reading session {session_id} stalled: {received} of {expected} events "
            f"arrived, then none for {seconds:.0f} s; check that the events stream has a leader"
        )
        self.session_id = session_id
        self.received = received
        self.expected = expected


def server_urls(url: str) -> list[str]:
    """Split a comma-separated list of NATS URLs, such as the nodes of a cluster."""
    urls = [part.strip() for part in url.split(",") if part.strip()]
    if not urls:
        raise ValueError(f"no NATS URL in {url!r}; give one URL or a comma-separated list")
    return urls


async def connect(url: str, name: str) -> NATS:
    """Connect to NATS, reconnecting for ever after the first connection succeeds.

    `url` may be a comma-separated list of the nodes of a cluster: the client
    connects to any of them and moves to another when its node goes away.
    """

    # While the server is away the client retries every 0.5 s; log the first error of an
    # outage and then one line every 30 s, with the number of errors in between.
    outage = {"errors": 0, "logged_at": 0.0}

    async def on_error(error: Exception) -> None:
        outage["errors"] += 1
        now = time.monotonic()
        if outage["errors"] == 1 or now - outage["logged_at"] >= 30.0:
            outage["logged_at"] = now
            logger.warning(
                "nats connection error: %s",
                error,
                extra={"client": name, "errors_in_outage": outage["errors"]},
            )

    async def on_disconnected() -> None:
        logger.warning("nats disconnected", extra={"client": name})

    async def on_reconnected() -> None:
        logger.info(
            "nats reconnected", extra={"client": name, "errors_in_outage": outage["errors"]}
        )
        outage["errors"] = 0

    return await nats.connect(
        servers=server_urls(url),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )


async def ensure_topology(
    js: JetStreamContext, replicas: int = 1, unavailable_timeout: float = 60.0
) -> None:
    """Create the streams, KV buckets and object store, or bring their config up to date.

    Safe to call from every service at start-up, any number of times. While JetStream
    is unavailable (a cluster electing its meta leader after a node died, or still
    forming), it retries for up to `unavailable_timeout` seconds, then raises the error.
    """
    deadline = time.monotonic() + unavailable_timeout
    attempt = 0
    while True:
        try:
            await _create_topology(js, replicas)
            return
        except (NatsTimeoutError, NoRespondersError, NoStreamResponseError, APIError) as error:
            # A forming or electing cluster returns a 5xx code, such as 503 "JetStream
            # system temporarily unavailable". Any other API error is final.
            if isinstance(error, APIError) and error.code not in (500, 503):
                raise
            attempt += 1
            if time.monotonic() >= deadline:
                raise
            logger.warning(
                "creating the JetStream topology failed (%s: %s), retrying",
                type(error).__name__,
                error,
                extra={"attempt": attempt},
            )
            await asyncio.sleep(min(0.1 * 2**attempt, 2.0))


async def _create_topology(js: JetStreamContext, replicas: int) -> None:
    events = api.StreamConfig(
        name=subjects.EVENTS_STREAM,
        subjects=[f"{subjects.EVENTS_PREFIX}.*"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=EVENT_DUPLICATE_WINDOW_SECONDS,
        allow_direct=True,
        deny_delete=True,
    )
    commands = api.StreamConfig(
        name=subjects.COMMANDS_STREAM,
        subjects=[f"{subjects.PLANNER_COMMANDS}.*", f"{subjects.EXECUTOR_COMMANDS}.*"],
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=COMMAND_DUPLICATE_WINDOW_SECONDS,
    )
    for config in (events, commands):
        await _ensure_stream(js, config)

    for bucket, ttl in (
        (subjects.CONTROL_BUCKET, CONTROL_TTL_SECONDS),
        (subjects.LEASES_BUCKET, LEASE_TTL_SECONDS),
    ):
        try:
            await js.key_value(bucket)
        except BucketNotFoundError:
            await js.create_key_value(
                api.KeyValueConfig(bucket=bucket, ttl=ttl, history=1, replicas=replicas)
            )
    try:
        await js.key_value(subjects.SECRETS_BUCKET)
    except BucketNotFoundError:
        # Memory storage: the values are never written to the server's disk, and a
        # nats-server restart loses them (a step that needs them then fails, saying so).
        await js.create_key_value(
            api.KeyValueConfig(
                bucket=subjects.SECRETS_BUCKET,
                ttl=SECRETS_TTL_SECONDS,
                history=1,
                replicas=replicas,
                storage=api.StorageType.MEMORY,
            )
        )
    try:
        await js.object_store(subjects.SCREENSHOTS_BUCKET)
    except BucketNotFoundError:
        await js.create_object_store(
            subjects.SCREENSHOTS_BUCKET,
            config=api.ObjectStoreConfig(storage=api.StorageType.FILE, replicas=replicas),
        )


async def _ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    assert config.name is not None, "a stream config without a name"
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        logger.info("created stream %s", config.name)
        return
    await js.update_stream(config)


async def publish_command(js: JetStreamContext, subject: str, command: Command) -> api.PubAck:
    """Store a command on the commands stream, deduplicated by its `command_id`."""
    return await js.publish(
        subject,
        encode_command(command),
        headers={"Nats-Msg-Id": command.command_id},
        timeout=5,
    )


@dataclass
class _Tail:
    position: int
    seq: int


class EventStore:
    """Appends to and reads from the per-session subjects of the events stream.

    An append sends `Nats-Expected-Last-Subject-Sequence`, so two writers on one
    session cannot both take the same `seq`; the loser re-reads the tail and retries.
    """

    def __init__(
        self, js: JetStreamContext, max_attempts: int = 50, unavailable_timeout: float = 30.0
    ) -> None:
        self._js = js
        # Conflicts with other writers allowed per append before giving up.
        self._max_attempts = max_attempts
        # Seconds an append keeps retrying while the stream has no leader or NATS is away.
        self._unavailable_timeout = unavailable_timeout
        self._tails: dict[str, _Tail] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def last(self, session_id: str, *, direct: bool = True) -> tuple[int, int]:
        """Return (stream position, seq) of the session's last event, or (0, 0) if it has none.

        A direct get may be served by a replica that lags the stream leader, so pass
        `direct=False` to ask the leader.
        """
        try:
            message = await self._js.get_msg(
                subjects.EVENTS_STREAM,
                subject=subjects.session_events_subject(session_id),
                direct=direct,
            )
        except NotFoundError:
            return 0, 0
        return message.seq or 0, _seq_of(message)

    async def append(
        self,
        session_id: str,
        payload: Payload,
        command_id: str | None = None,
        event_id: str | None = None,
    ) -> Event:
        """Append one event to a session and return it with its `seq` and `position`."""
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            event = new_event(session_id, 0, payload, command_id=command_id, event_id=event_id)
            subject = subjects.session_events_subject(session_id)
            conflicts = 0
            unavailable = 0
            deadline = time.monotonic() + self._unavailable_timeout
            while True:
                tail = self._tails.get(session_id)
                if tail is None:
                    position, seq = await self.last(session_id)
                    tail = self._tails[session_id] = _Tail(position, seq)
                event.seq = tail.seq + 1
                try:
                    ack = await self._js.publish(
                        subject,
                        encode_event(event),
                        headers={
                            "Nats-Msg-Id": event.id,
                            "Nats-Expected-Last-Subject-Sequence": str(tail.position),
                            subjects.SEQ_HEADER: str(event.seq),
                        },
                        timeout=5,
                    )
                except APIError as error:
                    if error.err_code != WRONG_LAST_SEQUENCE:
                        raise
                    conflicts += 1
                    if conflicts >= self._max_attempts:
                        raise AppendConflictError(session_id, conflicts) from error
                    logger.debug(
                        "append conflict, re-reading tail",
                        extra={"session_id": session_id, "attempt": conflicts},
                    )
                    self._tails.pop(session_id, None)
                    # A jittered pause keeps a writer with a warm cache from winning every race.
                    await asyncio.sleep(random.uniform(0, 0.002 * conflicts))
                    continue
                except (NatsTimeoutError, NoStreamResponseError) as error:
                    # The stream is electing a leader or the server is away. The message may
                    # still be stored: the retry carries the same Nats-Msg-Id, so the server
                    # answers it as a duplicate instead of storing it twice.
                    unavailable += 1
                    if time.monotonic() >= deadline:
                        raise
                    logger.warning(
                        "append failed (%s), retrying",
                        type(error).__name__,
                        extra={"session_id": session_id, "attempt": unavailable},
                    )
                    await asyncio.sleep(min(0.05 * 2**unavailable, 1.0))
                    continue
                if ack.duplicate:
                    stored = await self._js.get_msg(
                        subjects.EVENTS_STREAM, seq=ack.seq, direct=True
                    )
                    event = decode_event(stored.data or b"", ack.seq)
                    self._tails[session_id] = _Tail(ack.seq, event.seq)
                    return event
                self._tails[session_id] = _Tail(ack.seq, event.seq)
                event.position = ack.seq
                return event

    def forget(self, session_id: str) -> None:
        """Drop cached state about a session that this process no longer writes to."""
        self._tails.pop(session_id, None)
        self._locks.pop(session_id, None)

    async def position_after(self, session_id: str, since: int) -> int | None:
        """Return the stream position of the first event with `seq > since`, or None if none yet.

        A binary search over stream positions with direct gets, so the cost grows
        with the log of the stream's size and not with `since`.
        """
        subject = subjects.session_events_subject(session_id)
        last_position, last_seq = await self.last(session_id)
        if last_seq <= since:
            return None
        first = await self._next_on_subject(subject, 1)
        assert first is not None
        first_position, first_seq = first
        if since < first_seq:
            return first_position
        # When the session's messages are contiguous in the stream, the guess is exact.
        guess = await self._next_on_subject(subject, first_position + (since + 1 - first_seq))
        if guess is not None and guess[1] == since + 1:
            return guess[0]
        best, low, high = last_position, first_position, last_position
        while low <= high:
            middle = (low + high) // 2
            found = await self._next_on_subject(subject, middle)
            # The position last_position >= middle contains a message of this subject.
            assert found is not None
            position, seq = found
            if seq > since:
                # No message of this subject lies in [middle, position), so the answer is
                # `position` or lies below `middle`.
                best = min(best, position)
                high = middle - 1
            else:
                low = position + 1
        return best

    async def _next_on_subject(self, subject: str, start: int) -> tuple[int, int] | None:
        try:
            message = await self._js.get_msg(
                subjects.EVENTS_STREAM, seq=max(start, 1), subject=subject, next=True, direct=True
            )
        except NotFoundError:
            return None
        return message.seq or 0, _seq_of(message)

    async def read(self, session_id: str, since: int = 0, limit: int | None = None) -> list[Event]:
        """Return the stored events of a session after `since`, at most `limit` of them.

        Raises EventReadStalledError when no event arrives for `unavailable_timeout`
        seconds although the stream contains more.
        """
        _, last_seq = await self.last(session_id)
        if last_seq <= since or limit == 0:
            return []
        wanted = last_seq - since if limit is None else min(limit, last_seq - since)
        events: list[Event] = []
        # aclosing unsubscribes at once instead of when the generator is collected.
        async with contextlib.aclosing(
            self.tail(session_id, since, idle_timeout=READ_IDLE_SECONDS)
        ) as tail:
            while len(events) < wanted:
                try:
                    event = await asyncio.wait_for(anext(tail), self._unavailable_timeout)
                except TimeoutError:
                    raise EventReadStalledError(
                        session_id, len(events), wanted, self._unavailable_timeout
                    ) from None
                events.append(event)
        return events

    async def tail(
        self, session_id: str, since: int = 0, idle_timeout: float = TAIL_IDLE_SECONDS
    ) -> AsyncGenerator[Event, None]:
        """Yield every event of a session after `since`, in order and once each, then live ones.

        Runs until the caller stops iterating. After `idle_timeout` seconds without
        a message it checks the session's last event. When the stream contains events
        that the consumer has not delivered, the consumer has stalled (which happens
        after a JetStream leader change), so it is replaced by a new one that starts
        after the last event delivered.
        """
        subject = subjects.session_events_subject(session_id)
        # The start position comes from one read of the tail, so an event appended while
        # this runs has a higher position and is delivered, never skipped.
        last_position, last_seq = await self.last(session_id)
        position: int | None
        if last_seq > since:
            position = await self.position_after(session_id, since)
        elif last_position:
            position = last_position + 1
        else:
            # The session has no events yet: deliver every message of its subject.
            position = None
        last_seen = since
        while True:
            subscription = await self._subscribe(subject, position)
            try:
                while True:
                    try:
                        message = await subscription.next_msg(timeout=idle_timeout)
                    except NatsTimeoutError:
                        if await self._has_undelivered(session_id, last_seen):
                            break
                        continue
                    stream_position = message.metadata.sequence.stream
                    event = decode_event(message.data, stream_position)
                    position = stream_position + 1
                    if event.seq <= last_seen:
                        continue
                    last_seen = event.seq
                    yield event
            finally:
                try:
                    await subscription.unsubscribe()
                except Exception:  # the connection may already be closed
                    logger.debug("unsubscribe failed", exc_info=True)
            logger.warning(
                "event consumer stalled, starting a new one",
                extra={"session_id": session_id, "seq": last_seen, "position": position},
            )

    async def _subscribe(
        self, subject: str, position: int | None
    ) -> JetStreamContext.PushSubscription:
        """Create an ordered consumer on `subject` from `position`, or from its first message."""
        if position is None:
            policy, config = api.DeliverPolicy.ALL, None
        else:
            policy = api.DeliverPolicy.BY_START_SEQUENCE
            config = api.ConsumerConfig(opt_start_seq=position)
        attempt = 0
        deadline = time.monotonic() + self._unavailable_timeout
        while True:
            try:
                return await self._js.subscribe(
                    subject,
                    stream=subjects.EVENTS_STREAM,
                    ordered_consumer=True,
                    idle_heartbeat=5.0,
                    deliver_policy=policy,
                    config=config,
                )
            except (NatsTimeoutError, NoStreamResponseError, ServiceUnavailableError) as error:
                # The stream is electing a leader or the server is away.
                attempt += 1
                if time.monotonic() >= deadline:
                    raise
                logger.warning(
                    "creating an event consumer failed (%s), retrying",
                    type(error).__name__,
                    extra={"subject": subject, "attempt": attempt},
                )
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))

    async def _has_undelivered(self, session_id: str, last_seen: int) -> bool:
        """Return True when the stream contains an event of the session after seq `last_seen`."""
        try:
            _, last_seq = await self.last(session_id)
        except (NatsTimeoutError, NoStreamResponseError, ServiceUnavailableError) as error:
            logger.debug(
                "reading the last event failed: %s", error, extra={"session_id": session_id}
            )
            return False
        return last_seq > last_seen


def _seq_of(message: api.RawStreamMsg) -> int:
    headers = message.headers or {}
    value = headers.get(subjects.SEQ_HEADER)
    if value is not None:
        return int(value)
    return decode_event(message.data or b"").seq
