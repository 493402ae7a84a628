"""`stepwise-projector rebuild`: empty the read models and replay the whole events stream.

The replay reads the stream with an ordered consumer from its first position and
writes through the same position-guarded batches as the live projector. At the
end the durable consumer is created again at the position the read models reached.

Stop the live projector (scale it to zero) before a rebuild, so readers see the
tables fill in one pass. A projector left running stays correct: every batch
applies only positions above the stored one and fills the gaps below it from the
stream, and a projector whose consumer was replaced binds to the new one.
"""

from __future__ import annotations

import asyncio
import logging

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext, api
from stepwise_libs import subjects
from stepwise_libs.jetstream import connect, ensure_topology

from . import database
from .errors import ProjectorError
from .handlers import BatchWriter, Record, decode_record
from .projection import EVENTS_FILTER, Projector, ensure_durable
from .settings import ProjectorSettings

logger = logging.getLogger(__name__)

# Seconds without a message, while the stream contains more, before the rebuild gives up.
STALL_TIMEOUT_SECONDS = 30.0


class RebuildStalledError(ProjectorError):
    """The replay stopped receiving messages before it reached the stream's last position."""

    def __init__(self, position: int, last: int) -> None:
        super().__init__(
            f"rebuild stalled at position {position} of {last}: no message for "
            f"{STALL_TIMEOUT_SECONDS:.0f} s; check that nats-server is up and run the rebuild again"
        )
        self.position = position
        self.last = last


async def rebuild(settings: ProjectorSettings, stop: asyncio.Event | None = None) -> int:
    """Replay the whole events stream into emptied read models; return the position reached."""
    stop = stop or asyncio.Event()
    engine = database.create_engine(settings.database_url)
    client = await connect(settings.nats_url, "projector-rebuild")
    try:
        js = client.jetstream()
        await ensure_topology(js, settings.stream_replicas)
        async with engine.begin() as connection:
            await database.truncate_read_models(connection)
        logger.info("emptied the read models")

        stream = await js.stream_info(subjects.EVENTS_STREAM)
        last = stream.state.last_seq
        writer = BatchWriter(Projector(engine, js), stop, settings.max_backoff)
        replayed = 0
        if stream.state.messages:
            replayed = await _replay(js, writer, last, settings.batch_size)

        async with engine.connect() as connection:
            position = await database.read_position(connection)
        await ensure_durable(js, position, max(4 * settings.batch_size, 1000), reset=True)
    finally:
        await client.close()
        await engine.dispose()
    logger.info(
        "rebuilt the read models from the events stream",
        extra={"messages": replayed, "position": position},
    )
    return position


async def _replay(js: JetStreamContext, writer: BatchWriter, last: int, batch_size: int) -> int:
    subscription = await js.subscribe(
        EVENTS_FILTER,
        stream=subjects.EVENTS_STREAM,
        ordered_consumer=True,
        deliver_policy=api.DeliverPolicy.ALL,
        idle_heartbeat=5.0,
    )
    replayed = 0
    position = 0
    batch: list[Record] = []
    try:
        while position < last:
            try:
                message = await subscription.next_msg(timeout=STALL_TIMEOUT_SECONDS)
            except NatsTimeoutError:
                raise RebuildStalledError(position, last) from None
            position = message.metadata.sequence.stream
            batch.append(decode_record(message.subject, message.data, position))
            if len(batch) >= batch_size or position >= last:
                if not await writer.write(batch):
                    break
                replayed += len(batch)
                batch = []
    finally:
        await subscription.unsubscribe()
    return replayed
