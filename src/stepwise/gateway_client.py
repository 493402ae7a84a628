"""A small synchronous client for the gateway's HTTP API and session WebSocket."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import connect as ws_connect

# WebSocket close codes after which reconnecting cannot help: missing or wrong token,
# unknown session, invalid since.
FINAL_CLOSE_CODES = frozenset({4401, 4403, 4404, 4422})


def token_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """Return the API token for the gateway: `STEPWISE_API_TOKEN`, else the first entry of
    `STEPWISE_API_TOKENS` (the gateway's list of `token` or `name:token` entries), else None.
    """
    token = environ.get("STEPWISE_API_TOKEN", "").strip()
    if token:
        return token
    first = environ.get("STEPWISE_API_TOKENS", "").split(",")[0].strip()
    if not first:
        return None
    _, separator, value = first.partition(":")
    return value.strip() if separator else first


class GatewayError(RuntimeError):
    """The gateway rejected a request or could not be reached."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field

    @property
    def bad_input(self) -> bool:
        """True when the request itself was invalid (HTTP 400 or 422)."""
        return self.status in (400, 422)


def _error_from(response: httpx.Response, action: str) -> GatewayError:
    code = field = None
    try:
        body = response.json()
    except ValueError:
        body = None
    message = response.text.strip() or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            code = error.get("code")
            field = error.get("field")
        elif "detail" in body:
            message = json.dumps(body["detail"])
    if response.status_code == 401:
        message += "; set STEPWISE_API_TOKEN or pass --token with one of the gateway's API tokens"
    return GatewayError(
        f"{action} failed with HTTP {response.status_code}: {message}",
        status=response.status_code,
        code=code,
        field=field,
    )


class GatewayClient:
    """Calls to one gateway, by its base URL such as `http://127.0.0.1:8000`."""

    def __init__(self, base_url: str, timeout: float = 30.0, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=self.headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, method: str, path: str, action: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise GatewayError(
                f"{action} failed: gateway {self.base_url} unreachable: {error}"
            ) from error
        if response.status_code >= 400:
            raise _error_from(response, action)
        body = response.json()
        if not isinstance(body, dict):
            raise GatewayError(f"{action} returned {body!r}, expected a JSON object")
        return body

    def ready(self) -> bool:
        """Return True when the gateway's /readyz returns 200."""
        try:
            return self.http.get("/readyz", timeout=3.0).status_code == 200
        except httpx.HTTPError:
            return False

    def create_session(
        self,
        test_case: str,
        target_url: str,
        model: str | None,
        secrets: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"test_case": test_case, "target_url": target_url}
        if model:
            body["llm_model"] = model
        if secrets:
            body["secrets"] = secrets
        return self._request("POST", "/api/sessions", "creating the session", json=body)

    def start(self, session_id: str) -> dict[str, Any]:
        return self._request("POST", f"/api/sessions/{session_id}/start", "starting the execution")

    def cancel(self, session_id: str) -> dict[str, Any]:
        return self._request(
            "POST", f"/api/sessions/{session_id}/task/cancel", "cancelling the session"
        )

    def session(self, session_id: str) -> dict[str, Any]:
        return self._request("GET", f"/api/sessions/{session_id}", "reading the session")

    def session_page_url(self, session_id: str) -> str:
        """Return the web UI page of one session."""
        return f"{self.base_url}/sessions/{session_id}"

    def websocket_url(self, session_id: str, since: int) -> str:
        parts = urlsplit(self.base_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        path = f"{parts.path}/api/sessions/{session_id}/ws"
        return urlunsplit((scheme, parts.netloc, path, f"since={since}", ""))

    def events(self, session_id: str, since: int, idle_timeout: float) -> Iterator[dict[str, Any]]:
        """Yield the session's events after `since` from its WebSocket, then live ones.

        Messages without a `seq` (replies to socket commands, notices) are skipped. Raises
        `TimeoutError` when no message arrives for `idle_timeout` seconds and
        `ConnectionClosed` or `OSError` when the socket drops; the caller
        reconnects with the last seq it saw.
        """
        try:
            socket = ws_connect(
                self.websocket_url(session_id, since),
                open_timeout=15,
                additional_headers=self.headers,
            )
        except InvalidStatus as error:
            status = error.response.status_code
            raise GatewayError(
                f"the session WebSocket was rejected with HTTP {status}", status=status
            ) from error
        except InvalidHandshake as error:
            raise GatewayError(f"the session WebSocket handshake failed: {error}") from error
        with socket:
            while True:
                try:
                    raw = socket.recv(timeout=idle_timeout)
                except ConnectionClosed as closed:
                    received = closed.rcvd
                    if received is not None and received.code in FINAL_CLOSE_CODES:
                        raise GatewayError(
                            f"the gateway closed the session WebSocket: {received.reason} "
                            f"(code {received.code})"
                        ) from closed
                    raise
                message = json.loads(raw)
                if isinstance(message, dict) and isinstance(message.get("seq"), int):
                    yield message
                elif isinstance(message, dict) and message.get("type") == "error":
                    raise GatewayError(f"the session WebSocket sent an error: {message}")


__all__ = ["ConnectionClosed", "GatewayClient", "GatewayError"]
