"""Alembic migrations of the read-model schema, run from the installed package.

The migration scripts ship inside the package (`stepwise_projector/migrations`),
so `stepwise-projector migrate` needs no checkout and no alembic.ini of its own.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.exc import DBAPIError

from .errors import MigrationError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(database_url: str) -> Config:
    """Return an Alembic config that runs the packaged migrations against `database_url`."""
    config = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser treats "%" as interpolation, and a password may contain one.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the read-model schema up to `revision`; running it again changes nothing.

    Alembic's env.py runs its own event loop, so call this from synchronous code
    or through `asyncio.to_thread`.
    """
    try:
        command.upgrade(alembic_config(database_url), revision)
    except OSError as error:
        raise MigrationError(revision, f"cannot reach the database: {error}") from error
    except DBAPIError as error:
        reason = str(error.orig or error).splitlines()[0]
        raise MigrationError(revision, f"the database returned an error: {reason}") from error
    logger.info("read-model schema is at revision %s", revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Take the read-model schema down to `revision`; `base` drops every table."""
    command.downgrade(alembic_config(database_url), revision)
    logger.info("read-model schema is at revision %s", revision)
