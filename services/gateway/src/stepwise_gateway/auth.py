"""Bearer-token auth for every route but the probes, as one ASGI middleware.

Tokens come from `STEPWISE_API_TOKENS`: comma-separated, each `token` or
`name:token`; the name (or `token-<n>`) is what logs show, never the token.

A client proves it holds a token in one of four ways, checked in this order:
1. `Authorization: Bearer <token>` (REST, SSE, screenshots, metrics, WebSocket).
2. `Sec-WebSocket-Protocol: bearer, <token>` (WebSocket from a browser script
   that cannot set headers); the gateway answers with the `bearer` subprotocol.
3. `?token=<token>` in the query string (any route). On a page load of the web
   UI the gateway sets the token as an HttpOnly SameSite=Strict cookie and
   redirects to the same URL without the token.
4. That cookie, which the browser sends with the UI's own fetch, image,
   EventSource and WebSocket requests. A request authenticated by the cookie
   whose `Origin` differs from its `Host` gets 403: the cookie would also reach
   the gateway from a page on another port of the same host.

Each presented token is compared with every configured token by
`hmac.compare_digest`, so the time taken does not depend on which token or
how much of one matched. A missing or wrong token gets 401 with
`WWW-Authenticate: Bearer` (HTTP) or close code 4401 (WebSocket).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from stepwise_libs.settings import SettingsError

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

TOKENS_VARIABLE = "STEPWISE_API_TOKENS"
# Shorter tokens can be guessed; `openssl rand -hex 32` makes a good one.
MIN_TOKEN_LENGTH = 16
COOKIE_NAME = "stepwise_token"
QUERY_PARAMETER = "token"
WS_SUBPROTOCOL = "bearer"
# WebSocket close code for a missing or wrong token (4000 + HTTP 401).
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
# Paths anyone may read: the orchestrator's probes.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# Path prefixes that are not HTML pages: a `?token=` there is used, not turned into a cookie.
NOT_PAGES = ("/api/", "/ui/", "/metrics", "/openapi.json")


@dataclass(frozen=True)
class ApiToken:
    """One accepted token and the client name logs show for it."""

    name: str
    token: str

    def __repr__(self) -> str:  # keep tokens out of tracebacks and debug output
        return f"ApiToken(name={self.name!r}, token=<hidden>)"


def parse_tokens(raw: str) -> tuple[ApiToken, ...]:
    """Parse `STEPWISE_API_TOKENS`; errors name the entry by position, never its value."""
    tokens: list[ApiToken] = []
    names: set[str] = set()
    entries = [entry.strip() for entry in raw.split(",")]
    if not raw.strip():
        return ()
    for position, entry in enumerate(entries, 1):
        where = f"<entry {position} of {len(entries)}>"
        if not entry:
            raise SettingsError(
                TOKENS_VARIABLE, where, "comma-separated tokens or name:token pairs, none empty"
            )
        name, separator, token = entry.partition(":")
        if not separator:
            name, token = f"token-{position}", entry
        name, token = name.strip(), token.strip()
        if not name or name in names:
            raise SettingsError(
                TOKENS_VARIABLE, where, "a unique client name before the ':' of a name:token pair"
            )
        if len(token) < MIN_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
            raise SettingsError(
                TOKENS_VARIABLE,
                where,
                f"a token of at least {MIN_TOKEN_LENGTH} printable ASCII characters without "
                "commas or spaces, such as the output of `openssl rand -hex 32`",
            )
        if any(character.isspace() for character in token):
            raise SettingsError(TOKENS_VARIABLE, where, "a token without spaces")
        names.add(name)
        tokens.append(ApiToken(name, token))
    return tuple(tokens)


def tokens_from_env() -> tuple[ApiToken, ...]:
    return parse_tokens(os.environ.get(TOKENS_VARIABLE, ""))


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine: localhost, 127.0.0.0/8 or ::1."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def match(tokens: Sequence[ApiToken], presented: str | None) -> ApiToken | None:
    """Return the configured token equal to `presented`, comparing with each in constant time."""
    if presented is None:
        return None
    candidate = presented.encode("utf-8", errors="replace")
    found: ApiToken | None = None
    for token in tokens:
        # No early exit: every token is compared, whatever matched before.
        if hmac.compare_digest(candidate, token.token.encode()) and found is None:
            found = token
    return found


# Where a credential can show up in a log line (uvicorn and websockets log raw
# handshakes at DEBUG): the value after each prefix is replaced, whatever it is.
_CREDENTIAL_PATTERNS = [
    re.compile(r"(?i)(authorization:\s*bearer\s+)[^<\s][^\s\"']*"),
    re.compile(r"(?i)(sec-websocket-protocol:\s*bearer\s*,\s*)[^<\s,][^\s,\"']*"),
    re.compile(r"(?i)([?&]token=)[^<&\s\"'][^&\s\"']*"),
    re.compile(rf"(?i)({COOKIE_NAME}=)[^<;\s\"'][^;\s\"']*"),
]


class TokenRedactor(logging.Filter):
    """Keep credentials out of log lines: `<token:name>` for a known token, else `<redacted>`.

    The gateway keeps tokens out of what it logs itself; this filter, on the log
    handler, catches what libraries log (the raw WebSocket handshake at DEBUG).
    """

    def __init__(self, tokens: Sequence[ApiToken]) -> None:
        super().__init__()
        self._tokens = tuple(tokens)

    def redact(self, text: str) -> str:
        for token in self._tokens:
            if token.token in text:
                text = text.replace(token.token, f"<token:{token.name}>")
        for pattern in _CREDENTIAL_PATTERNS:
            text = pattern.sub(r"\1<redacted>", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        for key, value in list(vars(record).items()):
            if isinstance(value, str) and key not in ("msg", "message"):
                clean = self.redact(value)
                if clean != value:
                    setattr(record, key, clean)
        return True


def _headers(scope: Scope) -> dict[str, str]:
    # The last value wins; the headers read here are sent once.
    return {
        key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]
    }


def _cookie(header: str | None) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == COOKIE_NAME:
            return value
    return None


def _query_without_token(query: bytes) -> tuple[str | None, bytes]:
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    token = next((value for key, value in pairs if key == QUERY_PARAMETER), None)
    if token is None:
        return None, query
    rest = [(key, value) for key, value in pairs if key != QUERY_PARAMETER]
    return token, urlencode(rest).encode("latin-1")


@dataclass
class Credential:
    token: str | None
    source: str  # header, subprotocol, query, cookie or none
    # The Authorization header's scheme when it is not Bearer, such as "Basic".
    other_scheme: str | None = None


def _credential(scope: Scope, headers: dict[str, str]) -> Credential:
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return Credential(None, "header", other_scheme=scheme[:20] or "(empty)")
        return Credential(value.strip(), "header")
    if scope["type"] == "websocket":
        offered = list(scope.get("subprotocols") or [])
        if WS_SUBPROTOCOL in offered:
            rest = [item for item in offered if item != WS_SUBPROTOCOL]
            return Credential(rest[0] if rest else None, "subprotocol")
    token, _ = _query_without_token(scope.get("query_string", b""))
    if token is not None:
        return Credential(token, "query")
    cookie = _cookie(headers.get("cookie"))
    if cookie is not None:
        return Credential(cookie, "cookie")
    return Credential(None, "none")


def _same_origin(headers: dict[str, str]) -> bool:
    origin = headers.get("origin")
    if origin is None:  # not sent by a browser script, so no other page is involved
        return True
    host = headers.get("host", "")
    return origin.partition("://")[2].rstrip("/") == host


def _unauthorized_body(credential: Credential) -> dict[str, Any]:
    if credential.other_scheme is not None:
        message = (
            f"the Authorization header uses the scheme {credential.other_scheme!r}; "
            "send `Authorization: Bearer <token>` with one of the tokens in STEPWISE_API_TOKENS"
        )
        code = "unsupported_auth_scheme"
    elif credential.token is None:
        message = (
            "this gateway needs an API token: send `Authorization: Bearer <token>` with one "
            "of the tokens in STEPWISE_API_TOKENS (a browser opens the web UI once with "
            "?token=<token>)"
        )
        code = "missing_token"
    else:
        message = f"the API token sent in the {credential.source} is not valid"
        code = "invalid_token"
    return {"error": {"code": code, "message": message, "field": "Authorization"}}


class AuthMiddleware:
    """Let a request through only with a valid token; `/healthz` and `/readyz` stay open."""

    def __init__(self, app: ASGIApp, tokens: Sequence[ApiToken]) -> None:
        self.app = app
        self.tokens = tuple(tokens)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            not self.tokens
            or scope["type"] not in ("http", "websocket")
            or scope["path"] in OPEN_PATHS
        ):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        credential = _credential(scope, headers)
        client = match(self.tokens, credential.token)
        # Drop the token from the URL before anything (uvicorn's access log included) sees it.
        _, scope["query_string"] = _query_without_token(scope.get("query_string", b""))
        peer = scope.get("client")
        context = {"path": scope["path"], "client_address": peer[0] if peer else None}
        if client is None:
            logger.info(
                "rejected a request without a valid API token",
                extra={**context, "credential": credential.source},
            )
            await self._reject(scope, receive, send, credential)
            return
        if credential.source == "cookie" and not _same_origin(headers):
            logger.info(
                "rejected a cookie-authenticated request from another origin", extra=context
            )
            await self._forbid(scope, receive, send, headers.get("origin", ""))
            return
        scope.setdefault("state", {})["api_client"] = client.name
        if scope["type"] == "websocket":
            logger.info(
                "WebSocket client authenticated", extra={**context, "api_client": client.name}
            )
            if credential.source == "subprotocol":
                scope["subprotocols"] = [WS_SUBPROTOCOL]
                send = _choose_subprotocol(send)
        elif credential.source == "query" and self._is_page_load(scope):
            await self._set_cookie(scope, send, client, credential.token or "")
            return
        else:
            logger.debug("request authenticated", extra={**context, "api_client": client.name})
        await self.app(scope, receive, send)

    @staticmethod
    def _is_page_load(scope: Scope) -> bool:
        return scope["method"] in ("GET", "HEAD") and not scope["path"].startswith(NOT_PAGES)

    async def _set_cookie(self, scope: Scope, send: Send, client: ApiToken, token: str) -> None:
        # Redirect to the same page without the token, so it leaves the address bar and history.
        location = scope.get("root_path", "") + scope["path"]
        if scope["query_string"]:
            location += "?" + scope["query_string"].decode("latin-1")
        secure = "; Secure" if scope.get("scheme") == "https" else ""
        cookie = f"{COOKIE_NAME}={token}; Path=/; HttpOnly; SameSite=Strict{secure}"
        logger.info(
            "web UI client authenticated; cookie set",
            extra={"path": scope["path"], "api_client": client.name},
        )
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", location.encode("latin-1")),
                    (b"set-cookie", cookie.encode("latin-1")),
                    (b"cache-control", b"no-store"),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async def _reject(
        self, scope: Scope, receive: Receive, send: Send, credential: Credential
    ) -> None:
        body = _unauthorized_body(credential)
        if scope["type"] == "websocket":
            await _close_socket(receive, send, CLOSE_UNAUTHORIZED, body["error"]["message"])
            return
        challenge = 'Bearer realm="stepwise"'
        if credential.token is not None:
            challenge += ', error="invalid_token"'
        await _json_response(send, 401, body, [(b"www-authenticate", challenge.encode())])

    async def _forbid(self, scope: Scope, receive: Receive, send: Send, origin: str) -> None:
        message = (
            f"a request from origin {origin!r} may not use the web UI's cookie; "
            "send an Authorization header instead"
        )
        if scope["type"] == "websocket":
            await _close_socket(receive, send, CLOSE_FORBIDDEN, message)
            return
        body = {"error": {"code": "cross_origin", "message": message, "field": "Origin"}}
        await _json_response(send, 403, body, [])


def _choose_subprotocol(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "websocket.accept" and not message.get("subprotocol"):
            message = {**message, "subprotocol": WS_SUBPROTOCOL}
        await send(message)

    return wrapped


async def _close_socket(receive: Receive, send: Send, code: int, reason: str) -> None:
    # Accept first, so the client sees the close code and reason, not a failed handshake.
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send(
        {
            "type": "websocket.close",
            "code": code,
            "reason": reason.encode()[:123].decode(errors="ignore"),
        }
    )


async def _json_response(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
