"""Entry point of the planner service (`stepwise-planner`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError
from stepwise_libs import subjects
from stepwise_libs.consumer import run_command_consumer
from stepwise_libs.health import health_address, start_health_server
from stepwise_libs.jetstream import EventStore, connect, ensure_topology
from stepwise_libs.logs import configure_logging
from stepwise_libs.settings import SettingsError, redact_url

from .handlers import PlannerService
from .settings import PlannerSettings

logger = logging.getLogger(__name__)

FILTER_SUBJECT = f"{subjects.PLANNER_COMMANDS}.*"


async def run(settings: PlannerSettings, health_at: tuple[str, int] | None = None) -> None:
    """Consume plan commands until SIGTERM or SIGINT, then finish or abandon plans in progress."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    if settings.gemini_api_key is not None:
        # Import google-genai (slow) before `service ready`, not during the first plan.
        from . import gemini  # noqa: F401

    nc = await connect(settings.common.nats_url, "stepwise-planner")
    health = await start_health_server(nc, health_at)
    try:
        js = nc.jetstream()
        await ensure_topology(js, settings.common.stream_replicas)
        await _ensure_consumer(js, settings.ack_wait_seconds)
        store = EventStore(js)
        service = PlannerService(store, settings)
        consumer = asyncio.create_task(
            run_command_consumer(
                js,
                store,
                subjects.PLANNER_CONSUMER,
                FILTER_SUBJECT,
                service.handle,
                stop,
                ack_wait_seconds=settings.ack_wait_seconds,
            )
        )
        logger.info(
            "service ready",
            extra={
                "nats_url": redact_url(settings.common.nats_url),
                "concurrency": settings.concurrency,
                "gemini": settings.gemini_api_key is not None,
            },
        )
        stop_wait = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({consumer, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if consumer in done:
            consumer.result()  # the consumer loop only ends on its own by raising
        logger.info("stopping", extra={"in_progress": service.in_progress})
        # The loop sees `stop` after its current fetch; it may also wait on a free slot.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(consumer, timeout=2.0)
        await service.drain(settings.shutdown_grace_seconds)
    finally:
        # Every ack and append was awaited above, so closing loses nothing. drain() would
        # wait out its 30 s timeout on the consumer's pull subscription.
        await health.close()
        await nc.close()
    logger.info("service stopped")


async def _ensure_consumer(js: JetStreamContext, ack_wait_seconds: float) -> None:
    """Create or update the durable planner consumer, so `service ready` means commands flow.

    `run_command_consumer` binds to this consumer as it is, so its ack wait is set here.
    """
    config = api.ConsumerConfig(
        durable_name=subjects.PLANNER_CONSUMER,
        name=subjects.PLANNER_CONSUMER,
        filter_subject=FILTER_SUBJECT,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=ack_wait_seconds,
        max_deliver=-1,
        max_ack_pending=1000,
    )
    try:
        info = await js.consumer_info(subjects.COMMANDS_STREAM, subjects.PLANNER_CONSUMER)
    except NotFoundError:
        await js.add_consumer(subjects.COMMANDS_STREAM, config=config)
        return
    if info.config.ack_wait != ack_wait_seconds:
        # Creating a consumer that exists with an editable field changed updates it.
        await js.add_consumer(subjects.COMMANDS_STREAM, config=config)


def main() -> None:
    try:
        settings = PlannerSettings()
        health_at = health_address()
    except SettingsError as error:
        sys.stderr.write(f"stepwise-planner: {error}\n")
        raise SystemExit(2) from None
    configure_logging("planner", settings.common.log_level)
    asyncio.run(run(settings, health_at))


if __name__ == "__main__":
    main()
