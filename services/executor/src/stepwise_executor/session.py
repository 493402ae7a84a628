"""The live side of one session in this executor: its browser, its running task and its controls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.fold import STEP_SKIPPED, STOP_ALL_REASON, SessionState, apply
from stepwise_libs.jetstream import EventStore
from stepwise_libs.secrets import delete_secrets

from .browser import SessionBrowser
from .errors import ExecutorStopping
from .runner import StepRunner
from .secrets import REGISTRY
from .settings import ExecutorSettings

logger = logging.getLogger(__name__)

EXECUTION = "execution"
RUN_TILL_END = "run_till_end"

# Values of a session's key in the control bucket.
PAUSE_FLAG = b"pause"
STOP_ALL_FLAG = b"stop_all"
CANCEL_FLAG = b"cancel"

# Reasons of `browser_closed` after which the run has ended, so the session's secret
# values are purged: a later run of the session cannot use them.
RUN_ENDED_REASONS = frozenset({"execution finished", "cancelled", "executor error"})


class LiveSession:
    """A session whose browser this executor holds; at most one task runs at a time."""

    def __init__(
        self,
        js: JetStreamContext,
        store: EventStore,
        settings: ExecutorSettings,
        state: SessionState,
        on_browser_closed: Callable[[LiveSession], Awaitable[None]] | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.js = js
        self.store = store
        self.settings = settings
        self.state = state
        self.browser = SessionBrowser(
            state.session_id,
            settings.chromium,
            settings.browsers_dir,
            state.target_url,
            cdp_url=settings.browser_cdp_url,
        )
        self.runner = StepRunner(js, store, settings, state, self.browser)
        self.stopping = self.runner.stopping = stopping
        self.task: asyncio.Task[None] | None = None
        self.task_id: str | None = None
        self.mode = EXECUTION
        # Set by pause / stop-all; read between steps. The command id goes on the events it causes.
        self.pause_request: tuple[bytes, str | None] | None = None
        self.on_browser_closed = on_browser_closed

    @property
    def session_id(self) -> str:
        return self.state.session_id

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def replace_state(self, state: SessionState) -> None:
        self.state = self.runner.state = state

    async def append(self, payload: ev.Payload, command_id: str | None) -> ev.Event:
        payload = REGISTRY.redact_payload(payload)
        event = await self.store.append(self.session_id, payload, command_id=command_id)
        apply(self.state, event)
        return event

    def _spawn(self, work: Awaitable[None], name: str) -> None:
        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except ExecutorStopping as stopped:
                # The shutdown records the session as interrupted and closes the browser.
                logger.info("%s", stopped, extra={"session_id": self.session_id})
            except Exception as error:
                if self.stopping():
                    logger.warning(
                        "session task failed during the shutdown: %s",
                        error,
                        extra={"session_id": self.session_id, "task_id": self.task_id},
                    )
                    return
                logger.exception(
                    "session task failed",
                    extra={"session_id": self.session_id, "task_id": self.task_id},
                )
                with contextlib.suppress(Exception):
                    await self.append(
                        ev.ExecutionFailed(
                            task_id=self.task_id or "", error=f"the executor failed: {error}"
                        ),
                        None,
                    )
                await self.close_browser("executor error", None)

        self.task = asyncio.create_task(guarded(), name=f"{name}-{self.session_id}")

    # --- plan execution -----------------------------------------------------------

    def start_execution(self, task_id: str, command_id: str, mode: str) -> None:
        self.task_id = task_id
        self.mode = mode
        self.pause_request = None
        self._spawn(self._start_and_run(task_id, command_id, mode), "execute")

    async def _start_and_run(self, task_id: str, command_id: str, mode: str) -> None:
        total = len(self.state.steps)
        from_step = self.state.next_step or total + 1
        if mode == RUN_TILL_END:
            await self.append(
                ev.RunTillEndStarted(
                    task_id=task_id,
                    from_step=from_step,
                    total_steps=total,
                    executor_id=self.settings.executor_id,
                ),
                command_id,
            )
        else:
            await self.append(
                ev.ExecutionStarted(
                    task_id=task_id,
                    from_step=from_step,
                    total_steps=total,
                    mode=mode,
                    executor_id=self.settings.executor_id,
                ),
                command_id,
            )
        logger.info(
            "%s started from step %s of %s",
            mode,
            from_step,
            total,
            extra={"session_id": self.session_id},
        )
        await self._run_steps(task_id, command_id)

    def resume(self, task_id: str, command_id: str, skip_step: int | None = None) -> None:
        """Continue after a pause (or retry / skip the blocked step) in the same browser."""
        self.task_id = task_id
        self.pause_request = None
        self._spawn(self._resume(task_id, command_id, skip_step), "resume")

    async def _resume(self, task_id: str, command_id: str, skip_step: int | None) -> None:
        if skip_step is not None:
            await self.append(
                ev.StepSkipped(task_id=task_id, step_number=skip_step, reason="skipped by user"),
                command_id,
            )
        from_step = self.state.next_step or len(self.state.steps) + 1
        resumed = ev.ExecutionResumed(
            task_id=task_id, from_step=from_step, executor_id=self.settings.executor_id
        )
        await self.append(resumed, command_id)
        await self._run_steps(task_id, command_id)

    async def _run_steps(self, task_id: str, command_id: str) -> None:
        total = len(self.state.steps)
        while True:
            number = self.state.next_step
            if number is None:
                break
            if await self._pause_if_requested(task_id):
                return
            if self.mode == RUN_TILL_END:
                await self.append(
                    ev.RunTillEndProgress(task_id=task_id, current_step=number, total_steps=total),
                    command_id,
                )
            outcome = await self.runner.run_step(task_id, number, command_id)
            if outcome.success:
                continue
            if self.mode == RUN_TILL_END:
                await self.append(
                    ev.RunTillEndPaused(task_id=task_id, step_number=number, error=outcome.error),
                    command_id,
                )
                logger.info(
                    "run till end paused at failed step %s",
                    number,
                    extra={"session_id": self.session_id},
                )
                # The browser stays open so the page can be fixed with act mode before a retry.
                return
            await self.append(
                ev.ExecutionFailed(
                    task_id=task_id,
                    error=f"step {number} failed: {outcome.error}",
                    failed_step=number,
                ),
                command_id,
            )
            await self.close_browser("execution finished", command_id)
            return
        await self._finish(task_id, command_id, total)

    async def _finish(self, task_id: str, command_id: str, total: int) -> None:
        failed = self.state.failed_count
        if self.mode == RUN_TILL_END:
            skipped = [step.number for step in self.state.steps if step.status == STEP_SKIPPED]
            await self.append(
                ev.RunTillEndCompleted(task_id=task_id, success=failed == 0, skipped_steps=skipped),
                command_id,
            )
        else:
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
        logger.info(
            "%s completed", self.mode, extra={"session_id": self.session_id, "task_id": task_id}
        )
        await self.close_browser("execution finished", command_id)

    # --- pause, stop-all and cancel -------------------------------------------------

    def request_pause(self, flag: bytes, command_id: str | None) -> None:
        """Ask the running task to pause before its next step; stop-all outranks a plain pause."""
        current = self.pause_request
        if current is None or (flag == STOP_ALL_FLAG and current[0] != STOP_ALL_FLAG):
            self.pause_request = (flag, command_id)
        elif current[0] == flag and current[1] is None and command_id is not None:
            # The control-bucket watch saw the flag first; the command's id belongs on the event.
            self.pause_request = (flag, command_id)

    async def _read_control_flag(self) -> bytes | None:
        try:
            control = await self.js.key_value(subjects.CONTROL_BUCKET)
            entry = await control.get(self.session_id)
        except Exception:
            return None
        return entry.value if entry is not None else None

    async def _pause_if_requested(self, task_id: str) -> bool:
        if self.pause_request is None:
            flag = await self._read_control_flag()
            if flag in (PAUSE_FLAG, STOP_ALL_FLAG):
                self.request_pause(flag, None)
        if self.pause_request is None:
            return False
        flag, command_id = self.pause_request
        self.pause_request = None
        await clear_control_flag(self.js, self.session_id)
        after = self.state.last_completed_step
        await self.append(ev.ExecutionPaused(task_id=task_id, after_step=after), command_id)
        logger.info("execution paused after step %s", after, extra={"session_id": self.session_id})
        if flag == STOP_ALL_FLAG:
            await self.close_browser(STOP_ALL_REASON, command_id)
        return True

    async def stop_all(self, command_id: str) -> None:
        """Close the browser of a session that is not running (a running one pauses first)."""
        task = self.state.current_task
        if self.state.status == "running" and task is not None:
            await self.append(
                ev.ExecutionPaused(task_id=task.task_id, after_step=self.state.last_completed_step),
                command_id,
            )
        await self.close_browser(STOP_ALL_REASON, command_id, force_event=True)

    async def cancel(self, command_id: str) -> None:
        """Cancel the running task at once, kill the browser, and record the cancellation."""
        task = self.task
        if task is not None and not task.done():
            task.cancel()
        # Kill Chromium first (or close an attached session's pages), so nothing more is
        # typed even while the task unwinds. The kill runs off the event loop.
        await self.browser.halt()
        if task is not None:
            # The task is cancelled and its browser is gone; it only has cleanup left.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=2)
        await self.append(
            ev.ExecutionCancelled(task_id=self.task_id or self.state.current_task_id), command_id
        )
        await clear_control_flag(self.js, self.session_id)
        await self.close_browser("cancelled", command_id, graceful=False)

    async def close_browser(
        self, reason: str, command_id: str | None, graceful: bool = True, force_event: bool = False
    ) -> None:
        was_open = self.browser.is_open or self.state.browser_open
        await self.browser.close(graceful=graceful)
        if was_open or force_event:
            await self.append(ev.BrowserClosed(reason=reason), command_id)
            logger.info("browser closed: %s", reason, extra={"session_id": self.session_id})
        # The next agent run loads the values again, if the bucket still has them.
        REGISTRY.discard(self.session_id)
        if reason in RUN_ENDED_REASONS and self.state.secret_names:
            await self._purge_secrets()
        if self.on_browser_closed is not None:
            await self.on_browser_closed(self)

    async def _purge_secrets(self) -> None:
        try:
            await delete_secrets(self.js, self.session_id)
        except Exception as error:
            logger.warning(
                "purging the session's secret values failed, so they stay until the "
                "bucket's 24-hour TTL: %s",
                error,
                extra={"session_id": self.session_id},
            )
            return
        logger.info("secret values purged", extra={"session_id": self.session_id})

    # --- act mode -------------------------------------------------------------------

    def start_act(
        self, task_id: str, command_id: str, instruction: str, context: str | None
    ) -> None:
        self.task_id = task_id
        self._spawn(self._act(task_id, command_id, instruction, context), "act")

    async def _act(
        self, task_id: str, command_id: str, instruction: str, context: str | None
    ) -> None:
        await self.append(ev.ActModeStarted(task_id=task_id, instruction=instruction), command_id)
        history = context if context is not None else "\n".join(self.state.act_history[-5:])
        task = (
            instruction
            if not history
            else f"{instruction}\n\nEarlier ad-hoc instructions and their results:\n{history}"
        )
        outcome = await self.runner.run_agent(
            task, task_id, None, command_id, f"act-{task_id}", step_text=instruction
        )
        if outcome.success:
            await self.append(
                ev.ActModeCompleted(
                    task_id=task_id,
                    thinking=outcome.thinking,
                    actions=outcome.actions,
                    result=outcome.results[-1] if outcome.results else "done",
                    screenshot=outcome.screenshots[0] if outcome.screenshots else None,
                    url=outcome.url,
                ),
                command_id,
            )
        else:
            await self.append(
                ev.ActModeFailed(task_id=task_id, error=outcome.error, category=outcome.category),
                command_id,
            )
        logger.info(
            "act mode %s",
            "completed" if outcome.success else "failed",
            extra={"session_id": self.session_id},
        )

    async def shutdown(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        await self.browser.close(graceful=False)


async def clear_control_flag(js: JetStreamContext, session_id: str) -> None:
    with contextlib.suppress(Exception):
        control = await js.key_value(subjects.CONTROL_BUCKET)
        await control.delete(session_id)


async def set_control_flag(js: JetStreamContext, session_id: str, flag: bytes) -> None:
    control = await js.key_value(subjects.CONTROL_BUCKET)
    await control.put(session_id, flag)
