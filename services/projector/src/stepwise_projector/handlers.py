"""Handling of one fetched batch: decode the messages, write them, acknowledge them.

A malformed message is logged with its subject and stream position and written
as a gap (its position still counts as applied), so it never blocks the stream.
A batch that cannot be written because Postgres is unavailable stays
unacknowledged and is retried with backoff until it is written or the
projector stops.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec
from nats.aio.msg import Msg
from sqlalchemy.exc import DBAPIError, InterfaceError
from stepwise_libs import subjects
from stepwise_libs.events import Event, decode_event

logger = logging.getLogger(__name__)

INITIAL_BACKOFF_SECONDS = 0.5

# Errors that mean "Postgres cannot be reached right now", as opposed to a bug.
DATABASE_UNAVAILABLE = (DBAPIError, InterfaceError, OSError, ConnectionError)
# SQLSTATE classes meaning "Postgres cannot store these values", such as a NUL
# character in text (22P05): retrying the same rows would block the stream for ever.
# 22 is data exception, 23 integrity constraint violation, 54 program limit exceeded.
REJECTED_SQLSTATE_CLASSES = ("22", "23", "54")


@dataclass(frozen=True)
class Record:
    """One message of the events stream; `event` is None when the message is malformed."""

    position: int
    subject: str
    event: Event | None


def decode_record(subject: str, data: bytes | None, position: int) -> Record:
    """Decode one stored message into a record, logging and blanking a malformed one."""
    try:
        event = decode_event(data or b"", position)
        # Decode the payload now, so the fold never meets a payload of the wrong shape.
        event.payload()
    except msgspec.MsgspecError as error:
        logger.warning(
            "skipping malformed event: %s",
            error,
            extra={"subject": subject, "position": position},
        )
        return Record(position, subject, None)

    subject_session = subject.removeprefix(f"{subjects.EVENTS_PREFIX}.")
    if event.session_id != subject_session or event.seq < 1:
        logger.warning(
            "skipping event with session_id %r and seq %d on another session's subject",
            event.session_id,
            event.seq,
            extra={"subject": subject, "position": position},
        )
        return Record(position, subject, None)
    return Record(position, subject, event)


def record_from_message(message: Msg) -> Record:
    return decode_record(message.subject, message.data, message.metadata.sequence.stream)


class Applier(Protocol):
    """Anything that writes records in one transaction, such as `projection.Projector`."""

    async def apply(self, records: Sequence[Record]) -> object: ...


class BatchWriter:
    """Writes batches through a projector, retrying with backoff while Postgres is down."""

    def __init__(self, projector: Applier, stop: asyncio.Event, max_backoff: float) -> None:
        self._projector = projector
        self._stop = stop
        self._max_backoff = max_backoff

    async def write(self, records: Sequence[Record], messages: Sequence[Msg] = ()) -> bool:
        """Write the records; return False when the projector stopped before they were written.

        While retrying, the `messages` they came from get an in-progress signal, so
        JetStream does not redeliver them to another projector meanwhile.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._projector.apply(records)
            except Exception as error:
                if _rejected_by_database(error):
                    return await self._write_rejected(records, messages, error)
                delay = self._delay(attempt)
                context = {"attempt": attempt, "batch_size": len(records)}
                if isinstance(error, DATABASE_UNAVAILABLE):
                    logger.warning(
                        "database unavailable, retrying the batch in %.1f s: %s",
                        delay,
                        describe(error),
                        extra=context,
                    )
                else:
                    logger.exception(
                        "writing the batch failed, retrying in %.1f s", delay, extra=context
                    )
            else:
                if attempt > 1:
                    logger.info("wrote the batch after %d attempts", attempt)
                return True
            await _keep_in_progress(messages)
            if await _stopped_within(self._stop, delay):
                return False

    async def _write_rejected(
        self, records: Sequence[Record], messages: Sequence[Msg], error: Exception
    ) -> bool:
        """Write a batch that Postgres rejected one record at a time, skipping the bad ones."""
        if len(records) > 1:
            logger.warning(
                "the read models reject a value in the batch, writing it one event at a time: %s",
                describe(error),
                extra={"from_position": records[0].position, "batch_size": len(records)},
            )
            for record in records:
                if not await self.write([record], messages):
                    return False
            return True

        # NOTE: later events of this session fold over the rejected one and are
        # rejected too, so the session's read models stop at the event before it.
        record = records[0]
        logger.error(
            "skipping an event that the read models cannot store: %s",
            describe(error),
            extra={
                "subject": record.subject,
                "position": record.position,
                "session_id": record.event.session_id if record.event else None,
            },
        )
        return await self.write([Record(record.position, record.subject, None)], messages)

    def _delay(self, attempt: int) -> float:
        # Exponential backoff with jitter, so restarted projectors do not retry in step.
        ceiling = min(self._max_backoff, INITIAL_BACKOFF_SECONDS * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


def _rejected_by_database(error: Exception) -> bool:
    sqlstate = getattr(getattr(error, "orig", None), "sqlstate", None)
    return isinstance(error, DBAPIError) and str(sqlstate or "")[:2] in REJECTED_SQLSTATE_CLASSES


def describe(error: Exception) -> str:
    """Return the first line of a database error, without the statement and its parameters."""
    cause = getattr(error, "orig", None) or error
    return str(cause).splitlines()[0] if str(cause) else type(cause).__name__


async def handle_batch(writer: BatchWriter, messages: Sequence[Msg]) -> bool:
    """Write one fetched batch and acknowledge its messages once the write committed."""
    records = [record_from_message(message) for message in messages]
    if not await writer.write(records, messages):
        return False
    for message in messages:
        try:
            await message.ack()
        except Exception as error:
            logger.warning(
                "acknowledging a projected event failed; it will be redelivered and skipped: %s",
                error,
                extra={"subject": message.subject},
            )
            break
    return True


async def _keep_in_progress(messages: Sequence[Msg]) -> None:
    for message in messages:
        try:
            await message.in_progress()
        except Exception:
            logger.debug("in-progress signal failed", exc_info=True)
            return


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `stop`; return whether it was set."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True
