"""Secret placeholders in test cases, and the KV bucket that contains their values.

A test case names a secret as `{{name}}`. Its value is sent once, with the request
that creates the session, and is stored only in the secrets bucket under the
session id: events, commands, logs and read models carry the names, never the
values. The executor reads the values when it runs a step and hands them to
browser-use, which puts a value in place of `<secret>name</secret>` in an action's
parameters just before the action runs.
"""

from __future__ import annotations

import re

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError

from . import subjects

# A placeholder: `{{name}}`, the name a letter or underscore and then up to 63 letters,
# digits or underscores. Spaces or tabs may surround the name, as in `{{ name }}`.
SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
PLACEHOLDER = re.compile(r"\{\{[ \t]*([A-Za-z_][A-Za-z0-9_]{0,63})[ \t]*\}\}")
# Text that reads as a placeholder: one word without braces or blanks inside `{{ }}`.
PLACEHOLDER_LIKE = re.compile(r"\{\{[ \t]*([^{}\s]+)[ \t]*\}\}")
MAX_SECRETS = 50
MAX_SECRET_VALUE_BYTES = 4096

_values = msgspec.json.Decoder(dict[str, str])


class SecretsNotFoundError(LookupError):
    """The secrets bucket has no values for a session that named secrets."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"the secrets bucket has no values for session {session_id}")
        self.session_id = session_id


def placeholders(text: str) -> list[str]:
    """Return the secret names that `text` refers to as `{{name}}`, once each, in order."""
    return list(dict.fromkeys(PLACEHOLDER.findall(text)))


def invalid_placeholders(text: str) -> list[str]:
    """Return each `{{...}}` in `text` that reads as a placeholder but whose name is invalid."""
    return [
        match.group(0)
        for match in PLACEHOLDER_LIKE.finditer(text)
        if not SECRET_NAME.fullmatch(match.group(1))
    ]


def to_secret_tags(text: str) -> str:
    """Write each `{{name}}` in `text` as `<secret>name</secret>`, the form browser-use replaces."""
    return PLACEHOLDER.sub(r"<secret>\1</secret>", text)


async def store_secrets(js: JetStreamContext, session_id: str, values: dict[str, str]) -> None:
    """Put a session's secret values into the secrets bucket, replacing any earlier ones."""
    bucket = await js.key_value(subjects.SECRETS_BUCKET)
    await bucket.put(session_id, msgspec.json.encode(values))


async def load_secrets(js: JetStreamContext, session_id: str) -> dict[str, str]:
    """Return a session's secret values; raise SecretsNotFoundError when the bucket has none."""
    bucket = await js.key_value(subjects.SECRETS_BUCKET)
    try:
        entry = await bucket.get(session_id)
    except (KeyNotFoundError, KeyDeletedError):
        raise SecretsNotFoundError(session_id) from None
    if not entry.value:
        raise SecretsNotFoundError(session_id)
    return _values.decode(entry.value)


async def delete_secrets(js: JetStreamContext, session_id: str) -> None:
    """Purge a session's secret values, so not even an earlier revision stays in the bucket."""
    bucket = await js.key_value(subjects.SECRETS_BUCKET)
    await bucket.purge(session_id)
