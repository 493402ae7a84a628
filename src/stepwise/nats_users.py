"""NATS users of the embedded nats-server that `stepwise up` runs: one per service.

Each service connects as its own user, allowed only the subjects it uses, so a
service that misbehaves cannot act for another (the planner cannot publish an
executor command, for example). `PERMISSIONS` is the same as the `STEPWISE`
account in deploy/nats/values.yaml, and tests/deploy/test_deploy_nats_permissions.py
checks that the two stay equal. The `admin` user has every right: it is for the
supervisor's own tools and tests, and for an operator inspecting the server.

Passwords are random, generated on the first `up` and stored in
`$STEPWISE_HOME/nats-users.json` with mode 0600. The server config refers to
them as environment variables, so no config file contains a password.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

SERVICE_USERS = ("gateway", "planner", "executor", "projector")
ADMIN_USER = "admin"
USERS = (*SERVICE_USERS, ADMIN_USER)
USERS_FILE = "nats-users.json"
# 24 random bytes as hex: URL-safe, so a password goes into `nats://user:password@host` as is.
_PASSWORD_BYTES = 24
_PASSWORD = re.compile(r"^[0-9a-f]{16,}$")

Permissions = dict[str, dict[str, list[str]]]

_JETSTREAM_TOPOLOGY = [
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.*",
    "$JS.API.STREAM.CREATE.*",
    "$JS.API.STREAM.UPDATE.*",
]
_READ_EVENTS = [
    "$JS.API.DIRECT.GET.STEPWISE_EVENTS",
    "$JS.API.DIRECT.GET.STEPWISE_EVENTS.>",
    # A get served by the stream leader, for a read that a lagging replica must not serve.
    "$JS.API.STREAM.MSG.GET.STEPWISE_EVENTS",
]
_TAIL_EVENTS = [
    "$JS.API.CONSUMER.CREATE.STEPWISE_EVENTS",
    "$JS.API.CONSUMER.CREATE.STEPWISE_EVENTS.>",
]


def _durable(stream: str, consumer: str) -> list[str]:
    """Return the subjects that pull from and ack on one durable consumer."""
    return [
        f"$JS.API.CONSUMER.INFO.{stream}.{consumer}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}",
        f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{consumer}",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
        f"$JS.ACK.{stream}.{consumer}.>",
    ]


# Publish and subscribe rights per service user, in the order of deploy/nats/values.yaml.
PERMISSIONS: dict[str, Permissions] = {
    # Accepts HTTP requests: publishes every command and session_created, sets pause and
    # cancel flags, tails sessions and reads screenshots.
    "gateway": {
        "publish": {
            "allow": [
                "stepwise.cmd.planner.*",
                "stepwise.cmd.executor.*",
                "stepwise.events.*",
                "$KV.stepwise_control.>",
                # Puts secret values; only the executor may read them back.
                "$KV.stepwise_secrets.>",
                *_JETSTREAM_TOPOLOGY,
                *_READ_EVENTS,
                "$JS.API.DIRECT.GET.KV_stepwise_control.>",
                "$JS.API.DIRECT.GET.KV_stepwise_leases.>",
                "$JS.API.DIRECT.GET.OBJ_stepwise_screenshots.>",
                "$JS.API.STREAM.MSG.GET.KV_stepwise_control",
                "$JS.API.STREAM.MSG.GET.OBJ_stepwise_screenshots",
                "$JS.API.STREAM.NAMES",
                *_TAIL_EVENTS,
                "$JS.API.CONSUMER.CREATE.OBJ_stepwise_screenshots",
                "$JS.API.CONSUMER.CREATE.OBJ_stepwise_screenshots.>",
                "$JS.API.CONSUMER.DELETE.STEPWISE_EVENTS.*",
                "$JS.API.CONSUMER.DELETE.OBJ_stepwise_screenshots.*",
                "$JS.FC.STEPWISE_EVENTS.>",
                "$JS.FC.OBJ_stepwise_screenshots.>",
            ]
        },
        "subscribe": {"allow": ["_INBOX.>"]},
    },
    # Consumes plan commands on its durable consumer `planner`, appends plan events.
    "planner": {
        "publish": {
            "allow": [
                "stepwise.events.*",
                *_JETSTREAM_TOPOLOGY,
                *_READ_EVENTS,
                *_durable("STEPWISE_COMMANDS", "planner"),
                *_TAIL_EVENTS,
                "$JS.API.CONSUMER.DELETE.STEPWISE_EVENTS.*",
                "$JS.FC.STEPWISE_EVENTS.>",
            ]
        },
        "subscribe": {"allow": ["_INBOX.>"]},
    },
    # Consumes execution commands on its durable consumer `executor`, appends step events,
    # holds and watches leases, watches control flags, stores screenshots, and forwards commands to
    # the replica that owns a session over its core-NATS inbox.
    "executor": {
        "publish": {
            "allow": [
                "stepwise.events.*",
                "stepwise.executor.inbox.>",
                "$KV.stepwise_leases.>",
                "$KV.stepwise_control.>",
                # Purges a session's secret values when its run ends.
                "$KV.stepwise_secrets.>",
                "$O.stepwise_screenshots.>",
                *_JETSTREAM_TOPOLOGY,
                "$JS.API.STREAM.PURGE.OBJ_stepwise_screenshots",
                *_READ_EVENTS,
                "$JS.API.DIRECT.GET.KV_stepwise_control.>",
                "$JS.API.DIRECT.GET.KV_stepwise_leases.>",
                "$JS.API.DIRECT.GET.KV_stepwise_secrets.>",
                "$JS.API.DIRECT.GET.OBJ_stepwise_screenshots.>",
                "$JS.API.STREAM.MSG.GET.KV_stepwise_leases",
                "$JS.API.STREAM.MSG.GET.KV_stepwise_control",
                "$JS.API.STREAM.MSG.GET.KV_stepwise_secrets",
                "$JS.API.STREAM.MSG.GET.OBJ_stepwise_screenshots",
                *_durable("STEPWISE_COMMANDS", "executor"),
                *_TAIL_EVENTS,
                "$JS.API.CONSUMER.CREATE.KV_stepwise_control",
                "$JS.API.CONSUMER.CREATE.KV_stepwise_control.>",
                "$JS.API.CONSUMER.CREATE.KV_stepwise_leases",
                "$JS.API.CONSUMER.CREATE.KV_stepwise_leases.>",
                "$JS.API.CONSUMER.INFO.KV_stepwise_control.*",
                "$JS.API.CONSUMER.INFO.KV_stepwise_leases.*",
                "$JS.API.CONSUMER.DELETE.STEPWISE_EVENTS.*",
                "$JS.API.CONSUMER.DELETE.KV_stepwise_control.*",
                "$JS.API.CONSUMER.DELETE.KV_stepwise_leases.*",
                "$JS.FC.STEPWISE_EVENTS.>",
                "$JS.FC.KV_stepwise_control.>",
                "$JS.FC.KV_stepwise_leases.>",
            ]
        },
        "subscribe": {"allow": ["_INBOX.>", "stepwise.executor.inbox.>"]},
    },
    # Consumes the events stream on its durable consumer `projector` (and replays it whole
    # for `rebuild`); writes only to Postgres.
    "projector": {
        "publish": {
            "allow": [
                *_JETSTREAM_TOPOLOGY,
                *_READ_EVENTS,
                *_durable("STEPWISE_EVENTS", "projector"),
                *_TAIL_EVENTS,
                "$JS.API.CONSUMER.DELETE.STEPWISE_EVENTS.*",
                "$JS.FC.STEPWISE_EVENTS.>",
            ]
        },
        "subscribe": {"allow": ["_INBOX.>"]},
    },
}


class NatsUsersError(RuntimeError):
    """The passwords file cannot be read or written; the message names the file."""


def password_variable(user: str) -> str:
    """Return the environment variable that passes `user`'s password to nats-server."""
    return f"STEPWISE_NATS_{user.upper()}_PASSWORD"


def server_config() -> str:
    """Return nats-server config text with every user, passwords as environment variables.

    The users belong to the global account, where an embedded server without
    authorization kept its JetStream data, so a data folder from before keeps its
    streams. Once users are configured, nats-server rejects a connection without
    credentials.
    """
    entries = []
    for user in USERS:
        entry = f"    {{user: {json.dumps(user)}, password: ${password_variable(user)}"
        if user in PERMISSIONS:
            entry += f", permissions: {json.dumps(PERMISSIONS[user])}"
        entries.append(entry + "}")
    return "authorization {\n  users: [\n" + "\n".join(entries) + "\n  ]\n}\n"


def server_environment(passwords: Mapping[str, str]) -> dict[str, str]:
    """Return the environment variables that `server_config()` reads."""
    return {password_variable(user): passwords[user] for user in USERS}


def load_or_create_passwords(home: Path) -> dict[str, str]:
    """Return the password of every user from `home/nats-users.json`, creating missing ones.

    The file is created with mode 0600, and a wider mode found later is narrowed to
    0600. A file that is not a JSON object of hex passwords raises NatsUsersError.
    """
    path = home / USERS_FILE
    passwords: dict[str, str] = {}
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise NatsUsersError(
                f"cannot read the NATS passwords in {path}: {error}; "
                "delete the file to generate new ones"
            ) from error
        if not isinstance(stored, dict) or not all(
            isinstance(value, str) and _PASSWORD.match(value) for value in stored.values()
        ):
            raise NatsUsersError(
                f"invalid NATS passwords file {path}: expected a JSON object of "
                "user name to hex password; delete the file to generate new ones"
            )
        passwords = {user: stored[user] for user in USERS if user in stored}
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    missing = [user for user in USERS if user not in passwords]
    if missing:
        for user in missing:
            passwords[user] = secrets.token_hex(_PASSWORD_BYTES)
        _write_private(path, json.dumps(passwords, indent=2) + "\n")
    return passwords


def _write_private(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    temporary.replace(path)


def url_with_credentials(url: str, user: str, password: str) -> str:
    """Return `url` with `user:password@` in front of its host and port."""
    parts = urlsplit(url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))
