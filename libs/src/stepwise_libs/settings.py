"""Typed settings read once from `STEPWISE_*` environment variables at a service's entry point."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""

    def __init__(self, variable: str, value: str, expected: str) -> None:
        super().__init__(f"invalid {variable}={value!r}: expected {expected}")
        self.variable = variable
        self.value = value


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(name, raw, "an integer") from None
    if value < minimum:
        raise SettingsError(name, raw, f"an integer >= {minimum}")
    return value


def env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(name, raw, "a number") from None
    if value < minimum:
        raise SettingsError(name, raw, f"a number >= {minimum}")
    return value


@dataclass(frozen=True)
class CommonSettings:
    """Settings every service reads."""

    nats_url: str = field(
        default_factory=lambda: env_str("STEPWISE_NATS_URL", "nats://127.0.0.1:4222")
    )
    log_level: str = field(default_factory=lambda: env_str("STEPWISE_LOG_LEVEL", "INFO").upper())
    # Replicas of each stream and bucket; 3 on a NATS cluster.
    stream_replicas: int = field(default_factory=lambda: env_int("STEPWISE_STREAM_REPLICAS", 1, 1))


def redact_url(url: str) -> str:
    """Return `url` with the secret of each `user:password@` or `token@` part as `***`, for logs.

    A comma-separated list of URLs, as STEPWISE_NATS_URL accepts, is redacted URL by URL.
    """
    if "," in url:
        return ",".join(redact_url(item.strip()) for item in url.split(","))
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url
    # NATS reads a user part without a password as a token, so it is a secret too.
    name, colon, _ = userinfo.partition(":")
    redacted = f"{name}:***" if colon else "***"
    return urlunsplit(parts._replace(netloc=f"{redacted}@{host}"))


def gemini_api_key() -> str | None:
    """Return the Gemini API key from GEMINI_API_KEY or GOOGLE_API_KEY, if one is set."""
    return os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY") or None


DEFAULT_GEMINI_MODEL = "gemini-2.5-flash"
OFFLINE_MODEL = "offline"


def default_model() -> str:
    """Return the model a session gets when the request names none."""
    return env_str(
        "STEPWISE_DEFAULT_MODEL", DEFAULT_GEMINI_MODEL if gemini_api_key() else OFFLINE_MODEL
    )
