"""Fixtures of the planner tests: sessions on the real NATS server and planner processes."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from nats.aio.client import Client as NATS
from planner_helpers import PLANNER_SCRIPT, PlannerProcess
from stepwise_libs.jetstream import EventStore

from stepwise.embedded import EmbeddedNats


@pytest.fixture
async def store(nats_client: NATS) -> AsyncIterator[EventStore]:
    yield EventStore(nats_client.jetstream())


@pytest.fixture
def start_planner(nats_server: EmbeddedNats) -> Iterator[Callable[..., PlannerProcess]]:
    """Start `stepwise-planner` processes on the test NATS server; each is stopped at the end."""
    started: list[PlannerProcess] = []

    def start(**env: str) -> PlannerProcess:
        environment = {
            key: value
            for key, value in os.environ.items()
            if key not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "STEPWISE_GEMINI_BASE_URL")
        }
        environment.update({"STEPWISE_NATS_URL": nats_server.url, "STEPWISE_LOG_LEVEL": "INFO"})
        environment.update(env)
        process = subprocess.Popen(
            [str(PLANNER_SCRIPT)],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        planner = PlannerProcess(process)
        started.append(planner)

        def read() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                with planner.new_line:
                    planner.lines.append(line)
                    planner.new_line.notify_all()
                if "service ready" in line:
                    planner.ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not planner.ready.wait(30):
            planner.stop()
            raise AssertionError(f"stepwise-planner did not become ready:\n{planner.log}")
        return planner

    yield start
    for planner in started:
        planner.stop()
