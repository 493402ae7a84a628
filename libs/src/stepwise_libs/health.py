"""A liveness endpoint for the workers (planner, executor, projector), for orchestrator probes.

When `STEPWISE_HEALTH_PORT` is set, `start_health_server(nc)` serves
`GET /healthz` on `STEPWISE_HEALTH_HOST` (default 127.0.0.1; a container sets
0.0.0.0) at that port: 200 `{"status": "ok", "nats": "connected"}` while the
NATS client is connected, 503 `{"error": {...}, "nats": "<state>"}` otherwise.
The server runs on the worker's own event loop, so an answer at all means the
loop is alive; a stalled loop makes the probe time out. Any other path gets 404
and any other method 405. Without the variable it serves nothing.

In a worker's entry point, after connecting to NATS:

    health = await start_health_server(nc)
    ...
    await health.close()   # in the `finally` that closes nc
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any, Protocol

from .settings import SettingsError

logger = logging.getLogger(__name__)

PORT_VARIABLE = "STEPWISE_HEALTH_PORT"
HOST_VARIABLE = "STEPWISE_HEALTH_HOST"
DEFAULT_HOST = "127.0.0.1"
# Seconds a probe may take to send its request line and headers.
READ_TIMEOUT = 5.0
MAX_REQUEST_BYTES = 8192


class NatsLike(Protocol):
    @property
    def is_connected(self) -> bool: ...

    @property
    def is_reconnecting(self) -> bool: ...

    @property
    def is_closed(self) -> bool: ...


def health_address() -> tuple[str, int] | None:
    """Read `STEPWISE_HEALTH_HOST` and `STEPWISE_HEALTH_PORT`; None when the port is unset."""
    raw = os.environ.get(PORT_VARIABLE, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise SettingsError(PORT_VARIABLE, raw, "a TCP port number from 1 to 65535")
    host = os.environ.get(HOST_VARIABLE, "").strip() or DEFAULT_HOST
    return host, int(raw)


def nats_state(nc: NatsLike) -> str:
    if nc.is_connected:
        return "connected"
    if nc.is_reconnecting:
        return "reconnecting"
    if nc.is_closed:
        return "closed"
    return "disconnected"


class HealthServer:
    """The running endpoint; `close()` stops it. A server for an unset port does nothing."""

    def __init__(self, server: asyncio.Server | None) -> None:
        self._server = server

    @property
    def port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None


async def start_health_server(nc: NatsLike, address: tuple[str, int] | None = None) -> HealthServer:
    """Serve `GET /healthz` at `address`, or where the environment says when it is None."""
    address = address or health_address()
    if address is None:
        return HealthServer(None)

    def check() -> tuple[bool, dict[str, Any]]:
        state = nats_state(nc)
        return state == "connected", {"nats": state}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _answer(reader, writer, check)
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass  # a probe that hangs up or sends garbage gets no answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    host, port = address
    server = await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_BYTES)
    logger.info("health endpoint listening", extra={"health_host": host, "health_port": port})
    return HealthServer(server)


async def _answer(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    check: Callable[[], tuple[bool, dict[str, Any]]],
) -> None:
    async with asyncio.timeout(READ_TIMEOUT):
        request_line = (await reader.readline()).decode("latin-1").strip()
        while (await reader.readline()).strip():  # skip the headers
            pass
    method, _, rest = request_line.partition(" ")
    path = rest.partition(" ")[0].partition("?")[0]
    if path != "/healthz":
        status, body = 404, _error("not_found", f"no route for {path!r}; probe GET /healthz")
    elif method not in ("GET", "HEAD"):
        status, body = 405, _error("method_not_allowed", f"{method} is not allowed; use GET")
    else:
        healthy, details = check()
        if healthy:
            status, body = 200, {"status": "ok", **details}
        else:
            problem = ", ".join(f"{key} {value}" for key, value in details.items())
            status, body = 503, {**_error("unhealthy", problem), **details}
    payload = json.dumps(body).encode()
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
    head = (
        f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + (b"" if method == "HEAD" else payload))
    await writer.drain()


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": None}}
