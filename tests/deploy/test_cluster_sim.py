"""A simulated production cluster on one machine, with one replica of everything killed mid-run.

Three nats-server processes form a JetStream cluster on loopback, with the accounts of
deploy/nats/values.yaml and Stepwise's streams at 3 replicas. Two planners, three
executors, two projectors (one Postgres database) and two gateways run as their own
processes, each given the URLs of all three nodes. Sessions of a short test case on
the bundled sample site go alternately through both gateways. Mid-run the test
SIGKILLs the node that leads the events stream and one replica of each service. A
session whose executor died is continued through the surviving gateway. Then a fourth
executor starts and one more old executor is killed, and the new one must take sessions.

At the end every session has passed, each event is in the stream once with a dense
per-session seq, every client received each event once across gateway failover, and
the read models equal a fold of the stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import nats
import pytest
import websockets
from natsconf import ensure_topology_when_formed
from stepwise_libs import subjects
from stepwise_libs.fold import COMPLETED, STEP_PASSED, fold
from stepwise_libs.jetstream import connect
from support.readmodels import (
    assert_read_models_match_stream,
    read_stream,
    wait_for_position,
    wait_for_sessions,
)

from stepwise import processes
from stepwise.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from stepwise.sample_site import SampleSite, serve_sample_site
from stepwise.stack import service_command

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

REPLICAS = 3
SESSIONS = 20
# Sessions in flight at once: each runs a Chromium, and the machine may have two cores.
PARALLEL = 3
# Sessions that must have ended before the kills, so the kills land mid-run.
DONE_BEFORE_KILL = 4
# Extra sessions allowed after the 20 when the new executor has taken none yet.
EXTRA_SESSIONS = 6
TEST_CASE = (
    '1. Open the login page\n2. Type "standard_user" into "Username"\n'
    '3. Type "secret_sauce" into "Password"'
)
STEPS = 3
API_TOKEN = "cluster-" + secrets.token_hex(16)
START_TIMEOUT = 180.0
# Seconds one session may take from its creation to browser_closed, including a
# lease expiry (10 s), a redelivered command (30 s ack wait) and a continue.
SESSION_TIMEOUT = 180.0
KILL_WAIT_TIMEOUT = 120.0
PLAN_END = frozenset({"plan_completed", "plan_failed"})
EXECUTION_END = frozenset({"execution_completed", "execution_failed", "execution_cancelled"})
RUN_STARTS = frozenset({"execution_started", "run_till_end_started", "execution_resumed"})
READY_LINE = "service ready"
OFFLINE_ENV = {
    "GEMINI_API_KEY": "",
    "GOOGLE_API_KEY": "",
    "STEPWISE_DEFAULT_MODEL": "offline",
    "ANONYMIZED_TELEMETRY": "false",
    "BROWSER_USE_VERSION_CHECK": "false",
}


@dataclass
class ServiceProcess:
    """One service replica started with `processes.spawn`, its output in its own log file."""

    name: str
    kind: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self) -> ServiceProcess:
        self.process = processes.spawn(service_command(self.kind), self.env, self.log_path)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def ready(self) -> bool:
        if self.kind != "gateway":
            return READY_LINE in self.log()
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def sigkill(self) -> None:
        assert self.process is not None and self.running, f"{self.name} is not running"
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        return processes.stop_tree(self.process, timeout)


@dataclass
class Cluster:
    nodes: list[EmbeddedNats]
    services: dict[str, ServiceProcess]
    database_url: str
    site: SampleSite
    folder: Path
    make_service: Callable[[str, int], ServiceProcess]

    def gateways(self) -> list[ServiceProcess]:
        return [service for service in self.services.values() if service.kind == "gateway"]

    def diagnosis(self) -> str:
        parts = [f"--- {name} ---\n{service.log_tail()}" for name, service in self.services.items()]
        return "\n".join(parts)


def _nats_urls(nodes: list[EmbeddedNats], user: str, password: str) -> str:
    """Return the comma-separated URLs of every node, as a Deployment lists a cluster's pods."""
    return ",".join(f"nats://{user}:{password}@{node.host}:{node.port}" for node in nodes)


def _wait_ready(services: list[ServiceProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(services)
    while pending:
        for service in list(pending):
            if not service.running:
                raise AssertionError(f"{service.name} exited during start:\n{service.log_tail()}")
            if service.ready():
                pending.remove(service)
        if pending and time.monotonic() > deadline:
            names = ", ".join(service.name for service in pending)
            details = "\n".join(f"--- {s.name} ---\n{s.log_tail()}" for s in pending)
            raise AssertionError(f"{names} not ready after {timeout:.0f} s:\n{details}")
        if pending:
            time.sleep(0.3)


async def _form(nodes: list[EmbeddedNats], password: str) -> None:
    client = await nats.connect(
        servers=[node.url for node in nodes],
        user="gateway",
        password=password,
        connect_timeout=5,
    )
    try:
        await ensure_topology_when_formed(client.jetstream(), REPLICAS)
    finally:
        await client.close()


def _migrate(database_url: str, log_path: Path) -> None:
    env = {**os.environ, "STEPWISE_DATABASE_URL": database_url}
    result = subprocess.run(
        [*service_command("projector"), "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    log_path.write_text(result.stdout + result.stderr)
    assert result.returncode == 0, f"migrate failed:\n{result.stdout}{result.stderr}"


@pytest.fixture
def sim_cluster(
    cluster: list[EmbeddedNats],
    passwords: dict[str, str],
    postgres_server: EmbeddedPostgres,
) -> Iterator[Cluster]:
    asyncio.run(_form(cluster, passwords["gateway"]))
    database_url = postgres_server.create_database(f"cluster_{uuid.uuid4().hex[:12]}")
    # Outside pytest's temporary folders, which a concurrent pytest run may lock to 0700.
    folder = Path(tempfile.mkdtemp(prefix="stepwise-cluster-"))
    logs = folder / "logs"
    logs.mkdir()
    _migrate(database_url, logs / "migrate.log")
    site = serve_sample_site()
    services: dict[str, ServiceProcess] = {}

    def make_service(kind: str, index: int) -> ServiceProcess:
        env = {
            **os.environ,
            **OFFLINE_ENV,
            "STEPWISE_NATS_URL": _nats_urls(cluster, kind, passwords[kind]),
            "STEPWISE_STREAM_REPLICAS": str(REPLICAS),
            "STEPWISE_LOG_LEVEL": "INFO",
            "STEPWISE_HOME": str(folder),
            "PYTHONUNBUFFERED": "1",
        }
        service = ServiceProcess(f"{kind}-{index}", kind, env, logs / f"{kind}-{index}.log")
        if kind in ("gateway", "projector"):
            env["STEPWISE_DATABASE_URL"] = database_url
        if kind == "gateway":
            port = free_port()
            env.update(
                STEPWISE_HOST="127.0.0.1",
                STEPWISE_PORT=str(port),
                STEPWISE_API_TOKENS=f"cluster:{API_TOKEN}",
            )
            service.url = f"http://127.0.0.1:{port}"
        if kind == "executor":
            env["STEPWISE_EXECUTOR_ID"] = f"executor-{index}"
            env["STEPWISE_ALLOWED_HOSTS"] = urlsplit(site.base_url).netloc
        services[service.name] = service
        return service

    try:
        started = [
            make_service(kind, index).start()
            for kind, count in (("planner", 2), ("executor", 3), ("projector", 2), ("gateway", 2))
            for index in range(1, count + 1)
        ]
        _wait_ready(started, START_TIMEOUT)
        yield Cluster(cluster, services, database_url, site, folder, make_service)
    finally:
        for service in services.values():
            service.stop(15)
        site.stop()
        shutil.rmtree(folder, ignore_errors=True)


# --- a client that fails over between gateways ------------------------------------------


@dataclass
class SessionRun:
    index: int
    session_id: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    continued: int = 0
    gateways_used: set[str] = field(default_factory=set)
    ended: bool = False

    @property
    def last_seq(self) -> int:
        return self.events[-1]["seq"] if self.events else 0

    def types(self) -> list[str]:
        return [event["type"] for event in self.events]

    def executors(self) -> list[str]:
        return [
            event["data"].get("executor_id", "")
            for event in self.events
            if event["type"] in RUN_STARTS
        ]

    def starting_on(self) -> str | None:
        """Return the executor whose run of the session has started but passed no step yet.

        Such a run has all its steps (several seconds of work) ahead of it, so a kill of
        its executor right now lands before the run ends.
        """
        owner = None
        for event in self.events:
            if event["type"] in RUN_STARTS:
                owner = event["data"].get("executor_id")
            elif event["type"] != "step_started" and event["type"] != "action_executed":
                owner = None
        return owner


class Client:
    """Sends requests and follows sessions through whichever gateway is up."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.headers = {"Authorization": f"Bearer {API_TOKEN}"}
        self.changed = asyncio.Event()

    def _gateway_order(self, preferred: int) -> list[ServiceProcess]:
        gateways = self.cluster.gateways()
        ordered = gateways[preferred % len(gateways) :] + gateways[: preferred % len(gateways)]
        return [gateway for gateway in ordered if gateway.running] or ordered

    async def post(
        self, run: SessionRun, path: str, key: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """POST with an Idempotency-Key, retried on the other gateway when the first is down."""
        deadline = time.monotonic() + 60
        attempt = 0
        while True:
            gateway = self._gateway_order(run.index + attempt)[0]
            attempt += 1
            try:
                async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
                    response = await http.post(
                        path, json=body, headers={**self.headers, "Idempotency-Key": key}
                    )
            except httpx.TransportError as error:
                if time.monotonic() > deadline:
                    raise AssertionError(f"POST {path} failed on every gateway: {error}") from None
                await asyncio.sleep(0.2)
                continue
            if response.status_code == 503 and time.monotonic() < deadline:
                await asyncio.sleep(0.5)  # the gateway lost NATS for a moment
                continue
            assert response.status_code in (201, 202), (
                f"POST {path} via {gateway.name}: {response.status_code} {response.text}"
            )
            run.gateways_used.add(gateway.name)
            return dict(response.json())

    async def follow(self, run: SessionRun, done: frozenset[str]) -> dict[str, Any]:
        """Receive the session's events until one whose type is in `done`; return that event.

        Whenever a socket closes, it reconnects to a gateway that is up with `since` set to
        the last seq received. Each event must arrive once and in order.
        """
        closes: list[str] = []
        while True:
            gateway = self._gateway_order(run.index)[0]
            url = (
                gateway.url.replace("http://", "ws://", 1)
                + f"/api/sessions/{run.session_id}/ws?since={run.last_seq}"
            )
            try:
                async with websockets.connect(url, additional_headers=self.headers) as socket:
                    run.gateways_used.add(gateway.name)
                    while True:
                        message = json.loads(await socket.recv())
                        if "seq" not in message:
                            continue  # a reply to a socket command, not an event
                        assert message["seq"] == run.last_seq + 1, (
                            f"session {run.session_id}: seq {message['seq']} after "
                            f"{run.last_seq}, from {gateway.name}"
                        )
                        run.events.append(message)
                        self.changed.set()
                        if message["type"] in done:
                            return message
            except (websockets.ConnectionClosed, websockets.InvalidHandshake, OSError) as error:
                # The gateway died (even mid-handshake) or lost NATS: resume after the last
                # seq on a gateway that is up.
                closes.append(f"{gateway.name}: {error!r}")
                assert len(closes) < 100, f"session {run.session_id}: sockets closed: {closes[-5:]}"
                await asyncio.sleep(0.2)

    async def run_session(self, run: SessionRun) -> SessionRun:
        """Create a session, start it, continue it after each interruption, until browser_closed."""
        try:
            async with asyncio.timeout(SESSION_TIMEOUT):
                await self._run_session(run)
        except TimeoutError:
            raise AssertionError(
                f"session {run.session_id or run.index} did not end in {SESSION_TIMEOUT} s; "
                f"its events: {run.types()}"
            ) from None
        run.ended = True
        self.changed.set()
        return run

    async def _run_session(self, run: SessionRun) -> None:
        created = await self.post(
            run,
            "/api/sessions",
            f"create-{run.index}-{uuid.uuid4().hex}",
            {
                "test_case": TEST_CASE,
                "target_url": self.cluster.site.base_url,
                "llm_model": "offline",
            },
        )
        run.session_id = str(created["session_id"])
        end = await self.follow(run, PLAN_END)
        assert end["type"] == "plan_completed", f"session {run.session_id}: {end}"
        await self.post(run, f"/api/sessions/{run.session_id}/start", f"start-{run.session_id}")
        while True:
            end = await self.follow(run, EXECUTION_END | {"session_interrupted"})
            if end["type"] != "session_interrupted":
                break
            # Its executor died or stopped: continue the session on another one.
            run.continued += 1
            await self.post(
                run,
                f"/api/sessions/{run.session_id}/continue",
                f"continue-{run.session_id}-{run.continued}",
            )
        assert end["type"] == "execution_completed", f"session {run.session_id}: {end}"
        await self.follow(run, frozenset({"browser_closed"}))


async def _wait_until(client: Client, check: Any, seconds: float, description: str) -> Any:
    """Wait until `check()` returns something truthy, woken by each event a session receives."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                client.changed.clear()
                result = check()
                if result:
                    return result
                try:
                    await asyncio.wait_for(client.changed.wait(), 2.0)
                except TimeoutError:
                    pass  # check again: a missed wake-up costs at most 2 s
    except TimeoutError:
        raise AssertionError(f"timed out after {seconds} s waiting for {description}") from None


async def _events_leader(nodes: list[EmbeddedNats], password: str) -> str:
    client = await nats.connect(
        servers=[node.url for node in nodes], user="gateway", password=password, connect_timeout=5
    )
    try:
        info = await client.jetstream().stream_info(subjects.EVENTS_STREAM)
    finally:
        await client.close()
    assert info.cluster is not None and info.cluster.leader is not None
    return info.cluster.leader


async def _stream_last_position(nats_url: str) -> int:
    client = await connect(nats_url, "tests-cluster")
    try:
        info = await client.jetstream().stream_info(subjects.EVENTS_STREAM)
        return int(info.state.last_seq)
    finally:
        await client.close()


async def test_cluster_survives_one_of_each_killed(
    sim_cluster: Cluster, passwords: dict[str, str]
) -> None:
    cluster = sim_cluster
    client = Client(cluster)
    runs: list[SessionRun] = []
    slots = asyncio.Semaphore(PARALLEL)

    async def run_one(index: int) -> SessionRun:
        async with slots:
            run = SessionRun(index)
            runs.append(run)
            return await client.run_session(run)

    tasks = [asyncio.create_task(run_one(index)) for index in range(SESSIONS)]
    try:
        # Phase 1: sessions run on the whole cluster until some have ended and one has
        # just started its run.
        def starting_executor() -> str | None:
            if sum(run.ended for run in runs) < DONE_BEFORE_KILL:
                return None
            owners = [run.starting_on() for run in runs if not run.ended]
            return next((owner for owner in owners if owner), None)

        await _wait_until(
            client,
            lambda: sum(run.ended for run in runs) >= DONE_BEFORE_KILL,
            KILL_WAIT_TIMEOUT,
            f"{DONE_BEFORE_KILL} ended sessions",
        )
        leader = await _events_leader(cluster.nodes, passwords["gateway"])
        victim = await _wait_until(
            client, starting_executor, KILL_WAIT_TIMEOUT, "a session starting its run"
        )

        # Phase 2: SIGKILL the executor of that session first, then the node that leads
        # the events stream and one replica of each other service.
        assert victim in cluster.services, f"unknown executor id {victim!r}"
        cluster.services[victim].sigkill()
        [node] = [node for node in cluster.nodes if node.log_path.parent.name == leader]
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(10)
        killed = [victim, "planner-1", "projector-1", "gateway-1"]
        for name in killed[1:]:
            cluster.services[name].sigkill()

        # Phase 3: a fourth executor joins. Once it is ready, one more old executor is
        # killed, so that the new one must take part of the remaining sessions.
        # NOTE: SIGTERM would be the gentler stop, but an executor that got SIGTERM while
        # its NATS connection was reconnecting did not exit within 60 s in one of three
        # runs, so the test does not rely on it.
        new_executor = cluster.make_service("executor", 4).start()
        await asyncio.to_thread(_wait_ready, [new_executor], START_TIMEOUT)
        old = [
            service
            for service in cluster.services.values()
            if service.kind == "executor" and service.running and service is not new_executor
        ]
        assert len(old) == 2, [service.name for service in old]
        stopped = old[0]
        stopped.sigkill()

        results = await asyncio.gather(*tasks)

        # More sessions, one at a time, until the new executor has run one.
        def new_executor_runs() -> list[SessionRun]:
            return [run for run in runs if new_executor.name in run.executors()]

        extra = 0
        while not new_executor_runs() and extra < EXTRA_SESSIONS:
            run = SessionRun(SESSIONS + extra)
            runs.append(run)
            results.append(await client.run_session(run))
            extra += 1
    except BaseException:
        for task in tasks:
            task.cancel()
        print(cluster.diagnosis())
        raise

    # Every session passed, and the one running on the killed executor was continued.
    assert len(results) >= SESSIONS
    live_nodes = [node for node in cluster.nodes if node.process and node.process.poll() is None]
    assert len(live_nodes) == len(cluster.nodes) - 1
    nats_url = _nats_urls(live_nodes, "gateway", passwords["gateway"])
    stream = await read_stream(nats_url)
    for run in results:
        events = stream.get(run.session_id, [])
        state = fold(run.session_id, events)
        assert state.status == COMPLETED, f"session {run.session_id} is {state.status}"
        assert len(state.steps) == STEPS, f"session {run.session_id}: {len(state.steps)} steps"
        statuses = [step.status for step in state.steps]
        assert statuses == [STEP_PASSED] * STEPS, f"session {run.session_id}: {statuses}"
        # The client received each stored event once and in order, across gateways.
        assert [event["id"] for event in run.events] == [event.id for event in events], (
            f"session {run.session_id}: the socket events differ from the stream"
        )
    interrupted = [
        run
        for run in results
        if any(
            event["type"] == "session_interrupted" and event["data"].get("executor_id") == victim
            for event in run.events
        )
    ]
    assert interrupted, f"no session was interrupted by the death of {victim}"
    for run in interrupted:
        assert run.continued >= 1, f"session {run.session_id} was not continued"
        assert victim not in run.executors()[-1:], f"session {run.session_id} resumed on {victim}"
    assert new_executor_runs(), (
        f"{new_executor.name} took none of {len(results)} sessions:\n{new_executor.log_tail()}"
    )
    assert any(run.gateways_used == {"gateway-2"} for run in results)
    assert any("gateway-1" in run.gateways_used for run in results)

    # No event lost or stored twice: seq dense from 1 per session, no event id twice.
    ids: list[str] = []
    for session_id, events in stream.items():
        seqs = [event.seq for event in events]
        assert seqs == list(range(1, len(seqs) + 1)), f"session {session_id}: seqs {seqs}"
        ids.extend(event.id for event in events)
    assert len(ids) == len(set(ids)), "the events stream contains an event id twice"

    # The surviving projector reaches the end of the stream, and the read models equal
    # a fold of it.
    position = await _stream_last_position(nats_url)
    await wait_for_position(cluster.database_url, position, 120)
    await wait_for_sessions(
        cluster.database_url, {run.session_id: run.last_seq for run in results}, 60
    )
    await assert_read_models_match_stream(cluster.database_url, nats_url)

    # Only the services the test killed or stopped are down.
    down = {
        name: service.process.returncode if service.process else None
        for name, service in cluster.services.items()
        if not service.running
    }
    assert set(down) == {*killed, stopped.name}, f"services down (name: exit code): {down}"
