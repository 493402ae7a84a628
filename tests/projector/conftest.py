"""Fixtures of the projector tests: a nats-server per test and the projector as a process.

Each test gets its own nats-server, so the events stream and the projector's
durable consumer hold only that test's messages, and a fresh database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from projector_process import ProjectorProcess
from stepwise_libs.jetstream import EventStore, connect, ensure_topology

from stepwise.embedded import EmbeddedNats


@pytest.fixture
def events_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
async def js_client(events_nats: EmbeddedNats) -> AsyncIterator[NATS]:
    client = await connect(events_nats.url, "projector-tests")
    await ensure_topology(client.jetstream())
    yield client
    await client.close()


@pytest.fixture
def store(js_client: NATS) -> EventStore:
    return EventStore(js_client.jetstream())


@pytest.fixture
def projector(
    events_nats: EmbeddedNats, database_url: str, tmp_path: Path
) -> Iterator[ProjectorProcess]:
    process = ProjectorProcess(events_nats.url, database_url, tmp_path, batch_size=50)
    yield process
    if process.process is not None and process.process.poll() is None:
        process.kill()
