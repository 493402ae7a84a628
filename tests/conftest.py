"""Real servers for the test suite: one embedded nats-server and one embedded Postgres per run.

Each test gets its own database; sessions get fresh UUIDs, so tests sharing the
NATS server do not see each other's events.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from stepwise.embedded import EmbeddedNats, EmbeddedPostgres
from stepwise_libs.jetstream import connect, ensure_topology


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path_factory.mktemp("nats")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[EmbeddedPostgres]:
    # Not under pytest's basetemp: pytest makes that folder private to root, and as
    # root the server runs as its own user, which must be able to reach its data.
    data_dir = Path(tempfile.mkdtemp(prefix="stepwise-test-postgres-"))
    server = EmbeddedPostgres(data_dir).start()
    yield server
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def database_url(postgres_server: EmbeddedPostgres) -> str:
    """URL of a new, empty database for one test."""
    return postgres_server.create_database(f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def nats_client(nats_server: EmbeddedNats) -> AsyncIterator[NATS]:
    client = await connect(nats_server.url, "tests")
    await ensure_topology(client.jetstream())
    yield client
    await client.close()


@pytest.fixture
def artifacts_dir() -> Path:
    path = Path(__file__).resolve().parent.parent / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path

# The fake Gemini server (`fake_gemini` fixture) for tests of the model paths.
pytest_plugins = ["fakes.fixtures"]
