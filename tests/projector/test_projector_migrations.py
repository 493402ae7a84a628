"""Read-model migrations: they create exactly the libs tables and go down to nothing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from projector_process import PROJECTOR
from sqlalchemy import Connection, DateTime, inspect, text
from sqlalchemy.ext.asyncio import create_async_engine
from stepwise_libs import readmodel
from stepwise_projector import schema

ALEMBIC = Path(sys.executable).parent / "alembic"
READ_MODEL_TABLES = {table.name for table in readmodel.metadata.sorted_tables}
TIMESTAMP_COLUMNS = sum(
    isinstance(column.type, DateTime)
    for table in readmodel.metadata.sorted_tables
    for column in table.columns
)


def _schema_state(connection: Connection) -> dict[str, object]:
    context = MigrationContext.configure(connection)
    return {
        "tables": set(inspect(connection).get_table_names()),
        "differences": compare_metadata(context, readmodel.metadata),
        "revision": context.get_current_revision(),
    }


async def _inspect(database_url: str) -> dict[str, object]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            state = await connection.run_sync(_schema_state)
            naive = await connection.execute(
                text(
                    "SELECT table_name || '.' || column_name FROM information_schema.columns "
                    "WHERE table_schema = 'public' "
                    "AND data_type = 'timestamp without time zone'"
                )
            )
            aware = await connection.execute(
                text(
                    "SELECT count(*) FROM information_schema.columns "
                    "WHERE table_schema = 'public' AND data_type = 'timestamp with time zone'"
                )
            )
            state["naive_timestamps"] = [row[0] for row in naive]
            state["aware_timestamps"] = aware.scalar_one()
            return state
    finally:
        await engine.dispose()


async def test_migrations_create_schema_and_downgrade_to_base(database_url: str) -> None:
    # Act
    await asyncio.to_thread(schema.upgrade, database_url)
    upgraded = await _inspect(database_url)
    await asyncio.to_thread(schema.upgrade, database_url)
    again = await _inspect(database_url)
    await asyncio.to_thread(schema.downgrade, database_url, "base")
    downgraded = await _inspect(database_url)

    # Assert: the explicit migration matches the libs metadata, column for column.
    assert upgraded["tables"] == READ_MODEL_TABLES | {"alembic_version"}
    assert upgraded["differences"] == []
    assert upgraded["revision"] == "0001"
    assert upgraded["naive_timestamps"] == []
    assert upgraded["aware_timestamps"] == TIMESTAMP_COLUMNS
    assert again["tables"] == upgraded["tables"]
    assert again["revision"] == "0001"
    assert downgraded["tables"] == {"alembic_version"}
    assert downgraded["revision"] is None


def _env(database_url: str) -> dict[str, str]:
    return {**os.environ, "STEPWISE_DATABASE_URL": database_url, "STEPWISE_LOG_LEVEL": "INFO"}


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )


async def test_migrate_command_and_alembic_cli(database_url: str) -> None:
    # Arrange
    env = _env(database_url)
    ini = str(schema.MIGRATIONS_DIR / "alembic.ini")

    # Act: migrate through the console script, then down and up through the alembic CLI.
    migrated = await asyncio.to_thread(_run, [str(PROJECTOR), "migrate"], env)
    after_migrate = await _inspect(database_url)
    down = await asyncio.to_thread(_run, [str(ALEMBIC), "-c", ini, "downgrade", "base"], env)
    after_down = await _inspect(database_url)
    up = await asyncio.to_thread(_run, [str(ALEMBIC), "-c", ini, "upgrade", "head"], env)
    after_up = await _inspect(database_url)

    # Assert
    assert migrated.returncode == 0, migrated.stderr
    assert "read-model schema is at revision head" in migrated.stderr
    assert after_migrate["tables"] == READ_MODEL_TABLES | {"alembic_version"}
    assert down.returncode == 0, down.stderr
    assert after_down["tables"] == {"alembic_version"}
    assert up.returncode == 0, up.stderr
    assert after_up["differences"] == []


def test_projector_rejects_missing_or_bad_database_url() -> None:
    # Arrange
    missing = {key: value for key, value in os.environ.items() if key != "STEPWISE_DATABASE_URL"}
    bad = {**missing, "STEPWISE_DATABASE_URL": "postgres://localhost/stepwise"}

    # Act
    without = _run([str(PROJECTOR), "migrate"], missing)
    wrong = _run([str(PROJECTOR), "run"], bad)

    # Assert
    assert without.returncode == 2
    assert "STEPWISE_DATABASE_URL" in without.stderr
    assert wrong.returncode == 2
    assert "invalid STEPWISE_DATABASE_URL='postgres://localhost/stepwise'" in wrong.stderr
    assert "postgresql+asyncpg://" in wrong.stderr


def test_projector_rejects_unknown_log_level(database_url: str) -> None:
    # Act
    result = _run([str(PROJECTOR), "run"], {**_env(database_url), "STEPWISE_LOG_LEVEL": "loud"})

    # Assert
    assert result.returncode == 2
    assert "invalid STEPWISE_LOG_LEVEL='LOUD'" in result.stderr
