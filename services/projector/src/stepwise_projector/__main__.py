"""Entry point of `stepwise-projector`: run (the default), migrate or rebuild."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from stepwise_libs.health import health_address
from stepwise_libs.logs import configure_logging
from stepwise_libs.settings import SettingsError

from . import schema
from .errors import MigrationError
from .handlers import DATABASE_UNAVAILABLE
from .projection import run_projector
from .rebuild import rebuild
from .settings import ProjectorSettings

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepwise-projector",
        description="Project the Stepwise events stream into the Postgres read models.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="migrate, then project events as they arrive (the default)")
    commands.add_parser("migrate", help="upgrade the read-model schema to the latest revision")
    commands.add_parser(
        "rebuild",
        help="empty the read models and replay the whole events stream into them; "
        "stop the running projector first",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        settings = ProjectorSettings()
        health_at = health_address()
    except SettingsError as error:
        sys.stderr.write(f"stepwise-projector: {error}\n")
        raise SystemExit(2) from None
    configure_logging("projector", settings.log_level)

    command = args.command or "run"
    try:
        if command == "migrate":
            schema.upgrade(settings.database_url)
        elif command == "rebuild":
            schema.upgrade(settings.database_url)
            asyncio.run(rebuild(settings))
        else:
            asyncio.run(_serve(settings, health_at))
    except MigrationError as error:
        logger.error("%s", error)
        raise SystemExit(1) from None


async def _serve(settings: ProjectorSettings, health_at: tuple[str, int] | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    if not await _migrate_when_reachable(settings, stop):
        return
    await run_projector(settings, stop, health_at)


async def _migrate_when_reachable(settings: ProjectorSettings, stop: asyncio.Event) -> bool:
    """Run the migrations, waiting for Postgres to come up; return False if stopped first."""
    delay = 0.5
    attempt = 0
    while not stop.is_set():
        attempt += 1
        try:
            await asyncio.to_thread(schema.upgrade, settings.database_url)
            return True
        except (MigrationError, *DATABASE_UNAVAILABLE) as error:
            logger.warning(
                "migrating the read models failed, retrying in %.1f s: %s",
                delay,
                error,
                extra={"attempt": attempt},
            )
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            delay = min(settings.max_backoff, delay * 2)
    return False


if __name__ == "__main__":
    main()
