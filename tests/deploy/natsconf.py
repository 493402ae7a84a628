"""Turn the `config.merge` of deploy/nats/values.yaml into a nats-server config file.

The NATS Helm chart writes `config.merge` into the server's config the same way: maps
become blocks, lists become arrays, and a string `<< $NAME >>` becomes the bare variable
`$NAME`, which nats-server resolves from its environment.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "deploy" / "nats" / "values.yaml"
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
