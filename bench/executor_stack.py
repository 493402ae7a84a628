"""A `stepwise-executor` process, the bundled sample site, and planned sessions for it.

Scenarios 6 and 7 drive the executor the way the gateway does: they append a
session with a ready plan (the offline model's plan of the bundled checkout test
case), publish commands on the commands stream and watch the session's events.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from stepwise_libs import commands as cmd
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.jetstream import EventStore, publish_command
from stepwise_libs.phrases import split_test_case

from stepwise.sample_site import sample_test_case, serve_sample_site

from .context import Bench
from .servers import BenchError, _bin, _stop


@dataclass
class Watched:
    """The events of one session as they arrive, with their arrival times."""

    session_id: str
    seen: list[tuple[float, ev.Event]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(
        self, types: set[str], after: float = 0.0, within: float = 120
    ) -> tuple[float, ev.Event]:
        """Return the first event of one of `types` that arrived after `after` (perf_counter)."""
        deadline = time.monotonic() + within
        while True:
            for arrived, event in self.seen:
                if arrived >= after and event.type in types:
                    return arrived, event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                got = [event.type for _, event in self.seen][-5:]
                raise BenchError(
                    f"no {sorted(types)} within {within} s on {self.session_id}; last: {got}"
                )
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                pass

    def step_durations(self) -> list[float]:
        """Seconds from each step_started to its step_completed or step_failed."""
        started: dict[int, float] = {}
        durations = []
        for arrived, event in self.seen:
            number = event.data.get("step_number")
            if event.type == "step_started":
                started[number] = arrived
            elif event.type in ("step_completed", "step_failed") and number in started:
                durations.append(arrived - started.pop(number))
        return durations


class ExecutorStack:
    """The sample site, one executor process, and a NATS connection to drive it."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.home = bench.workdir / f"executor-home-{uuid.uuid4().hex[:6]}"
        self.site = serve_sample_site()
        self.process = None
        self.watchers: list[asyncio.Task] = []

    async def __aenter__(self) -> ExecutorStack:
        self.nc, self.store = await self.bench.event_store("bench-controls")
        self.js = self.nc.jetstream()
        env = self.bench.servers.env(
            "",
            STEPWISE_HOME=str(self.home),
            STEPWISE_LOG_LEVEL="INFO",
            STEPWISE_ALLOWED_HOSTS=self.site.host_port,
        )
        env.pop("STEPWISE_DATABASE_URL")
        self.process = self.bench.servers.start_process(
            "executor", [_bin("stepwise-executor")], env
        )
        log: Path = self.process.log_path  # type: ignore[attr-defined]
        deadline = time.monotonic() + 120
        while "service ready" not in await asyncio.to_thread(log.read_text, errors="replace"):
            if self.process.poll() is not None:
                tail = await asyncio.to_thread(log.read_text, errors="replace")
                raise BenchError(f"stepwise-executor exited at start: {tail[-600:]}")
            if time.monotonic() > deadline:
                raise BenchError("stepwise-executor did not log 'service ready' in 120 s")
            await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.watchers:
            task.cancel()
        await asyncio.gather(*self.watchers, return_exceptions=True)
        await self.nc.close()
        if self.process is not None:
            _stop(self.process)
        self.site.stop()

    async def planned_session(self) -> Watched:
        """Create a session whose plan (the checkout sample) is ready, and watch its events."""
        session_id, plan_id = str(uuid.uuid4()), str(uuid.uuid4())
        test_case = sample_test_case("checkout")
        steps = split_test_case(test_case)
        store: EventStore = self.store
        await store.append(
            session_id,
            ev.SessionCreated(
                test_case=test_case, target_url=self.site.base_url, llm_model="offline"
            ),
        )
        await store.append(session_id, ev.PlanStarted(plan_id=plan_id, model="offline"))
        await store.append(
            session_id,
            ev.PlanCompleted(
                plan_id=plan_id,
                plan_text="\n".join(f"{n}. {s}" for n, s in enumerate(steps, 1)),
                steps=[ev.PlanStep(number=n, description=s) for n, s in enumerate(steps, 1)],
            ),
        )
        watched = Watched(session_id)

        async def watch() -> None:
            async for event in store.tail(session_id, 0):
                watched.seen.append((time.perf_counter(), event))
                watched.changed.set()

        self.watchers.append(asyncio.create_task(watch()))
        return watched

    async def command(self, session_id: str, body: cmd.CommandBody) -> float:
        """Publish a command as the gateway does; return the perf_counter time just before."""
        command = cmd.new_command(session_id, body)
        sent = time.perf_counter()
        await publish_command(self.js, subjects.executor_command_subject(command.type), command)
        return sent

    def browser_processes(self, session_id: str) -> list[int]:
        """Pids of the Chromium processes of one session (their command line names its folder)."""
        marker = str(self.home / "executor" / session_id)
        found = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            if any(marker in part for part in process.info.get("cmdline") or []):
                found.append(process.pid)
        return found

    def tree_memory(self) -> int:
        """Memory of the executor process and every process under it (its Chromiums), in bytes.

        PSS, not RSS: Chromium's processes share most of their pages, and RSS would count
        each shared page once per process.
        """
        assert self.process is not None
        root = psutil.Process(self.process.pid)
        total = 0
        for process in [root, *root.children(recursive=True)]:
            try:
                total += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total
