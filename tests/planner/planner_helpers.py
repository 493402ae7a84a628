"""Helpers of the planner tests: creating sessions and waiting for their plan events."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stepwise_libs.events import Event, SessionCreated
from stepwise_libs.jetstream import EventStore

PLANNER_SCRIPT = Path(sys.executable).with_name("stepwise-planner")


async def create_session(
    store: EventStore, test_case: str, llm_model: str = "offline", target_url: str = ""
) -> str:
    """Append `session_created` for a new session and return its id."""
    session_id = str(uuid.uuid4())
    await store.append(
        session_id,
        SessionCreated(
            test_case=test_case,
            target_url=target_url or f"http://127.0.0.1:9/shop-{session_id}/",
            llm_model=llm_model,
        ),
    )
    return session_id


async def wait_for_event(
    store: EventStore,
    session_id: str,
    predicate: Callable[[Event], bool],
    within: float = 20.0,
) -> list[Event]:
    """Return the session's events up to the first one matching `predicate`, waiting `within` s."""
    seen: list[Event] = []

    async def collect() -> list[Event]:
        async for event in store.tail(session_id):
            seen.append(event)
            if predicate(event):
                return seen
        raise AssertionError("the tail ended")

    try:
        return await asyncio.wait_for(collect(), within)
    except TimeoutError:
        types = [event.type for event in seen]
        raise AssertionError(f"no matching event within {within} s; saw {types}") from None


def is_plan_end(event: Event) -> bool:
    return event.type in ("plan_completed", "plan_failed", "command_rejected")


@dataclass
class PlannerProcess:
    """A `stepwise-planner` process and the log lines it wrote to stderr."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    new_line: threading.Condition = field(default_factory=threading.Condition)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, text: str, timeout: float = 20.0) -> str:
        """Return the first log line containing `text`, waiting at most `timeout` s for it."""
        deadline = time.monotonic() + timeout
        with self.new_line:
            while True:
                found = next((line for line in self.lines if text in line), None)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no log line with {text!r} in {timeout} s:\n{self.log}")
                self.new_line.wait(remaining)

    def stop(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode
