"""Render the NATS accounts of deploy/nats/values.yaml for a real nats-server.

The NATS Helm chart turns `config.merge` into server config by the same rules. Maps
become blocks, lists become arrays, and a string `<< $NAME >>` becomes the bare variable
`$NAME`, which nats-server resolves from its environment.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import nats
import yaml
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import APIError, ServiceUnavailableError
from stepwise_libs.jetstream import ensure_topology

from stepwise.embedded import EmbeddedNats

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "planner", "executor", "projector")
VALUES = REPO / "deploy" / "nats" / "values.yaml"
# Seconds a fresh cluster gets to elect a JetStream meta leader.
CLUSTER_FORM_TIMEOUT = 60.0
_VARIABLE = re.compile(r"^<<\s*(\$[A-Za-z_][A-Za-z0-9_]*)\s*>>$")


def load_values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


def merge_config() -> dict[str, Any]:
    return load_values()["config"]["merge"]


def _value(value: Any, indent: int) -> str:
    pad = "  " * indent
    if isinstance(value, dict):
        lines = [
            f"{pad}  {json.dumps(key)}: {_value(item, indent + 1)}" for key, item in value.items()
        ]
        return "{\n" + "\n".join(lines) + f"\n{pad}}}"
    if isinstance(value, list):
        items = [f"{pad}  {_value(item, indent + 1)}" for item in value]
        return "[\n" + "\n".join(items) + f"\n{pad}]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    variable = _VARIABLE.match(text)
    if variable:
        return variable.group(1)
    return json.dumps(text)


def render(config: dict[str, Any]) -> str:
    """Return nats-server config text for a mapping of top-level settings."""
    return (
        "\n".join(f"{json.dumps(key)}: {_value(value, 0)}" for key, value in config.items()) + "\n"
    )


def users(config: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Return the users of the STEPWISE account by name."""
    config = merge_config() if config is None else config
    return {entry["user"]: entry for entry in config["accounts"]["STEPWISE"]["users"]}


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, `>` one or more trailing tokens."""
    pattern_tokens = pattern.split(".")
    subject_tokens = subject.split(".")
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return len(subject_tokens) > index
        if index >= len(subject_tokens):
            return False
        if token != "*" and token != subject_tokens[index]:
            return False
    return len(pattern_tokens) == len(subject_tokens)


def may_publish(user: dict[str, Any], subject: str) -> bool:
    publish = user.get("permissions", {}).get("publish", {})
    allowed = any(subject_matches(p, subject) for p in publish.get("allow", []))
    denied = any(subject_matches(p, subject) for p in publish.get("deny", []))
    return allowed and not denied


class Violations:
    """Collects the asynchronous permission errors the server sends to one client.

    nats-py lower-cases the server's error text, so matching ignores case.
    """

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.changed = asyncio.Event()

    async def record(self, error: Exception) -> None:
        self.messages.append(str(error))
        self.changed.set()

    async def wait_for(self, text: str, seconds: float = 5.0) -> str:
        async def found() -> str:
            while True:
                for message in self.messages:
                    if text.lower() in message.lower():
                        return message
                self.changed.clear()
                await self.changed.wait()

        return await asyncio.wait_for(found(), seconds)


async def connect_as(
    server: EmbeddedNats, user: str, password: str, violations: Violations
) -> NATS:
    return await nats.connect(
        servers=[server.url],
        user=user,
        password=password,
        name=f"test-{user}",
        error_cb=violations.record,
        allow_reconnect=False,
        connect_timeout=5,
    )


async def ensure_topology_when_formed(js: JetStreamContext, replicas: int) -> None:
    """Retry until the cluster has elected a JetStream meta leader and takes the topology."""
    async with asyncio.timeout(CLUSTER_FORM_TIMEOUT):
        while True:
            try:
                await ensure_topology(js, replicas=replicas)
                return
            except (
                ServiceUnavailableError,
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
            ):
                await asyncio.sleep(0.2)
            except APIError as error:
                # Until the nodes have met, JetStream responds with a 5xx code, such as
                # 503 "JetStream system temporarily unavailable".
                if error.code not in (503, 500):
                    raise
                await asyncio.sleep(0.2)
