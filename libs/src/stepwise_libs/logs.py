"""Logging set-up for a service's entry point: one line per record with its context fields."""

from __future__ import annotations

import logging
import sys

# Attributes every LogRecord has; anything else was passed through `extra=` and is context.
_STANDARD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# uvicorn adds a copy of the message with terminal colour codes; it is not context.
_IGNORED_ATTRIBUTES = _STANDARD_ATTRIBUTES | {"color_message"}


class ContextFormatter(logging.Formatter):
    """Append the fields given with `extra=` (session id, command id, ...) as key=value pairs."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = {
            key: value for key, value in vars(record).items() if key not in _IGNORED_ATTRIBUTES
        }
        if context:
            line += " " + " ".join(f"{key}={value}" for key, value in context.items())
        return line


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send the service's logs to stderr; call once, from the entry point only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        ContextFormatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("nats", "httpx", "httpcore", "browser_use", "bubus", "cdp_use", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
