"""Handlers of the planner's commands: `generate_plan` and `continue_plan`.

Acknowledgement: a plan command stays unacknowledged until its final event
(`plan_completed`, `plan_failed` or `command_rejected`) is stored, and the
handler marks it in progress meanwhile so JetStream does not redeliver it.
A plan takes at most a few model calls, unlike a paused browser session, so
holding the message is cheap. When a planner dies mid-plan, the command is
redelivered and another planner finishes the work, so the session does not
stay in `generating_plan`.

Idempotency: before working, the handler reads the session's events. A
command whose final event is stored is only acknowledged; one with a
`plan_started` but no final event is finished under the same plan id, without
a second `plan_started`. The plan id is the command id, so the caller that
publishes the command knows the plan-generation task id in advance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Literal, cast

from nats.aio.msg import Msg
from stepwise_libs import fold as session_fold
from stepwise_libs.commands import Command, CommandBody, ContinuePlan, GeneratePlan
from stepwise_libs.events import (
    CommandRejected,
    Event,
    Payload,
    PlanCompleted,
    PlanFailed,
    PlanProgress,
    PlanStarted,
    PlanStep,
)
from stepwise_libs.jetstream import EventStore
from stepwise_libs.settings import OFFLINE_MODEL

from .errors import AppendFailedError, PlanFailedError
from .models import OfflinePlanModel, PlanModel, PlanRequest, model_name_for
from .settings import PlannerSettings

logger = logging.getLogger(__name__)

PlanKind = Literal["initial", "continuation"]

FINAL_EVENT_TYPES = frozenset({"plan_completed", "plan_failed", "command_rejected"})


class PlannerService:
    """Runs plan commands concurrently, at most `settings.concurrency` at a time."""

    def __init__(self, store: EventStore, settings: PlannerSettings) -> None:
        self._store = store
        self._settings = settings
        self._ack_wait_seconds = settings.ack_wait_seconds
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        # Command id -> further copies of the command that arrived while it ran.
        self._in_progress: dict[str, list[Msg]] = {}
        self._models: dict[str, PlanModel] = {}

    @property
    def in_progress(self) -> int:
        """Number of commands this process is working on."""
        return len(self._tasks)

    # --- consumer side ------------------------------------------------------------

    async def handle(self, command: Command, body: CommandBody, message: Msg) -> None:
        """Start a command's work in the background once a slot is free; the work acks it."""
        copies = self._in_progress.get(command.command_id)
        if copies is not None:
            # A redelivery or a second copy of a command this process is working on:
            # the running work acknowledges it too when it ends.
            logger.info(
                "command redelivered while in progress",
                extra={"session_id": command.session_id, "command_id": command.command_id},
            )
            copies.append(message)
            return
        await self._slots.acquire()
        self._in_progress[command.command_id] = []
        task = asyncio.create_task(
            self._run(command, body, message), name=f"plan-{command.command_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, command: Command, body: CommandBody, message: Msg) -> None:
        context = {
            "session_id": command.session_id,
            "command_id": command.command_id,
            "command_type": command.type,
        }
        try:
            async with self._keep_in_progress(message):
                await self.process(command, body)
            copies = self._in_progress.pop(command.command_id, [])
            for each in (message, *copies):
                await each.ack()
        except asyncio.CancelledError:
            logger.warning("plan abandoned at shutdown; it will be redelivered", extra=context)
            raise
        except Exception:
            logger.exception("plan command failed; it will be redelivered", extra=context)
            for each in (message, *self._in_progress.get(command.command_id, [])):
                with contextlib.suppress(Exception):
                    await each.nak(delay=2.0)
        finally:
            self._in_progress.pop(command.command_id, None)
            self._slots.release()

    @contextlib.asynccontextmanager
    async def _keep_in_progress(self, message: Msg) -> AsyncIterator[None]:
        """Tell JetStream the message is in progress every third of the ack wait."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self._ack_wait_seconds / 3)
                try:
                    await message.in_progress()
                except Exception as error:  # A lost beat only risks a redelivery.
                    logger.warning("marking a command in progress failed: %s", error)

        heartbeat = asyncio.create_task(beat())
        try:
            yield
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def drain(self, grace_seconds: float) -> None:
        """Wait up to `grace_seconds` for plans in progress, then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        for model in self._models.values():
            with contextlib.suppress(Exception):
                await model.aclose()
        self._models.clear()

    # --- the work -------------------------------------------------------------------

    async def process(self, command: Command, body: CommandBody) -> None:
        """Generate a command's plan and append its events, once per command."""
        session_id = command.session_id
        context = {"session_id": session_id, "command_id": command.command_id}
        events = await read_session(self._store, session_id)
        own = [event for event in events if event.command_id == command.command_id]
        if any(event.type in FINAL_EVENT_TYPES for event in own):
            logger.info("command already handled; acknowledging it", extra=context)
            return

        started = next((event for event in own if event.type == "plan_started"), None)
        state = session_fold.fold(session_id, events)
        if started is None:
            rejection = _rejection_reason(state, command, body)
            if rejection is not None:
                code, reason = rejection
                logger.warning("rejected %s: %s", command.type, reason, extra=context)
                await self._append(
                    command, CommandRejected(command_type=command.type, reason=reason, code=code)
                )
                return

        request, llm_model, kind = _plan_request(state, body)
        model_name = model_name_for(llm_model, self._settings.gemini_api_key is not None)
        plan_id = command.command_id
        if started is None:
            await self._append(
                command,
                PlanStarted(plan_id=plan_id, model=model_name, kind=kind, prompt=request.text),
            )
            logger.info("plan started", extra={**context, "model": model_name, "kind": kind})
        else:
            plan_id = str(started.data.get("plan_id", plan_id))
            logger.info("resuming a plan started before", extra={**context, "plan_id": plan_id})

        async def progress(message: str, attempt: int | None) -> None:
            try:
                await self._append(
                    command, PlanProgress(plan_id=plan_id, message=message, attempt=attempt)
                )
            except Exception as error:
                raise AppendFailedError(str(error)) from error

        try:
            model = self._model(model_name)
            draft = await model.generate(request, progress)
        except AppendFailedError:
            raise  # the event store is unreachable: the command is redelivered and resumed
        except PlanFailedError as error:
            logger.warning(
                "plan failed: %s",
                error.message,
                extra={**context, "plan_id": plan_id, "category": error.category},
            )
            await self._append(
                command, PlanFailed(plan_id=plan_id, error=error.message, category=error.category)
            )
            return
        except Exception as error:
            # A bug in a model must end the plan, not make every redelivery fail again.
            logger.exception("plan generation raised", extra={**context, "plan_id": plan_id})
            await self._append(
                command,
                PlanFailed(
                    plan_id=plan_id,
                    error=f"the planner failed: {type(error).__name__}: {error}",
                    category="internal_error",
                ),
            )
            return

        steps = [
            PlanStep(number=number, description=description)
            for number, description in enumerate(draft.steps, start=1)
        ]
        await self._append(
            command,
            PlanCompleted(
                plan_id=plan_id,
                plan_text=draft.plan_text,
                steps=steps,
                unparsed=draft.unparsed,
                kind=kind,
            ),
        )
        logger.info(
            "plan completed",
            extra={
                **context,
                "plan_id": plan_id,
                "steps": len(steps),
                "unparsed": len(draft.unparsed),
            },
        )

    async def _append(self, command: Command, payload: Payload) -> Event:
        return await self._store.append(command.session_id, payload, command_id=command.command_id)

    def _model(self, name: str) -> PlanModel:
        """Return the model called `name`; raise `PlanFailedError` for an unusable one."""
        model = self._models.get(name)
        if model is not None:
            return model
        if name == OFFLINE_MODEL:
            model = OfflinePlanModel()
        elif name.startswith("gemini"):
            api_key = self._settings.gemini_api_key
            if api_key is None:
                raise PlanFailedError(
                    "configuration",
                    f"Model {name} needs GEMINI_API_KEY (or GOOGLE_API_KEY), which the planner "
                    f"does not have. Set it for the planner, or use the model {OFFLINE_MODEL!r}.",
                )
            # Imported here because google-genai takes seconds to import, which an offline
            # planner need not pay at start.
            from . import gemini

            model = gemini.GeminiPlanModel(
                name, api_key, self._settings.gemini_base_url, self._settings.retry
            )
        else:
            raise PlanFailedError(
                "unsupported_model",
                f"Unsupported model {name!r}: the planner runs {OFFLINE_MODEL!r} and Gemini "
                "models (names starting with 'gemini', such as 'gemini-2.5-flash').",
            )
        self._models[name] = model
        return model


async def read_session(store: EventStore, session_id: str) -> list[Event]:
    """Return every stored event of a session.

    The tail is closed explicitly: an abandoned tail keeps its JetStream
    subscription open until garbage collection.
    """
    _, last_seq = await store.last(session_id)
    events: list[Event] = []
    if last_seq == 0:
        return events
    tail = cast(AsyncGenerator[Event, None], store.tail(session_id))
    async with contextlib.aclosing(tail):
        async for event in tail:
            events.append(event)
            if event.seq >= last_seq:
                break
    return events


def _rejection_reason(
    state: session_fold.SessionState, command: Command, body: CommandBody
) -> tuple[str, str] | None:
    """Return (code, reason) when the session's state does not allow the command."""
    if state.last_seq == 0:
        return "session_not_found", f"session {state.session_id} has no events; create it first"
    if state.status == session_fold.CANCELLED:
        return "invalid_state", f"session {state.session_id} is cancelled"
    if isinstance(body, GeneratePlan):
        for plan in state.plans:
            if plan.kind == "initial" and plan.status in ("generating", "completed"):
                return (
                    "invalid_state",
                    f"session {state.session_id} already has a plan ({plan.plan_id}, "
                    f"{plan.status}); ask for a continuation plan instead",
                )
    if isinstance(body, ContinuePlan):
        if not state.steps:
            return (
                "invalid_state",
                f"session {state.session_id} has no plan to continue; generate a plan first",
            )
        if not body.task_prompt.strip():
            return "invalid_command", "task_prompt is empty; say what the new steps should do"
    return None


def _plan_request(
    state: session_fold.SessionState, body: CommandBody
) -> tuple[PlanRequest, str, PlanKind]:
    """Return the request, the command's model and the plan kind of a plan command."""
    if isinstance(body, GeneratePlan):
        return PlanRequest(body.test_case, body.target_url), body.llm_model, "initial"
    if isinstance(body, ContinuePlan):
        # On a resumed continuation the fold contains no steps of this plan yet, because
        # its plan_completed is not stored.
        existing = [step.description for step in state.steps]
        request = PlanRequest(body.task_prompt, state.target_url, existing_steps=existing)
        return request, body.llm_model or state.llm_model, "continuation"
    raise TypeError(f"the planner does not handle {type(body).__name__}")
