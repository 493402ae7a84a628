"""Connection, topology and the append / read / tail helpers on JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import msgspec
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
# JetStream error code returned when a stream does not allow atomic batch publishes.
ATOMIC_PUBLISH_DISABLED = 10174

# Number of appends waiting for one session from which they are written as one atomic
# batch. A batch costs about 4 ms on the server whatever its size (measured with
# nats-server 2.15 on 2 cores), against about 0.3 ms for one append, so smaller groups
# go one at a time.
BATCH_MIN = 32
# The server's limit on the messages of one atomic batch.
BATCH_MAX = 1000

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


class BatchNotSupportedError(RuntimeError):
    """Raised when nats-server acknowledged an atomic batch as a single message."""

    def __init__(self, position: int) -> None:
        super().__init__(
            f"the batch commit's acknowledgement (stream position {position}) has no batch count"
        )
        self.position = position


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
        if "permissions violation" in str(error).lower():
            # Not an outage: this service's NATS user may not use a subject it needs.
            logger.error(
                "nats denied a request: %s; add the subject to this service's user in the "
                "NATS permissions",
                error,
                extra={"client": name},
            )
            return
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
        allow_atomic=True,
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


@dataclass(eq=False)
class _SessionWrites:
    """The appends of one session that wait for the write in progress, in call order."""

    queue: deque[_Pending] = field(default_factory=deque)
    # True while an append of the session is being written.
    busy: bool = False
    # The task writing the queue, once the caller that wrote first has returned.
    drain: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Pending:
    """An append waiting for its turn, and the future its caller awaits."""

    event: Event
    future: asyncio.Future[Event] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # True once a writer has claimed the event, after which it may be stored.
    claimed: bool = False

    def resolve(self, event: Event) -> None:
        """Hand the stored event to the caller, unless the caller was cancelled."""
        if not self.future.done():
            self.future.set_result(event)


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
        # The sessions with an append being written, and the appends waiting behind it.
        self._writes: dict[str, _SessionWrites] = {}
        # False once the stream rejected an atomic batch: appends then go one at a time.
        self._batch: bool | None = None

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
        """Append one event to a session and return it with its `seq` and `position`.

        Appends to one session are stored in the order of the calls. A caller may start
        many without awaiting each (with `asyncio.gather`, say). When `BATCH_MIN` or
        more wait for the same session, the writer stores them as one atomic batch,
        which takes one round trip instead of one per event.
        """
        event = new_event(session_id, 0, payload, command_id=command_id, event_id=event_id)
        writes = self._writes.get(session_id)
        if writes is None:
            writes = self._writes[session_id] = _SessionWrites()
        if writes.busy:
            # Another append of this session is being written: wait in line behind it.
            pending = _Pending(event)
            writes.queue.append(pending)
            try:
                return await pending.future
            except asyncio.CancelledError:
                if not pending.claimed:
                    writes.queue.remove(pending)
                raise
        writes.busy = True
        try:
            return await self._append_one(session_id, event)
        finally:
            self._hand_over(session_id, writes)

    def _hand_over(self, session_id: str, writes: _SessionWrites) -> None:
        """Start a task that writes the appends queued meanwhile, or mark the session idle."""
        if writes.queue:
            writes.drain = asyncio.create_task(
                self._drain(session_id, writes), name=f"append-{session_id}"
            )
            return
        writes.busy = False
        if self._writes.get(session_id) is writes:
            del self._writes[session_id]

    async def _drain(self, session_id: str, writes: _SessionWrites) -> None:
        """Write a session's queued appends in order, as atomic batches when enough wait."""
        try:
            while writes.queue:
                batch = self._batch is not False and len(writes.queue) >= BATCH_MIN
                count = min(len(writes.queue), BATCH_MAX) if batch else 1
                claimed = [writes.queue.popleft() for _ in range(count)]
                for pending in claimed:
                    pending.claimed = True
                try:
                    if count == 1:
                        claimed[0].resolve(await self._append_one(session_id, claimed[0].event))
                    else:
                        await self._append_batch(session_id, claimed)
                except Exception as error:
                    # The callers get the error; the appends queued after them still run.
                    _fail(claimed, error)
        except BaseException as error:
            _fail(list(writes.queue), error)
            writes.queue.clear()
            raise
        finally:
            writes.drain = None
            writes.busy = False
            if not writes.queue and self._writes.get(session_id) is writes:
                del self._writes[session_id]

    async def _append_one(self, session_id: str, event: Event) -> Event:
        subject = subjects.session_events_subject(session_id)
        conflicts = 0
        unavailable = 0
        deadline = time.monotonic() + self._unavailable_timeout
        while True:
            tail = await self._tail(session_id)
            event.seq = tail.seq + 1
            try:
                # nc.request rather than js.publish, because decoding the ack with msgspec
                # saves about 5% of an append's CPU (profiled) over nats-py's dataclass.
                response = await self._js._nc.request(
                    subject,
                    encode_event(event),
                    headers={
                        "Nats-Msg-Id": event.id,
                        "Nats-Expected-Last-Subject-Sequence": str(tail.position),
                        subjects.SEQ_HEADER: str(event.seq),
                    },
                    timeout=5,
                )
                ack = _pub_ack(response.data)
            except APIError as error:
                if error.err_code != WRONG_LAST_SEQUENCE:
                    raise
                conflicts += 1
                await self._after_conflict(session_id, conflicts, error)
                continue
            except (NatsTimeoutError, NoRespondersError) as error:
                # The stream is electing a leader or the server is away. The message may
                # still be stored: the retry carries the same Nats-Msg-Id, so the server
                # reports it as a duplicate instead of storing it twice.
                unavailable += 1
                await self._after_unavailable(session_id, unavailable, deadline, error)
                continue
            if ack.duplicate:
                stored = await self._js.get_msg(subjects.EVENTS_STREAM, seq=ack.seq, direct=True)
                event = decode_event(stored.data or b"", ack.seq)
                self._tails[session_id] = _Tail(ack.seq, event.seq)
                return event
            self._tails[session_id] = _Tail(ack.seq, event.seq)
            event.position = ack.seq
            return event

    async def _append_batch(self, session_id: str, batch: list[_Pending]) -> None:
        """Store the events as one atomic batch and resolve each caller's future.

        The first message carries Nats-Expected-Last-Subject-Sequence, so the batch is
        stored only if no other writer moved the session meanwhile. An atomic batch
        cannot carry Nats-Msg-Id, so a retry after a lost acknowledgement is recognised
        by the session's last stored event being this batch's last one.
        """
        events = [pending.event for pending in batch]
        subject = subjects.session_events_subject(session_id)
        # nats-py 2.16 has no atomic batch helper, so the batch goes as plain messages.
        nc = self._js._nc
        conflicts = 0
        unavailable = 0
        deadline = time.monotonic() + self._unavailable_timeout
        try:
            while True:
                tail = await self._tail(session_id)
                for index, event in enumerate(events):
                    event.seq = tail.seq + 1 + index
                batch_id = uuid.uuid4().hex
                last = len(events) - 1
                try:
                    for index, event in enumerate(events[:last]):
                        headers = {
                            "Nats-Batch-Id": batch_id,
                            "Nats-Batch-Sequence": str(index + 1),
                            subjects.SEQ_HEADER: str(event.seq),
                        }
                        reply = ""
                        if index == 0:
                            headers["Nats-Expected-Last-Subject-Sequence"] = str(tail.position)
                            # The server requires a reply subject on a batch's first message.
                            # Its empty reply carries nothing the commit's does not.
                            reply = nc.new_inbox()
                        await nc.publish(subject, encode_event(event), reply=reply, headers=headers)
                    response = await nc.request(
                        subject,
                        encode_event(events[last]),
                        headers={
                            "Nats-Batch-Id": batch_id,
                            "Nats-Batch-Sequence": str(last + 1),
                            "Nats-Batch-Commit": "1",
                            subjects.SEQ_HEADER: str(events[last].seq),
                        },
                        timeout=5,
                    )
                    position = _batch_position(response.data, len(events))
                except BatchNotSupportedError as error:
                    # The events are stored, one message each, in one burst from this
                    # writer. NOTE: their positions assume no other subject's message came
                    # between them.
                    logger.warning(
                        "nats-server stored an atomic batch as single messages; appending "
                        "one event at a time from now on (use nats-server 2.12 or later): %s",
                        error,
                        extra={"session_id": session_id},
                    )
                    self._batch = False
                    position = error.position
                except APIError as error:
                    if error.err_code == ATOMIC_PUBLISH_DISABLED:
                        logger.warning(
                            "the events stream does not allow atomic batches, so events are "
                            "appended one at a time; restart a service to update the stream",
                            extra={"session_id": session_id},
                        )
                        self._batch = False
                        for pending in batch:
                            pending.resolve(await self._append_one(session_id, pending.event))
                        return
                    if error.err_code != WRONG_LAST_SEQUENCE:
                        raise
                    stored = await self._stored_batch(session_id, events)
                    if stored is None:
                        conflicts += 1
                        await self._after_conflict(session_id, conflicts, error)
                        continue
                    position = stored
                except (NatsTimeoutError, NoRespondersError) as error:
                    # The batch may be stored. The retry then meets a wrong last sequence,
                    # and `_stored_batch` finds this batch's events.
                    unavailable += 1
                    await self._after_unavailable(session_id, unavailable, deadline, error)
                    continue
                first = position - last
                for index, (pending, event) in enumerate(zip(batch, events, strict=True)):
                    event.position = first + index
                    pending.resolve(event)
                self._tails[session_id] = _Tail(position, events[last].seq)
                return
        except BaseException as error:
            _fail(batch, error)
            raise

    async def _stored_batch(self, session_id: str, events: list[Event]) -> int | None:
        """Return the stream position of the batch's last event if it is stored already."""
        try:
            message = await self._js.get_msg(
                subjects.EVENTS_STREAM,
                subject=subjects.session_events_subject(session_id),
                direct=False,
            )
        except NotFoundError:
            return None
        stored = decode_event(message.data or b"", message.seq or 0)
        if stored.id != events[-1].id or stored.seq != events[-1].seq:
            return None
        return message.seq

    async def _tail(self, session_id: str) -> _Tail:
        tail = self._tails.get(session_id)
        if tail is None:
            position, seq = await self.last(session_id)
            tail = self._tails[session_id] = _Tail(position, seq)
        return tail

    async def _after_conflict(self, session_id: str, conflicts: int, error: Exception) -> None:
        """Forget the session's cached tail after another writer moved it, or give up."""
        if conflicts >= self._max_attempts:
            raise AppendConflictError(session_id, conflicts) from error
        logger.debug(
            "append conflict, re-reading tail",
            extra={"session_id": session_id, "attempt": conflicts},
        )
        self._tails.pop(session_id, None)
        # A jittered pause keeps a writer with a warm cache from winning every race.
        await asyncio.sleep(random.uniform(0, 0.002 * conflicts))

    async def _after_unavailable(
        self, session_id: str, attempt: int, deadline: float, error: Exception
    ) -> None:
        """Wait before retrying an append that found no stream leader, or re-raise."""
        if time.monotonic() >= deadline:
            raise error
        logger.warning(
            "append failed (%s), retrying",
            type(error).__name__,
            extra={"session_id": session_id, "attempt": attempt},
        )
        await asyncio.sleep(min(0.05 * 2**attempt, 1.0))

    def forget(self, session_id: str) -> None:
        """Drop cached state about a session that this process no longer writes to."""
        self._tails.pop(session_id, None)

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


def _fail(batch: list[_Pending], error: BaseException) -> None:
    """Pass a write's failure to each caller still waiting in the batch."""
    for pending in batch:
        if pending.future.done():
            continue
        if isinstance(error, asyncio.CancelledError):
            pending.future.cancel()
        else:
            pending.future.set_exception(error)
            # Mark it retrieved: a caller cancelled meanwhile never awaits it.
            pending.future.exception()


class _PubAck(msgspec.Struct):
    """The fields of a JetStream publish acknowledgement that an append reads."""

    seq: int = 0
    duplicate: bool = False
    count: int | None = None
    error: dict[str, Any] | None = None


_pub_ack_decoder = msgspec.json.Decoder(_PubAck)


def _pub_ack(data: bytes) -> _PubAck:
    """Decode a publish acknowledgement, or raise the APIError it carries."""
    ack = _pub_ack_decoder.decode(data)
    if ack.error is not None:
        APIError.from_error(ack.error)  # raises the APIError subclass of the code
    return ack


def _batch_position(data: bytes, count: int) -> int:
    """Return the stream position of a committed batch's last message, or raise its error."""
    ack = _pub_ack(data)
    if ack.count != count:
        # A server before 2.12 ignores the batch headers and stores each message alone.
        raise BatchNotSupportedError(ack.seq)
    return ack.seq


def _seq_of(message: api.RawStreamMsg) -> int:
    headers = message.headers or {}
    value = headers.get(subjects.SEQ_HEADER)
    if value is not None:
        return int(value)
    return decode_event(message.data or b"").seq
