"""The executor as its own process: `stepwise-executor` consuming commands from real NATS."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psutil
import pytest
from nats.aio.client import Client as NATS
from stepwise_libs import commands as cmd
from stepwise_libs import subjects
from stepwise_libs.commands import encode_command
from stepwise_libs.events import Event
from stepwise_libs.jetstream import EventStore, publish_command

from stepwise.embedded import EmbeddedNats
from stepwise.sample_site import SampleSite, sample_test_case

from .conftest import create_planned_session

EXECUTOR = str(Path(sys.executable).with_name("stepwise-executor"))


class ExecutorProcess:
    def __init__(self, process: subprocess.Popen[bytes], log_path: Path, home: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.home = home

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while "service ready" not in self.log():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"stepwise-executor exited with {self.process.returncode}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"stepwise-executor not ready within {timeout} s:\n{self.log()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def executor_process(nats_server: EmbeddedNats, tmp_path: Path) -> Iterator[ExecutorProcess]:
    home = tmp_path / "home"
    log_path = tmp_path / "executor.log"
    env = dict(os.environ)
    env.update(
        STEPWISE_NATS_URL=nats_server.url,
        STEPWISE_HOME=str(home),
        STEPWISE_EXECUTOR_ID=f"test-{uuid.uuid4().hex[:8]}",
        STEPWISE_STEP_TIMEOUT="60",
        STEPWISE_LOG_LEVEL="INFO",
        # The sample site, the only site these tests serve, listens on 127.0.0.1.
        STEPWISE_ALLOWED_HOSTS="127.0.0.1",
    )
    env.pop("GEMINI_API_KEY", None)
    env.pop("GOOGLE_API_KEY", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen([EXECUTOR], env=env, stdout=log, stderr=subprocess.STDOUT)
    executor = ExecutorProcess(process, log_path, home)
    try:
        executor.wait_ready()
        yield executor
    finally:
        executor.stop()


async def wait_for_event(
    store: EventStore,
    session_id: str,
    event_type: str,
    within: float = 90.0,
    match: Callable[[Event], bool] = lambda event: True,
) -> list[Event]:
    """Tail the session until an event of `event_type` satisfying `match` arrives; return every event up to it."""
    seen: list[Event] = []

    async def follow() -> list[Event]:
        async for event in store.tail(session_id):
            seen.append(event)
            if event.type == event_type and match(event):
                return seen
        raise AssertionError("tail ended")

    try:
        return await asyncio.wait_for(follow(), timeout=within)
    except TimeoutError:
        raise AssertionError(
            f"no {event_type} within {within} s; saw {[e.type for e in seen]}"
        ) from None


@pytest.fixture
async def store(nats_client: NATS) -> AsyncIterator[EventStore]:
    yield EventStore(nats_client.jetstream())


async def test_executor_process_runs_plan(
    executor_process: ExecutorProcess, nats_client: NATS, store: EventStore, sample_site: SampleSite
) -> None:
    state = await create_planned_session(store, sample_test_case("failing"), sample_site.base_url)
    command = cmd.new_command(state.session_id, cmd.ExecutePlan(task_id="task-1"))
    js = nats_client.jetstream()
    await publish_command(js, subjects.executor_command_subject("execute_plan"), command)
    # The same command again under another message id, as a redelivery would bring it.
    await js.publish(
        subjects.executor_command_subject("execute_plan"),
        encode_command(command),
        headers={"Nats-Msg-Id": f"{command.command_id}-again"},
    )
    events = await wait_for_event(store, state.session_id, "browser_closed")
    types = [event.type for event in events]
    assert types.count("execution_started") == 1
    assert types.count("step_completed") == 5
    assert types.count("execution_failed") == 1
    assert all(event.command_id == command.command_id for event in events[3:])
    failed = next(event.data for event in events if event.type == "step_failed")
    assert 'Text "Free shipping on every order" was not found on the page' in failed["error"]
    folder = executor_process.home / "executor" / state.session_id
    assert not folder.exists()
    chromium = [p for p in psutil.Process(executor_process.process.pid).children(recursive=True)]
    assert chromium == []


async def test_executor_rejects_execute_without_plan(
    executor_process: ExecutorProcess, nats_client: NATS, store: EventStore
) -> None:
    from stepwise_libs import events as ev

    session_id = str(uuid.uuid4())
    await store.append(
        session_id,
        ev.SessionCreated(test_case="x", target_url="http://127.0.0.1:9/", llm_model="offline"),
    )
    command = cmd.new_command(session_id, cmd.ExecutePlan(task_id="task-1"))
    await publish_command(
        nats_client.jetstream(), subjects.executor_command_subject("execute_plan"), command
    )
    events = await wait_for_event(store, session_id, "command_rejected", within=30)
    rejected = events[-1]
    assert rejected.command_id == command.command_id
    assert rejected.data["command_type"] == "execute_plan"
    assert "no ready plan" in rejected.data["reason"]


async def test_cancel_kills_browser_mid_step(
    executor_process: ExecutorProcess, nats_client: NATS, store: EventStore, sample_site: SampleSite
) -> None:
    test_case = '1. Open the login page\n2. Wait for "Never shown" for 60 seconds\n3. Type "late" into "Username"'
    state = await create_planned_session(store, test_case, sample_site.base_url)
    js = nats_client.jetstream()
    execute = cmd.new_command(state.session_id, cmd.ExecutePlan(task_id="task-1"))
    await publish_command(js, subjects.executor_command_subject("execute_plan"), execute)
    await wait_for_event(
        store,
        state.session_id,
        "step_started",
        within=120,
        match=lambda event: event.data["step_number"] == 2,
    )
    before = psutil.Process(executor_process.process.pid).children(recursive=True)
    assert before, "the browser of the running step is not a child of the executor"
    cancel = cmd.new_command(state.session_id, cmd.CancelTask())
    await publish_command(js, subjects.executor_command_subject("cancel_task"), cancel)
    # Step 2 waits 60 s, so a browser gone within 10 s was killed by the cancel. The
    # cancel latency itself is measured by the cancel scenario in bench/.
    _, alive = await asyncio.to_thread(psutil.wait_procs, before, 10)
    assert alive == []
    await wait_for_event(store, state.session_id, "browser_closed", within=10)
    all_events = await store.read(state.session_id)
    types = [event.type for event in all_events]
    assert types[-2:] == ["execution_cancelled", "browser_closed"]
    assert (
        "step_completed"
        not in types[types.index("step_started", types.index("step_started") + 1) :]
    )
    assert not any(
        event.data.get("step_number") == 3 for event in all_events if event.type == "step_started"
    )


WRONG_PASSWORD = (
    '1. Open the login page\n2. Type "standard_user" into "Username"\n'
    '3. Type "wrong" into "Password"\n4. Click "Login"\n5. Check that the page shows "Products"'
)


async def test_failed_login_fails_products_check(
    executor_process: ExecutorProcess, nats_client: NATS, store: EventStore, sample_site: SampleSite
) -> None:
    # The login page reads "Log in to see the products.": only a case-sensitive check fails.
    state = await create_planned_session(store, WRONG_PASSWORD, sample_site.base_url)
    command = cmd.new_command(state.session_id, cmd.ExecutePlan(task_id="task-1"))
    await publish_command(
        nats_client.jetstream(), subjects.executor_command_subject("execute_plan"), command
    )
    events = await wait_for_event(store, state.session_id, "execution_failed", within=180)
    completed = [e.data["step_number"] for e in events if e.type == "step_completed"]
    assert completed == [1, 2, 3, 4]
    failed = [e.data for e in events if e.type == "step_failed"]
    assert [data["step_number"] for data in failed] == [5]
    assert 'Text "Products" was not found on the page' in failed[0]["error"]
    assert events[-1].data["failed_step"] == 5
