"""Entry point of the executor service: `stepwise-executor`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from stepwise_libs import subjects
from stepwise_libs.consumer import run_command_consumer
from stepwise_libs.health import health_address, start_health_server
from stepwise_libs.jetstream import EventStore, connect, ensure_topology
from stepwise_libs.logs import configure_logging
from stepwise_libs.settings import SettingsError, redact_url

from .handlers import ExecutorService
from .secrets import install_log_redaction
from .settings import ExecutorSettings

logger = logging.getLogger(__name__)

# Seconds the tasks left after the shutdown get to end once cancelled.
LEFTOVER_TASKS_SECONDS = 5.0


async def run(settings: ExecutorSettings, health_at: tuple[str, int] | None = None) -> None:
    settings.browsers_dir.mkdir(parents=True, exist_ok=True)
    client = await connect(settings.nats_url, f"executor-{settings.executor_id}")
    health = await start_health_server(client, health_at)
    js = client.jetstream()
    await ensure_topology(js, settings.stream_replicas)
    store = EventStore(js)
    service = ExecutorService(client, js, store, settings)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        service.begin_shutdown()
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    consumer = asyncio.create_task(
        run_command_consumer(
            js,
            store,
            subjects.EXECUTOR_CONSUMER,
            f"{subjects.EXECUTOR_COMMANDS}.*",
            service.handle,
            stop,
        )
    )
    logger.info(
        "service ready",
        extra={"executor_id": settings.executor_id, "nats_url": redact_url(settings.nats_url)},
    )
    await stop.wait()
    logger.info("stopping", extra={"executor_id": settings.executor_id})
    await consumer
    await service.shutdown()
    await health.close()
    # close, not drain: drain waits out its whole timeout once a pull consumer has fetched.
    await client.close()
    await _exit_past_stuck_tasks(LEFTOVER_TASKS_SECONDS)


async def _exit_past_stuck_tasks(grace_seconds: float) -> None:
    """Cancel the tasks still running after the shutdown; exit the process if some ignore it.

    When SIGTERM arrives while a browser starts, browser-use 0.13.14 leaves the
    `_run_loop` task of its event bus running, and that task ignores cancellation.
    asyncio.run would wait for it for ever, so the executor would never exit. Every
    event and ack has been sent by now, so exiting without that task loses nothing.
    """
    current = asyncio.current_task()
    leftovers = [task for task in asyncio.all_tasks() if task is not current]
    for task in leftovers:
        task.cancel()
    if not leftovers:
        return
    _, pending = await asyncio.wait(leftovers, timeout=grace_seconds)
    if pending:
        logger.warning(
            "%d tasks did not stop after cancellation, exiting without them",
            len(pending),
            extra={"tasks": sorted(task.get_name() for task in pending)},
        )
        logging.shutdown()
        os._exit(0)


def main() -> None:
    try:
        settings = ExecutorSettings()
        health_at = health_address()
    except SettingsError as error:
        sys.stderr.write(f"stepwise-executor: {error}\n")
        raise SystemExit(2) from None
    configure_logging("executor", settings.log_level)
    install_log_redaction()
    asyncio.run(run(settings, health_at))


if __name__ == "__main__":
    main()
