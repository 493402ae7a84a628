"""Secret values of the sessions this executor runs: loading them, and keeping them out of output.

browser-use 0.13.14 puts a value in place of `<secret>name</secret>` only in the
parameters of the action it is about to run, masks the values in the messages it
sends to the model, and logs typed secrets by name. A page or a model may still
echo a value, for example in a URL's query or a model's thinking. So every event payload
this executor appends and every log record of its process has each registered
value replaced with its `{{name}}` placeholder.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import msgspec
from nats.js import JetStreamContext
from stepwise_libs import events as ev
from stepwise_libs.fold import SessionState
from stepwise_libs.secrets import SecretsNotFoundError, load_secrets, placeholders

from .errors import SECRET_MISSING, StepError

P = TypeVar("P", bound=ev.Payload)

# Attributes every LogRecord has; any other attribute came from `extra=`.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class SecretRegistry:
    """The secret values of the sessions whose work runs in this process, for redaction.

    Readers in other threads (the lease heartbeat logs too) see a tuple that is
    replaced whole, never changed in place.
    """

    def __init__(self) -> None:
        self._by_session: dict[str, dict[str, str]] = {}
        self._pairs: tuple[tuple[str, str], ...] = ()

    @property
    def active(self) -> bool:
        return bool(self._pairs)

    def add(self, session_id: str, values: dict[str, str]) -> None:
        self._by_session[session_id] = dict(values)
        self._rebuild()

    def discard(self, session_id: str) -> None:
        if self._by_session.pop(session_id, None) is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        pairs = {
            (name, value)
            for values in self._by_session.values()
            for name, value in values.items()
            if value
        }
        # Longest values first, so a value that contains a shorter one is replaced whole.
        self._pairs = tuple(sorted(pairs, key=lambda pair: -len(pair[1])))

    def redact(self, text: str) -> str:
        """Return `text` with every registered value replaced by its `{{name}}` placeholder."""
        for name, value in self._pairs:
            if value in text:
                text = text.replace(value, "{{" + name + "}}")
        return text

    def redact_payload(self, payload: P) -> P:
        """Return the payload with every registered value in its strings replaced."""
        if not self._pairs:
            return payload
        data = msgspec.to_builtins(payload)
        cleaned = self._redact_value(data)
        if cleaned == data:
            return payload
        return msgspec.convert(cleaned, type(payload))

    def _redact_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {self.redact(str(k)): self._redact_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._redact_value(item) for item in value]
        return value


REGISTRY = SecretRegistry()


async def secrets_for_task(js: JetStreamContext, state: SessionState, task: str) -> dict[str, str]:
    """Load the session's secret values for one agent run; raise StepError if the task lacks one.

    A task without placeholders still gets the values when the bucket has them, so
    browser-use masks them in the page state the model receives after an earlier step typed them.
    """
    names = state.secret_names
    used = placeholders(task)
    unknown = [name for name in used if name not in names]
    if unknown:
        supplied = ", ".join(names) if names else "no secrets"
        raise StepError(
            f"the placeholder {{{{{unknown[0]}}}}} has no secret value: the session was "
            f"created with {supplied}; create a new session whose secrets include "
            f"{unknown[0]!r}",
            SECRET_MISSING,
        )
    if not names:
        return {}
    try:
        values = await load_secrets(js, state.session_id)
    except SecretsNotFoundError:
        if not used:
            return {}
        raise StepError(
            f"the values of the secrets {', '.join(names)} of session {state.session_id} are "
            "not in the NATS KV bucket stepwise_secrets: they are purged when a run ends, "
            "expire 24 hours after the session was created and are lost when nats-server "
            "restarts; create a new session with the secrets",
            SECRET_MISSING,
        ) from None
    missing = [name for name in used if name not in values]
    if missing:
        raise StepError(
            f"the secrets bucket has no value for {{{{{missing[0]}}}}} of session "
            f"{state.session_id}; create a new session with that secret",
            SECRET_MISSING,
        )
    REGISTRY.add(state.session_id, values)
    return values


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string is the handler's to report
        return
    redacted = REGISTRY.redact(message)
    if redacted != message:
        record.msg, record.args = redacted, None
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        record.exc_text = REGISTRY.redact(logging.Formatter().formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = REGISTRY.redact(record.stack_info)


class _RedactExtras(logging.Filter):
    """Redact the string fields passed with `extra=`, which are set after a record is made."""

    def filter(self, record: logging.LogRecord) -> bool:
        if REGISTRY.active:
            for key, value in list(vars(record).items()):
                if key not in _STANDARD_ATTRIBUTES and isinstance(value, str):
                    setattr(record, key, REGISTRY.redact(value))
        return True


def install_log_redaction() -> None:
    """Redact registered secret values from every log record of this process.

    The record factory covers message, arguments and traceback of every logger,
    including browser-use's, which has its own handlers. Call once from the
    entry point, after logging is configured.
    """
    previous = logging.getLogRecordFactory()

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if REGISTRY.active:
            _redact_record(record)
        return record

    logging.setLogRecordFactory(make_record)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactExtras())
