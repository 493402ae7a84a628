"""Secret values through the whole stack: typed into the page, found nowhere else.

A session logs in to a loopback site with a username and password chosen at
random for the run, passed as secrets. The values must reach the browser, which
the site proves by recording the login. They must appear in no event, command or
other NATS message except the secrets bucket's own. Nor may they appear in a
service log, a file of the stack's data folder, a read-model row or a gateway
response.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import websockets
from e2e.conftest import OFFLINE_ENV, _run_stack, stack_home
from e2e.sessions import EXECUTION_END, PLAN_END, websocket_url
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NotFoundError
from stepwise.stack import Stack
from stepwise_libs import subjects
from stepwise_libs.jetstream import connect
from support.login_site import LoginSite, login_test_case, random_secret

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def secrets_stack() -> Iterator[Stack]:
    """A stack of its own, so every file in its data folder belongs to these tests."""
    with stack_home() as home:
        yield from _run_stack(home)


@dataclass
class Captured:
    """Every message published on the stack's NATS while a capture ran."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)

    async def on_message(self, message: Msg) -> None:
        headers = json.dumps(message.headers or {}).encode()
        self.messages.append((message.subject, message.data + b"\n" + headers))

    def containing(self, value: str) -> list[str]:
        return [subject for subject, data in self.messages if value.encode() in data]


async def receive_raw(
    socket: Any, done: frozenset[str] | set[str], seconds: float
) -> list[tuple[str, dict[str, Any]]]:
    """Receive socket messages, as sent and parsed, until an event whose type is in `done`."""
    received: list[tuple[str, dict[str, Any]]] = []
    async with asyncio.timeout(seconds):
        while True:
            text = await socket.recv()
            message = json.loads(text)
            received.append((text, message))
            if "seq" in message and message["type"] in done:
                return received


async def wait_until_purged(js: JetStreamContext, session_id: str, seconds: float) -> None:
    """Wait until the session's key in the secrets bucket is deleted or purged."""
    bucket = await js.key_value(subjects.SECRETS_BUCKET)
    async with asyncio.timeout(seconds):
        while True:
            try:
                await bucket.get(session_id)
            except (KeyNotFoundError, KeyDeletedError):
                return
            await asyncio.sleep(0.2)


async def raw_events(js: JetStreamContext, session_id: str) -> list[bytes]:
    """Return the stored bytes (body and headers) of every event of a session, in order."""
    subject = subjects.session_events_subject(session_id)
    found: list[bytes] = []
    position = 1
    while True:
        try:
            message = await js.get_msg(
                subjects.EVENTS_STREAM, seq=position, subject=subject, next=True, direct=True
            )
        except NotFoundError:
            return found
        found.append((message.data or b"") + json.dumps(message.headers or {}).encode())
        position = (message.seq or 0) + 1


async def dump_read_models(database_url: str) -> str:
    """Return every row of every table of the read-model database as text."""
    connection = await asyncpg.connect(
        database_url.replace("postgresql+asyncpg://", "postgresql://")
    )
    try:
        tables = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        dumped = []
        for table in tables:
            rows = await connection.fetch(f'SELECT t::text AS row FROM "{table["tablename"]}" t')
            dumped.extend(f"{table['tablename']}: {row['row']}" for row in rows)
        return "\n".join(dumped)
    finally:
        await connection.close()


def files_containing(folder: Path, values: list[str]) -> list[str]:
    """Return the files under `folder` whose bytes contain any of `values`."""
    found = []
    for path in folder.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue  # removed while walking, such as a finished browser profile
        if any(value.encode() in data for value in values):
            found.append(str(path))
    return found


async def test_secret_values_reach_page_only(secrets_stack: Stack) -> None:
    stack = secrets_stack
    with LoginSite(random_secret(), random_secret()) as site:
        values = [site.username, site.password]
        captured = Captured()
        nats: NATS = await connect(stack.nats_url, "tests-secrets")
        subscription = await nats.subscribe(">", cb=captured.on_message)
        js = nats.jetstream()
        responses: list[str] = []
        socket_messages: list[tuple[str, dict[str, Any]]] = []
        try:
            async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as http:
                created = await http.post(
                    "/api/sessions",
                    json={
                        "test_case": login_test_case(),
                        "target_url": site.url,
                        "llm_model": "offline",
                        "secrets": {"user": site.username, "password": site.password},
                    },
                )
                assert created.status_code == 201, created.text
                responses.append(created.text)
                session_id = created.json()["session_id"]
                url = websocket_url(stack.gateway_url, session_id, 0)
                async with websockets.connect(url) as socket:
                    socket_messages += await receive_raw(socket, PLAN_END, 120)
                    started = await http.post(f"/api/sessions/{session_id}/start")
                    assert started.status_code == 202, started.text
                    responses.append(started.text)
                    socket_messages += await receive_raw(socket, EXECUTION_END, 600)
                    socket_messages += await receive_raw(socket, {"browser_closed"}, 60)
                await wait_until_purged(js, session_id, 30)
                await nats.flush()
                # Drain delivers what is still queued for the callback, then unsubscribes.
                await subscription.drain()

                events = [message for _, message in socket_messages if "seq" in message]
                last_seq = events[-1]["seq"]
                for path in (
                    f"/api/sessions/{session_id}?wait_for_seq={last_seq}",
                    f"/api/sessions/{session_id}/events?since=0",
                    f"/api/sessions/{session_id}/task/status",
                    "/api/sessions?limit=500",
                ):
                    response = await http.get(path)
                    assert response.status_code == 200, (path, response.text)
                    responses.append(response.text)
                screenshots = [
                    name
                    for event in events
                    if event["type"] == "step_completed"
                    for name in event["data"]["screenshots"]
                ]
                for name in screenshots:
                    image = await http.get(f"/api/sessions/{session_id}/screenshots/{name}")
                    assert image.status_code == 200, name
                    assert all(value.encode() not in image.content for value in values)

            stored_events = await raw_events(js, session_id)
            kv = await js.get_msg(
                f"KV_{subjects.SECRETS_BUCKET}",
                subject=f"$KV.{subjects.SECRETS_BUCKET}.{session_id}",
            )
        finally:
            await nats.close()

    # The values reached the page: the site saw exactly them, and the check passed.
    assert site.attempts == [(site.username, site.password)]
    completed = [event for event in events if event["type"] == "execution_completed"]
    assert [event["data"]["success"] for event in completed] == [True]
    typed = [
        event["data"]["action"]["params"]["text"]
        for event in events
        if event["type"] == "action_executed" and event["data"]["action"]["name"] == "input"
    ]
    assert typed == ["<secret>user</secret>", "<secret>password</secret>"]
    assert events[0]["data"]["secret_names"] == ["user", "password"]

    # On NATS, only the gateway's put into the bucket and the executor's read of it carry
    # a value. The read's reply goes to an inbox. No event or command carries one.
    for value in values:
        holders = captured.containing(value)
        assert f"$KV.{subjects.SECRETS_BUCKET}.{session_id}" in holders
        assert all(
            subject == f"$KV.{subjects.SECRETS_BUCKET}.{session_id}"
            or subject.startswith("_INBOX.")
            for subject in holders
        ), holders
    assert any(subject.startswith("stepwise.events.") for subject, _ in captured.messages)
    commands = [subject for subject, _ in captured.messages if subject.startswith("stepwise.cmd.")]
    assert "stepwise.cmd.planner.generate_plan" in commands
    assert "stepwise.cmd.executor.execute_plan" in commands
    assert len(stored_events) == len(events)
    assert all(value.encode() not in data for data in stored_events for value in values)
    # The bucket keeps only the purge marker.
    assert (kv.headers or {}).get("KV-Operation") == "PURGE"
    assert all(value.encode() not in (kv.data or b"") for value in values)

    # Gateway responses, socket messages, screenshot names and the read models.
    texts = responses + [text for text, _ in socket_messages] + screenshots
    assert all(value not in text for text in texts for value in values)
    assert screenshots
    dump = await dump_read_models(stack.database_url)
    assert session_id in dump
    assert all(value not in dump for value in values)

    # Every file the stack wrote: service logs, nats-server and Postgres data.
    executor_log = (stack.logs_dir / "executor.log").read_text(errors="replace")
    assert session_id in executor_log
    assert files_containing(stack.home, values) == []


def test_cli_reads_secrets_from_environment(secrets_stack: Stack, tmp_path: Path) -> None:
    with LoginSite(random_secret(), random_secret()) as site:
        env = dict(os.environ)
        env.update(OFFLINE_ENV)
        env["STEPWISE_HOME"] = str(tmp_path)
        env["STEPWISE_SECRET_user"] = site.username
        env["STEPWISE_SECRET_PASSWORD"] = site.password
        result = subprocess.run(
            [
                sys.executable, "-m", "stepwise.cli", "run",
                "--gateway", secrets_stack.gateway_url,
                "--url", site.url,
                "--secret", "password",
                login_test_case(),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )  # fmt: skip

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert site.attempts == [(site.username, site.password)]
    assert site.username not in output
    assert site.password not in output
    assert "on the command line" not in result.stderr
    assert files_containing(secrets_stack.logs_dir, [site.username, site.password]) == []
