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
                return True
            except DATABASE_UNAVAILABLE as error:
                delay = self._delay(attempt)
                logger.warning(
                    "database unavailable, retrying the batch in %.1f s: %s",
                    delay,
                    error,
                    extra={"attempt": attempt, "batch_size": len(records)},
                )
            except Exception:
                delay = self._delay(attempt)
                logger.exception(
                    "writing the batch failed, retrying in %.1f s",
                    delay,
                    extra={"attempt": attempt, "batch_size": len(records)},
                )
            await _keep_in_progress(messages)
            if await _stopped_within(self._stop, delay):
                return False

    def _delay(self, attempt: int) -> float:
        # Exponential backoff with jitter, so restarted projectors do not retry in step.
        ceiling = min(self._max_backoff, INITIAL_BACKOFF_SECONDS * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


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
