"""`stepwise run` against a gateway that requires an API token."""

from __future__ import annotations

import importlib.util
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stepwise import processes
from stepwise.embedded import free_port
from stepwise.sample_site import SampleSite
from stepwise.stack import Stack, service_command

from .test_cli_commands import _cli_env

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        importlib.util.find_spec("stepwise_gateway.auth") is None,
        reason="this gateway has no API token support",
    ),
]

TOKEN = secrets.token_hex(32)


@pytest.fixture
def guarded_gateway(stack: Stack, tmp_path: Path) -> Iterator[str]:
    """A second gateway process on the stack's NATS and Postgres, with STEPWISE_API_TOKENS set."""
    port = free_port()
    env = {
        **stack.services["gateway"].env,
        "STEPWISE_PORT": str(port),
        "STEPWISE_API_TOKENS": f"cli:{TOKEN}",
    }
    process = processes.spawn(service_command("gateway"), env, tmp_path / "gateway.log")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            assert process.poll() is None, (tmp_path / "gateway.log").read_text()
            assert time.monotonic() < deadline, "the guarded gateway was not ready in 120 s"
            time.sleep(0.2)
        yield url
    finally:
        processes.stop_tree(process, 10)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _run(args: list[str], home: Path, **extra: str) -> tuple[int, str, str]:
    env = {**_cli_env(home), **extra}
    result = subprocess.run(
        [sys.executable, "-m", "stepwise.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr


def test_run_sends_api_token(guarded_gateway: str, e2e_site: SampleSite, tmp_path: Path) -> None:
    case = '1. Open the login page\n2. Check that the page shows "Login"'
    args = ["run", "--gateway", guarded_gateway, "--url", e2e_site.base_url, case]

    # Without a token the gateway returns 401, and the CLI names the variable to set.
    code, _, stderr = _run(args, tmp_path)
    assert code == 1, stderr
    assert "HTTP 401" in stderr
    assert "STEPWISE_API_TOKEN" in stderr

    # With the token, over HTTP and the WebSocket alike, the run passes.
    code, stdout, stderr = _run(args, tmp_path, STEPWISE_API_TOKEN=TOKEN)
    assert code == 0, stdout + stderr
    assert "Test passed: 2 passed" in stdout
