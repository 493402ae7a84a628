"""Executor settings, read once from the environment in `main()`."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from stepwise_libs.settings import CommonSettings, SettingsError, env_float, env_str, gemini_api_key

from .egress import ALLOWED_HOSTS_VARIABLE, AllowedHosts, parse_allowed_hosts


def _executor_id() -> str:
    value = os.environ.get("STEPWISE_EXECUTOR_ID", "")
    if value and not all(ch.isalnum() or ch in "-_" for ch in value):
        raise SettingsError(
            "STEPWISE_EXECUTOR_ID",
            value,
            "letters, digits, '-' or '_' (it is part of a NATS subject)",
        )
    return value or f"{socket.gethostname()}-{os.getpid()}".replace(".", "-")


def _browser_cdp_url() -> str | None:
    value = os.environ.get("STEPWISE_BROWSER_CDP_URL", "").strip() or None
    if value is None:
        return None
    expected = (
        "an http://, https://, ws:// or wss:// URL of a Chromium DevTools endpoint,"
        " such as http://browser-pool:9222"
    )
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise SettingsError("STEPWISE_BROWSER_CDP_URL", value, expected) from None
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise SettingsError("STEPWISE_BROWSER_CDP_URL", value, expected)
    if port == 0:
        raise SettingsError("STEPWISE_BROWSER_CDP_URL", value, expected)
    return value


def _chromium() -> str:
    value = env_str("STEPWISE_CHROMIUM", "/usr/bin/chromium")
    if _browser_cdp_url() is not None:
        # An attached browser runs elsewhere, so the local binary is not used.
        return value
    if not Path(value).is_file() or not os.access(value, os.X_OK):
        raise SettingsError("STEPWISE_CHROMIUM", value, "the path of an executable Chromium binary")
    return value


def _base_url() -> str | None:
    value = os.environ.get("STEPWISE_GEMINI_BASE_URL") or None
    if value is not None and not value.startswith(("http://", "https://")):
        raise SettingsError("STEPWISE_GEMINI_BASE_URL", value, "an http:// or https:// URL")
    return value


def _allowed_hosts() -> AllowedHosts:
    return parse_allowed_hosts(os.environ.get(ALLOWED_HOSTS_VARIABLE, "").strip())


@dataclass(frozen=True)
class ExecutorSettings(CommonSettings):
    # DevTools endpoint of a running Chromium to attach to instead of launching one.
    browser_cdp_url: str | None = field(default_factory=_browser_cdp_url)
    chromium: str = field(default_factory=_chromium)
    home: Path = field(
        default_factory=lambda: Path(env_str("STEPWISE_HOME", "./.stepwise")).resolve()
    )
    # Seconds one plan step may take before it fails with category "timeout".
    step_timeout: float = field(
        default_factory=lambda: env_float("STEPWISE_STEP_TIMEOUT", 120.0, 1.0)
    )
    executor_id: str = field(default_factory=_executor_id)
    gemini_api_key: str | None = field(default_factory=gemini_api_key)
    gemini_base_url: str | None = field(default_factory=_base_url)
    # Hosts a session's browser may load pages from although they resolve to a private,
    # loopback or other non-public address.
    allowed_hosts: AllowedHosts = field(default_factory=_allowed_hosts)

    @property
    def browsers_dir(self) -> Path:
        return self.home / "executor"
