"""Checks on user input: test case text, target URL, model name, control bodies, ids."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import urlsplit

from stepwise_libs.secrets import (
    MAX_SECRET_VALUE_BYTES,
    MAX_SECRETS,
    SECRET_NAME,
    invalid_placeholders,
    placeholders,
)
from stepwise_libs.settings import OFFLINE_MODEL

from .errors import InvalidInput, SessionNotFound

MAX_TEST_CASE_CHARS = 100_000
MAX_URL_CHARS = 2_048
MAX_INSTRUCTION_CHARS = 10_000
MAX_CONTEXT_CHARS = 100_000
MAX_IDEMPOTENCY_KEY_CHARS = 255
ALLOWED_CONTROL_CHARACTERS = frozenset("\n\t\r")

_GEMINI_MODEL = re.compile(r"gemini-[A-Za-z0-9][A-Za-z0-9.\-]{0,120}")
# Session ids become part of a NATS subject, so only subject-safe characters are allowed.
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]+")
# Hints for a required text field that arrived empty, by field. An act task is one instruction.
_EMPTY_HINTS = {
    "test_case": "write at least one step",
    "task_prompt": "write at least one step",
    "task": 'write one instruction, like Click "Login"',
}


def check_unicode(value: str, field: str) -> str:
    """Return `value` if it has no unpaired surrogate, which no UTF-8 encoder accepts.

    JSON can carry one as an escape such as "\\ud800", and Python decodes it into a str.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidInput(
            f"{field} contains an unpaired surrogate U+{ord(value[error.start]):04X} "
            f"(invalid Unicode) at position {error.start}; send valid UTF-8 text",
            field=field,
        ) from None
    return value


def check_json_unicode(value: object, field: str) -> None:
    """Raise InvalidInput if any string or key inside a decoded JSON value has a surrogate."""
    if isinstance(value, str):
        check_unicode(value, field)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_unicode(str(key), f"a key of {field}" if field else "a key")
            check_json_unicode(item, f"{field}.{key}" if field else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_json_unicode(item, f"{field}.{index}")


def check_placeholder_names(text: str, field: str) -> None:
    """Raise InvalidInput if `text` has `{{...}}` that looks like a placeholder but is invalid."""
    bad = invalid_placeholders(text)
    if bad:
        raise InvalidInput(
            f"{field} has the placeholder {bad[0][:80]!r} with an invalid name: a name is a "
            "letter or underscore and then up to 63 letters, digits or underscores, "
            "as in {{password}}",
            field=field,
        )


def check_text(value: str, field: str, max_chars: int, *, required: bool = True) -> str:
    """Return `value` if it is valid Unicode, non-empty, short enough and has no control codes."""
    check_unicode(value, field)
    if required and not value.strip():
        hint = _EMPTY_HINTS.get(field, "send a value with at least one visible character")
        raise InvalidInput(f"{field} must not be empty; {hint}", field=field)
    if len(value) > max_chars:
        raise InvalidInput(
            f"{field} has {len(value):,} characters, more than the maximum of {max_chars:,}; "
            "shorten it",
            field=field,
        )
    for index, char in enumerate(value):
        if char not in ALLOWED_CONTROL_CHARACTERS and unicodedata.category(char) == "Cc":
            raise InvalidInput(
                f"{field} contains the control character U+{ord(char):04X} at position {index}; "
                "only newline, tab and carriage return are allowed",
                field=field,
            )
    return value


def check_target_url(value: str, field: str = "target_url") -> str:
    """Return the URL without surrounding blanks if it is an absolute http(s) URL with a host."""
    check_unicode(value, field)
    url = value.strip()
    if not url:
        raise InvalidInput(
            f"{field} must not be empty; give the page to test, like https://example.com",
            field=field,
        )
    if len(url) > MAX_URL_CHARS:
        raise InvalidInput(
            f"{field} has {len(url):,} characters, more than the maximum of {MAX_URL_CHARS:,}",
            field=field,
        )
    if any(char.isspace() or unicodedata.category(char) == "Cc" for char in url):
        raise InvalidInput(
            f"{field} must not contain spaces or control characters; percent-encode them",
            field=field,
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise InvalidInput(f"{field} {url!r} is not a valid URL: {error}", field=field) from None
    if parts.scheme.lower() not in ("http", "https"):
        scheme = f"the scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise InvalidInput(
            f"{field} {url!r} has {scheme}; only absolute http:// and https:// URLs are supported",
            field=field,
        )
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(
            f"{field} must not contain user:password credentials; "
            "put the login steps in the test case",
            field=field,
        )
    if not parts.hostname:
        raise InvalidInput(
            f"{field} {url!r} has no host; write it like https://example.com/path", field=field
        )
    if port == 0:
        raise InvalidInput(f"{field} {url!r} has port 0; use a port from 1 to 65535", field=field)
    return url


def check_model(
    value: str | None, *, default: str, gemini_configured: bool, field: str = "llm_model"
) -> str:
    """Return the model a session runs with, or raise when it is unknown or has no API key."""
    if value is None:
        return default
    if value == OFFLINE_MODEL:
        return value
    if _GEMINI_MODEL.fullmatch(value):
        if not gemini_configured:
            raise InvalidInput(
                f"{field} {value!r} needs a Gemini API key; set GEMINI_API_KEY or GOOGLE_API_KEY "
                f"for the gateway, or use {OFFLINE_MODEL!r}",
                field=field,
            )
        return value
    raise InvalidInput(
        f"{field} {value!r} is not a known model; use {OFFLINE_MODEL!r} or a Gemini model "
        "such as 'gemini-2.5-flash'",
        field=field,
    )


def check_secrets(secrets: dict[str, str] | None, test_case: str) -> dict[str, str]:
    """Return the secret values if every name is valid and every placeholder has a value.

    No message names a value: they are secrets, and error bodies end up in logs.
    """
    secrets = secrets or {}
    field = "secrets"
    if len(secrets) > MAX_SECRETS:
        raise InvalidInput(
            f"{field} has {len(secrets)} entries, more than the maximum of {MAX_SECRETS}",
            field=field,
        )
    for name, value in secrets.items():
        if not SECRET_NAME.fullmatch(name):
            raise InvalidInput(
                f"{field} has the invalid name {name[:80]!r}: a name is a letter or underscore "
                "and then up to 63 letters, digits or underscores, as in {{password}}",
                field=field,
            )
        if not value:
            raise InvalidInput(f"{field}.{name} must not be empty", field=f"{field}.{name}")
        check_unicode(value, f"{field}.{name}")
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_SECRET_VALUE_BYTES:
            raise InvalidInput(
                f"{field}.{name} has {size:,} bytes, more than the maximum of "
                f"{MAX_SECRET_VALUE_BYTES:,} bytes",
                field=f"{field}.{name}",
            )
    check_placeholder_names(test_case, "test_case")
    for name in placeholders(test_case):
        if name not in secrets:
            raise InvalidInput(
                f"test_case uses the placeholder {{{{{name}}}}}, but {field} has no value for "
                f"{name!r}; add it to {field}, as in "
                f'"{field}": {{"{name}": "..."}}',
                field=f"{field}.{name}",
            )
    return secrets


def check_session_id(session_id: str) -> str:
    """Return the id if it can name a session; an id that cannot is reported as not found."""
    if not _SESSION_ID.fullmatch(session_id):
        raise SessionNotFound(session_id)
    return session_id


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidInput(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters "
            "without spaces, such as a UUID",
            field="Idempotency-Key",
        )
    return key
