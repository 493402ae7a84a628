"""Event envelope and the typed payload of every event type.

Events are JSON on the wire. The envelope carries a per-session `seq` that is
dense and 1-based; `position` is the JetStream stream sequence of the message
and is filled in when an event is read back, never written.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

SCHEMA_VERSION = 1


class Payload(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """Base of every event payload."""


class PlanStep(msgspec.Struct, kw_only=True):
    number: int
    description: str


class ActionRecord(msgspec.Struct, kw_only=True):
    """One browser action the agent took and what came of it."""

    name: str
    params: dict[str, Any] = {}
    result: str | None = None
    error: str | None = None
    success: bool = True


# --- session and plan ---------------------------------------------------------


class SessionCreated(Payload):
    test_case: str
    target_url: str
    llm_model: str
    title: str = ""
    # Names of the secrets supplied with the session; their values are never in an event.
    secret_names: list[str] = []


class PlanStarted(Payload):
    plan_id: str
    model: str
    kind: Literal["initial", "continuation"] = "initial"
    prompt: str = ""


class PlanProgress(Payload):
    plan_id: str
    message: str
    attempt: int | None = None


class PlanCompleted(Payload):
    plan_id: str
    plan_text: str
    steps: list[PlanStep]
    # Parts of the test case the model could not turn into a step.
    unparsed: list[str] = []
    kind: Literal["initial", "continuation"] = "initial"


class PlanFailed(Payload):
    plan_id: str
    error: str
    category: str = "error"


# --- execution ----------------------------------------------------------------


class ExecutionStarted(Payload):
    task_id: str
    from_step: int
    total_steps: int
    mode: str = "execution"
    # The executor replica that runs the steps (STEPWISE_EXECUTOR_ID); empty in older events.
    executor_id: str = ""


class StepStarted(Payload):
    task_id: str
    step_number: int
    description: str
    attempt: int = 1


class ActionExecuted(Payload):
    task_id: str
    step_number: int | None
    action: ActionRecord


class StepCompleted(Payload):
    task_id: str
    step_number: int
    thinking: str = ""
    actions: list[ActionRecord] = []
    results: list[str] = []
    screenshots: list[str] = []
    duration_ms: int = 0
    # The page the browser showed when the step ended; a fresh browser reopens it.
    url: str = ""


class StepFailed(Payload):
    task_id: str
    step_number: int
    error: str
    category: str = "error"
    thinking: str = ""
    actions: list[ActionRecord] = []
    screenshots: list[str] = []
    duration_ms: int = 0
    url: str = ""


class StepSkipped(Payload):
    task_id: str
    step_number: int
    reason: str = ""


class ExecutionPaused(Payload):
    task_id: str
    after_step: int


class ExecutionResumed(Payload):
    task_id: str
    from_step: int
    # The executor replica that runs the steps (STEPWISE_EXECUTOR_ID); empty in older events.
    executor_id: str = ""


class ExecutionCompleted(Payload):
    task_id: str
    passed: int
    failed: int
    skipped: int
    total: int
    success: bool


class ExecutionFailed(Payload):
    task_id: str
    error: str
    failed_step: int | None = None


class ExecutionCancelled(Payload):
    task_id: str | None = None
    reason: str = "cancelled by user"


class ActModeStarted(Payload):
    task_id: str
    instruction: str


class ActModeCompleted(Payload):
    task_id: str
    thinking: str = ""
    actions: list[ActionRecord] = []
    result: str = ""
    screenshot: str | None = None
    url: str = ""


class ActModeFailed(Payload):
    task_id: str
    error: str
    category: str = "error"


class RunTillEndStarted(Payload):
    task_id: str
    from_step: int
    total_steps: int
    # The executor replica that runs the steps (STEPWISE_EXECUTOR_ID); empty in older events.
    executor_id: str = ""


class RunTillEndProgress(Payload):
    task_id: str
    current_step: int
    total_steps: int


class RunTillEndPaused(Payload):
    task_id: str
    step_number: int
    error: str


class RunTillEndCompleted(Payload):
    task_id: str
    success: bool
    skipped_steps: list[int] = []


class BrowserClosed(Payload):
    reason: str = ""


class SessionInterrupted(Payload):
    reason: str
    executor_id: str = ""
    last_completed_step: int = 0


class CommandRejected(Payload):
    command_type: str
    reason: str
    code: str = "invalid_state"


PAYLOAD_TYPES: dict[str, type[Payload]] = {
    "session_created": SessionCreated,
    "plan_started": PlanStarted,
    "plan_progress": PlanProgress,
    "plan_completed": PlanCompleted,
    "plan_failed": PlanFailed,
    "execution_started": ExecutionStarted,
    "step_started": StepStarted,
    "step_completed": StepCompleted,
    "step_failed": StepFailed,
    "step_skipped": StepSkipped,
    "action_executed": ActionExecuted,
    "execution_paused": ExecutionPaused,
    "execution_resumed": ExecutionResumed,
    "execution_completed": ExecutionCompleted,
    "execution_failed": ExecutionFailed,
    "execution_cancelled": ExecutionCancelled,
    "act_mode_started": ActModeStarted,
    "act_mode_completed": ActModeCompleted,
    "act_mode_failed": ActModeFailed,
    "run_till_end_started": RunTillEndStarted,
    "run_till_end_progress": RunTillEndProgress,
    "run_till_end_paused": RunTillEndPaused,
    "run_till_end_completed": RunTillEndCompleted,
    "browser_closed": BrowserClosed,
    "session_interrupted": SessionInterrupted,
    "command_rejected": CommandRejected,
}
EVENT_TYPES: dict[type[Payload], str] = {cls: name for name, cls in PAYLOAD_TYPES.items()}


class Event(msgspec.Struct, kw_only=True):
    """The envelope every event is stored in."""

    id: str
    session_id: str
    seq: int
    type: str
    at: datetime
    data: dict[str, Any]
    command_id: str | None = None
    version: int = SCHEMA_VERSION
    # Stream sequence of the stored message; set when read, omitted when written.
    position: int | None = None

    def payload(self) -> Payload:
        """Decode `data` into the typed payload of this event's type."""
        return msgspec.convert(self.data, PAYLOAD_TYPES[self.type])


def new_event(
    session_id: str,
    seq: int,
    payload: Payload,
    command_id: str | None = None,
    event_id: str | None = None,
) -> Event:
    """Build an envelope around a payload; `seq` is set again by the appender."""
    return Event(
        id=event_id or str(uuid.uuid4()),
        session_id=session_id,
        seq=seq,
        type=EVENT_TYPES[type(payload)],
        at=datetime.now(UTC),
        data=msgspec.to_builtins(payload),
        command_id=command_id,
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def encode_event(event: Event) -> bytes:
    return _encoder.encode(msgspec.structs.replace(event, position=None))


def decode_event(raw: bytes, position: int | None = None) -> Event:
    """Decode an event body; raise `msgspec.ValidationError` on a malformed one."""
    event = _decoder.decode(raw)
    if event.type not in PAYLOAD_TYPES:
        raise msgspec.ValidationError(f"unknown event type {event.type!r}")
    if position is not None:
        event.position = position
    return event
