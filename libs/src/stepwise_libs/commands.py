"""Commands: requests for work, sent on the commands stream to the planner or executor.

Each command carries a `command_id`, also sent as `Nats-Msg-Id`, so a retried
request is stored once. The events a command causes carry its id.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec

SCHEMA_VERSION = 1

# Largest command body a consumer accepts; a test case of up to 100 kB fits.
MAX_COMMAND_BYTES = 256 * 1024


class CommandBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Base of every command's data."""


class GeneratePlan(CommandBody):
    test_case: str
    target_url: str
    llm_model: str


class ContinuePlan(CommandBody):
    """Generate a continuation plan whose steps are appended to the session's plan."""

    task_prompt: str
    llm_model: str


class ExecutePlan(CommandBody):
    task_id: str
    # "execution" stops at the first failed step; "run_till_end" pauses there instead.
    mode: str = "execution"


class PauseExecution(CommandBody):
    pass


class ContinueExecution(CommandBody):
    task_id: str


class Act(CommandBody):
    task_id: str
    task: str
    previous_context: str | None = None


class RunTillEnd(CommandBody):
    task_id: str


class RetryStep(CommandBody):
    task_id: str


class SkipStep(CommandBody):
    task_id: str


class CancelTask(CommandBody):
    pass


class StopAll(CommandBody):
    pass


PLANNER_COMMANDS: dict[str, type[CommandBody]] = {
    "generate_plan": GeneratePlan,
    "continue_plan": ContinuePlan,
}
EXECUTOR_COMMANDS: dict[str, type[CommandBody]] = {
    "execute_plan": ExecutePlan,
    "pause_execution": PauseExecution,
    "continue_execution": ContinueExecution,
    "act": Act,
    "run_till_end": RunTillEnd,
    "retry_step": RetryStep,
    "skip_step": SkipStep,
    "cancel_task": CancelTask,
    "stop_all": StopAll,
}
COMMAND_TYPES: dict[type[CommandBody], str] = {
    cls: name for name, cls in (PLANNER_COMMANDS | EXECUTOR_COMMANDS).items()
}


class Command(msgspec.Struct, kw_only=True):
    """The envelope every command travels in."""

    command_id: str
    session_id: str
    type: str
    at: datetime
    data: dict[str, Any]
    version: int = SCHEMA_VERSION

    def body(self) -> CommandBody:
        """Decode `data` into the typed body of this command's type."""
        return msgspec.convert(self.data, (PLANNER_COMMANDS | EXECUTOR_COMMANDS)[self.type])


class InvalidCommand(ValueError):
    """A message on a command subject that cannot be decoded into a known command."""

    def __init__(self, reason: str, session_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.session_id = session_id


def new_command(session_id: str, body: CommandBody, command_id: str | None = None) -> Command:
    return Command(
        command_id=command_id or str(uuid.uuid4()),
        session_id=session_id,
        type=COMMAND_TYPES[type(body)],
        at=datetime.now(UTC),
        data=msgspec.to_builtins(body),
    )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Command)


def encode_command(command: Command) -> bytes:
    return _encoder.encode(command)


def decode_command(raw: bytes) -> tuple[Command, CommandBody]:
    """Decode and validate a command message, raising `InvalidCommand` with the reason."""
    if len(raw) > MAX_COMMAND_BYTES:
        raise InvalidCommand(
            f"command of {len(raw)} bytes exceeds the {MAX_COMMAND_BYTES}-byte limit",
            _guess_session_id(raw),
        )
    try:
        command = _decoder.decode(raw)
    except msgspec.DecodeError as error:
        session_id = _guess_session_id(raw)
        raise InvalidCommand(f"malformed command: {error}", session_id) from error
    if not is_valid_session_id(command.session_id):
        raise InvalidCommand(
            f"invalid session_id {command.session_id[:80]!r}: expected 1-64 of A-Z a-z 0-9 _ -"
        )
    if command.version != SCHEMA_VERSION:
        raise InvalidCommand(
            f"unsupported command version {command.version}; this service reads version {SCHEMA_VERSION}",
            command.session_id,
        )
    try:
        return command, command.body()
    except KeyError:
        raise InvalidCommand(f"unknown command type {command.type!r}", command.session_id) from None
    except msgspec.ValidationError as error:
        raise InvalidCommand(f"invalid {command.type} command: {error}", command.session_id) from error


def _guess_session_id(raw: bytes) -> str | None:
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    session_id = value.get("session_id") if isinstance(value, dict) else None
    if isinstance(session_id, str) and is_valid_session_id(session_id):
        return session_id
    return None


_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_valid_session_id(session_id: str) -> bool:
    """Return whether a session id can be one token of a NATS subject: 1-64 of [A-Za-z0-9_-]."""
    return _SESSION_ID.fullmatch(session_id) is not None
