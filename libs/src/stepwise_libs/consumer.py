"""The pull loop that planner and executor run over their command subjects.

Malformed, oversized and unknown-version messages are acknowledged (so they are
not redelivered for ever), logged with their subject and reason, and answered by
`command_rejected` on the session when the message names one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext, api

from . import subjects
from .commands import Command, CommandBody, InvalidCommand, decode_command
from .events import CommandRejected
from .jetstream import EventStore

logger = logging.getLogger(__name__)

# A handler acknowledges the message itself once it has accepted the command,
# so a long-running or paused session never holds an unacknowledged message.
CommandHandler = Callable[[Command, CommandBody, Msg], Awaitable[None]]


async def run_command_consumer(
    js: JetStreamContext,
    store: EventStore,
    durable: str,
    filter_subject: str,
    handle: CommandHandler,
    stop: asyncio.Event,
    ack_wait_seconds: float = 30.0,
    batch: int = 1,
) -> None:
    """Fetch commands until `stop` is set, passing each valid one to `handle`."""
    subscription = await js.pull_subscribe(
        filter_subject,
        durable=durable,
        stream=subjects.COMMANDS_STREAM,
        config=api.ConsumerConfig(
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait_seconds,
            max_deliver=-1,
            max_ack_pending=1000,
        ),
    )
    logger.info("consuming commands", extra={"subject": filter_subject, "durable": durable})
    while not stop.is_set():
        try:
            messages = await subscription.fetch(batch, timeout=1.0)
        except NatsTimeoutError:
            continue
        except Exception as error:  # noqa: BLE001 - a lost connection must not end the loop
            logger.warning("fetching commands failed: %s", error, extra={"subject": filter_subject})
            await asyncio.sleep(0.5)
            continue
        for message in messages:
            if stop.is_set():
                # The service is stopping: give the command back at once, so another
                # replica takes it instead of this one accepting work it cannot finish.
                await message.nak()
                continue
            await _dispatch(store, message, handle)


async def _dispatch(store: EventStore, message: Msg, handle: CommandHandler) -> None:
    try:
        command, body = decode_command(message.data)
    except InvalidCommand as error:
        logger.warning(
            "rejected command: %s",
            error.reason,
            extra={"subject": message.subject, "session_id": error.session_id},
        )
        if error.session_id:
            command_type = message.subject.rsplit(".", 1)[-1]
            try:
                await store.append(
                    error.session_id,
                    CommandRejected(
                        command_type=command_type, reason=error.reason, code="invalid_command"
                    ),
                )
            except Exception:  # noqa: BLE001 - the message must be acked whatever happens here
                logger.exception(
                    "could not record the rejection on its session",
                    extra={"subject": message.subject, "session_id": error.session_id},
                )
        await message.ack()
        return
    try:
        await handle(command, body, message)
    except Exception:
        logger.exception(
            "command handler failed; the command will be redelivered",
            extra={
                "session_id": command.session_id,
                "command_id": command.command_id,
                "command_type": command.type,
            },
        )
        await message.nak(delay=2.0)
