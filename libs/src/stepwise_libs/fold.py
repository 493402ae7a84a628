"""The state of a session, folded from its events.

The gateway checks commands against it, the executor resumes from it and the
projector's read models must equal it; one fold keeps the three in agreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import events as ev
from .events import ActionRecord, Event

# Session statuses.
CREATED = "created"
GENERATING_PLAN = "generating_plan"
PLAN_READY = "plan_ready"
RUNNING = "running"
PAUSED = "paused"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
STOPPED = "stopped"
INTERRUPTED = "interrupted"
TIMED_OUT = "timed_out"

TERMINAL_STATUSES = frozenset({CANCELLED})

# Step statuses.
STEP_PENDING = "pending"
STEP_RUNNING = "running"
STEP_PASSED = "passed"
STEP_FAILED = "failed"
STEP_SKIPPED = "skipped"

# Reason carried by `browser_closed` when the user asked to stop everything.
STOP_ALL_REASON = "stop_all"


@dataclass
class StepState:
    number: int
    description: str
    plan_id: str
    status: str = STEP_PENDING
    attempts: int = 0
    thinking: str = ""
    actions: list[ActionRecord] = field(default_factory=list)
    results: list[str] = field(default_factory=list)
    screenshots: list[str] = field(default_factory=list)
    error: str | None = None
    error_category: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: int | None = None


@dataclass
class TaskState:
    task_id: str
    task_type: str  # plan_generation, execution, act_mode, run_till_end
    status: str = "running"  # queued, running, completed, failed, cancelled
    progress: str = ""
    error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlanState:
    plan_id: str
    kind: str
    model: str
    prompt: str
    status: str = "generating"  # generating, completed, failed
    plan_text: str = ""
    unparsed: list[str] = field(default_factory=list)
    error: str | None = None
    created_at: datetime | None = None
    completed_at: datetime | None = None


@dataclass
class SessionState:
    session_id: str
    status: str = CREATED
    test_case: str = ""
    target_url: str = ""
    llm_model: str = ""
    title: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    last_seq: int = 0
    plans: list[PlanState] = field(default_factory=list)
    steps: list[StepState] = field(default_factory=list)
    tasks: dict[str, TaskState] = field(default_factory=dict)
    current_task_id: str | None = None
    browser_open: bool = False
    # The step a run-till-end is paused on, waiting for retry or skip.
    blocked_step: int | None = None
    last_rejection: str | None = None
    act_history: list[str] = field(default_factory=list)
    # The page of the last step or act-mode instruction, from its event's `url`.
    last_url: str = ""
    # Names of the secrets supplied with the session (the values are in the secrets bucket).
    secret_names: list[str] = field(default_factory=list)

    @property
    def plan_ready(self) -> bool:
        return any(plan.status == "completed" for plan in self.plans) and bool(self.steps)

    @property
    def passed_count(self) -> int:
        return sum(step.status == STEP_PASSED for step in self.steps)

    @property
    def failed_count(self) -> int:
        return sum(step.status == STEP_FAILED for step in self.steps)

    @property
    def skipped_count(self) -> int:
        return sum(step.status == STEP_SKIPPED for step in self.steps)

    @property
    def last_completed_step(self) -> int:
        """Return the highest step number such that it and every step before it is done."""
        done = 0
        for step in self.steps:
            if step.status in (STEP_PASSED, STEP_SKIPPED):
                done = step.number
            else:
                break
        return done

    @property
    def next_step(self) -> int | None:
        """Return the number of the first step not yet passed or skipped, or None."""
        for step in self.steps:
            if step.status not in (STEP_PASSED, STEP_SKIPPED):
                return step.number
        return None

    def step(self, number: int) -> StepState | None:
        if 1 <= number <= len(self.steps):
            return self.steps[number - 1]
        return None

    @property
    def current_task(self) -> TaskState | None:
        return self.tasks.get(self.current_task_id) if self.current_task_id else None


RUN_TASK_TYPES = ("execution", "run_till_end")


def open_run(state: SessionState) -> TaskState | None:
    """Return the latest execution or run-till-end task that has not ended, if any.

    A paused run's task is still open; an act that ran meanwhile is a task of its own.
    """
    for task in reversed(state.tasks.values()):
        if task.task_type in RUN_TASK_TYPES and task.status == "running":
            return task
    return None


def fold(session_id: str, events: list[Event]) -> SessionState:
    state = SessionState(session_id=session_id)
    for event in events:
        apply(state, event)
    return state


def apply(state: SessionState, event: Event) -> SessionState:
    """Apply one event to the state in place; events at or below `last_seq` are ignored."""
    if event.seq <= state.last_seq:
        return state
    state.last_seq = event.seq
    state.updated_at = event.at
    handler = _HANDLERS.get(event.type)
    if handler is not None:
        handler(state, event.payload(), event)
    return state


def _start_task(state: SessionState, task_id: str, task_type: str, event: Event) -> TaskState:
    task = state.tasks.get(task_id)
    if task is None:
        task = state.tasks[task_id] = TaskState(task_id, task_type, created_at=event.at)
    task.task_type = task_type
    task.status = "running"
    task.error = None
    task.updated_at = event.at
    state.current_task_id = task_id
    return task


def _end_task(
    state: SessionState, task_id: str | None, status: str, event: Event, error: str | None = None
) -> None:
    task = state.tasks.get(task_id) if task_id else state.current_task
    if task is None:
        return
    task.status = status
    task.error = error
    task.updated_at = event.at


def _session_created(state: SessionState, data: ev.SessionCreated, event: Event) -> None:
    state.test_case = data.test_case
    state.target_url = data.target_url
    state.llm_model = data.llm_model
    state.title = data.title
    state.secret_names = list(data.secret_names)
    state.created_at = event.at
    state.status = CREATED


def _plan_started(state: SessionState, data: ev.PlanStarted, event: Event) -> None:
    state.plans.append(
        PlanState(data.plan_id, data.kind, data.model, data.prompt, created_at=event.at)
    )
    _start_task(state, data.plan_id, "plan_generation", event)
    if data.kind == "initial":
        state.status = GENERATING_PLAN


def _find_plan(state: SessionState, plan_id: str) -> PlanState | None:
    return next((plan for plan in state.plans if plan.plan_id == plan_id), None)


def _plan_progress(state: SessionState, data: ev.PlanProgress, event: Event) -> None:
    task = state.tasks.get(data.plan_id)
    if task is not None:
        task.progress = data.message
        task.updated_at = event.at


def _plan_completed(state: SessionState, data: ev.PlanCompleted, event: Event) -> None:
    plan = _find_plan(state, data.plan_id)
    if plan is None:
        plan = PlanState(data.plan_id, data.kind, state.llm_model, "", created_at=event.at)
        state.plans.append(plan)
    plan.status = "completed"
    plan.plan_text = data.plan_text
    plan.unparsed = list(data.unparsed)
    plan.completed_at = event.at
    offset = len(state.steps)
    for step in data.steps:
        state.steps.append(StepState(offset + step.number, step.description, data.plan_id))
    _end_task(state, data.plan_id, "completed", event)
    if data.kind == "initial":
        state.status = PLAN_READY
    elif state.status in (PLAN_READY, COMPLETED, FAILED, PAUSED, STOPPED, INTERRUPTED, CREATED):
        ran = any(step.status != STEP_PENDING for step in state.steps)
        state.status = PAUSED if ran else PLAN_READY


def _plan_failed(state: SessionState, data: ev.PlanFailed, event: Event) -> None:
    plan = _find_plan(state, data.plan_id)
    if plan is not None:
        plan.status = "failed"
        plan.error = data.error
    _end_task(state, data.plan_id, "failed", event, data.error)
    if plan is None or plan.kind == "initial":
        state.status = FAILED


def _execution_started(state: SessionState, data: ev.ExecutionStarted, event: Event) -> None:
    _start_task(state, data.task_id, data.mode, event)
    state.status = RUNNING
    state.browser_open = True
    state.blocked_step = None


def _step_started(state: SessionState, data: ev.StepStarted, event: Event) -> None:
    step = state.step(data.step_number)
    if step is None:
        return
    step.status = STEP_RUNNING
    step.attempts += 1
    step.started_at = event.at
    step.finished_at = None
    step.error = None
    step.error_category = None
    step.thinking = ""
    step.actions = []
    step.results = []
    step.screenshots = []
    task = state.tasks.get(data.task_id)
    if task is not None:
        task.progress = f"step {data.step_number} of {len(state.steps)}"
        task.updated_at = event.at


def _step_completed(state: SessionState, data: ev.StepCompleted, event: Event) -> None:
    step = state.step(data.step_number)
    if step is None:
        return
    step.status = STEP_PASSED
    step.thinking = data.thinking
    step.actions = list(data.actions)
    step.results = list(data.results)
    step.screenshots = list(data.screenshots)
    step.finished_at = event.at
    step.duration_ms = data.duration_ms
    if data.url:
        state.last_url = data.url


def _step_failed(state: SessionState, data: ev.StepFailed, event: Event) -> None:
    step = state.step(data.step_number)
    if step is None:
        return
    step.status = STEP_FAILED
    step.error = data.error
    step.error_category = data.category
    step.thinking = data.thinking
    step.actions = list(data.actions)
    step.screenshots = list(data.screenshots)
    step.finished_at = event.at
    step.duration_ms = data.duration_ms
    if data.url:
        state.last_url = data.url


def _step_skipped(state: SessionState, data: ev.StepSkipped, event: Event) -> None:
    step = state.step(data.step_number)
    if step is None:
        return
    step.status = STEP_SKIPPED
    step.error = data.reason or step.error
    step.finished_at = event.at
    if state.blocked_step == data.step_number:
        state.blocked_step = None


def _action_executed(state: SessionState, data: ev.ActionExecuted, event: Event) -> None:
    if data.step_number is None:
        return
    step = state.step(data.step_number)
    if step is not None and step.status == STEP_RUNNING:
        step.actions.append(data.action)


def _execution_paused(state: SessionState, data: ev.ExecutionPaused, event: Event) -> None:
    state.status = PAUSED
    task = state.tasks.get(data.task_id)
    if task is not None:
        task.progress = f"paused after step {data.after_step}"
        task.updated_at = event.at


def _execution_resumed(state: SessionState, data: ev.ExecutionResumed, event: Event) -> None:
    state.status = RUNNING
    state.blocked_step = None
    task = state.tasks.get(data.task_id)
    if task is None:
        # Older gateways gave a follow-up sent after an act a task id of its own.
        run = open_run(state)
        _start_task(state, data.task_id, run.task_type if run else "execution", event)
    else:
        task.status = "running"
        task.updated_at = event.at
    state.current_task_id = data.task_id


def _end_run(
    state: SessionState, task_id: str, status: str, event: Event, error: str | None = None
) -> None:
    """End the task of a run that ended, and any other run task left open before it."""
    _end_task(state, task_id, status, event, error)
    while (run := open_run(state)) is not None:
        _end_task(state, run.task_id, status, event, error)


def _execution_completed(state: SessionState, data: ev.ExecutionCompleted, event: Event) -> None:
    state.status = COMPLETED if data.success else FAILED
    _end_run(state, data.task_id, "completed" if data.success else "failed", event)


def _execution_failed(state: SessionState, data: ev.ExecutionFailed, event: Event) -> None:
    failed = state.step(data.failed_step) if data.failed_step else None
    timed_out = failed is not None and failed.error_category == "timeout"
    state.status = TIMED_OUT if timed_out else FAILED
    _end_run(state, data.task_id, "failed", event, data.error)


def _execution_cancelled(state: SessionState, data: ev.ExecutionCancelled, event: Event) -> None:
    state.status = CANCELLED
    for step in state.steps:
        if step.status == STEP_RUNNING:
            step.status = STEP_PENDING
    for task in state.tasks.values():
        if task.status in ("queued", "running"):
            task.status = "cancelled"
            task.updated_at = event.at


def _act_started(state: SessionState, data: ev.ActModeStarted, event: Event) -> None:
    task = _start_task(state, data.task_id, "act_mode", event)
    task.progress = data.instruction
    state.browser_open = True


def _act_completed(state: SessionState, data: ev.ActModeCompleted, event: Event) -> None:
    if data.url:
        state.last_url = data.url
    _end_task(state, data.task_id, "completed", event)
    task = state.tasks.get(data.task_id)
    if task is not None:
        task.result = {"result": data.result, "screenshot": data.screenshot}
        state.act_history.append(f"{task.progress}: {data.result}")


def _act_failed(state: SessionState, data: ev.ActModeFailed, event: Event) -> None:
    _end_task(state, data.task_id, "failed", event, data.error)


def _run_till_end_started(state: SessionState, data: ev.RunTillEndStarted, event: Event) -> None:
    _start_task(state, data.task_id, "run_till_end", event)
    state.status = RUNNING
    state.browser_open = True
    state.blocked_step = None


def _run_till_end_progress(state: SessionState, data: ev.RunTillEndProgress, event: Event) -> None:
    task = state.tasks.get(data.task_id)
    if task is not None:
        task.progress = f"step {data.current_step} of {data.total_steps}"
        task.updated_at = event.at


def _run_till_end_paused(state: SessionState, data: ev.RunTillEndPaused, event: Event) -> None:
    state.status = PAUSED
    state.blocked_step = data.step_number
    task = state.tasks.get(data.task_id)
    if task is not None:
        task.progress = f"paused at failed step {data.step_number}"
        task.updated_at = event.at


def _run_till_end_completed(
    state: SessionState, data: ev.RunTillEndCompleted, event: Event
) -> None:
    state.status = COMPLETED if data.success else FAILED
    state.blocked_step = None
    _end_run(state, data.task_id, "completed" if data.success else "failed", event)


def _browser_closed(state: SessionState, data: ev.BrowserClosed, event: Event) -> None:
    state.browser_open = False
    if data.reason == STOP_ALL_REASON and state.status != CANCELLED:
        state.status = STOPPED


def _session_interrupted(state: SessionState, data: ev.SessionInterrupted, event: Event) -> None:
    state.status = INTERRUPTED
    state.browser_open = False
    for step in state.steps:
        if step.status == STEP_RUNNING:
            step.status = STEP_PENDING
    task = state.current_task
    if task is not None and task.status == "running":
        task.status = "failed"
        task.error = data.reason
        task.updated_at = event.at


def _command_rejected(state: SessionState, data: ev.CommandRejected, event: Event) -> None:
    state.last_rejection = f"{data.command_type}: {data.reason}"


_HANDLERS: dict[str, Any] = {
    "session_created": _session_created,
    "plan_started": _plan_started,
    "plan_progress": _plan_progress,
    "plan_completed": _plan_completed,
    "plan_failed": _plan_failed,
    "execution_started": _execution_started,
    "step_started": _step_started,
    "step_completed": _step_completed,
    "step_failed": _step_failed,
    "step_skipped": _step_skipped,
    "action_executed": _action_executed,
    "execution_paused": _execution_paused,
    "execution_resumed": _execution_resumed,
    "execution_completed": _execution_completed,
    "execution_failed": _execution_failed,
    "execution_cancelled": _execution_cancelled,
    "act_mode_started": _act_started,
    "act_mode_completed": _act_completed,
    "act_mode_failed": _act_failed,
    "run_till_end_started": _run_till_end_started,
    "run_till_end_progress": _run_till_end_progress,
    "run_till_end_paused": _run_till_end_paused,
    "run_till_end_completed": _run_till_end_completed,
    "browser_closed": _browser_closed,
    "session_interrupted": _session_interrupted,
    "command_rejected": _command_rejected,
}
