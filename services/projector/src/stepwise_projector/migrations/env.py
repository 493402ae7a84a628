"""Alembic environment of the read-model migrations: async, through asyncpg.

The database URL comes from the config's `sqlalchemy.url` (set by
`stepwise_projector.schema`) or else from `STEPWISE_DATABASE_URL`.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from stepwise_libs.readmodel import metadata

config = context.config
target_metadata = metadata


def _database_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("STEPWISE_DATABASE_URL", "")
    if not url:
        raise RuntimeError(
            "no database URL: set STEPWISE_DATABASE_URL to postgresql+asyncpg://user@host/db"
        )
    return url


def run_migrations_offline() -> None:
    """Write the migration SQL to stdout instead of running it (`alembic upgrade --sql`)."""
    context.configure(
        url=_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = create_async_engine(_database_url(), poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
