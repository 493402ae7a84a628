"""The supervisor behind `stepwise up`: restarts a dead service, guards its data folder."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from stepwise.sample_site import SampleSite
from stepwise.stack import (
    READY_LINE,
    Stack,
    StackAlreadyRunningError,
    StackConfig,
    read_state,
    running_gateway,
)

from .sessions import run_test_case

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_stack_state_file_names_gateway_and_pids(stack: Stack) -> None:
    state = read_state(stack.home)

    assert state is not None
    assert state["gateway_url"] == stack.gateway_url
    assert state["ready"] is True
    assert state["services"] == {name: s.pid for name, s in stack.services.items()}
    assert running_gateway(stack.home) == stack.gateway_url


def test_second_supervisor_on_same_home_is_rejected(stack: Stack) -> None:
    with pytest.raises(StackAlreadyRunningError, match=stack.gateway_url):
        Stack(StackConfig(home=stack.home, port=0)).start()

    # The refused supervisor touched nothing of the running one.
    assert read_state(stack.home) is not None
    assert httpx.get(f"{stack.gateway_url}/readyz", timeout=10).status_code == 200


async def test_supervisor_restarts_killed_service(stack: Stack, e2e_site: SampleSite) -> None:
    reports: list[tuple[str, str]] = []
    planner = stack.services["planner"]
    old_pid = planner.pid
    assert old_pid is not None
    stack.report = lambda level, message: reports.append((level, message))
    stack.config.restart = True
    try:
        os.kill(old_pid, signal.SIGKILL)
        planner.process.wait(10)  # type: ignore[union-attr]

        # Drive the supervisor's periodic check until the new planner logs that it is ready.
        deadline = time.monotonic() + 90
        while not (planner.running() and READY_LINE in planner.log_since_start()):
            assert time.monotonic() < deadline, f"planner not restarted; reports: {reports}"
            stack.check()
            await asyncio.sleep(0.2)
    finally:
        stack.config.restart = False

    assert planner.pid != old_pid
    assert any(
        level == "error" and "planner exited with code -9" in message for level, message in reports
    ), reports
    assert read_state(stack.home)["services"]["planner"] == planner.pid  # type: ignore[index]

    # The restarted planner serves the next session.
    record = await run_test_case(
        stack.gateway_url,
        '1. Open the login page\n2. Check that the page shows "Login"',
        e2e_site.base_url,
    )
    assert record.of_type("execution_completed")[0]["data"]["success"] is True
