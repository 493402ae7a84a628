"""The executor's egress guard against real Chromium: refused hosts never get a request.

One `stepwise-executor` process runs with STEPWISE_ALLOWED_HOSTS=127.0.0.1:<allowed port>.
Three servers of this test record every request they get: the allowed one, another port
on 127.0.0.1 and one on 127.0.0.2. Only loopback addresses are used, so a guard that
fails to block sends its request to a server of this test, never off the machine.
"""

from __future__ import annotations

import asyncio
import html
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from stepwise.embedded import EmbeddedNats
from stepwise_libs import commands as cmd
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.events import Event
from stepwise_libs.jetstream import EventStore, ensure_topology, publish_command
from stepwise_libs.phrases import split_test_case

from .conftest import service_env, start_service, stop_service

# Seconds until the executor is ready (importing browser-use is slow), and for one session.
START_TIMEOUT = 150
SESSION_TIMEOUT = 120


@dataclass
class RecordingServer:
    """An HTTP server on loopback that serves fixed pages and records every request path."""

    host: str
    pages: dict[str, tuple[int, dict[str, str], str]] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> RecordingServer:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                recorder.requests.append(self.path)
                status, headers, body = recorder.pages.get(self.path, (404, {}, "not found"))
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((self.host, 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


# Text of a page that a script of the allowed page opens from a blob: URL after loading.
BLOB_READY = "Blob page ready"
BLOB_SECRET = "blob-secret-9d2e"
BLOB_SCRIPT = (
    "addEventListener('load', () => { location.href = URL.createObjectURL(new Blob("
    f"['<title>Blob page</title><h1>{BLOB_READY}</h1><p>{BLOB_SECRET}</p>'], "
    "{type: 'text/html'})); });"
)


def page(title: str, body: str = "") -> tuple[int, dict[str, str], str]:
    return 200, {}, f"<!doctype html><title>{title}</title><h1>{title}</h1>{body}"


@dataclass
class Servers:
    allowed: RecordingServer
    other_port: RecordingServer
    other_address: RecordingServer


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    allowed = RecordingServer("127.0.0.1").start()
    other_port = RecordingServer("127.0.0.1").start()
    other_address = RecordingServer("127.0.0.2").start()
    internal = other_address.url("/internal")
    secret = f"http://localhost:{allowed.port}/secret"
    allowed.pages.update(
        {
            "/": page("Welcome"),
            "/redirect": (302, {"Location": internal}, ""),
            "/links": page(
                "Links",
                f'<p><a href="{html.escape(secret)}">Secret</a></p>'
                f'<p><a href="{html.escape(internal)}">Internal</a></p>',
            ),
            "/frame": page("Frame", f'<iframe src="{html.escape(other_address.url("/framed"))}">'),
            "/secret": page("Secret page"),
            "/blob": page("Blob opener", f"<script>{BLOB_SCRIPT}</script>"),
        }
    )
    for server in (other_port, other_address):
        server.pages.update({"/": page("Not allowed"), "/internal": page("Internal")})
    yield Servers(allowed, other_port, other_address)
    for server in (allowed, other_port, other_address):
        server.stop()


@pytest.fixture(scope="module")
def guarded_executor(
    nats_server: EmbeddedNats, servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """A `stepwise-executor` process that allows only the allowed server's host:port."""
    folder = tmp_path_factory.mktemp("ssrf-executor")
    log = folder / "executor.log"
    env = service_env(
        STEPWISE_NATS_URL=nats_server.url,
        STEPWISE_HOME=str(folder / "home"),
        STEPWISE_EXECUTOR_ID=f"ssrf-{uuid.uuid4().hex[:8]}",
        STEPWISE_STEP_TIMEOUT="60",
        STEPWISE_ALLOWED_HOSTS=f"127.0.0.1:{servers.allowed.port}",
        ANONYMIZED_TELEMETRY="false",
        BROWSER_USE_VERSION_CHECK="false",
    )
    process = start_service("stepwise_executor", env, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "service ready" not in log.read_text(errors="replace"):
            assert process.poll() is None, f"the executor exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the executor was not ready:\n{log.read_text()}"
            time.sleep(0.1)
        yield log
    finally:
        stop_service(process)


@pytest.fixture
async def store(nats_client: NATS) -> AsyncIterator[EventStore]:
    js = nats_client.jetstream()
    await ensure_topology(js)
    yield EventStore(js)


async def run_session(
    nats_client: NATS, store: EventStore, test_case: str, target_url: str
) -> list[Event]:
    """Plan `test_case` straight into the stream, execute it, return its events once it ends."""
    session_id = str(uuid.uuid4())
    steps = split_test_case(test_case)
    await store.append(
        session_id,
        ev.SessionCreated(test_case=test_case, target_url=target_url, llm_model="offline"),
    )
    await store.append(session_id, ev.PlanStarted(plan_id="plan-1", model="offline"))
    await store.append(
        session_id,
        ev.PlanCompleted(
            plan_id="plan-1",
            plan_text=test_case,
            steps=[ev.PlanStep(number=n, description=s) for n, s in enumerate(steps, 1)],
        ),
    )
    command = cmd.new_command(session_id, cmd.ExecutePlan(task_id="task-1"))
    await publish_command(
        nats_client.jetstream(), subjects.executor_command_subject(command.type), command
    )
    seen: list[Event] = []

    async def follow() -> list[Event]:
        async for event in store.tail(session_id):
            seen.append(event)
            if event.type == "browser_closed" or (
                event.type == "execution_failed" and not event.data.get("failed_step")
            ):
                return seen
        raise AssertionError("the tail ended")

    try:
        return await asyncio.wait_for(follow(), timeout=SESSION_TIMEOUT)
    except TimeoutError:
        raise AssertionError(
            f"session did not end within {SESSION_TIMEOUT} s; saw {[e.type for e in seen]}"
        ) from None


def failed_steps(events: list[Event]) -> list[dict]:
    return [event.data for event in events if event.type == "step_failed"]


def assert_blocked(failure: dict, url: str, address: str) -> None:
    assert failure["category"] == "navigation_blocked"
    assert f"navigation to {url} was blocked" in failure["error"]
    assert address in failure["error"]
    assert "STEPWISE_ALLOWED_HOSTS" in failure["error"]


async def test_target_not_allowed_fails_first_step(
    guarded_executor: Path, nats_client: NATS, store: EventStore, servers: Servers
) -> None:
    target = servers.other_port.url("/")
    events = await run_session(nats_client, store, "1. Open the page", target)

    failures = failed_steps(events)
    assert len(failures) == 1
    assert failures[0]["step_number"] == 1
    assert_blocked(failures[0], target, "127.0.0.1")
    assert (
        f"add 127.0.0.1:{servers.other_port.port} to STEPWISE_ALLOWED_HOSTS"
        in (failures[0]["error"])
    )
    assert [event.type for event in events].count("execution_failed") == 1
    assert servers.other_port.requests == []


async def test_allowed_host_port_passes(
    guarded_executor: Path, nats_client: NATS, store: EventStore, servers: Servers
) -> None:
    test_case = '1. Open the page\n2. Check that the page shows "Welcome"'
    events = await run_session(nats_client, store, test_case, servers.allowed.url("/"))

    assert failed_steps(events) == []
    completed = next(event.data for event in events if event.type == "execution_completed")
    assert completed["success"] is True
    assert completed["passed"] == 2
    assert "/" in servers.allowed.requests


async def test_redirect_to_other_address_blocked(
    guarded_executor: Path, nats_client: NATS, store: EventStore, servers: Servers
) -> None:
    events = await run_session(
        nats_client, store, "1. Open the page", servers.allowed.url("/redirect")
    )

    failures = failed_steps(events)
    assert len(failures) == 1
    assert failures[0]["step_number"] == 1
    assert_blocked(failures[0], servers.other_address.url("/internal"), "127.0.0.2")
    assert "/redirect" in servers.allowed.requests
    assert servers.other_address.requests == []


async def test_link_to_localhost_blocked(
    guarded_executor: Path, nats_client: NATS, store: EventStore, servers: Servers
) -> None:
    test_case = '1. Open the page\n2. Click "Secret"'
    events = await run_session(nats_client, store, test_case, servers.allowed.url("/links"))

    failures = failed_steps(events)
    assert len(failures) == 1
    assert failures[0]["step_number"] == 2
    secret = f"http://localhost:{servers.allowed.port}/secret"
    assert_blocked(failures[0], secret, "localhost resolved to")
    assert (
        f"add localhost:{servers.allowed.port} to STEPWISE_ALLOWED_HOSTS" in (failures[0]["error"])
    )
    assert "/links" in servers.allowed.requests
    assert "/secret" not in servers.allowed.requests


async def test_link_to_other_address_blocked(
    guarded_executor: Path, nats_client: NATS, store: EventStore, servers: Servers
) -> None:
    test_case = '1. Open the page\n2. Click "Internal"'
    events = await run_session(nats_client, store, test_case, servers.allowed.url("/links"))

    failures = failed_steps(events)
    assert len(failures) == 1
    assert failures[0]["step_number"] == 2
    assert_blocked(failures[0], servers.other_address.url("/internal"), "127.0.0.2")
    assert servers.other_address.requests == []


async def test_typed_url_blocked(
    guarded_executor: Path, nats_client: NATS, store: EventStore, servers: Servers
) -> None:
    typed = servers.other_address.url("/internal")
    test_case = f"1. Open the page\n2. Go to {typed}"
    events = await run_session(nats_client, store, test_case, servers.allowed.url("/"))

    failures = failed_steps(events)
    assert len(failures) == 1
    assert failures[0]["step_number"] == 2
    assert_blocked(failures[0], typed, "127.0.0.2")
    assert servers.other_address.requests == []


async def test_subframe_to_other_address_blocked(
    guarded_executor: Path, nats_client: NATS, store: EventStore, servers: Servers
) -> None:
    events = await run_session(
        nats_client, store, "1. Open the page", servers.allowed.url("/frame")
    )

    failures = failed_steps(events)
    assert len(failures) == 1
    assert_blocked(failures[0], servers.other_address.url("/framed"), "127.0.0.2")
    assert "/frame" in servers.allowed.requests
    assert servers.other_address.requests == []


async def test_typed_file_url_blocked(
    guarded_executor: Path,
    nats_client: NATS,
    store: EventStore,
    servers: Servers,
    tmp_path: Path,
) -> None:
    secret = "file-secret-4b7c"
    local = tmp_path / "nats-users.html"
    local.write_text(f"<title>Local users</title><h1>{secret}</h1>")
    test_case = f"1. Open the page\n2. Go to {local.as_uri()}"
    events = await run_session(nats_client, store, test_case, servers.allowed.url("/"))

    failures = failed_steps(events)
    assert len(failures) == 1
    assert failures[0]["step_number"] == 2
    assert failures[0]["category"] == "navigation_blocked"
    assert f"navigation to {local.as_uri()} was blocked" in failures[0]["error"]
    assert "its scheme file: is not allowed" in failures[0]["error"]
    assert "Only http and https URLs are allowed" in failures[0]["error"]
    assert not failures[0]["url"].startswith("file:")
    for event in events:
        assert secret not in json.dumps(event.data), event.type
        assert "Local users" not in json.dumps(event.data), event.type


async def test_script_opened_blob_page_left(
    guarded_executor: Path, nats_client: NATS, store: EventStore, servers: Servers
) -> None:
    # Chromium lets a page open a blob: URL of its own origin. The guard finds the page
    # after the step's action, or at the latest before the step's screenshot.
    test_case = f'1. Open the page\n2. Wait for "{BLOB_READY}"'
    events = await run_session(nats_client, store, test_case, servers.allowed.url("/blob"))

    failures = failed_steps(events)
    assert len(failures) == 1
    assert failures[0]["category"] == "navigation_blocked"
    assert "navigation to blob:http://127.0.0.1:" in failures[0]["error"]
    assert "its scheme blob: is not allowed" in failures[0]["error"]
    assert "/blob" in servers.allowed.requests
    for event in events:
        assert not event.data.get("url", "").startswith("blob:"), event.type
        assert BLOB_SECRET not in json.dumps(event.data), event.type
