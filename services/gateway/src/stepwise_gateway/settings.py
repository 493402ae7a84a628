"""The gateway's settings, read once from `STEPWISE_*` environment variables in `main()`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from stepwise_libs.settings import (
    CommonSettings,
    SettingsError,
    default_model,
    env_float,
    env_int,
    env_str,
    gemini_api_key,
)

from .auth import ApiToken, tokens_from_env


def _database_url() -> str:
    raw = os.environ.get("STEPWISE_DATABASE_URL", "")
    if not raw:
        raise SettingsError(
            "STEPWISE_DATABASE_URL", raw, "a URL like postgresql+asyncpg://user@host:port/database"
        )
    if not raw.startswith("postgresql+asyncpg://"):
        raise SettingsError("STEPWISE_DATABASE_URL", raw, "a postgresql+asyncpg:// URL")
    return raw


def _ws_compression() -> bool:
    raw = os.environ.get("STEPWISE_WS_COMPRESSION", "off")
    if raw not in ("on", "off"):
        raise SettingsError("STEPWISE_WS_COMPRESSION", raw, "on or off")
    return raw == "on"


@dataclass(frozen=True)
class GatewaySettings(CommonSettings):
    """Everything the gateway reads from the environment."""

    database_url: str = field(default_factory=_database_url)
    host: str = field(default_factory=lambda: env_str("STEPWISE_HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: env_int("STEPWISE_PORT", 8000, 0))
    # Events a WebSocket or SSE client may fall behind by before it is closed (code 4008).
    client_buffer: int = field(default_factory=lambda: env_int("STEPWISE_CLIENT_BUFFER", 1000, 1))
    # Maximum time, in seconds, a read with `wait_for_seq` waits for the projector.
    max_wait_for_seq: float = field(
        default_factory=lambda: env_float("STEPWISE_MAX_WAIT_FOR_SEQ", 10.0, 0.0)
    )
    # uvicorn's WebSocket ping interval and pong timeout, in seconds.
    ws_ping_interval: float = field(
        default_factory=lambda: env_float("STEPWISE_WS_PING_INTERVAL", 20.0, 0.0)
    )
    ws_ping_timeout: float = field(
        default_factory=lambda: env_float("STEPWISE_WS_PING_TIMEOUT", 20.0, 0.0)
    )
    # Whether clients may negotiate permessage-deflate. Off by default, because deflating
    # each event once per client about doubled the gateway's CPU per delivered event and
    # its memory per client in the 500-client fan-out bench (bench/s5_fanout.py).
    ws_compression: bool = field(default_factory=_ws_compression)
    # Whether a Gemini API key is configured; Gemini models are accepted only then.
    gemini_configured: bool = field(default_factory=lambda: gemini_api_key() is not None)
    default_model: str = field(default_factory=default_model)
    # Accepted bearer tokens (STEPWISE_API_TOKENS); none means loopback only, no auth.
    api_tokens: tuple[ApiToken, ...] = field(default_factory=tokens_from_env)
