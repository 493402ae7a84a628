"""`stepwise run`, `stepwise up` and `stepwise demo` as a user runs them: subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from stepwise import processes
from stepwise.embedded import free_port
from stepwise.sample_site import SAMPLES_DIR, SampleSite
from stepwise.stack import Stack

from .conftest import OFFLINE_ENV

pytestmark = pytest.mark.e2e

STEPWISE = [sys.executable, "-m", "stepwise.cli"]


def _cli_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["STEPWISE_HOME"] = str(home)
    env.pop("STEPWISE_GATEWAY_URL", None)
    env.pop("STEPWISE_NATS_URL", None)
    env.pop("STEPWISE_DATABASE_URL", None)
    return env


def _run_cli(args: list[str], home: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STEPWISE, *args],
        env=_cli_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.timeout(600)
def test_run_exits_zero_when_case_passes(
    stack: Stack, e2e_site: SampleSite, tmp_path: Path
) -> None:
    result = _run_cli(
        ["run", "--gateway", stack.gateway_url, "--url", e2e_site.base_url,
         "--file", str(SAMPLES_DIR / "checkout.txt")],
        tmp_path,
        timeout=500,
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Live view: {stack.gateway_url}/sessions/" in result.stdout
    assert 'Check that the page shows "Thank you for your order!"' in result.stdout
    assert "✓ Step 16 passed" in result.stdout
    assert "Test passed: 16 passed, 0 failed, 0 skipped of 16 steps" in result.stdout


@pytest.mark.timeout(600)
def test_run_exits_one_when_case_fails(stack: Stack, e2e_site: SampleSite) -> None:
    # No --gateway: the CLI finds the running stack through $STEPWISE_HOME/stack.json.
    result = _run_cli(
        ["run", "--url", e2e_site.base_url, "--file", str(SAMPLES_DIR / "failing.txt")],
        stack.home,
        timeout=500,
    )

    assert f"Live view: {stack.gateway_url}/sessions/" in result.stdout
    assert result.returncode == 1, result.stdout + result.stderr
    assert "✗ Step 6 failed" in result.stdout
    assert "Free shipping on every order" in result.stdout
    assert "Test failed" in result.stdout


def _session_id(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("Session "):
            return line.split()[1]
    raise AssertionError(f"no session id in:\n{output}")


def _wait_for_status(stack: Stack, session_id: str, status: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    seen = None
    while time.monotonic() < deadline:
        seen = httpx.get(f"{stack.gateway_url}/api/sessions/{session_id}", timeout=10).json()
        if seen.get("status") == status:
            return
        time.sleep(0.2)
    raise AssertionError(f"session {session_id} not {status} after {within} s: {seen}")


@pytest.mark.timeout(300)
def test_run_timeout_cancels_session(stack: Stack, e2e_site: SampleSite, tmp_path: Path) -> None:
    result = _run_cli(
        ["run", "--gateway", stack.gateway_url, "--url", e2e_site.base_url,
         "--timeout", "3", "--file", str(SAMPLES_DIR / "checkout.txt")],
        tmp_path,
        timeout=240,
    )  # fmt: skip

    session_id = _session_id(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "timed out after 3 s" in result.stdout
    assert f"cancelled session {session_id}" in result.stderr
    _wait_for_status(stack, session_id, "cancelled")


@pytest.mark.timeout(300)
def test_run_interrupt_cancels_session(stack: Stack, e2e_site: SampleSite, tmp_path: Path) -> None:
    process = subprocess.Popen(
        [*STEPWISE, "run", "--gateway", stack.gateway_url, "--url", e2e_site.base_url,
         "--file", str(SAMPLES_DIR / "checkout.txt")],
        env=_cli_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "Step 1 passed" in line:
                break
        process.send_signal(signal.SIGINT)
        rest, errors = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)

    session_id = _session_id("".join(lines))
    assert process.returncode == 130, "".join(lines) + rest + errors
    assert f"the run was interrupted: cancelled session {session_id}" in errors
    _wait_for_status(stack, session_id, "cancelled")


@pytest.mark.timeout(300)
def test_run_fails_plan_with_parts_left_out(
    stack: Stack, e2e_site: SampleSite, tmp_path: Path
) -> None:
    case = (
        "1. Open the login page\n"
        "2. Verify the logo is blue\n"
        '3. Check that the page shows "Username"'
    )
    args = ["run", "--gateway", stack.gateway_url, "--url", e2e_site.base_url, case]

    strict = _run_cli(args, tmp_path, timeout=240)
    partial = _run_cli([*args, "--allow-partial"], tmp_path, timeout=240)

    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "Verify the logo is blue" in strict.stdout
    assert "did not understand 1 part(s)" in strict.stdout
    assert "Step 1" not in strict.stdout
    assert partial.returncode == 0, partial.stdout + partial.stderr
    assert "Test passed: 2 passed, 0 failed, 0 skipped of 2 steps" in partial.stdout


@pytest.mark.timeout(120)
def test_run_exits_two_when_gateway_rejects_input(
    stack: Stack, e2e_site: SampleSite, tmp_path: Path
) -> None:
    # A control character passes the CLI's own checks; the gateway rejects it with 422.
    result = _run_cli(
        ["run", "--gateway", stack.gateway_url, "--url", e2e_site.base_url, "1. Open\x01 the page"],
        tmp_path,
        timeout=60,
    )

    assert result.returncode == 2, result.stdout + result.stderr
    assert "HTTP 422" in result.stderr
    assert "test_case" in result.stderr


def _wait_for_stack(process: subprocess.Popen[str], home: Path, seconds: float) -> dict:
    """Wait until `stepwise up` has marked stack.json ready and its gateway passes /readyz."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"stepwise up exited with {process.returncode}"
        state_path = home / "stack.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        if state.get("ready"):
            try:
                if httpx.get(f"{state['gateway_url']}/readyz", timeout=2).status_code == 200:
                    return state
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"stepwise up was not ready after {seconds} s")


def _interrupt(process: subprocess.Popen[str], seconds: float) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=seconds)
    return process.returncode, output


@pytest.mark.timeout(900)
def test_up_stops_cleanly_and_keeps_data(home: Path) -> None:
    port = free_port()
    command = [*STEPWISE, "up", "--port", str(port)]

    # First run: start, create a session, then Ctrl-C.
    first = subprocess.Popen(
        command, env=_cli_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        state = _wait_for_stack(first, home, 300)
        tree = processes.descendants(first.pid)
        expected = {*state["services"].values(), state["nats_pid"], state["postgres_pid"]}
        assert expected <= set(tree), f"stack.json pids {expected} are not children of up: {tree}"
        created = httpx.post(
            f"{state['gateway_url']}/api/sessions",
            json={"test_case": "1. Open the page", "target_url": "http://127.0.0.1:9/"},
            timeout=30,
        )
        assert created.status_code == 201, created.text
        session_id = created.json()["session_id"]

        code, output = _interrupt(first, 180)
    finally:
        if first.poll() is None:
            processes.stop_tree(first, 5)  # type: ignore[arg-type]

    assert code == 0, output
    assert "Stack stopped." in output
    survivors = [pid for pid in tree if processes.alive(pid)]
    assert survivors == [], f"processes left after Ctrl-C: {survivors}"
    assert not (home / "stack.json").exists()

    # Second run on the same data: the session is still there.
    second = subprocess.Popen(
        command, env=_cli_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        state = _wait_for_stack(second, home, 300)
        tree = processes.descendants(second.pid)
        listed = httpx.get(f"{state['gateway_url']}/api/sessions", timeout=30)
        assert listed.status_code == 200, listed.text
        assert session_id in {item["session_id"] for item in listed.json()["sessions"]}
        code, output = _interrupt(second, 180)
    finally:
        if second.poll() is None:
            processes.stop_tree(second, 5)  # type: ignore[arg-type]

    assert code == 0, output
    assert [pid for pid in tree if processes.alive(pid)] == []


@pytest.mark.timeout(900)
def test_demo_once_runs_sample_case(home: Path) -> None:
    result = _run_cli(["demo", "--once"], home, timeout=800)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Sample shop on http://127.0.0.1:" in result.stdout
    assert "Test passed: 16 passed" in result.stdout
    assert not (home / "stack.json").exists()
