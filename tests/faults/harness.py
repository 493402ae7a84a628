"""Shared tools of the fault tests: a stack of their own, kills, restarts and the final checks.

Each fault test starts its own stack (embedded nats-server and Postgres on free
loopback ports, the services as processes) because it breaks that stack. So no
test shares a broken stack with another.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from stepwise_libs.events import Event
from stepwise_libs.jetstream import EventStore, connect
from support.readmodels import assert_read_models_match_stream, read_stream, wait_for_sessions

from stepwise.stack import SERVICES, Stack, StackConfig, StackError, service_command

# Nothing here may reach a real Gemini API: empty keys read as unset.
OFFLINE_ENV = {
    "GEMINI_API_KEY": "",
    "GOOGLE_API_KEY": "",
    "STEPWISE_DEFAULT_MODEL": "offline",
    "ANONYMIZED_TELEMETRY": "false",
    "BROWSER_USE_VERSION_CHECK": "false",
    # Every site these tests serve listens on 127.0.0.1, as does TARGET_URL.
    "STEPWISE_ALLOWED_HOSTS": "127.0.0.1",
}
TARGET_URL = "http://127.0.0.1:9/"
TEST_CASE = '1. Open the login page\n2. Type "standard_user" into "Username"\n3. Click "Login"'
PLAN_END = frozenset({"plan_completed", "plan_failed"})


class PartialStack(Stack):
    """The supervisor's stack with only some services: most faults need no browser.

    The executor imports browser-use, which takes a minute to start on a busy
    machine; the tests that never run a step leave it out.
    """

    def __init__(self, config: StackConfig, names: tuple[str, ...]) -> None:
        super().__init__(config)
        self.names = names

    def start(self) -> Stack:
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._choose_port()
            self._start_servers()
            self._migrate()
            for name in self.names:
                self._start_service(name)
            self._write_state()
            deadline = time.monotonic() + self.config.ready_timeout
            with httpx.Client(timeout=2.0) as client:
                for service in self.services.values():
                    while not self._service_ready(service, client):
                        if not service.running() or time.monotonic() > deadline:
                            raise StackError(
                                f"{service.name} did not become ready:\n{service.log_tail()}"
                            )
                        time.sleep(0.2)
        except BaseException:
            self.stop()
            raise
        return self


WITHOUT_EXECUTOR = ("projector", "planner", "gateway")


@contextmanager
def fault_stack(
    extra_env: dict[str, str] | None = None, names: tuple[str, ...] = SERVICES
) -> Iterator[Stack]:
    """Start a stack of `names` in a fresh data folder; stop it and remove the folder after."""
    # Outside pytest's temporary folders: Postgres runs as an unprivileged user and
    # must be able to walk down to its data (see tests/e2e/conftest.py).
    home = Path(tempfile.mkdtemp(prefix="stepwise-faults-"))
    try:
        config = StackConfig(
            home=home,
            port=0,
            restart=False,
            extra_env={**OFFLINE_ENV, **(extra_env or {})},
        )
        with PartialStack(config, names) as stack:
            yield stack
    finally:
        shutil.rmtree(home, ignore_errors=True)


def sigkill(stack: Stack, name: str) -> None:
    """SIGKILL a service's whole process group and keep it down until `restart`."""
    service = stack.services[name]
    service.restart_at = float("inf")
    process = service.process
    assert process is not None and process.poll() is None, f"{name} is not running"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, f"{name} exited with {process.returncode}"


def restart(stack: Stack, name: str, timeout: float = 90.0) -> None:
    """Start a killed service again and wait until it is ready."""
    stack.start_service(name, timeout=timeout)


def run_projector_command(stack: Stack, subcommand: str, timeout: float = 180.0) -> str:
    """Run `stepwise-projector <subcommand>` with the stack's settings; return its output."""
    env = stack.services["projector"].env
    result = subprocess.run(
        [*service_command("projector"), subcommand],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"stepwise-projector {subcommand} failed:\n{output[-3000:]}"
    return output


def service_log(stack: Stack, name: str) -> str:
    return stack.services[name].log_path.read_text(errors="replace")


def alive(stack: Stack, *names: str) -> None:
    """Fail naming every listed service that is no longer running."""
    dead = {
        name: stack.services[name].process.returncode  # type: ignore[union-attr]
        for name in names
        if not stack.services[name].running()
    }
    assert not dead, f"services exited (name: exit code): {dead}"


async def create_session(
    client: httpx.AsyncClient, test_case: str = TEST_CASE, llm_model: str = "offline"
) -> str:
    response = await client.post(
        "/api/sessions",
        json={"test_case": test_case, "target_url": TARGET_URL, "llm_model": llm_model},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["session_id"])


async def wait_for_stream(
    nats_url: str,
    session_ids: list[str],
    done: frozenset[str] = PLAN_END,
    seconds: float = 120.0,
) -> dict[str, list[Event]]:
    """Wait until each session's stream contains an event whose type is in `done`.

    A core NATS subscription to every events subject wakes the wait on each new
    event, so it reads the sessions again only when something was appended.
    """
    client = await connect(nats_url, "tests-faults")
    try:
        store = EventStore(client.jetstream())
        pending = set(session_ids)
        woken = asyncio.Event()

        async def on_message(_: Any) -> None:
            woken.set()

        subscription = await client.subscribe("stepwise.events.*", cb=on_message)
        try:
            async with asyncio.timeout(seconds):
                while pending:
                    woken.clear()
                    for session_id in list(pending):
                        events = await store.read(session_id)
                        if any(event.type in done for event in events):
                            pending.discard(session_id)
                    if pending:
                        try:
                            await asyncio.wait_for(woken.wait(), 2.0)
                        except TimeoutError:
                            pass  # read again: a missed wake-up costs at most 2 s
        except TimeoutError:
            raise AssertionError(
                f"{len(pending)} sessions reached none of {sorted(done)} in {seconds} s: "
                f"{sorted(pending)[:5]}"
            ) from None
        finally:
            await subscription.unsubscribe()
        return {session_id: await store.read(session_id) for session_id in session_ids}
    finally:
        await client.close()


async def assert_consistent(stack: Stack, session_ids: list[str], seconds: float = 120.0) -> None:
    """The end check of every fault test.

    The stream contains each event once (distinct ids, seq dense from 1), the
    projector has caught up with every session, and the read models equal a
    fold of the whole stream.
    """
    by_session = await read_stream(stack.nats_url)
    missing = [session_id for session_id in session_ids if session_id not in by_session]
    assert not missing, f"sessions with no events in the stream: {missing}"
    ids: list[str] = []
    for session_id, events in by_session.items():
        seqs = [event.seq for event in events]
        assert seqs == list(range(1, len(seqs) + 1)), f"session {session_id}: seqs {seqs}"
        ids.extend(event.id for event in events)
    assert len(ids) == len(set(ids)), "the events stream holds an event id twice"
    await wait_for_sessions(
        stack.database_url,
        {session_id: events[-1].seq for session_id, events in by_session.items()},
        seconds,
    )
    await assert_read_models_match_stream(stack.database_url, stack.nats_url)


def process_rss_kib(pid: int) -> int:
    """Return the resident memory of a process in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def open_sockets(pid: int) -> int:
    """Count the sockets the process has open, from /proc/<pid>/fd."""
    count = 0
    for entry in os.scandir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(entry.path).startswith("socket:"):
                count += 1
        except OSError:
            continue  # closed between the listing and the readlink
    return count


def gateway_pid(stack: Stack) -> int:
    pid = stack.services["gateway"].pid
    assert pid is not None
    return pid


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], seconds: float, what: str, every: float = 0.2
) -> float:
    """Wait until `check()` holds, testing it every `every` s; return the seconds it took.

    For states with no event to wait on (a process's open sockets, a consumer's
    counters); fails naming `what` after `seconds`.
    """
    started = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(every)
