"""An executor stopped by SIGTERM during a run records the run as interrupted, not failed.

A run cut by a shutdown is no test failure: the session must end with
`session_interrupted`, so that a continue resumes it once an executor runs again.
The executor's Chromium is in its process group, so a SIGTERM to the group kills
the browser while the step runs. The executor must still record no failure. The
supervisor signals the executor alone, on `stop_service` and on Ctrl-C of
`stepwise up`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from stepwise import processes
from stepwise.embedded import free_port
from stepwise.stack import Stack

from .sessions import EXECUTION_END, PLAN_END, create_session, receive_until, websocket_url
from .test_cli_commands import STEPWISE, _cli_env, _interrupt, _wait_for_stack

pytestmark = pytest.mark.e2e

# The page shows READY only once the test allows it, so step 2 runs until then.
READY = "Checkout ready"
PAGE = """<!doctype html>
<html><head><title>Slow checkout</title></head>
<body><h1>Checkout</h1><p id="state">Loading</p>
<script>
setInterval(async () => {
  const response = await fetch("/state", {cache: "no-store"});
  document.getElementById("state").textContent = await response.text();
}, 300);
</script></body></html>
"""
TEST_CASE = f'1. Open the checkout page\n2. Wait for "{READY}" for 120 seconds'
FAILURES = frozenset({"step_failed", "execution_failed"})


@dataclass
class SlowSite:
    base_url: str
    ready: threading.Event


@pytest.fixture
def slow_site() -> Iterator[SlowSite]:
    ready = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/state":
                body = PAGE
            elif ready.is_set():
                body = READY
            else:
                body = "Still loading"
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SlowSite(f"http://127.0.0.1:{server.server_address[1]}/", ready)
    finally:
        server.shutdown()
        server.server_close()


def _sigterm_group(stack: Stack) -> None:
    """SIGTERM the executor's whole process group, its Chromium included, and wait for its exit."""
    process = stack.services["executor"].process
    assert process is not None and process.poll() is None, "the executor is not running"
    stack.services["executor"].restart_at = float("inf")
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(60)


def _stop_like_supervisor(stack: Stack) -> None:
    stack.stop_service("executor")


STOPS = {"process_group": _sigterm_group, "supervisor": _stop_like_supervisor}


@pytest.mark.parametrize("how", sorted(STOPS))
async def test_sigterm_during_step_interrupts_and_continue_finishes(
    stack: Stack, slow_site: SlowSite, how: str
) -> None:
    executor = stack.services["executor"]
    try:
        resumed = await _interrupt_and_continue(stack, slow_site, how)
    finally:
        # The other tests share this stack: leave it with a running executor.
        if not executor.running():
            await asyncio.to_thread(stack.start_service, "executor", 180)

    ended = resumed[-1]
    assert ended["type"] == "execution_completed", [event["type"] for event in resumed]
    assert ended["data"]["success"] is True, ended
    passed = [
        event["data"]["step_number"] for event in resumed if event["type"] == "step_completed"
    ]
    assert passed == [2], passed


async def _interrupt_and_continue(
    stack: Stack, slow_site: SlowSite, how: str
) -> list[dict[str, Any]]:
    executor = stack.services["executor"]
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        session_id = await create_session(client, TEST_CASE, slow_site.base_url)
        async with websockets.connect(websocket_url(stack.gateway_url, session_id, 0)) as socket:
            events = await receive_until(socket, PLAN_END, 120)
            assert events[-1]["type"] == "plan_completed", events[-1]
            started = await client.post(f"/api/sessions/{session_id}/start")
            assert started.status_code == 202, started.text

            # The agent is inside step 2 once it has polled the page once.
            while True:
                events += await receive_until(socket, {"action_executed"} | EXECUTION_END, 180)
                last = events[-1]
                assert last["type"] == "action_executed", f"the run ended early: {last}"
                if last["data"].get("step_number") == 2:
                    break

            await asyncio.to_thread(STOPS[how], stack)
            assert executor.process is not None
            # 0: the executor ran its shutdown; -15 or -9 would mean the signal killed it.
            assert executor.process.returncode == 0, executor.log_tail(40)

            mark = len(events)
            events += await receive_until(socket, {"session_interrupted"} | EXECUTION_END, 30)
            after_stop = [event["type"] for event in events[mark:]]
            assert after_stop[-1] == "session_interrupted", [
                (event["type"], event["data"].get("error")) for event in events[mark:]
            ]

        listed = await client.get(f"/api/sessions/{session_id}/events")
        assert listed.status_code == 200, listed.text
        stored = listed.json()["events"]
        types = [event["type"] for event in stored]
        assert not FAILURES & set(types), types
        assert types[-1] == "session_interrupted", types
        interrupted = stored[-1]["data"]
        assert "shut down" in interrupted["reason"], interrupted
        assert interrupted["last_completed_step"] == 1, interrupted

        await asyncio.to_thread(stack.start_service, "executor", 180)
        slow_site.ready.set()
        since = stored[-1]["seq"]
        async with websockets.connect(
            websocket_url(stack.gateway_url, session_id, since)
        ) as socket:
            continued = await client.post(f"/api/sessions/{session_id}/continue")
            assert continued.status_code == 202, continued.text
            resumed = await receive_until(socket, EXECUTION_END, 300)
    return resumed


def _events_until(
    gateway_url: str, session_id: str, done: Callable[[list[dict[str, Any]]], bool], seconds: float
) -> list[dict[str, Any]]:
    """Read the session's events until `done` holds for them; fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        listed = httpx.get(f"{gateway_url}/api/sessions/{session_id}/events", timeout=30)
        assert listed.status_code == 200, listed.text
        events: list[dict[str, Any]] = listed.json()["events"]
        if done(events):
            return events
        assert time.monotonic() < deadline, [event["type"] for event in events]
        time.sleep(0.3)


def _in_step_two(events: list[dict[str, Any]]) -> bool:
    return any(
        event["type"] == "action_executed" and event["data"].get("step_number") == 2
        for event in events
    )


def _ended(events: list[dict[str, Any]]) -> bool:
    return any(event["type"] in EXECUTION_END for event in events)


@pytest.mark.timeout(900)
def test_up_ctrl_c_interrupts_run(home: Path, slow_site: SlowSite) -> None:
    command = [*STEPWISE, "up", "--port", str(free_port())]

    first = subprocess.Popen(
        command, env=_cli_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        gateway_url = _wait_for_stack(first, home, 300)["gateway_url"]
        created = httpx.post(
            f"{gateway_url}/api/sessions",
            json={"test_case": TEST_CASE, "target_url": slow_site.base_url, "llm_model": "offline"},
            timeout=30,
        )
        assert created.status_code == 201, created.text
        session_id = created.json()["session_id"]
        _events_until(gateway_url, session_id, lambda got: got[-1]["type"] in PLAN_END, 120)
        started = httpx.post(f"{gateway_url}/api/sessions/{session_id}/start", timeout=30)
        assert started.status_code == 202, started.text
        _events_until(gateway_url, session_id, lambda got: _in_step_two(got) or _ended(got), 180)

        code, output = _interrupt(first, 180)
    finally:
        if first.poll() is None:
            processes.stop_tree(first, 5)  # type: ignore[arg-type]
    assert code == 0, output

    second = subprocess.Popen(
        command, env=_cli_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        gateway_url = _wait_for_stack(second, home, 300)["gateway_url"]
        stored = _events_until(gateway_url, session_id, lambda got: True, 30)
        types = [event["type"] for event in stored]
        assert not FAILURES & set(types), [
            (event["type"], event["data"].get("error"))
            for event in stored
            if event["type"] in FAILURES
        ]
        assert types[-1] == "session_interrupted", types
        assert stored[-1]["data"]["last_completed_step"] == 1, stored[-1]

        slow_site.ready.set()
        continued = httpx.post(f"{gateway_url}/api/sessions/{session_id}/continue", timeout=30)
        assert continued.status_code == 202, continued.text
        events = _events_until(gateway_url, session_id, _ended, 300)
        code, output = _interrupt(second, 180)
    finally:
        if second.poll() is None:
            processes.stop_tree(second, 5)  # type: ignore[arg-type]
    assert code == 0, output

    ended = [event for event in events if event["type"] in EXECUTION_END]
    assert [event["type"] for event in ended] == ["execution_completed"], ended
    assert ended[0]["data"]["success"] is True, ended[0]
