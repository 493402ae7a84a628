"""Run a session's plan steps through browser-use agents in the session's browser, appending events."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from browser_use import Agent, BrowserSession, Tools
from nats.js import JetStreamContext
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.events import ActionRecord
from stepwise_libs.fold import STEP_FAILED, STEP_PASSED, STEP_SKIPPED, SessionState
from stepwise_libs.jetstream import EventStore
from stepwise_libs.secrets import to_secret_tags

from .browser import SessionBrowser
from .egress import EgressGuard
from .errors import (
    BROWSER_ERROR,
    MODEL_ERROR,
    NAVIGATION_BLOCKED,
    TIMEOUT,
    ExecutorStopping,
    StepError,
    categorize_failure,
)
from .models import RetryingChatModel, gemini_model, is_offline, offline_model
from .secrets import REGISTRY, secrets_for_task
from .settings import ExecutorSettings

logger = logging.getLogger(__name__)

# Agent steps (model calls) one plan step may take; the step time limit usually ends it first.
MAX_AGENT_STEPS = 60
# Seconds to reopen the session's last page in a fresh browser, and to read the page's URL.
REOPEN_TIMEOUT = 60
URL_TIMEOUT = 10


@dataclass
class StepOutcome:
    success: bool
    thinking: str = ""
    actions: list[ActionRecord] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    screenshots: list[str] = field(default_factory=list)
    error: str = ""
    category: str = ""
    duration_ms: int = 0
    url: str = ""


def resume_url(state: SessionState) -> str | None:
    """Return the page a fresh browser opens before the next step, or None for a session that ran nothing.

    A session that already ran steps or act-mode instructions reopens the page of the last one
    (`last_url`), or its target URL when no page was recorded. A new session starts on a blank
    page, as its first step usually opens the site.
    """
    if state.last_url.startswith(("http://", "https://")):
        return state.last_url
    ran_steps = any(step.status in (STEP_PASSED, STEP_FAILED, STEP_SKIPPED) for step in state.steps)
    ran_acts = any(
        task.task_type == "act_mode" and task.status in ("completed", "failed")
        for task in state.tasks.values()
    )
    if (ran_steps or ran_acts) and state.target_url:
        return state.target_url
    return None


def action_records(item: Any) -> list[ActionRecord]:
    """Turn one agent history item (model output + results) into ActionRecords, leaving out `done`."""
    records: list[ActionRecord] = []
    output = item.model_output
    if output is None:
        return records
    for action, result in zip(output.action, item.result, strict=False):
        dumped = action.model_dump(exclude_none=True)
        if not dumped:
            continue
        name, params = next(iter(dumped.items()))
        if name == "done":
            continue
        error = result.error
        text = result.long_term_memory or result.extracted_content
        records.append(
            ActionRecord(
                name=name,
                params=params if isinstance(params, dict) else {"value": params},
                result=text,
                error=error,
                success=error is None,
            )
        )
    return records


def build_agent(
    task: str,
    llm: Any,
    session: BrowserSession,
    folder: Path,
    step_timeout: float,
    use_vision: bool,
    sensitive_data: dict[str, str] | None = None,
    tools: Tools | None = None,
) -> Agent:
    """Create the agent for one plan step or act-mode instruction in the session's browser."""
    return Agent(
        task=task,
        llm=llm,
        browser_session=session,
        tools=tools,
        # browser-use types a value where an action's parameter has <secret>name</secret>.
        # NOTE: it also types the value in place of a parameter that is exactly a secret's
        # name without the tags (browser-use 0.13.14, Registry._replace_sensitive_data).
        sensitive_data=sensitive_data or None,
        # No judge, planner or start-URL guessing: one step is one small task, and the
        # model alone decides what happens (browser-use 0.13.14 options).
        use_judge=False,
        enable_planning=False,
        directly_open_url=False,
        enable_signal_handler=False,
        use_vision=use_vision,
        # One failure (after the model wrapper's own retries) ends the step, with no extra
        # "final response" model call.
        max_failures=1,
        final_response_after_failure=False,
        calculate_cost=False,
        generate_gif=False,
        llm_timeout=90,
        step_timeout=int(step_timeout) + 5,
        file_system_path=str(folder),
    )


class StepRunner:
    """Runs plan steps (or act-mode instructions) for one session in its browser."""

    def __init__(
        self,
        js: JetStreamContext,
        store: EventStore,
        settings: ExecutorSettings,
        state: SessionState,
        browser: SessionBrowser,
    ) -> None:
        self.js = js
        self.store = store
        self.settings = settings
        self.state = state
        self.browser = browser
        self.egress = EgressGuard(settings.allowed_hosts, state.session_id)
        # True once the executor shuts down; a failure seen then is not recorded.
        self.stopping: Callable[[], bool] = lambda: False

    async def append(self, payload: ev.Payload, command_id: str | None) -> ev.Event:
        payload = REGISTRY.redact_payload(payload)
        return await self.store.append(self.state.session_id, payload, command_id=command_id)

    def _model(self, task_id: str, step_number: int | None, command_id: str | None) -> Any:
        model = self.state.llm_model
        if is_offline(model):
            return offline_model(self.state.target_url)

        async def on_retry(attempt: int, delay: float, error: str) -> None:
            # A model retry is reported as an action named "model_retry", so a client sees
            # each retry in the step's action stream without a new event type.
            await self.append(
                ev.ActionExecuted(
                    task_id=task_id,
                    step_number=step_number,
                    action=ActionRecord(
                        name="model_retry",
                        params={"attempt": attempt, "delay_seconds": round(delay, 2)},
                        error=error,
                        success=False,
                    ),
                ),
                command_id,
            )

        if not self.settings.gemini_api_key:
            raise StepError(
                f"model {model!r} needs GEMINI_API_KEY or GOOGLE_API_KEY, and neither is set",
                MODEL_ERROR,
            )
        return gemini_model(
            model, self.settings.gemini_api_key, self.settings.gemini_base_url, on_retry
        )

    async def run_agent(
        self,
        task: str,
        task_id: str,
        step_number: int | None,
        command_id: str | None,
        screenshot_step: int | str,
        step_text: str | None = None,
    ) -> StepOutcome:
        """Run one agent on `task` in the session's browser; never raises for a failed step.

        `step_text` replaces `task` for the offline model, which reads one step phrase and no context.
        """
        started = time.monotonic()
        if step_text is not None and is_offline(self.state.llm_model):
            task = step_text
        blocked_before = len(self.egress.blocked_requests)
        outcome = await self._run_agent(task, task_id, step_number, command_id)
        if not outcome.success and self.stopping():
            raise ExecutorStopping(f"the executor is shutting down: {outcome.error}")
        pages_checked = await self._leave_forbidden_pages(screenshot_step)
        blocked_requests = self.egress.blocked_requests[blocked_before:]
        if blocked_requests:
            # A blocked navigation fails the step, whatever the agent made of the error page.
            outcome.success = False
            outcome.error = blocked_requests[0].message
            outcome.category = NAVIGATION_BLOCKED
        outcome.duration_ms = int((time.monotonic() - started) * 1000)
        if self.browser.is_open and pages_checked:
            outcome.url = await self._page_url(screenshot_step)
            try:
                name = subjects.screenshot_object_name(self.state.session_id, screenshot_step, 1)
                data = await asyncio.wait_for(self.browser.screenshot(), timeout=15)
                store = await self.js.object_store(subjects.SCREENSHOTS_BUCKET)
                await store.put(name, data)
                outcome.screenshots.append(name)
            except Exception as error:
                logger.warning(
                    "screenshot failed: %s",
                    error,
                    extra={"session_id": self.state.session_id, "step": screenshot_step},
                )
        return outcome

    async def _leave_forbidden_pages(self, step: int | str | None) -> bool:
        """Navigate pages of a forbidden scheme to about:blank; return False if that failed."""
        session = self.browser.session
        if session is None:
            return True
        try:
            await asyncio.wait_for(self.egress.leave_forbidden_pages(session), timeout=URL_TIMEOUT)
        except Exception as error:
            # Fail closed: without the check, the agent stops before its next step, and the
            # step records no page URL and no screenshot.
            logger.warning(
                "checking the schemes of the open pages failed: %s",
                error,
                extra={"session_id": self.state.session_id, "step": step},
            )
            return False
        return True

    async def _page_url(self, screenshot_step: int | str) -> str:
        session = self.browser.session
        if session is None:
            return ""
        try:
            return await asyncio.wait_for(session.get_current_page_url(), timeout=URL_TIMEOUT)
        except Exception as error:
            logger.warning(
                "reading the page URL failed: %s",
                error,
                extra={"session_id": self.state.session_id, "step": screenshot_step},
            )
            return ""

    async def _reopen_page(self, session: BrowserSession, is_act: bool) -> None:
        """In a fresh browser of a session that already ran, open the page it was on.

        An act-mode instruction in a session that ran nothing starts on the target URL,
        because one instruction like 'Type "ada" into "Username"' cannot open the site
        itself, unlike a plan whose first step does."""
        url = resume_url(self.state)
        if url is None and is_act:
            url = self.state.target_url or None
        if url is None:
            return
        logger.info(
            "reopening the session's last page in a fresh browser",
            extra={"session_id": self.state.session_id, "url": url},
        )
        try:
            await asyncio.wait_for(session.navigate_to(url), timeout=REOPEN_TIMEOUT)
        except Exception as error:
            # A retry starts a fresh browser again, which tries the page once more.
            await self.browser.close()
            detail = str(error) or type(error).__name__
            raise StepError(
                f"the fresh browser could not reopen the session's last page {url}: {detail}",
                BROWSER_ERROR,
            ) from error

    async def _check_start_urls(self) -> None:
        """Fail before a browser starts when the guard blocks the target URL or the last page."""
        urls = [self.state.target_url, resume_url(self.state)]
        for url in dict.fromkeys(url for url in urls if url):
            blocked = await self.egress.check_url(url)
            if blocked is not None:
                self.egress.record(blocked)
                raise StepError(blocked.message, NAVIGATION_BLOCKED)

    async def _guard_egress(self, session: BrowserSession) -> None:
        """Check every page request of a freshly started browser with the egress guard."""
        try:
            await self.egress.attach(session, getattr(self.browser, "context_id", None))
        except Exception as error:
            await self.browser.close()
            raise StepError(
                f"the egress guard could not watch the browser's requests: {error}", BROWSER_ERROR
            ) from error

    async def _run_agent(
        self, task: str, task_id: str, step_number: int | None, command_id: str | None
    ) -> StepOutcome:
        try:
            secrets = await secrets_for_task(self.js, self.state, task)
            fresh = not self.browser.is_open
            if fresh:
                await self._check_start_urls()
            session = await self.browser.start()
            if fresh:
                await self._guard_egress(session)
                await self._reopen_page(session, is_act=step_number is None)
            llm = self._model(task_id, step_number, command_id)
        except StepError as error:
            return StepOutcome(success=False, error=error.message, category=error.category)
        if secrets and not is_offline(self.state.llm_model):
            # The offline model writes the tags itself; Gemini reads them in its task.
            task = to_secret_tags(task)
        emitted: list[ActionRecord] = []

        async def on_step_end(agent: Agent) -> None:
            if agent.history.history:
                for record in action_records(agent.history.history[-1]):
                    emitted.append(record)
                    await self.append(
                        ev.ActionExecuted(task_id=task_id, step_number=step_number, action=record),
                        command_id,
                    )
            # Before the agent's next step, whose page state (and screenshot, for Gemini)
            # goes to the model. A page left here stops the agent through `on_blocked`.
            if not await self._leave_forbidden_pages(step_number):
                agent.stop()

        agent = build_agent(
            task,
            llm,
            session,
            self.browser.folder / "agent",
            self.settings.step_timeout,
            use_vision=not is_offline(self.state.llm_model),
            sensitive_data=secrets,
            # browser-use's default tools for an agent without vision="auto".
            tools=self.egress.guard_navigate_action(Tools(exclude_actions=["screenshot"])),
        )
        # A blocked navigation ends the step after the agent's current action.
        self.egress.on_blocked = lambda blocked: agent.stop()
        try:
            history = await asyncio.wait_for(
                agent.run(max_steps=MAX_AGENT_STEPS, on_step_end=on_step_end),
                timeout=self.settings.step_timeout,
            )
        except TimeoutError:
            return StepOutcome(
                success=False,
                actions=emitted,
                error=f"the step did not finish within {self.settings.step_timeout:g} seconds",
                category=TIMEOUT,
            )
        except Exception as error:
            logger.exception("agent run failed", extra={"session_id": self.state.session_id})
            return StepOutcome(
                success=False,
                actions=emitted,
                error=f"the browser agent failed: {error}",
                category=BROWSER_ERROR,
            )
        finally:
            self.egress.on_blocked = None

        thinking = "\n".join(
            item.model_output.thinking or item.model_output.next_goal or ""
            for item in history.history
            if item.model_output is not None
        ).strip()
        results = [
            text
            for item in history.history
            for result in item.result
            if (text := result.long_term_memory or result.extracted_content)
        ]
        final = history.final_result() or ""
        if history.is_done():
            if history.is_successful():
                return StepOutcome(
                    success=True, thinking=thinking, actions=emitted, results=results
                )
            return StepOutcome(
                success=False,
                thinking=thinking,
                actions=emitted,
                results=results,
                error=final or "the agent reported the step as failed",
                category=categorize_failure(final),
            )
        failure = llm.failure if isinstance(llm, RetryingChatModel) else None
        if failure is not None:
            return StepOutcome(
                False, thinking, emitted, results, error=failure.message, category=failure.category
            )
        errors = [error for error in history.errors() if error]
        message = errors[-1] if errors else "the agent stopped without finishing the step"
        return StepOutcome(False, thinking, emitted, results, error=message, category=BROWSER_ERROR)

    async def run_step(self, task_id: str, number: int, command_id: str | None) -> StepOutcome:
        step = self.state.step(number)
        assert step is not None
        attempt = step.attempts + 1
        event = await self.append(
            ev.StepStarted(
                task_id=task_id, step_number=number, description=step.description, attempt=attempt
            ),
            command_id,
        )
        _apply(self.state, event)
        outcome = await self.run_agent(step.description, task_id, number, command_id, number)
        if outcome.success:
            payload: ev.Payload = ev.StepCompleted(
                task_id=task_id,
                step_number=number,
                thinking=outcome.thinking,
                actions=outcome.actions,
                results=outcome.results,
                screenshots=outcome.screenshots,
                duration_ms=outcome.duration_ms,
                url=outcome.url,
            )
        else:
            payload = ev.StepFailed(
                task_id=task_id,
                step_number=number,
                error=outcome.error,
                category=outcome.category,
                thinking=outcome.thinking,
                actions=outcome.actions,
                screenshots=outcome.screenshots,
                duration_ms=outcome.duration_ms,
                url=outcome.url,
            )
        _apply(self.state, await self.append(payload, command_id))
        logger.info(
            "step %s %s",
            number,
            "passed" if outcome.success else f"failed ({outcome.category}): {outcome.error}",
            extra={"session_id": self.state.session_id, "task_id": task_id},
        )
        return outcome


def _apply(state: SessionState, event: ev.Event) -> None:
    from stepwise_libs.fold import apply

    apply(state, event)
