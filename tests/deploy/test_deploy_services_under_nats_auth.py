"""The gateway and the planner run as processes, each with its own NATS user.

A session goes from the gateway's HTTP API through the planner to a finished plan that
the gateway streams back. The nats-server has the accounts of deploy/nats/values.yaml,
so a permission either service needs and lacks shows up as a violation in its log.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine
from stepwise_libs import readmodel

from stepwise.embedded import EmbeddedNats, EmbeddedPostgres, free_port

SCRIPTS = Path(sys.executable).parent
START_TIMEOUT = 60.0
PLAN_TIMEOUT = 60.0


class ServiceProcess:
    """A service's console script, with its stderr collected for readiness and diagnosis."""

    def __init__(self, name: str, environment: dict[str, str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.process = subprocess.Popen(
            [str(SCRIPTS / f"stepwise-{name}")],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if "service ready" in line:
                self.ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _environment(server: EmbeddedNats, user: str, password: str, **extra: str) -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "STEPWISE_GEMINI_BASE_URL")
    }
    # The same URL the Deployments build from the service's Secret.
    environment["STEPWISE_NATS_URL"] = f"nats://{user}:{password}@{server.host}:{server.port}"
    environment["STEPWISE_LOG_LEVEL"] = "INFO"
    environment.update(extra)
    return environment


async def _create_tables(database_url: str) -> None:
    engine = create_async_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(readmodel.metadata.create_all)
    await engine.dispose()


@pytest.fixture
def services(
    secured_nats: EmbeddedNats,
    passwords: dict[str, str],
    postgres_server: EmbeddedPostgres,
) -> Iterator[str]:
    database_url = postgres_server.create_database(f"deploy_{uuid.uuid4().hex[:12]}")
    asyncio.run(_create_tables(database_url))
    port = free_port()
    started: list[ServiceProcess] = []
    try:
        planner = ServiceProcess(
            "planner", _environment(secured_nats, "planner", passwords["planner"])
        )
        started.append(planner)
        gateway = ServiceProcess(
            "gateway",
            _environment(
                secured_nats,
                "gateway",
                passwords["gateway"],
                STEPWISE_DATABASE_URL=database_url,
                STEPWISE_HOST="127.0.0.1",
                STEPWISE_PORT=str(port),
            ),
        )
        started.append(gateway)
        assert planner.ready.wait(START_TIMEOUT), f"planner did not start:\n{planner.log}"
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, gateway)
        yield url
    finally:
        for service in started:
            service.stop()


def _wait_ready(url: str, gateway: ServiceProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise AssertionError(
                f"gateway exited with {gateway.process.returncode}:\n{gateway.log}"
            )
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gateway not ready in {START_TIMEOUT} s:\n{gateway.log}")


async def _wait_for_event(client: httpx.AsyncClient, session_id: str, wanted: set[str]) -> str:
    async with client.stream("GET", f"/api/sessions/{session_id}/stream") as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("event: ") and line.removeprefix("event: ") in wanted:
                return line.removeprefix("event: ")
    raise AssertionError("the event stream ended before the plan finished")


async def test_session_plans_with_per_service_users(
    services: str, secured_nats: EmbeddedNats
) -> None:
    async with httpx.AsyncClient(base_url=services, timeout=30) as client:
        response = await client.post(
            "/api/sessions",
            json={
                "test_case": '1. Open the home page\n2. Check that the page shows "Welcome"',
                "target_url": "http://127.0.0.1:9/",
                "llm_model": "offline",
            },
        )
        assert response.status_code == 201, response.text
        session_id = response.json()["session_id"]

        outcome = await asyncio.wait_for(
            _wait_for_event(client, session_id, {"plan_completed", "plan_failed"}), PLAN_TIMEOUT
        )
        assert outcome == "plan_completed"

        events = (await client.get(f"/api/sessions/{session_id}/events")).json()["events"]
        types = [event["type"] for event in events]
        assert types[0] == "session_created"
        assert "plan_started" in types
        completed = [event for event in events if event["type"] == "plan_completed"]
        assert len(completed[0]["data"]["steps"]) == 2, json.dumps(completed[0])

    violations = [
        line for line in secured_nats.log_path.read_text().splitlines() if "Violation" in line
    ]
    assert violations == [], "a service lacks a NATS permission it uses:\n" + "\n".join(violations)
