"""Prometheus metrics of the gateway, served at `GET /metrics` (behind the same auth).

The metrics live in prometheus-client's default registry, so the process and
garbage-collector metrics come along. Names:
- `stepwise_gateway_websocket_clients`: WebSocket clients connected now.
- `stepwise_gateway_events_sent_total{transport}`: events sent on `websocket` or `sse`.
- `stepwise_gateway_commands_published_total{type}`: commands queued on JetStream.
- `stepwise_gateway_http_errors_total{status_class,status}`: 4xx and 5xx responses.
- `stepwise_gateway_slow_client_closes_total{transport}`: clients closed for falling
  more than STEPWISE_CLIENT_BUFFER messages behind.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from .auth import ASGIApp, Message, Receive, Scope, Send

WEBSOCKET_CLIENTS = Gauge(
    "stepwise_gateway_websocket_clients", "WebSocket clients connected to this gateway now."
)
EVENTS_SENT = Counter(
    "stepwise_gateway_events_sent", "Session events sent to clients.", ["transport"]
)
WS_EVENTS_QUEUED = Counter(
    "stepwise_gateway_websocket_events_queued",
    "WebSocket events sent through the client's outbox, because the client was behind, "
    "rather than written to its socket at once.",
)
COMMANDS_PUBLISHED = Counter(
    "stepwise_gateway_commands_published", "Commands queued on JetStream, by type.", ["type"]
)
HTTP_ERRORS = Counter(
    "stepwise_gateway_http_errors",
    "HTTP responses with a 4xx or 5xx status.",
    ["status_class", "status"],
)
SLOW_CLIENT_CLOSES = Counter(
    "stepwise_gateway_slow_client_closes",
    "Clients closed for falling more than STEPWISE_CLIENT_BUFFER messages behind.",
    ["transport"],
)


class MetricsMiddleware:
    """Count error responses and connected WebSocket clients; outermost, so 401s count too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.app(scope, receive, _counting_errors(send))
        elif scope["type"] == "websocket":
            accepted = False

            async def tracking(message: Message) -> None:
                nonlocal accepted
                await send(message)
                if message["type"] == "websocket.accept" and not accepted:
                    accepted = True
                    WEBSOCKET_CLIENTS.inc()

            try:
                await self.app(scope, receive, tracking)
            finally:
                if accepted:
                    WEBSOCKET_CLIENTS.dec()
        else:
            await self.app(scope, receive, send)


def _counting_errors(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            status = int(message["status"])
            HTTP_ERRORS.labels(f"{status // 100}xx", str(status)).inc()
        await send(message)

    return wrapped
