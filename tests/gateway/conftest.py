"""A real gateway for the tests.

uvicorn serves it on a free loopback port, against the test run's nats-server and a
fresh Postgres database.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from sqlalchemy.ext.asyncio import create_async_engine
from stepwise.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from stepwise_gateway.app import create_app
from stepwise_gateway.settings import GatewaySettings
from stepwise_libs import events as ev
from stepwise_libs import readmodel, subjects
from stepwise_libs.commands import Command
from stepwise_libs.jetstream import EventStore


class GatewayServer:
    """uvicorn serving the gateway app in a thread of this process."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        config = uvicorn.Config(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_config=None,
            ws_ping_interval=settings.ws_ping_interval,
            ws_ping_timeout=settings.ws_ping_timeout,
            ws_per_message_deflate=settings.ws_compression,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, name=f"gateway-{settings.port}", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.settings.host}:{self.settings.port}"

    def start(self, timeout: float = 20.0) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"gateway on port {self.settings.port} did not start in {timeout} s"
                )
            time.sleep(0.02)
        return self

    def wait_nats(self, timeout: float = 20.0) -> None:
        """Wait until the gateway has connected to NATS, as /readyz reports it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = httpx.get(f"{self.url}/readyz", timeout=5).json()
            if body.get("nats") == "ok":
                return
            time.sleep(0.05)
        raise RuntimeError("gateway did not connect to NATS")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def gateway_settings(nats_url: str, database_url: str, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "database_url": database_url,
        "host": "127.0.0.1",
        "port": free_port(),
        "log_level": "INFO",
        "stream_replicas": 1,
        "client_buffer": 1000,
        "max_wait_for_seq": 10.0,
        "ws_ping_interval": 20.0,
        "ws_ping_timeout": 20.0,
        "gemini_configured": False,
        "default_model": "offline",
    }
    values.update(overrides)
    return GatewaySettings(**values)


async def create_tables(database_url: str) -> None:
    engine = create_async_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(readmodel.metadata.create_all)
    await engine.dispose()


@pytest.fixture(scope="module")
def gateway_database(postgres_server: EmbeddedPostgres) -> str:
    url = postgres_server.create_database(f"gateway_{uuid.uuid4().hex[:12]}")
    asyncio.run(create_tables(url))
    return url


@pytest.fixture(scope="module")
def gateway(nats_server: EmbeddedNats, gateway_database: str) -> Iterator[GatewayServer]:
    server = GatewayServer(gateway_settings(nats_server.url, gateway_database)).start()
    server.wait_nats()
    yield server
    server.stop()


@pytest.fixture
async def client(gateway: GatewayServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        yield http


@pytest.fixture
def js(nats_client: NATS) -> JetStreamContext:
    return nats_client.jetstream()


@pytest.fixture
def store(js: JetStreamContext) -> EventStore:
    return EventStore(js)


# --- building sessions in a given state ------------------------------------------


@dataclass
class Built:
    session_id: str
    task_id: str = ""
    plan_id: str = ""
    events: list[ev.Event] = field(default_factory=list)


STEPS = ["Open the home page", 'Click "Cart"', 'Check that the page shows "Total"']


async def build_session(store: EventStore, state: str) -> Built:
    """Append the events that put a new session into `state`, as planner and executor would."""
    built = Built(
        session_id=str(uuid.uuid4()), task_id=str(uuid.uuid4()), plan_id=str(uuid.uuid4())
    )
    sid, task, plan = built.session_id, built.task_id, built.plan_id
    payloads: list[ev.Payload] = [
        ev.SessionCreated(
            test_case="\n".join(STEPS), target_url="http://127.0.0.1:9/", llm_model="offline"
        )
    ]

    if state != "created":
        payloads.append(ev.PlanStarted(plan_id=plan, model="offline"))
    if state not in ("created", "generating_plan"):
        payloads.append(
            ev.PlanCompleted(
                plan_id=plan,
                plan_text="\n".join(f"{n}. {s}" for n, s in enumerate(STEPS, 1)),
                steps=[ev.PlanStep(number=n, description=s) for n, s in enumerate(STEPS, 1)],
                unparsed=["wiggle the mouse"],
            )
        )

    if state in ("running", "paused", "cancelled", "completed", "stopped"):
        payloads += [
            ev.ExecutionStarted(task_id=task, from_step=1, total_steps=3),
            ev.StepStarted(task_id=task, step_number=1, description=STEPS[0]),
        ]
    if state in ("paused", "stopped"):
        payloads += [
            ev.StepCompleted(
                task_id=task, step_number=1, thinking="opened", screenshots=[f"{sid}/1/1.png"]
            ),
            ev.ExecutionPaused(task_id=task, after_step=1),
        ]
    if state == "stopped":
        payloads.append(ev.BrowserClosed(reason="stop_all"))
    if state == "completed":
        payloads.append(ev.StepCompleted(task_id=task, step_number=1))
        for number in (2, 3):
            payloads += [
                ev.StepStarted(task_id=task, step_number=number, description=STEPS[number - 1]),
                ev.StepCompleted(task_id=task, step_number=number),
            ]
        payloads += [
            ev.ExecutionCompleted(
                task_id=task, passed=3, failed=0, skipped=0, total=3, success=True
            ),
            ev.BrowserClosed(reason="finished"),
        ]
    if state == "cancelled":
        payloads += [ev.ExecutionCancelled(task_id=task), ev.BrowserClosed(reason="cancelled")]
    if state == "blocked":
        payloads += [
            ev.RunTillEndStarted(task_id=task, from_step=1, total_steps=3),
            ev.StepStarted(task_id=task, step_number=1, description=STEPS[0]),
            ev.StepFailed(task_id=task, step_number=1, error='page does not show "Home"'),
            ev.RunTillEndPaused(task_id=task, step_number=1, error='page does not show "Home"'),
        ]

    for payload in payloads:
        built.events.append(await store.append(sid, payload))
    return built


# --- reading what the gateway wrote ---------------------------------------------------


async def commands_for(js: JetStreamContext, session_id: str) -> list[tuple[str, Command]]:
    """Return (subject, command) of every stored command of one session, oldest first."""
    found: list[tuple[str, Command]] = []
    position = 1
    while True:
        try:
            message = await js.get_msg(
                subjects.COMMANDS_STREAM,
                seq=position,
                subject=f"{subjects.COMMANDS_PREFIX}.>",
                next=True,
            )
        except NotFoundError:
            return found
        command = msgspec.json.decode(message.data or b"", type=Command)
        if command.session_id == session_id:
            found.append((message.subject or "", command))
        position = (message.seq or position) + 1


async def rejections(store: EventStore, session_id: str) -> list[ev.Event]:
    return [event for event in await store.read(session_id) if event.type == "command_rejected"]
