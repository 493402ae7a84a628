"""The supervisor behind `stepwise up`: restarts a dead service, guards its data folder.

It also runs the embedded nats-server with one NATS user per service, each with only
its own rights and its own password.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import time
from urllib.parse import urlsplit

import httpx
import nats
import pytest
from nats.errors import Error as NatsError
from stepwise_libs import subjects

from stepwise import nats_users
from stepwise.sample_site import SampleSite
from stepwise.stack import (
    READY_LINE,
    Stack,
    StackAlreadyRunningError,
    StackConfig,
    read_state,
    running_gateway,
)

from .conftest import TEST_CLIENT_PREFIX
from .sessions import run_test_case

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_stack_state_file_names_gateway_and_pids(stack: Stack) -> None:
    state = read_state(stack.home)

    assert state is not None
    assert state["gateway_url"] == stack.gateway_url
    assert state["ready"] is True
    assert state["services"] == {name: s.pid for name, s in stack.services.items()}
    assert running_gateway(stack.home) == stack.gateway_url


def test_stack_state_file_holds_no_password(stack: Stack) -> None:
    assert stack.nats_users_path is not None
    passwords = json.loads(stack.nats_users_path.read_text())
    state_text = (stack.home / "stack.json").read_text()

    assert stat.S_IMODE(stack.nats_users_path.stat().st_mode) == 0o600
    assert set(passwords) == set(nats_users.USERS)
    for user, password in passwords.items():
        assert password not in state_text, f"stack.json contains the password of {user}"


def test_each_service_gets_only_its_own_nats_user(stack: Stack) -> None:
    passwords = json.loads(stack.nats_users_path.read_text())  # type: ignore[union-attr]

    for name, service in stack.services.items():
        url = urlsplit(service.env["STEPWISE_NATS_URL"])
        assert (url.username, url.password) == (name, passwords[name]), name
        others = [user for user in passwords if user != name]
        environment = json.dumps(service.env)
        leaked = [user for user in others if passwords[user] in environment]
        assert leaked == [], f"{name} has the NATS password of {leaked}"


async def test_planner_user_cannot_publish_executor_command(stack: Stack) -> None:
    assert stack.nats is not None
    passwords = json.loads(stack.nats_users_path.read_text())  # type: ignore[union-attr]
    violations: list[str] = []
    violation_seen = asyncio.Event()

    async def record(error: Exception) -> None:
        violations.append(str(error))
        violation_seen.set()

    planner = await nats.connect(
        nats_users.url_with_credentials(stack.nats.url, "planner", passwords["planner"]),
        name=f"{TEST_CLIENT_PREFIX}planner",
        error_cb=record,
        allow_reconnect=False,
        connect_timeout=5,
    )
    try:
        subject = subjects.executor_command_subject("x")
        await planner.publish(subject, b"{}")
        await planner.flush()
        await asyncio.wait_for(violation_seen.wait(), 10)
    finally:
        await planner.close()

    assert len(violations) == 1, violations
    assert "permissions violation for publish" in violations[0].lower()
    assert subject in violations[0]


async def test_nats_without_credentials_rejected(stack: Stack) -> None:
    assert stack.nats is not None

    with pytest.raises(NatsError, match=r"(?i)authorization violation"):
        await nats.connect(
            stack.nats.url,
            name=f"{TEST_CLIENT_PREFIX}anonymous",
            allow_reconnect=False,
            connect_timeout=5,
        )


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
