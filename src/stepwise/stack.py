"""The supervisor behind `stepwise up`: servers, migrations and the four services.

Start order: nats-server and Postgres (embedded unless `STEPWISE_NATS_URL` and
`STEPWISE_DATABASE_URL` point at running ones), `stepwise-projector migrate`,
then projector, planner, executor and gateway, each its own process with its
log under `$STEPWISE_HOME/logs/`. On the embedded nats-server each service
connects as its own NATS user with only its own rights (`stepwise.nats_users`).
Stop order is the reverse. While the stack runs, `$STEPWISE_HOME/stack.json`
records the gateway URL and the pids, so that `stepwise run` can find it. A lock
file keeps a second supervisor off the same data folder.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import httpx
from stepwise_libs.settings import redact_url

from stepwise import nats_users, processes
from stepwise.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedServerError,
    free_port,
    port_open,
)

logger = logging.getLogger(__name__)

# Start order; the stack stops them in reverse.
SERVICES = ("projector", "planner", "executor", "gateway")
WORKERS = ("projector", "planner", "executor")
# Seconds a service gets between SIGTERM and SIGKILL; the executor closes its browsers first.
STOP_TIMEOUTS = {"gateway": 10.0, "executor": 20.0, "planner": 10.0, "projector": 10.0}
# Line each worker logs once it is connected and consuming.
READY_LINE = "service ready"
# A service that ran this long before it died restarts at once instead of after a backoff.
STABLE_SECONDS = 60.0
MAX_BACKOFF_SECONDS = 30.0
STATE_FILE = "stack.json"
LOCK_FILE = "stack.lock"
# The executor blocks pages on private and loopback hosts unless this variable lists them.
ALLOWED_HOSTS_VARIABLE = "STEPWISE_ALLOWED_HOSTS"
# Its value on a stack whose gateway listens on loopback and whose user did not set it.
LOOPBACK_ALLOWED_HOSTS = "127.0.0.1,localhost,::1"

Reporter = Callable[[str, str], None]


class StackError(RuntimeError):
    """The stack could not start, or lost a part it cannot restart; the message names the part."""


class StackAlreadyRunningError(StackError):
    """Another supervisor has locked the data folder."""

    def __init__(self, home: Path, gateway_url: str | None) -> None:
        where = f" with its gateway on {gateway_url}" if gateway_url else ""
        super().__init__(
            f"a stack already runs on {home}{where}; use it, stop it, "
            "or set STEPWISE_HOME to another folder"
        )
        self.home = home
        self.gateway_url = gateway_url


def default_home(environ: Mapping[str, str] = os.environ) -> Path:
    """Return the data folder: `$STEPWISE_HOME`, or `./.stepwise`."""
    return Path(environ.get("STEPWISE_HOME") or ".stepwise").resolve()


@dataclass
class StackConfig:
    """Settings of one stack: data folder, gateway address, servers; `port=0` picks a free port."""

    home: Path
    host: str = "127.0.0.1"
    port: int = 8000
    nats_url: str | None = None
    database_url: str | None = None
    log_level: str = "INFO"
    ready_timeout: float = 180.0
    restart: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(
        cls, host: str = "127.0.0.1", port: int = 8000, environ: Mapping[str, str] = os.environ
    ) -> StackConfig:
        """Build a config from `STEPWISE_HOME`, `STEPWISE_NATS_URL`, `STEPWISE_DATABASE_URL`."""
        return cls(
            home=default_home(environ),
            host=host,
            port=port,
            nats_url=environ.get("STEPWISE_NATS_URL") or None,
            database_url=environ.get("STEPWISE_DATABASE_URL") or None,
            log_level=(environ.get("STEPWISE_LOG_LEVEL") or "INFO").upper(),
        )


@dataclass
class Service:
    """One service process and its restart bookkeeping."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    log_offset: int = 0
    failures: int = 0
    restart_at: float | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = processes.spawn(self.argv, self.env, self.log_path)
        self.started_at = time.monotonic()
        self.restart_at = None

    def log_since_start(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_offset)
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_since_start().splitlines()[-lines:])


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def service_command(name: str) -> list[str]:
    """Return the command that runs `stepwise-<name>` from this Python environment."""
    script = Path(sys.executable).parent / f"stepwise-{name}"
    if script.exists():
        return [str(script)]
    found = shutil.which(f"stepwise-{name}")
    if found:
        return [found]
    return [sys.executable, "-m", f"stepwise_{name}"]


def _log_reporter(level: str, message: str) -> None:
    logger.log(logging.getLevelName(level.upper()), message)


class Stack:
    """Start, watch and stop the whole stack; use it as a context manager or call start/stop."""

    def __init__(self, config: StackConfig, report: Reporter | None = None) -> None:
        self.config = config
        self.report = report or _log_reporter
        self.home = config.home
        self.logs_dir = self.home / "logs"
        self.nats: EmbeddedNats | None = None
        self.postgres: EmbeddedPostgres | None = None
        # Full rights on the stack's NATS: the admin user on the embedded server, or
        # STEPWISE_NATS_URL as given. It may hold a password: print or store `nats_address`.
        self.nats_url = config.nats_url or ""
        # Each service's own URL with its own user; empty when STEPWISE_NATS_URL is used as is.
        self.service_nats_urls: dict[str, str] = {}
        self.database_url = config.database_url or ""
        self.port = config.port
        self.services: dict[str, Service] = {}
        self._lock: TextIO | None = None
        self._stopping = False
        self.ready = False
        self._state_lock = threading.Lock()

    @property
    def gateway_url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"http://{host}:{self.port}"

    @property
    def state_path(self) -> Path:
        return self.home / STATE_FILE

    @property
    def nats_address(self) -> str:
        """Return the NATS URL without credentials, to print or store."""
        return self.nats.url if self.nats is not None else redact_url(self.nats_url)

    @property
    def nats_users_path(self) -> Path | None:
        """Return the passwords file of the embedded nats-server's users, or None without one."""
        return self.home / nats_users.USERS_FILE if self.service_nats_urls else None

    # --- start -------------------------------------------------------------------

    def start(self, cancel: threading.Event | None = None) -> Stack:
        """Start everything, then wait until the gateway passes /readyz and each worker is ready.

        Setting `cancel` from another thread or a signal handler ends the wait for
        readiness with a StackError; everything started so far is stopped.
        """
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            self._choose_port()
            self._start_servers()
            self._migrate()
            self._report_allowed_hosts()
            for name in SERVICES:
                self._start_service(name)
            # Written before the wait, so that a later supervisor can clean up after
            # this one if it dies while starting; `ready` turns true once all is ready.
            self._write_state()
            self._wait_ready(cancel or threading.Event())
            self.ready = True
            self._write_state()
        except EmbeddedServerError as error:
            self.stop()
            raise StackError(str(error)) from error
        except BaseException:
            self.stop()
            raise
        self.report("info", f"stack ready: gateway on {self.gateway_url}")
        return self

    def _acquire_lock(self) -> None:
        lock = (self.home / LOCK_FILE).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            state = read_state(self.home)
            raise StackAlreadyRunningError(
                self.home, state.get("gateway_url") if state else None
            ) from None
        self._lock = lock
        self._clean_stale_state()

    def _clean_stale_state(self) -> None:
        # We hold the lock, so a stack.json left here belongs to a supervisor that died:
        # kill what it left running before its servers block ours.
        state = read_state(self.home)
        if state is None:
            return
        leftovers: list[tuple[str, int | None, tuple[str, ...]]] = [
            (name, pid, (f"stepwise-{name}", f"stepwise_{name}"))
            for name, pid in state.get("services", {}).items()
        ]
        leftovers.append(("nats-server", state.get("nats_pid"), ("nats-server",)))
        leftovers.append(("postgres", state.get("postgres_pid"), ("postgres",)))
        for name, pid, expected in leftovers:
            if pid and processes.kill_stale(int(pid), expected):
                self.report("warning", f"killed {name} (pid {pid}) left by an earlier stack")
        self.state_path.unlink(missing_ok=True)

    def _choose_port(self) -> None:
        if not self.port:
            self.port = free_port(self.config.host or "127.0.0.1")
        elif port_open(self.config.host or "127.0.0.1", self.port):
            raise StackError(
                f"port {self.port} on {self.config.host} is already in use; "
                "stop what listens there or pass --port with another port"
            )

    def _start_servers(self) -> None:
        if not self.nats_url:
            self.report("info", "starting the embedded nats-server")
            self._start_embedded_nats()
        if not self.database_url:
            self.report("info", "starting the embedded Postgres")
            self.postgres = EmbeddedPostgres(self.home / "postgres").start()
            self.database_url = self.postgres.url

    def _start_embedded_nats(self) -> None:
        try:
            passwords = nats_users.load_or_create_passwords(self.home)
        except nats_users.NatsUsersError as error:
            raise StackError(str(error)) from error
        data_dir = self.home / "nats"
        data_dir.mkdir(parents=True, exist_ok=True)
        config_path = data_dir / "users.conf"
        config_path.write_text(nats_users.server_config())
        self.nats = EmbeddedNats(
            data_dir,
            extra_args=["-c", str(config_path)],
            environment=nats_users.server_environment(passwords),
        ).start()
        address = self.nats.url
        self.nats_url = nats_users.url_with_credentials(
            address, nats_users.ADMIN_USER, passwords[nats_users.ADMIN_USER]
        )
        self.service_nats_urls = {
            name: nats_users.url_with_credentials(address, name, passwords[name])
            for name in nats_users.SERVICE_USERS
        }

    def _environment(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.config.extra_env)
        env.update(
            {
                "STEPWISE_NATS_URL": self.service_nats_urls.get(name, self.nats_url),
                "STEPWISE_LOG_LEVEL": self.config.log_level,
                "STEPWISE_HOME": str(self.home),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if name in ("gateway", "projector"):
            env["STEPWISE_DATABASE_URL"] = self.database_url
        if name == "gateway":
            env["STEPWISE_HOST"] = self.config.host
            env["STEPWISE_PORT"] = str(self.port)
        if name == "executor":
            # browser-use 0.13 contacts the internet at start unless these are false.
            env.setdefault("ANONYMIZED_TELEMETRY", "false")
            env.setdefault("BROWSER_USE_VERSION_CHECK", "false")
            if self._allows_loopback_by_default():
                env[ALLOWED_HOSTS_VARIABLE] = LOOPBACK_ALLOWED_HOSTS
        return env

    def _allows_loopback_by_default(self) -> bool:
        """Tell whether the executor gets LOOPBACK_ALLOWED_HOSTS: the gateway listens on
        loopback, so only this machine's users can start sessions, and the user set no
        STEPWISE_ALLOWED_HOSTS of their own."""
        value = self.config.extra_env.get(ALLOWED_HOSTS_VARIABLE)
        if value is None:
            value = os.environ.get(ALLOWED_HOSTS_VARIABLE, "")
        return not value.strip() and is_loopback_host(self.config.host)

    def _report_allowed_hosts(self) -> None:
        if self._allows_loopback_by_default():
            self.report(
                "info",
                f"the executor may open pages on loopback ({LOOPBACK_ALLOWED_HOSTS}) because "
                f"the gateway listens on {self.config.host}; set {ALLOWED_HOSTS_VARIABLE} "
                "to choose the allowed hosts yourself",
            )

    def _migrate(self) -> None:
        self.report("info", "running the database migrations")
        log_path = self.logs_dir / "migrate.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        process = processes.spawn(
            [*service_command("projector"), "migrate"], self._environment("projector"), log_path
        )
        try:
            code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            processes.stop_tree(process, 5)
            raise StackError(
                f"stepwise-projector migrate timed out after 120 s; see {log_path}"
            ) from None
        if code != 0:
            with log_path.open("rb") as log:
                log.seek(offset)
                tail = "\n".join(log.read().decode("utf-8", "replace").splitlines()[-15:])
            raise StackError(
                f"stepwise-projector migrate failed with exit code {code}; see {log_path}:\n{tail}"
            )

    def _start_service(self, name: str) -> None:
        service = self.services.get(name)
        if service is None:
            service = Service(
                name=name,
                argv=service_command(name),
                env=self._environment(name),
                log_path=self.logs_dir / f"{name}.log",
            )
            self.services[name] = service
        service.start()
        logger.info("started %s", name, extra={"pid": service.pid, "log": str(service.log_path)})

    def _wait_ready(self, cancel: threading.Event) -> None:
        deadline = time.monotonic() + self.config.ready_timeout
        pending = set(WORKERS)
        gateway_ready = False
        with httpx.Client(timeout=2.0) as client:
            while pending or not gateway_ready:
                if cancel.is_set():
                    raise StackError("start cancelled before the stack was ready")
                for service in self.services.values():
                    if not service.running():
                        code = service.process.returncode if service.process else None
                        raise StackError(
                            f"{service.name} exited with code {code} during start; "
                            f"see {service.log_path}:\n{service.log_tail()}"
                        )
                for name in list(pending):
                    if READY_LINE in self.services[name].log_since_start():
                        pending.discard(name)
                if not gateway_ready:
                    gateway_ready = _answers_ready(client, self.gateway_url)
                if pending or not gateway_ready:
                    if time.monotonic() > deadline:
                        waiting = sorted(pending) + ([] if gateway_ready else ["gateway"])
                        seconds = self.config.ready_timeout
                        raise StackError(
                            f"{', '.join(waiting)} not ready after {seconds:.0f} s; "
                            f"see the logs in {self.logs_dir}"
                        )
                    time.sleep(0.2)

    # --- supervise ---------------------------------------------------------------

    def supervise(self, stop: threading.Event, interval: float = 0.5) -> None:
        """Watch the processes until `stop` is set, restarting any that die."""
        while not stop.wait(interval):
            self.check()

    def check(self) -> None:
        """Report and restart a dead service or embedded server; call it periodically."""
        if self._stopping:
            return
        now = time.monotonic()
        changed = False
        for server, name in ((self.nats, "nats-server"), (self.postgres, "postgres")):
            if (
                server is not None
                and server.process is not None
                and server.process.poll() is not None
            ):
                self.report(
                    "error",
                    f"{name} exited with code {server.process.returncode}; restarting it "
                    f"on the same port; see {server.log_path}",
                )
                try:
                    server.start()
                except EmbeddedServerError as error:
                    raise StackError(f"could not restart {name}: {error}") from error
                changed = True
        for service in self.services.values():
            if service.restart_at is None and not service.running():
                changed |= self._on_service_exit(service, now)
            elif service.restart_at is not None and now >= service.restart_at:
                self.report("warning", f"restarting {service.name}")
                service.start()
                changed = True
        if changed:
            self._write_state()

    def _on_service_exit(self, service: Service, now: float) -> bool:
        code = service.process.returncode if service.process else None
        message = (
            f"{service.name} exited with code {code}; see {service.log_path}:\n{service.log_tail()}"
        )
        if not self.config.restart:
            raise StackError(message)
        if now - service.started_at > STABLE_SECONDS:
            service.failures = 0
        delay = min(MAX_BACKOFF_SECONDS, 2.0**service.failures)
        service.failures += 1
        service.restart_at = now + delay
        self.report("error", f"{message}\nrestarting {service.name} in {delay:.0f} s")
        return False

    # --- stop ----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the services in reverse order, then the embedded servers; idempotent."""
        self._stopping = True
        # The gateway goes first, so no new command arrives. The workers then stop side
        # by side, because each may take its whole timeout to finish its work.
        self._stop_services(["gateway"])
        self._stop_services([name for name in reversed(SERVICES) if name != "gateway"])
        if self.postgres is not None:
            self.postgres.stop()
        if self.nats is not None:
            self.nats.stop()
        if self._lock is not None:
            self.state_path.unlink(missing_ok=True)
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def stop_service(self, name: str) -> None:
        """Stop one service and keep it stopped until `start_service`; for maintenance and tests."""
        service = self.services[name]
        service.restart_at = float("inf")  # check() must not restart it meanwhile
        if service.process is not None:
            processes.stop_tree(service.process, STOP_TIMEOUTS[name])

    def start_service(self, name: str, timeout: float | None = None) -> None:
        """Start a service stopped by `stop_service` and wait until it is ready."""
        service = self.services[name]
        service.start()
        self._write_state()
        deadline = time.monotonic() + (timeout or self.config.ready_timeout)
        with httpx.Client(timeout=2.0) as client:
            while not self._service_ready(service, client):
                if not service.running():
                    code = service.process.returncode if service.process else None
                    raise StackError(
                        f"{name} exited with code {code} during start; "
                        f"see {service.log_path}:\n{service.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise StackError(f"{name} not ready in time; see {service.log_path}")
                time.sleep(0.2)

    def _service_ready(self, service: Service, client: httpx.Client) -> bool:
        if service.name == "gateway":
            return _answers_ready(client, self.gateway_url)
        return READY_LINE in service.log_since_start()

    def _stop_services(self, names: list[str]) -> None:
        running = [
            (name, self.services[name].process)
            for name in names
            if name in self.services and self.services[name].process is not None
        ]
        threads = [
            threading.Thread(
                target=processes.stop_tree,
                args=(process, STOP_TIMEOUTS[name]),
                name=f"stop-{name}",
            )
            for name, process in running
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- state file ----------------------------------------------------------------

    def _write_state(self) -> None:
        state: dict[str, Any] = {
            "gateway_url": self.gateway_url,
            "ready": self.ready,
            "home": str(self.home),
            "supervisor_pid": os.getpid(),
            "nats_url": self.nats_address,
            "nats_users_file": str(self.nats_users_path) if self.nats_users_path else None,
            "database_url": self.database_url,
            "nats_pid": self.nats.process.pid if self.nats and self.nats.process else None,
            "postgres_pid": (
                self.postgres.process.pid if self.postgres and self.postgres.process else None
            ),
            "services": {name: service.pid for name, service in self.services.items()},
            "logs": str(self.logs_dir),
            "started_at": datetime.now(UTC).isoformat(),
        }
        with self._state_lock:
            temporary = self.state_path.with_suffix(".json.tmp")
            temporary.write_text(json.dumps(state, indent=2) + "\n")
            temporary.replace(self.state_path)


def _answers_ready(client: httpx.Client, gateway_url: str) -> bool:
    try:
        return client.get(f"{gateway_url}/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def read_state(home: Path) -> dict[str, Any] | None:
    """Return the contents of `home/stack.json`, or None when it is missing or unreadable."""
    try:
        state = json.loads((home / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def running_gateway(home: Path, timeout: float = 2.0) -> str | None:
    """Return the gateway URL of a stack running on `home`, if its /readyz returns 200."""
    state = read_state(home)
    if state is None or not state.get("ready"):
        return None
    if not processes.alive(int(state.get("supervisor_pid") or 0)):
        return None
    url = state.get("gateway_url")
    if not isinstance(url, str):
        return None
    with httpx.Client(timeout=timeout) as client:
        return url if _answers_ready(client, url) else None
