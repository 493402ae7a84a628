"""The workers' `/healthz` on STEPWISE_HEALTH_PORT: 200, then 503 without NATS."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from stepwise.embedded import EmbeddedNats, free_port

from .conftest import service_env, start_service, stop_service


def wait_for_status(url: str, status: int, timeout: float, log: Path) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == status:
                return response
            last = response.status_code
        except httpx.TransportError as error:
            last = error
        time.sleep(0.1)
    raise AssertionError(
        f"{url} did not answer {status} in {timeout} s (last: {last!r}); log:\n"
        + log.read_text(errors="replace")
    )


# Seconds until a worker serves /healthz; importing browser-use makes the executor slow.
START_TIMEOUT = {"planner": 60, "projector": 60, "executor": 150}


@pytest.mark.parametrize("service", ["planner", "projector", "executor"])
def test_worker_healthz_follows_nats(service: str, tmp_path: Path, database_url: str) -> None:
    # Its own nats-server, since the test stops it.
    nats = EmbeddedNats(tmp_path / "nats").start()
    port = free_port()
    log = tmp_path / f"{service}.log"
    env = service_env(
        STEPWISE_NATS_URL=nats.url,
        STEPWISE_DATABASE_URL=database_url,
        STEPWISE_HEALTH_PORT=str(port),
        STEPWISE_HOME=str(tmp_path / "home"),
    )
    process = start_service(f"stepwise_{service}", env, log)
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        healthy = wait_for_status(url, 200, START_TIMEOUT[service], log)
        assert healthy.json() == {"status": "ok", "nats": "connected"}
        assert httpx.get(f"http://127.0.0.1:{port}/other", timeout=5).status_code == 404
        assert httpx.post(url, timeout=5).status_code == 405

        nats.stop()
        unhealthy = wait_for_status(url, 503, 30, log)
        body = unhealthy.json()
        assert body["nats"] in ("reconnecting", "disconnected")
        assert body["error"]["code"] == "unhealthy"
        assert process.poll() is None, "the worker exited instead of reconnecting"

        # SIGTERM stops a worker promptly even while NATS is away.
        process.terminate()
        assert process.wait(15) == 0
    finally:
        stop_service(process)
        nats.stop()
    assert "health endpoint listening" in log.read_text(errors="replace")


def test_bad_health_port_fails_at_start(tmp_path: Path) -> None:
    log = tmp_path / "planner.log"
    env = service_env(STEPWISE_HEALTH_PORT="eighty")
    process = start_service("stepwise_planner", env, log)
    try:
        assert process.wait(30) == 2
    finally:
        stop_service(process)
    assert "invalid STEPWISE_HEALTH_PORT='eighty'" in log.read_text()
