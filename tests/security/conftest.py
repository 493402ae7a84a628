"""A gateway with API tokens, in this process, and helpers to run services as processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from gateway.conftest import GatewayServer, build_session, create_tables, gateway_settings
from nats.aio.client import Client as NATS
from stepwise.embedded import EmbeddedNats, EmbeddedPostgres
from stepwise_gateway.auth import ApiToken, parse_tokens
from stepwise_libs import subjects
from stepwise_libs.jetstream import EventStore, ensure_topology

# Two named clients; the tests send these and look for them in logs.
CI_TOKEN = "ci-" + "a1b2c3d4" * 4
UI_TOKEN = "ui-" + "f9e8d7c6" * 4
WRONG_TOKEN = "ci-" + "a1b2c3d4" * 3 + "a1b2c3d5"
TOKENS_ENV = f"ci:{CI_TOKEN},browser:{UI_TOKEN}"
# The smallest valid PNG header is enough: the gateway does not decode images.
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def tokens() -> tuple[ApiToken, ...]:
    return parse_tokens(TOKENS_ENV)


@pytest.fixture(scope="module")
def secured_database(postgres_server: EmbeddedPostgres) -> str:
    url = postgres_server.create_database(f"security_{uuid.uuid4().hex[:12]}")
    asyncio.run(create_tables(url))
    return url


@pytest.fixture(scope="module")
def secured(nats_server: EmbeddedNats, secured_database: str) -> Iterator[GatewayServer]:
    settings = gateway_settings(nats_server.url, secured_database, api_tokens=tokens())
    server = GatewayServer(settings).start()
    server.wait_nats()
    yield server
    server.stop()


@pytest.fixture
async def session_id(nats_client: NATS) -> str:
    """A session in plan_ready with one screenshot, `1/1.png`, in the object store."""
    js = nats_client.jetstream()
    await ensure_topology(js)
    built = await build_session(EventStore(js), "plan_ready")
    store = await js.object_store(subjects.SCREENSHOTS_BUCKET)
    await store.put(subjects.screenshot_object_name(built.session_id, 1, 1), PNG)
    return built.session_id


@pytest.fixture
async def anonymous(secured: GatewayServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=secured.url, timeout=30) as http:
        yield http


def service_env(**values: str) -> dict[str, str]:
    """The environment for a service process: this one's, minus any STEPWISE_ or Gemini value."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("STEPWISE_") and key not in ("GEMINI_API_KEY", "GOOGLE_API_KEY")
    }
    env.update(values)
    return env


def start_service(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `python -m <module>` with its stderr (the log) going to `log`."""
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", module],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_service(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
