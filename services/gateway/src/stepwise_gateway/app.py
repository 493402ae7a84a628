"""The FastAPI application: routers, error handlers and the connections' lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .auth import AuthMiddleware
from .errors import install_error_handlers
from .metrics import MetricsMiddleware
from .routes import controls, health, metrics, screenshots, sessions, stream, ui
from .runtime import Runtime
from .settings import GatewaySettings
from .wsframes import RawSendMiddleware

DESCRIPTION = """
Stepwise turns a plain-language test case into a plan of steps and runs them in a
real headless Chromium. This API creates sessions, queues controls, reads the
read models and streams each session's events.

Every 4xx and 5xx body is `{"error": {"code", "message", "field"}}`.

**Auth**: when the gateway has API tokens (STEPWISE_API_TOKENS), every route but
`/healthz` and `/readyz` needs `Authorization: Bearer <token>` and answers 401
without it. WebSocket clients may instead offer the subprotocols `bearer, <token>`
or add `?token=<token>`; the web UI is opened once with `?token=<token>`, which
sets an HttpOnly cookie.

**WebSocket** `/api/sessions/{session_id}/ws?since=N` sends every event with seq
greater than N as its JSON envelope, then live ones. Send control commands on the
same socket, like `{"command": "pause_execution"}`; the reply is
`{"type": "pause_queued", "task_id": ...}` or `{"type": "command_rejected", "reason": ...}`.
Events carry a `seq`; replies do not.
Close codes: 4401 missing or invalid API token, 4403 cookie sent from another origin,
4404 unknown session, 4422 invalid `since` or one after the last seq, 4008 the client fell too
far behind (reconnect with `since` set to the last seq received), 1013 NATS
unavailable. The server pings every STEPWISE_WS_PING_INTERVAL seconds (20 by default)
and drops a client that sends no pong within STEPWISE_WS_PING_TIMEOUT seconds.
"""


def create_app(settings: GatewaySettings) -> FastAPI:
    """Build the gateway app; connections open in its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings)
        app.state.runtime = runtime
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = FastAPI(
        title="Stepwise gateway", version="0.1.0", description=DESCRIPTION, lifespan=lifespan
    )
    install_error_handlers(app)
    for module in (health, sessions, controls, stream, screenshots, metrics):
        app.include_router(module.router)
    app.include_router(ui.router)
    # The last middleware added runs first: metrics count the 401s auth returns.
    app.add_middleware(AuthMiddleware, tokens=settings.api_tokens)
    app.add_middleware(MetricsMiddleware)
    # Outermost, so a WebSocket's scope gets the server's own `send` (see wsframes.py).
    app.add_middleware(RawSendMiddleware)
    return app
