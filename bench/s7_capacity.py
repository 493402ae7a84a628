"""Scenario 7: executor capacity, with real Chromium on the bundled sample site.

One `stepwise-executor` process runs 1, 2, 4, 8 and 16 sessions at once (1 and 2
with --short), each the checkout sample with the offline model. At each level:
- step latency: the median time from `step_started` to the step's end over
  every step of every session;
- memory: the peak PSS of the executor and all its Chromium processes while the
  sessions run, minus the PSS before the first session, divided by the sessions.
It stops at the first level whose median step latency is more than twice the
one-session figure; "sessions before step latency doubles" is the level before.
Each session is cancelled when its run ends, which closes its browser.
"""

from __future__ import annotations

import asyncio
import statistics

from stepwise_libs import commands as cmd

from .context import Bench
from .executor_stack import ExecutorStack, Watched
from .servers import BenchError
from .stats import Results, Target

NAME = "7 capacity"
SINGLE_RUN = True  # one sweep of the levels; each level is itself many steps
ENDS = {"execution_completed", "execution_failed", "execution_cancelled", "command_rejected"}


def _levels(bench: Bench) -> list[int]:
    return [1, 2] if bench.short else [1, 2, 4, 8, 16]


async def run_level(stack: ExecutorStack, sessions: int) -> tuple[float, int]:
    """Median step seconds, and peak PSS of the executor's process tree, with `sessions` at once."""
    watched: list[Watched] = [await stack.planned_session() for _ in range(sessions)]
    peak = stack.tree_memory()
    sent = [
        await stack.command(w.session_id, cmd.ExecutePlan(task_id=f"bench-{w.session_id[:8]}"))
        for w in watched
    ]

    async def finish(w: Watched, after: float) -> None:
        _, event = await w.wait_for(ENDS, after, within=600)
        if event.type == "command_rejected":
            raise BenchError(f"execute_plan rejected: {event.data.get('reason')}")

    runs = asyncio.gather(*(finish(w, t) for w, t in zip(watched, sent, strict=True)))
    while not runs.done():
        peak = max(peak, stack.tree_memory())
        await asyncio.wait({runs}, timeout=0.5)
    await runs
    for w in watched:
        closing = await stack.command(w.session_id, cmd.CancelTask())
        await w.wait_for(
            {"browser_closed", "command_rejected", "execution_cancelled"}, closing, within=60
        )
    durations = [d for w in watched for d in w.step_durations()]
    if not durations:
        raise BenchError(f"no step ran with {sessions} sessions")
    return statistics.median(durations), peak


async def run_once(bench: Bench, results: Results) -> None:
    async with ExecutorStack(bench) as stack:
        idle = stack.tree_memory()
        single = None
        capacity = None
        for sessions in _levels(bench):
            step, peak = await run_level(stack, sessions)
            results.add(NAME, f"median step, {sessions} sessions", "s", step)
            results.add(
                NAME,
                f"memory (PSS) per session, {sessions} sessions",
                "MiB",
                (peak - idle) / sessions / 2**20,
            )
            if single is None:
                single = step
            elif step > 2 * single:
                capacity = sessions // 2
                break
        if capacity is None:
            results.note(NAME, f"step latency did not double up to {sessions} sessions")
            capacity = sessions
        results.add(NAME, "sessions before step latency doubles", "sessions", capacity)


def targets(results: Results) -> list[Target]:
    return []  # No target exists for capacity, so the figures are reported as measured.
