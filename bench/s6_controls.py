"""Scenario 6: controls on a live session, with real Chromium on the bundled sample site.

Per try, a fresh session with a ready plan (the checkout sample, offline model):
- submit: `ExecutePlan` published on the commands stream -> the executor's
  `execution_started` (the worker received and accepted it);
- cancel: once step 1 ended (Chromium is up, step 2 runs), `CancelTask` ->
  `execution_cancelled`, and -> no Chromium process of the session left;
- pause: on another running session, `PauseExecution` -> `execution_paused`.
20 tries each (3 with --short). A control the executor answers with
`command_rejected` is reported as not measured, with the executor's reason.
"""

from __future__ import annotations

import asyncio
import time

from stepwise_libs import commands as cmd

from .context import Bench
from .executor_stack import ExecutorStack
from .servers import BenchError
from .stats import Results, Target

NAME = "6 controls"
SINGLE_RUN = True  # the tries are the repeats


def _tries(bench: Bench) -> int:
    return 3 if bench.short else 20


async def _running(stack: ExecutorStack):
    """A session whose first step has started; returns it and the submit latency in ms."""
    watched = await stack.planned_session()
    sent = await stack.command(
        watched.session_id, cmd.ExecutePlan(task_id=f"bench-{watched.session_id[:8]}")
    )
    accepted, event = await watched.wait_for({"execution_started", "command_rejected"}, sent)
    if event.type == "command_rejected":
        raise BenchError(f"execute_plan rejected: {event.data.get('reason')}")
    # The browser starts inside step 1; once that step ends, Chromium is up and step 2 runs.
    await watched.wait_for({"step_completed", "step_failed"}, sent)
    return watched, (accepted - sent) * 1000


async def _gone(stack: ExecutorStack, session_id: str, within: float = 30) -> float:
    deadline = time.monotonic() + within
    while stack.browser_processes(session_id):
        if time.monotonic() > deadline:
            raise BenchError(f"Chromium of session {session_id} still runs {within} s after cancel")
        await asyncio.sleep(0.01)
    return time.perf_counter()


async def run_once(bench: Bench, results: Results) -> None:
    submit, cancelled, chromium_gone, paused = [], [], [], []
    pause_note = None
    async with ExecutorStack(bench) as stack:
        for _ in range(_tries(bench)):
            watched, submit_ms = await _running(stack)
            submit.append(submit_ms)
            if not stack.browser_processes(watched.session_id):
                raise BenchError("no Chromium process found for a running session")
            sent = await stack.command(watched.session_id, cmd.CancelTask())
            arrived, event = await watched.wait_for(
                {"execution_cancelled", "command_rejected"}, sent
            )
            if event.type == "command_rejected":
                raise BenchError(f"cancel_task rejected: {event.data.get('reason')}")
            cancelled.append((arrived - sent) * 1000)
            chromium_gone.append((await _gone(stack, watched.session_id) - sent) * 1000)

            if pause_note is None:
                watched, _ = await _running(stack)
                sent = await stack.command(watched.session_id, cmd.PauseExecution())
                arrived, event = await watched.wait_for(
                    {"execution_paused", "command_rejected"}, sent
                )
                if event.type == "command_rejected":
                    pause_note = f"the executor rejects pause_execution: {event.data.get('reason')}"
                else:
                    paused.append((arrived - sent) * 1000)
                await stack.command(watched.session_id, cmd.CancelTask())
                await watched.wait_for({"execution_cancelled", "command_rejected"}, sent)
    results.add_latencies(NAME, "submit -> execution_started", submit)
    results.add_latencies(NAME, "cancel -> execution_cancelled", cancelled)
    results.add_latencies(NAME, "cancel -> Chromium gone", chromium_gone)
    if paused:
        results.add_latencies(NAME, "pause -> execution_paused", paused)
    if pause_note:
        results.not_measured(f"{NAME} pause", pause_note)


def targets(results: Results) -> list[Target]:
    return [
        Target(
            "cancel -> execution_cancelled p99",
            "< 1,000 ms",
            lambda: results.median(NAME, "cancel -> execution_cancelled p99"),
            lambda v: v < 1000,
            " ms",
        ),
        Target(
            "cancel -> Chromium gone p99",
            "< 1,000 ms",
            lambda: results.median(NAME, "cancel -> Chromium gone p99"),
            lambda v: v < 1000,
            " ms",
        ),
    ]
