"""`stepwise-gateway` as a process: refusing to start, the loopback warning, and clean logs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from stepwise.embedded import EmbeddedNats, free_port
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import (
    CI_TOKEN,
    TOKENS_ENV,
    UI_TOKEN,
    WRONG_TOKEN,
    service_env,
    start_service,
    stop_service,
)

# A well-formed URL; the gateway never reaches it in the refusal tests.
UNUSED_DATABASE = "postgresql+asyncpg://nobody@127.0.0.1:1/nothing"


def run_gateway_expecting_exit(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # A gateway that failed to refuse would listen; the timeout kills it within seconds.
    return subprocess.run(
        [sys.executable, "-m", "stepwise_gateway"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10"])
def test_non_loopback_host_without_tokens_refuses_to_start(host: str) -> None:
    env = service_env(
        STEPWISE_HOST=host,
        STEPWISE_PORT=str(free_port()),
        STEPWISE_DATABASE_URL=UNUSED_DATABASE,
        STEPWISE_NATS_URL=f"nats://127.0.0.1:{free_port()}",
    )
    result = run_gateway_expecting_exit(env)
    assert result.returncode == 2, result.stderr
    assert f"refusing to listen on {host} without API tokens" in result.stderr
    assert "Set STEPWISE_API_TOKENS" in result.stderr
    # It stopped before uvicorn started: no startup or bind line.
    assert "Uvicorn running" not in result.stderr
    assert "Started server process" not in result.stderr


@pytest.mark.parametrize(
    "value",
    ["short", f"ci:{CI_TOKEN},ci:{UI_TOKEN}", f"{CI_TOKEN},,{UI_TOKEN}", f"ci:{CI_TOKEN[:-1]} x"],
)
def test_bad_tokens_variable_fails_without_echoing_tokens(value: str) -> None:
    env = service_env(
        STEPWISE_API_TOKENS=value,
        STEPWISE_PORT=str(free_port()),
        STEPWISE_DATABASE_URL=UNUSED_DATABASE,
    )
    result = run_gateway_expecting_exit(env)
    assert result.returncode == 2, result.stderr
    assert "invalid STEPWISE_API_TOKENS=" in result.stderr
    for secret in (CI_TOKEN, UI_TOKEN, CI_TOKEN[:-1], "short"):
        assert secret not in result.stderr


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text(errors="replace")
        if text in content:
            return content
        if process.poll() is not None:
            raise AssertionError(f"gateway exited with {process.returncode}:\n{content}")
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged in {timeout} s:\n{log.read_text(errors='replace')}")


def test_loopback_without_tokens_serves_and_warns(
    tmp_path: Path, nats_server: EmbeddedNats, database_url: str
) -> None:
    port = free_port()
    log = tmp_path / "gateway.log"
    env = service_env(
        STEPWISE_PORT=str(port),
        STEPWISE_DATABASE_URL=database_url,
        STEPWISE_NATS_URL=nats_server.url,
    )
    process = start_service("stepwise_gateway", env, log)
    try:
        content = wait_for_line(log, "Uvicorn running", process, 60)
        assert "WARNING" in content
        assert "no API tokens set (STEPWISE_API_TOKENS)" in content
        assert "loopback address 127.0.0.1 only" in content
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200
    finally:
        stop_service(process)


async def _use_every_kind_of_credential(port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        created = await http.post(
            "/api/sessions",
            json={"test_case": "Open the home page", "target_url": "http://127.0.0.1:9/"},
            headers={"Authorization": f"Bearer {CI_TOKEN}"},
        )
        assert created.status_code == 201, created.text
        session_id = created.json()["session_id"]
        for response in (
            await http.get(f"/api/sessions/{session_id}/events?token={CI_TOKEN}"),
            await http.get(f"/api/sessions?token={UI_TOKEN}&limit=5"),
            await http.get(f"/?token={UI_TOKEN}"),
            await http.get("/api/sessions", headers={"Cookie": f"stepwise_token={UI_TOKEN}"}),
        ):
            assert response.status_code in (200, 303), response.text
        for wrong in (
            await http.get("/api/sessions", headers={"Authorization": f"Bearer {WRONG_TOKEN}"}),
            await http.get(f"/api/sessions?token={WRONG_TOKEN}"),
        ):
            assert wrong.status_code == 401
    ws = f"ws://127.0.0.1:{port}/api/sessions/{session_id}/ws"
    for url, options in (
        (f"{ws}?token={WRONG_TOKEN}", {}),
        (ws, {"subprotocols": ["bearer", WRONG_TOKEN]}),
        (ws, {"additional_headers": {"Authorization": f"Bearer {WRONG_TOKEN}"}}),
    ):
        async with connect(url, open_timeout=10, **options) as socket:
            with pytest.raises(ConnectionClosed) as closed:
                await socket.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    for url, options in (
        (f"{ws}?token={CI_TOKEN}", {}),
        (ws, {"subprotocols": ["bearer", UI_TOKEN]}),
        (ws, {"additional_headers": {"Authorization": f"Bearer {CI_TOKEN}"}}),
    ):
        async with connect(url, open_timeout=10, **options) as socket:
            assert '"seq":1' in await socket.recv(decode=True)


def test_tokens_never_reach_the_log(
    tmp_path: Path, nats_server: EmbeddedNats, secured_database: str
) -> None:
    port = free_port()
    log = tmp_path / "gateway.log"
    env = service_env(
        STEPWISE_PORT=str(port),
        STEPWISE_DATABASE_URL=secured_database,
        STEPWISE_NATS_URL=nats_server.url,
        STEPWISE_API_TOKENS=TOKENS_ENV,
        STEPWISE_LOG_LEVEL="DEBUG",
    )
    process = start_service("stepwise_gateway", env, log)
    try:
        wait_for_line(log, "Uvicorn running", process, 60)
        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        asyncio.run(_use_every_kind_of_credential(port))
    finally:
        stop_service(process)
    content = log.read_text(errors="replace")
    # The requests were logged (access log and auth lines) ...
    assert "GET /api/sessions" in content
    assert "api_client=ci" in content
    assert "api_client=browser" in content
    assert "rejected a request without a valid API token" in content
    # ... the gateway's own access lines lost the token at the source ...
    assert "GET /api/sessions?limit=5 HTTP/1.1" in content
    # ... and no token, right or wrong, is anywhere, though DEBUG logs the raw handshakes.
    for secret in (CI_TOKEN, UI_TOKEN, WRONG_TOKEN, CI_TOKEN[3:], UI_TOKEN[3:], WRONG_TOKEN[3:]):
        assert secret not in content
    assert "authorization: Bearer <token:ci>" in content
