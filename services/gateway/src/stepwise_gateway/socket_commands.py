"""Control commands sent as JSON messages on a session's WebSocket, replied to on that socket.

A message is `{"command": NAME, ...}` with the fields the REST control takes
(`task`, `previous_context`, `task_prompt`), an optional `idempotency_key` and an
optional `request_id` that the reply echoes. A queued command is answered with
`{"type": "<name>_queued", "task_id": ...}` (`execution_queued` for start), a
rejected one with `{"type": "command_rejected", "reason": ..., "code": ...}`,
and a malformed one with `{"type": "error", "code": ..., "message": ...}`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .controls import CONTROLS, load_state, submit
from .errors import CommandConflict, GatewayError, InvalidInput
from .runtime import Runtime, nats_errors
from .validation import (
    MAX_CONTEXT_CHARS,
    MAX_INSTRUCTION_CHARS,
    MAX_TEST_CASE_CHARS,
    check_idempotency_key,
    check_json_unicode,
    check_placeholder_names,
    check_text,
)

logger = logging.getLogger(__name__)

# Every accepted command name, REST-style and command-type style, mapped to its control.
ALIASES = {
    "start": "start",
    "execute_plan": "start",
    "pause": "pause",
    "pause_execution": "pause",
    "continue": "continue",
    "continue_execution": "continue",
    "act": "act",
    "run_till_end": "run_till_end",
    "run-till-end": "run_till_end",
    "retry_step": "retry_step",
    "retry-step": "retry_step",
    "skip_step": "skip_step",
    "skip-step": "skip_step",
    "cancel": "cancel",
    "cancel_task": "cancel",
    "stop": "stop",
    "stop_all": "stop",
    "continue_plan": "continue_plan",
    "continue_session": "continue_plan",
}
TASK_STATUS = "task_status"


def _error(code: str, message: str, field: str | None, request_id: Any) -> dict[str, Any]:
    logger.info("invalid WebSocket command: %s", message, extra={"code": code, "field": field})
    return {
        "type": "error",
        "code": code,
        "message": message,
        "field": field,
        "request_id": request_id,
    }


def _string_field(message: dict[str, Any], name: str) -> str | None:
    value = message.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string", field=name)
    return value


# Fields every command message may carry, and those of each control's REST body.
_COMMON_FIELDS = {"command", "request_id", "idempotency_key"}
_BODY_FIELDS = {
    "act": {"task", "previous_context"},
    "continue_plan": {"task_prompt"},
}


def _params(control_name: str, message: dict[str, Any]) -> dict[str, Any]:
    allowed = _COMMON_FIELDS | _BODY_FIELDS.get(control_name, set())
    unknown = sorted(str(name) for name in message if name not in allowed)
    if unknown:
        # The REST body rejects unknown fields too, so a misspelt field is not ignored.
        raise InvalidInput(
            f"{unknown[0]} is not a known field of {control_name}; remove it "
            f"(known: {', '.join(sorted(allowed))})",
            field=unknown[0],
        )
    if control_name == "act":
        task = check_text(_string_field(message, "task") or "", "task", MAX_INSTRUCTION_CHARS)
        check_placeholder_names(task, "task")
        context = _string_field(message, "previous_context")
        if context is not None:
            check_text(context, "previous_context", MAX_CONTEXT_CHARS, required=False)
        return {"task": task, "previous_context": context}
    if control_name == "continue_plan":
        prompt = check_text(
            _string_field(message, "task_prompt") or "", "task_prompt", MAX_TEST_CASE_CHARS
        )
        check_placeholder_names(prompt, "task_prompt")
        return {"task_prompt": prompt}
    return {}


async def handle(runtime: Runtime, session_id: str, text: str) -> dict[str, Any]:
    """Run one command message and return the reply to send back."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as error:
        return _error("invalid_json", f"message is not valid JSON: {error}", None, None)
    if not isinstance(message, dict):
        return _error(
            "invalid_input",
            'a command message is a JSON object like {"command": "start"}',
            None,
            None,
        )
    try:
        # The reply echoes request_id and the log names the command, so neither may contain
        # text that cannot be encoded.
        check_json_unicode(message, "")
    except InvalidInput as error:
        return _error(error.code, error.message, error.field, None)
    request_id = message.get("request_id")
    name = message.get("command")
    known = ", ".join(sorted([*ALIASES, TASK_STATUS]))
    if "command" not in message:
        return _error(
            "missing_command",
            f'the command field is missing; send {{"command": NAME}} with NAME one of: {known}',
            "command",
            request_id,
        )
    if name != TASK_STATUS and name not in ALIASES:
        return _error(
            "unknown_command",
            f"unknown command {name!r}; use one of: {known}",
            "command",
            request_id,
        )

    try:
        if name == TASK_STATUS:
            return await _task_status(runtime, session_id, request_id)
        control = CONTROLS[ALIASES[name]]
        params = _params(control.name, message)
        key = check_idempotency_key(_string_field(message, "idempotency_key"))
        js, store = runtime.jetstream()
        queued = await submit(js, store, session_id, control, params, key)
    except CommandConflict as conflict:
        return {
            "type": "command_rejected",
            "command": name,
            "command_type": conflict.command_type,
            "reason": conflict.message,
            "code": conflict.code,
            "status": conflict.status,
            "request_id": request_id,
        }
    except GatewayError as error:
        return _error(error.code, error.message, error.field, request_id)
    return {
        "type": queued.queued_type,
        "command": name,
        "task_id": queued.task_id,
        "command_id": queued.command_id,
        "status": "queued",
        "request_id": request_id,
    }


async def _task_status(runtime: Runtime, session_id: str, request_id: Any) -> dict[str, Any]:
    _, store = runtime.jetstream()
    with nats_errors(f"reading the events of session {session_id}"):
        events = await store.read(session_id)
    state = load_state(events, session_id)
    task = state.current_task
    return {
        "type": TASK_STATUS,
        "task_id": task.task_id if task else None,
        "task_type": task.task_type if task else None,
        "status": task.status if task else None,
        "progress": task.progress if task else "",
        "error": task.error if task else None,
        "session_status": state.status,
        "request_id": request_id,
    }
