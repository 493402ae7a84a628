"""The projector rides out a Postgres outage and a nats-server restart, then catches up."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from projector_process import ProjectorProcess
from projector_scenarios import append_sessions
from stepwise_libs.jetstream import EventStore, connect, ensure_topology
from support.readmodels import assert_read_models_match_stream, wait_for_sessions

from stepwise.embedded import EmbeddedNats, EmbeddedPostgres

OUTAGE_WARNING = "database unavailable, retrying the batch"


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "postgres").start()
    yield server
    server.stop()


async def _wait_for_log(
    projector: ProjectorProcess, text: str, count: int, timeout_seconds: float
) -> None:
    """Wait, with a deadline, until the projector has logged `text` at least `count` times."""
    async with asyncio.timeout(timeout_seconds):
        while projector.logs().count(text) < count:
            assert projector.process is not None and projector.process.poll() is None, (
                f"the projector exited during the outage; log:\n{projector.logs()}"
            )
            await asyncio.sleep(0.2)


async def test_projector_waits_out_postgres_outage(
    own_postgres: EmbeddedPostgres, events_nats: EmbeddedNats, store: EventStore, tmp_path: Path
) -> None:
    # Arrange: a projector that has caught up.
    database_url = own_postgres.create_database("outage")
    projector = ProjectorProcess(events_nats.url, database_url, tmp_path, batch_size=50)
    before = await append_sessions(store)
    projector.start()
    try:
        await wait_for_sessions(database_url, before, timeout_seconds=60)

        # Act: stop Postgres, append while it is down, start it again on the same port.
        own_postgres.stop()
        during = await append_sessions(store)
        await _wait_for_log(projector, OUTAGE_WARNING, count=3, timeout_seconds=60)
        restarted = EmbeddedPostgres(own_postgres.data_dir, port=own_postgres.port).start()
        try:
            await wait_for_sessions(database_url, {**before, **during}, timeout_seconds=60)

            # Assert
            await assert_read_models_match_stream(database_url, events_nats.url)
            assert projector.stop() == 0
        finally:
            restarted.stop()
    finally:
        if projector.process is not None and projector.process.poll() is None:
            projector.kill()

    logs = projector.logs()
    warnings = [line for line in logs.splitlines() if OUTAGE_WARNING in line]
    assert len(warnings) >= 3
    assert all("attempt=" in line for line in warnings)
    assert "wrote the batch after" in logs
    assert "Traceback" not in logs


async def test_projector_resumes_after_nats_restart(
    events_nats: EmbeddedNats, projector: ProjectorProcess, database_url: str
) -> None:
    # Arrange
    client = await connect(events_nats.url, "outage-writer")
    await ensure_topology(client.jetstream())
    store = EventStore(client.jetstream())
    before = await append_sessions(store)
    projector.start()
    await wait_for_sessions(database_url, before, timeout_seconds=60)
    await client.close()

    # Act: restart nats-server on the same port and store, then append more.
    events_nats.stop()
    restarted = EmbeddedNats(events_nats.data_dir, port=events_nats.port).start()
    try:
        client = await connect(restarted.url, "outage-writer")
        after = await append_sessions(EventStore(client.jetstream()))
        await client.close()
        await wait_for_sessions(database_url, {**before, **after}, timeout_seconds=60)

        # Assert
        await assert_read_models_match_stream(database_url, restarted.url)
        assert projector.stop() == 0
    finally:
        restarted.stop()
