"""The live side of one session in this executor: its browser and its running task."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.js import JetStreamContext

from stepwise_libs import events as ev
from stepwise_libs.fold import SessionState, apply
from stepwise_libs.jetstream import EventStore

from .browser import SessionBrowser
from .runner import StepRunner
from .settings import ExecutorSettings

logger = logging.getLogger(__name__)


class LiveSession:
    """A session whose browser this executor holds; at most one task runs at a time."""

    def __init__(self, js: JetStreamContext, store: EventStore, settings: ExecutorSettings, state: SessionState) -> None:
        self.js = js
        self.store = store
        self.settings = settings
        self.state = state
        self.browser = SessionBrowser(state.session_id, settings.chromium, settings.browsers_dir, state.target_url)
        self.runner = StepRunner(js, store, settings, state, self.browser)
        self.task: asyncio.Task[None] | None = None
        self.task_id: str | None = None

    @property
    def session_id(self) -> str:
        return self.state.session_id

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    async def append(self, payload: ev.Payload, command_id: str | None) -> ev.Event:
        event = await self.store.append(self.session_id, payload, command_id=command_id)
        apply(self.state, event)
        return event

    def start_execution(self, task_id: str, command_id: str, mode: str) -> None:
        self.task_id = task_id
        self.task = asyncio.create_task(self._execute(task_id, command_id, mode), name=f"execute-{self.session_id}")

    async def _execute(self, task_id: str, command_id: str, mode: str) -> None:
        extra = {"session_id": self.session_id, "task_id": task_id, "command_id": command_id}
        try:
            total = len(self.state.steps)
            from_step = self.state.next_step or total + 1
            await self.append(
                ev.ExecutionStarted(task_id=task_id, from_step=from_step, total_steps=total, mode=mode), command_id
            )
            logger.info("execution started from step %s of %s", from_step, total, extra=extra)
            for number in range(from_step, total + 1):
                step = self.state.step(number)
                if step is None or step.status in ("passed", "skipped"):
                    continue
                outcome = await self.runner.run_step(task_id, number, command_id)
                if not outcome.success:
                    await self.append(
                        ev.ExecutionFailed(
                            task_id=task_id, error=f"step {number} failed: {outcome.error}", failed_step=number
                        ),
                        command_id,
                    )
                    logger.info("execution failed at step %s", number, extra=extra)
                    break
            else:
                failed = self.state.failed_count
                await self.append(
                    ev.ExecutionCompleted(
                        task_id=task_id,
                        passed=self.state.passed_count,
                        failed=failed,
                        skipped=self.state.skipped_count,
                        total=total,
                        success=failed == 0,
                    ),
                    command_id,
                )
                logger.info("execution completed", extra=extra)
            await self.close_browser("execution finished", command_id)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.exception("execution crashed", extra=extra)
            with contextlib.suppress(Exception):
                await self.append(ev.ExecutionFailed(task_id=task_id, error=f"the executor failed: {error}"), command_id)
            await self.close_browser("execution crashed", command_id)

    async def close_browser(self, reason: str, command_id: str | None, graceful: bool = True) -> None:
        was_open = self.browser.is_open or self.state.browser_open
        await self.browser.close(graceful=graceful)
        if was_open:
            await self.append(ev.BrowserClosed(reason=reason), command_id)
            logger.info("browser closed: %s", reason, extra={"session_id": self.session_id})

    async def cancel(self, command_id: str) -> None:
        """Cancel the running task at once, kill the browser, and record the cancellation."""
        task = self.task
        if task is not None and not task.done():
            task.cancel()
        # Kill Chromium first so nothing more is typed even while the task unwinds.
        self.browser.kill_processes()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=10)
        await self.append(ev.ExecutionCancelled(task_id=self.task_id), command_id)
        await self.close_browser("cancelled", command_id, graceful=False)

    async def shutdown(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        await self.browser.close(graceful=False)
