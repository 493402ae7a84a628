"""The projector: folds events into session states and writes them to Postgres.

Each batch is written in one transaction that locks the stored position and
applies only the messages above it. Positions missing between the stored one and
the batch are read from the stream with direct gets, because a redelivery after a
crash can arrive after newer messages. The transaction then stores the batch's
last position, so re-applying a batch changes nothing, and two projectors on one
database cannot interleave.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError
from sqlalchemy.ext.asyncio import AsyncEngine
from stepwise_libs import subjects
from stepwise_libs.events import Event
from stepwise_libs.fold import SessionState, apply, fold
from stepwise_libs.health import start_health_server
from stepwise_libs.jetstream import EventStore, connect, ensure_topology

from . import database
from .errors import EarlierEventsError, MissingPositionError
from .handlers import DATABASE_UNAVAILABLE, BatchWriter, Record, decode_record, handle_batch
from .settings import ProjectorSettings

logger = logging.getLogger(__name__)

EVENTS_FILTER = f"{subjects.EVENTS_PREFIX}.*"
DEFAULT_CACHE_SESSIONS = 10_000
# Seconds JetStream waits for an ack before redelivering; the batch writer sends
# in-progress signals while it retries, so this only bounds a crashed projector.
ACK_WAIT_SECONDS = 60.0
# Idle fetches between two checks that the durable consumer still exists.
IDLE_FETCHES_PER_CHECK = 10


@dataclass
class BatchResult:
    """Outcome of one write: the count of positions applied and the sessions touched."""

    applied: int
    position: int
    sessions: dict[str, int] = field(default_factory=dict)


class SessionCache:
    """The folded state of recently seen sessions, least recently used dropped first."""

    def __init__(self, max_sessions: int = DEFAULT_CACHE_SESSIONS) -> None:
        self._states: OrderedDict[str, SessionState] = OrderedDict()
        self._max_sessions = max_sessions

    def get(self, session_id: str) -> SessionState | None:
        state = self._states.get(session_id)
        if state is not None:
            self._states.move_to_end(session_id)
        return state

    def put(self, state: SessionState) -> None:
        self._states[state.session_id] = state
        self._states.move_to_end(state.session_id)
        while len(self._states) > self._max_sessions:
            self._states.popitem(last=False)

    def discard(self, session_id: str) -> None:
        self._states.pop(session_id, None)


class Projector:
    """Applies batches of stream records to the read models, once each, in stream order."""

    def __init__(
        self,
        engine: AsyncEngine,
        js: JetStreamContext,
        cache: SessionCache | None = None,
    ) -> None:
        self._engine = engine
        self._js = js
        self._store = EventStore(js)
        self._cache = cache or SessionCache()

    async def apply(self, records: Sequence[Record]) -> BatchResult:
        """Apply the records above the stored position in one transaction."""
        ordered = sorted({record.position: record for record in records}.values(), key=_position)
        touched = {record.event.session_id for record in ordered if record.event is not None}
        try:
            async with self._engine.begin() as connection:
                stored = await database.lock_position(connection)
                fresh = [record for record in ordered if record.position > stored]
                if not fresh:
                    return BatchResult(applied=0, position=stored)
                fresh = await self._fill_gaps(stored, fresh)
                events = [record.event for record in fresh if record.event is not None]
                touched |= {event.session_id for event in events}
                states = await self._fold(events)

                await database.insert_events(connection, events)
                await database.write_sessions(connection, list(states.values()))
                await database.notify_projected_all(connection, list(states.values()))
                position = fresh[-1].position
                await database.set_position(connection, position)
        except BaseException:
            # The states were folded past what was committed; rebuild them next time.
            for session_id in touched:
                self._cache.discard(session_id)
            raise
        logger.debug(
            "projected batch",
            extra={
                "from_position": fresh[0].position,
                "position": position,
                "events": len(events),
                "sessions": len(states),
            },
        )
        return BatchResult(
            applied=len(fresh),
            position=position,
            sessions={session_id: state.last_seq for session_id, state in states.items()},
        )

    async def _fill_gaps(self, stored: int, fresh: list[Record]) -> list[Record]:
        """Return `fresh` plus any stream message between `stored` and its last position."""
        known = {record.position: record for record in fresh}
        top = fresh[-1].position
        expected = stored + 1
        filled = 0
        while expected <= top:
            if expected in known:
                expected += 1
                continue
            try:
                # The next message at or after `expected`, from any replica.
                message = await self._js.get_msg(
                    subjects.EVENTS_STREAM,
                    seq=expected,
                    subject=EVENTS_FILTER,
                    next=True,
                    direct=True,
                )
            except NotFoundError:
                raise MissingPositionError(expected, top) from None
            position = message.seq or expected
            if position != expected:
                # The events stream denies deletes, so every position up to `top` exists on
                # the leader. A replica that lags returns a later message or none.
                # NOTE: a stream with a real hole here (a message removed by hand) keeps
                # this batch failing, with an error logged on each retry.
                raise MissingPositionError(expected, top)
            if position not in known:
                known[position] = decode_record(message.subject or "", message.data, position)
                filled += 1
            expected = position + 1
        if filled:
            logger.info(
                "read %d events missing from the batch directly from the stream",
                filled,
                extra={"from_position": stored + 1, "to_position": top},
            )
        return [known[position] for position in sorted(known)]

    async def _fold(self, events: list[Event]) -> dict[str, SessionState]:
        states: dict[str, SessionState] = {}
        for event in events:
            state = states.get(event.session_id)
            if state is None:
                state = await self._state_before(event)
                states[event.session_id] = state
            if event.seq > state.last_seq + 1:
                logger.warning(
                    "session seq jumps from %d to %d; events in between are missing",
                    state.last_seq,
                    event.seq,
                    extra={"session_id": event.session_id, "position": event.position},
                )
            apply(state, event)
        for state in states.values():
            self._cache.put(state)
        return states

    async def _state_before(self, event: Event) -> SessionState:
        """Return the session's state folded up to just before `event`."""
        cached = self._cache.get(event.session_id)
        if cached is not None and cached.last_seq == event.seq - 1:
            return cached
        if event.seq == 1:
            return SessionState(session_id=event.session_id)
        try:
            earlier = await self._store.read(event.session_id, 0, limit=event.seq - 1)
        except Exception as error:
            raise EarlierEventsError(event.session_id, event.seq, str(error)) from error
        if [item.seq for item in earlier] != list(range(1, event.seq)):
            raise EarlierEventsError(
                event.session_id, event.seq, f"the stream returned {len(earlier)} events"
            )
        logger.debug(
            "rebuilt session state from the stream",
            extra={"session_id": event.session_id, "events": len(earlier)},
        )
        return fold(event.session_id, earlier)


def _position(record: Record) -> int:
    return record.position


async def ensure_durable(
    js: JetStreamContext, position: int, max_ack_pending: int, reset: bool = False
) -> None:
    """Make the durable consumer deliver what the read models lack, from `position + 1`.

    A consumer that acknowledged messages past `position` belongs to other read
    models, such as a new or rebuilt database. It is deleted and created again at
    `position + 1`, and so is any consumer when `reset` is set.
    """
    config = api.ConsumerConfig(
        durable_name=subjects.PROJECTOR_CONSUMER,
        filter_subject=EVENTS_FILTER,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_SECONDS,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=position + 1,
    )
    stream = await js.stream_info(subjects.EVENTS_STREAM)
    if position > stream.state.last_seq:
        logger.error(
            "the read models are at position %d but the events stream ends at %d; "
            "run `stepwise-projector rebuild` to project the stream as it is",
            position,
            stream.state.last_seq,
        )
    try:
        info = await js.consumer_info(subjects.EVENTS_STREAM, subjects.PROJECTOR_CONSUMER)
    except NotFoundError:
        await js.add_consumer(subjects.EVENTS_STREAM, config)
        logger.info("created the durable consumer", extra={"start_position": position + 1})
        return
    acknowledged = info.ack_floor.stream_seq if info.ack_floor else 0
    if not reset and acknowledged <= position:
        return
    if not reset:
        logger.warning(
            "the durable consumer acknowledged position %d but the read models end at %d; "
            "creating it again",
            acknowledged,
            position,
        )
    await js.delete_consumer(subjects.EVENTS_STREAM, subjects.PROJECTOR_CONSUMER)
    await js.add_consumer(subjects.EVENTS_STREAM, config)
    logger.info("created the durable consumer again", extra={"start_position": position + 1})


async def stored_position(
    engine: AsyncEngine, stop: asyncio.Event, max_backoff: float
) -> int | None:
    """Return the stored position, waiting for Postgres; None if `stop` is set meanwhile."""
    delay = 0.5
    attempt = 0
    while not stop.is_set():
        attempt += 1
        try:
            async with engine.connect() as connection:
                return await database.read_position(connection)
        except DATABASE_UNAVAILABLE as error:
            logger.warning(
                "database unavailable, retrying in %.1f s: %s",
                delay,
                error,
                extra={"attempt": attempt},
            )
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            delay = min(max_backoff, delay * 2)
    return None


class Subscription:
    """The pull subscription on the durable consumer, bound again after it is replaced."""

    def __init__(self, js: JetStreamContext, engine: AsyncEngine, settings: ProjectorSettings):
        self._js = js
        self._engine = engine
        self._settings = settings
        self._pull: JetStreamContext.PullSubscription | None = None

    @property
    def max_ack_pending(self) -> int:
        return max(4 * self._settings.batch_size, 1000)

    async def bind(self, stop: asyncio.Event) -> bool:
        """Align the durable consumer with the read models and subscribe to it."""
        if self._pull is not None:
            await _unsubscribe(self._pull)
            self._pull = None
        position = await stored_position(self._engine, stop, self._settings.max_backoff)
        if position is None:
            return False
        await ensure_durable(self._js, position, self.max_ack_pending)
        self._pull = await self._js.pull_subscribe_bind(
            durable=subjects.PROJECTOR_CONSUMER, stream=subjects.EVENTS_STREAM
        )
        return True

    async def fetch(self) -> list[Msg]:
        assert self._pull is not None, "bind() first"
        return await self._pull.fetch(
            self._settings.batch_size, timeout=self._settings.fetch_timeout
        )

    async def consumer_exists(self) -> bool:
        try:
            await self._js.consumer_info(subjects.EVENTS_STREAM, subjects.PROJECTOR_CONSUMER)
        except NotFoundError:
            return False
        return True

    async def close(self) -> None:
        if self._pull is not None:
            await _unsubscribe(self._pull)


async def _unsubscribe(pull: JetStreamContext.PullSubscription) -> None:
    try:
        await pull.unsubscribe()
    except Exception:
        logger.debug("unsubscribe failed", exc_info=True)


async def run_projector(
    settings: ProjectorSettings, stop: asyncio.Event, health_at: tuple[str, int] | None = None
) -> None:
    """Project the events stream into the read models until `stop` is set.

    With `health_at` (or STEPWISE_HEALTH_PORT) set, `GET /healthz` answers there.
    """
    engine = database.create_engine(settings.database_url)
    client: NATS = await connect(settings.nats_url, "projector")
    health = await start_health_server(client, health_at)
    try:
        js = client.jetstream()
        await ensure_topology(js, settings.stream_replicas)
        writer = BatchWriter(Projector(engine, js), stop, settings.max_backoff)
        subscription = Subscription(js, engine, settings)
        if not await subscription.bind(stop):
            return
        logger.info("service ready", extra={"durable": subjects.PROJECTOR_CONSUMER})
        await _consume(subscription, writer, stop)
        await subscription.close()
    finally:
        await health.close()
        await client.close()
        await engine.dispose()
    logger.info("projector stopped")


async def _consume(subscription: Subscription, writer: BatchWriter, stop: asyncio.Event) -> None:
    idle_fetches = 0
    while not stop.is_set():
        try:
            messages = await subscription.fetch()
        except TimeoutError:
            # nats-py raises its own TimeoutError or asyncio's; both subclass the builtin.
            idle_fetches += 1
            # A deleted consumer (by a rebuild) can look like an idle one, so check now and then.
            if idle_fetches % IDLE_FETCHES_PER_CHECK == 0 and not await _consumer_alive(
                subscription
            ):
                await _rebind(subscription, stop)
            continue
        except Exception as error:
            logger.warning("fetching events failed: %s", error)
            if not await _consumer_alive(subscription):
                await _rebind(subscription, stop)
            else:
                await _pause(stop, 1.0)
            continue
        idle_fetches = 0
        await handle_batch(writer, messages)


async def _rebind(subscription: Subscription, stop: asyncio.Event) -> None:
    try:
        await subscription.bind(stop)
    except Exception as error:
        logger.warning("binding the durable consumer again failed: %s", error)
        await _pause(stop, 1.0)


async def _consumer_alive(subscription: Subscription) -> bool:
    try:
        return await subscription.consumer_exists()
    except Exception:
        logger.debug("checking the durable consumer failed", exc_info=True)
        return True


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
