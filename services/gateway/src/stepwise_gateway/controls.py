"""Session controls: check a command against the folded session state, then queue it.

A control that does not fit the session's state is rejected with 409 and a
`command_rejected` event, never dropped. An `Idempotency-Key` makes the command id
deterministic, so JetStream stores a repeated command once (`Nats-Msg-Id`) and the
caller gets the same task id back.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyDeletedError, KeyNotFoundError
from stepwise_libs import commands as cmd
from stepwise_libs import fold as states
from stepwise_libs import subjects
from stepwise_libs.events import CommandRejected, Event
from stepwise_libs.fold import SessionState, fold, open_run
from stepwise_libs.jetstream import EventStore, publish_command

from .errors import CommandConflict, SessionNotFound
from .metrics import COMMANDS_PUBLISHED
from .runtime import nats_errors

logger = logging.getLogger(__name__)

# Namespace of the command ids derived from an Idempotency-Key.
IDEMPOTENCY_NAMESPACE = uuid.UUID("5b0e3c1e-9f53-4d0a-8a63-0c4f1f6f7d21")

RUNNING_TASK = "running"
# Controls that set a session running again and so retire an earlier pause flag.
RESUMING_CONTROLS = frozenset({"start", "continue", "run_till_end", "retry_step", "skip_step"})


class Rejection(Exception):
    """A control that cannot run in the session's current state."""

    def __init__(self, reason: str, code: str = "invalid_state") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


@dataclass(frozen=True)
class Control:
    """One user control: its command, where it goes and when it is allowed."""

    name: str
    command_type: str
    queued_type: str
    check: Callable[[SessionState], None]
    planner: bool = False
    # Value of the flag put into the control KV bucket, for controls the executor must see at once.
    flag: str | None = None


@dataclass(frozen=True)
class Queued:
    session_id: str
    task_id: str
    command_id: str
    command_type: str
    queued_type: str


def load_state(events: list[Event], session_id: str) -> SessionState:
    if not events:
        raise SessionNotFound(session_id)
    return fold(session_id, events)


# --- state checks ----------------------------------------------------------------


def _not_cancelled(state: SessionState) -> None:
    if state.status == states.CANCELLED:
        raise Rejection(
            "the session is cancelled and takes no more commands; create a new session",
            "session_cancelled",
        )


def _plan_exists(state: SessionState) -> None:
    if state.plan_ready:
        return
    if state.status in (states.CREATED, states.GENERATING_PLAN):
        raise Rejection(
            f"the plan is not ready yet (status {state.status}); wait for the plan_completed event",
            "plan_not_ready",
        )
    failed = next((plan for plan in reversed(state.plans) if plan.status == "failed"), None)
    if failed is not None:
        raise Rejection(
            f"the plan could not be generated: {failed.error}; create a new session",
            "plan_not_ready",
        )
    raise Rejection(
        "the session has no plan steps to run; create a new session with a test case",
        "plan_not_ready",
    )


def _act_running(state: SessionState) -> bool:
    task = state.current_task
    return task is not None and task.task_type == "act_mode" and task.status == RUNNING_TASK


def _no_act_running(state: SessionState) -> None:
    if _act_running(state):
        raise Rejection(
            "an act instruction is still running; wait for act_mode_completed or act_mode_failed",
            "busy",
        )


def _not_blocked(state: SessionState) -> None:
    if state.blocked_step is not None and state.status == states.PAUSED:
        raise Rejection(
            f"run till end is paused on failed step {state.blocked_step}; "
            "send retry-step or skip-step",
            "step_blocked",
        )


def _steps_remain(state: SessionState) -> None:
    if state.next_step is None:
        raise Rejection(
            "every step has already passed or been skipped; nothing is left to run",
            "nothing_to_run",
        )


def _running(state: SessionState) -> None:
    if state.status == states.RUNNING:
        raise Rejection(
            "the session is already running; pause it or wait for it to finish", "already_running"
        )


def check_start(state: SessionState) -> None:
    # NOTE: two starts sent before the executor appends execution_started both pass this
    # check, because a queued command is not in the events yet. The executor must reject
    # the second one.
    _not_cancelled(state)
    _plan_exists(state)
    _running(state)
    if state.status != states.PLAN_READY:
        raise Rejection(
            f"the session is {state.status}, and start runs a plan only from plan_ready; "
            + _start_alternative(state),
        )


def _start_alternative(state: SessionState) -> str:
    """Name the control that works in place of start, in a state other than plan_ready."""
    if state.status == states.PAUSED and state.blocked_step is not None:
        return f"send retry-step or skip-step for failed step {state.blocked_step}"
    if state.status in (states.PAUSED, states.STOPPED, states.INTERRUPTED):
        return "send continue to resume the run"
    return "create a new session to run the test case again"


def check_run_till_end(state: SessionState) -> None:
    _not_cancelled(state)
    _plan_exists(state)
    _running(state)
    _not_blocked(state)
    _no_act_running(state)
    _steps_remain(state)


def check_pause(state: SessionState) -> None:
    _not_cancelled(state)
    if state.status != states.RUNNING:
        raise Rejection(
            f"the session is {state.status}, not running; there is nothing to pause", "not_running"
        )


def check_continue(state: SessionState) -> None:
    _not_cancelled(state)
    _not_blocked(state)
    if state.status not in (states.PAUSED, states.STOPPED, states.INTERRUPTED):
        raise Rejection(
            f"the session is {state.status}, not paused; continue resumes a paused, stopped or "
            "interrupted session",
            "not_paused",
        )
    _no_act_running(state)
    _steps_remain(state)


# A finished run (completed, failed, timed_out) takes no act, so its result and browser stay closed.
ACT_STATUSES = (states.PAUSED, states.PLAN_READY, states.STOPPED, states.INTERRUPTED)


def check_act(state: SessionState) -> None:
    _not_cancelled(state)
    if state.status == states.RUNNING:
        raise Rejection(
            "the session is running; pause it before sending an act instruction", "already_running"
        )
    _plan_exists(state)
    if state.status not in ACT_STATUSES:
        raise Rejection(
            f"the session is {state.status}; act runs only on a paused, plan_ready, stopped "
            "or interrupted session"
        )
    _no_act_running(state)


def check_blocked_step(state: SessionState) -> None:
    _not_cancelled(state)
    if state.blocked_step is None or state.status != states.PAUSED:
        raise Rejection(
            f"the session is {state.status} and no run till end is paused on a failed step; "
            "retry-step and skip-step apply only then",
            "not_blocked",
        )
    _no_act_running(state)


def _work_in_progress(state: SessionState) -> bool:
    return state.browser_open or any(
        task.status in ("queued", RUNNING_TASK) for task in state.tasks.values()
    )


def check_cancel(state: SessionState) -> None:
    _not_cancelled(state)
    if state.status in (states.RUNNING, states.PAUSED, states.CREATED, states.GENERATING_PLAN):
        return
    if not _work_in_progress(state):
        raise Rejection(
            f"the session is {state.status} with no work in progress and no open browser; "
            "nothing to cancel",
            "nothing_to_cancel",
        )


def check_stop(state: SessionState) -> None:
    _not_cancelled(state)
    if state.status in (states.RUNNING, states.PAUSED) or state.browser_open:
        return
    raise Rejection(
        f"the session is {state.status} with no open browser; nothing to stop", "nothing_to_stop"
    )


def check_continue_plan(state: SessionState) -> None:
    _not_cancelled(state)
    _plan_exists(state)
    task = state.current_task
    if task is not None and task.task_type == "plan_generation" and task.status == RUNNING_TASK:
        raise Rejection("a plan is already being generated; wait for plan_completed", "busy")


CONTROLS: dict[str, Control] = {
    control.name: control
    for control in (
        Control("start", "execute_plan", "execution_queued", check_start),
        Control("pause", "pause_execution", "pause_queued", check_pause, flag="pause"),
        Control("continue", "continue_execution", "continue_queued", check_continue),
        Control("act", "act", "act_queued", check_act),
        Control("run_till_end", "run_till_end", "run_till_end_queued", check_run_till_end),
        Control("retry_step", "retry_step", "retry_step_queued", check_blocked_step),
        Control("skip_step", "skip_step", "skip_step_queued", check_blocked_step),
        Control("cancel", "cancel_task", "cancel_queued", check_cancel, flag="cancel"),
        Control("stop", "stop_all", "stop_all_queued", check_stop),
        Control(
            "continue_plan",
            "continue_plan",
            "plan_continuation_queued",
            check_continue_plan,
            planner=True,
        ),
    )
}


def command_id_for(session_id: str, command_type: str, idempotency_key: str | None) -> str:
    """Return a fresh command id, or one derived from the Idempotency-Key so a repeat reuses it."""
    if idempotency_key is None:
        return str(uuid.uuid4())
    return str(
        uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{session_id}\n{command_type}\n{idempotency_key}")
    )


def _task_id(control: Control, state: SessionState, command_id: str) -> str:
    """Return the task the command belongs to: the open run for follow-ups, else a new one."""
    task = state.current_task
    if control.name in ("cancel", "stop") and task is not None:
        return task.task_id
    if control.name in ("continue", "retry_step", "skip_step", "pause"):
        # The run a follow-up continues, even when an act ran since it paused.
        run = open_run(state)
        if run is not None:
            return run.task_id
    return command_id


def _body(
    control: Control, state: SessionState, task_id: str, params: dict[str, Any], model: str
) -> cmd.CommandBody:
    match control.command_type:
        case "execute_plan":
            return cmd.ExecutePlan(task_id=task_id)
        case "pause_execution":
            return cmd.PauseExecution()
        case "continue_execution":
            return cmd.ContinueExecution(task_id=task_id)
        case "act":
            return cmd.Act(
                task_id=task_id,
                task=params["task"],
                previous_context=params.get("previous_context"),
            )
        case "run_till_end":
            return cmd.RunTillEnd(task_id=task_id)
        case "retry_step":
            return cmd.RetryStep(task_id=task_id)
        case "skip_step":
            return cmd.SkipStep(task_id=task_id)
        case "cancel_task":
            return cmd.CancelTask()
        case "stop_all":
            return cmd.StopAll()
        case "continue_plan":
            return cmd.ContinuePlan(task_prompt=params["task_prompt"], llm_model=model)
    raise AssertionError(f"no command body for {control.command_type}")


def _replayed(events: list[Event], command_id: str) -> tuple[Event | None, str | None]:
    """Find what an earlier request with the same command id led to: a rejection or a task id."""
    answered = [event for event in events if event.command_id == command_id]
    if not answered:
        return None, None
    rejection = next((event for event in answered if event.type == "command_rejected"), None)
    task_id = next((event.data["task_id"] for event in answered if event.data.get("task_id")), None)
    return rejection, task_id


async def submit(
    js: JetStreamContext,
    store: EventStore,
    session_id: str,
    control: Control,
    params: dict[str, Any],
    idempotency_key: str | None,
) -> Queued:
    """Check a control against the session's events and queue its command, or raise 409."""
    with nats_errors(f"reading the events of session {session_id}"):
        events = await store.read(session_id)
    state = load_state(events, session_id)
    command_id = command_id_for(session_id, control.command_type, idempotency_key)
    log_context = {
        "session_id": session_id,
        "command_id": command_id,
        "command_type": control.command_type,
    }

    # A repeated Idempotency-Key gets the same response as the first request.
    if idempotency_key is not None:
        rejection, task_id = _replayed(events, command_id)
        if rejection is not None:
            raise CommandConflict(
                control.command_type,
                rejection.data["reason"],
                rejection.data.get("code", "invalid_state"),
                state.status,
            )
        if task_id is not None:
            return Queued(
                session_id, task_id, command_id, control.command_type, control.queued_type
            )

    try:
        control.check(state)
    except Rejection as rejected:
        await reject(
            store,
            session_id,
            control.command_type,
            rejected,
            command_id,
            idempotency_key is not None,
        )
        raise CommandConflict(
            control.command_type, rejected.reason, rejected.code, state.status
        ) from None

    task_id = _task_id(control, state, command_id)
    body = _body(control, state, task_id, params, state.llm_model)
    command = cmd.new_command(session_id, body, command_id=command_id)
    subject = (
        subjects.planner_command_subject(control.command_type)
        if control.planner
        else subjects.executor_command_subject(control.command_type)
    )
    with nats_errors(f"queueing {control.command_type}"):
        ack = await publish_command(js, subject, command)
        COMMANDS_PUBLISHED.labels(control.command_type).inc()
        if control.flag is not None:
            await put_control_flag(js, session_id, control.flag, command_id)
        elif control.name in RESUMING_CONTROLS:
            await clear_pause_flag(js, session_id)
    logger.info(
        "command queued",
        extra={**log_context, "task_id": task_id, "duplicate": bool(ack.duplicate)},
    )
    return Queued(session_id, task_id, command_id, control.command_type, control.queued_type)


async def reject(
    store: EventStore,
    session_id: str,
    command_type: str,
    rejected: Rejection,
    command_id: str,
    deterministic: bool,
) -> None:
    """Append `command_rejected`, so the rejection is in the session's history too."""
    event_id = (
        str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"rejected\n{command_id}")) if deterministic else None
    )
    logger.info(
        "command rejected: %s",
        rejected.reason,
        extra={"session_id": session_id, "command_id": command_id, "command_type": command_type},
    )
    with nats_errors(f"recording the rejection of {command_type}"):
        await store.append(
            session_id,
            CommandRejected(command_type=command_type, reason=rejected.reason, code=rejected.code),
            command_id=command_id,
            event_id=event_id,
        )
    # Planner and executor write this session next, so the cached tail would only go stale.
    store.forget(session_id)


async def clear_pause_flag(js: JetStreamContext, session_id: str) -> None:
    """Delete a pause flag, so the executor does not pause again after the run resumes."""
    bucket = await js.key_value(subjects.CONTROL_BUCKET)
    try:
        entry = await bucket.get(session_id)
    except (KeyNotFoundError, KeyDeletedError):
        return
    if json.loads(entry.value or b"{}").get("action") != "pause":
        return
    try:
        await bucket.delete(session_id, last=entry.revision)
    except APIError:
        # A newer flag was put in the meantime; it stays.
        logger.info("kept a control flag newer than the pause", extra={"session_id": session_id})


async def put_control_flag(
    js: JetStreamContext, session_id: str, action: str, command_id: str
) -> None:
    """Put the pause or cancel flag where the owning executor watches for it."""
    bucket = await js.key_value(subjects.CONTROL_BUCKET)
    value = {"action": action, "command_id": command_id, "at": datetime.now(UTC).isoformat()}
    await bucket.put(session_id, json.dumps(value).encode())
