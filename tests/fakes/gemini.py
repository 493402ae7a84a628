"""A fake of the Gemini REST API on loopback, for tests that run the real google-genai client.

The real client reaches it through `types.HttpOptions(base_url=fake.base_url)`
(or `STEPWISE_GEMINI_BASE_URL` in a service). It serves
`POST /{version}/models/{model}:generateContent` and `:streamGenerateContent`
(server-sent events when `alt=sse`), the calls google-genai and browser-use's
ChatGoogle make.

Each test scripts the responses in order:

    fake.reply_json({"steps": [...]})      # the model's text is this JSON
    fake.reply_text("not json")            # the model's text, verbatim
    fake.reply_status(503)                 # fail with a Google-style error body
    fake.reply_with(lambda request: {...}) # build the response from the request
    fake.always_status(503)                # every request fails this way

A callable may return a dict or list (sent as JSON text), a str (sent as is),
or a `Reply`. When the queue is empty the fake returns HTTP 400 naming the
request, so a test that makes more model calls than it scripted fails loudly;
`fake.default = ...` sets a response used for every unscripted request instead.

Every request is recorded (`fake.requests`) with its path, model, headers and
JSON body. The server runs on a daemon thread, so it serves sync and async
tests alike; `wait_for_requests` and `await_requests` wait for calls.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_PATH = re.compile(r"^/(?P<version>[^/]+)/models/(?P<model>[^/:]+):(?P<method>[A-Za-z]+)$")

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_STATUS_MESSAGES = {
    429: "Resource has been exhausted (e.g. check quota).",
    500: "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
}


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, list[str]]
    model: str
    rpc: str  # generateContent, streamGenerateContent, ...
    headers: dict[str, str]
    body: Any

    @property
    def prompt_text(self) -> str:
        """All text parts of the request's contents and system instruction, joined."""
        texts: list[str] = []
        body = self.body if isinstance(self.body, dict) else {}
        system = body.get("systemInstruction") or body.get("system_instruction") or {}
        for part in system.get("parts", []) if isinstance(system, dict) else []:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        for content in body.get("contents", []):
            for part in content.get("parts", []) if isinstance(content, dict) else []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
        return "\n".join(texts)

    @property
    def generation_config(self) -> dict[str, Any]:
        body = self.body if isinstance(self.body, dict) else {}
        config = body.get("generationConfig") or {}
        return config if isinstance(config, dict) else {}


@dataclass
class Reply:
    """One scripted response: the model's text, or an HTTP error."""

    text: str | None = None
    status: int = 200
    message: str | None = None
    delay_seconds: float = 0.0
    finish_reason: str = "STOP"
    extra_parts: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def json(cls, value: Any, delay_seconds: float = 0.0) -> Reply:
        return cls(text=json.dumps(value), delay_seconds=delay_seconds)

    @classmethod
    def error(cls, status: int, message: str | None = None, delay_seconds: float = 0.0) -> Reply:
        return cls(status=status, message=message, delay_seconds=delay_seconds)


Responder = Callable[[RecordedRequest], "Reply | dict[str, Any] | list[Any] | str"]
_Scripted = Reply | Responder


def _as_reply(value: Reply | dict[str, Any] | list[Any] | str) -> Reply:
    if isinstance(value, Reply):
        return value
    if isinstance(value, str):
        return Reply(text=value)
    return Reply.json(value)


def error_body(status: int, message: str | None = None) -> dict[str, Any]:
    """The JSON body Google's APIs send with an error status."""
    return {
        "error": {
            "code": status,
            "message": message or _STATUS_MESSAGES.get(status, HTTPStatus(status).phrase),
            "status": _STATUS_NAMES.get(status, "UNKNOWN"),
        }
    }


def response_body(text: str, model: str, reply: Reply | None = None) -> dict[str, Any]:
    """The generateContent response envelope around the model's text."""
    parts: list[dict[str, Any]] = [{"text": text}]
    if reply is not None:
        parts.extend(reply.extra_parts)
    prompt_tokens = 20
    output_tokens = max(1, len(text) // 4)
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": parts},
                "finishReason": reply.finish_reason if reply else "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": prompt_tokens + output_tokens,
        },
        "modelVersion": model,
        "responseId": uuid.uuid4().hex,
    }


class FakeGemini:
    """The fake server; start it with `with FakeGemini() as fake:` or `start()` / `stop()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._lock = threading.Condition()
        self._queue: deque[_Scripted] = deque()
        self._always: Reply | None = None
        self.default: _Scripted | None = None
        self.requests: list[RecordedRequest] = []
        # Requests that found no scripted response; a test may assert this stays empty.
        self.unscripted: list[RecordedRequest] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> FakeGemini:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                fake._handle(self)

            def do_GET(self) -> None:
                fake._handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((self._host, self._port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-gemini", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeGemini:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "FakeGemini is not started"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """What to pass as google-genai's `HttpOptions(base_url=...)`."""
        return f"http://{self._host}:{self.port}"

    # --- scripting --------------------------------------------------------------

    def reply_json(self, value: Any, delay_seconds: float = 0.0) -> FakeGemini:
        return self.reply(Reply.json(value, delay_seconds))

    def reply_text(self, text: str, delay_seconds: float = 0.0) -> FakeGemini:
        return self.reply(Reply(text=text, delay_seconds=delay_seconds))

    def reply_status(
        self, status: int, message: str | None = None, times: int = 1, delay_seconds: float = 0.0
    ) -> FakeGemini:
        for _ in range(times):
            self.reply(Reply.error(status, message, delay_seconds))
        return self

    def reply_with(self, responder: Responder) -> FakeGemini:
        return self.reply(responder)

    def reply(self, scripted: _Scripted) -> FakeGemini:
        with self._lock:
            self._queue.append(scripted)
        return self

    def always_status(self, status: int | None, message: str | None = None) -> FakeGemini:
        """Fail every request with `status` (None turns this off)."""
        with self._lock:
            self._always = None if status is None else Reply.error(status, message)
        return self

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self._always = None
            self.default = None
            self.requests.clear()
            self.unscripted.clear()

    @property
    def pending(self) -> int:
        """Scripted responses not used yet."""
        with self._lock:
            return len(self._queue)

    # --- waiting ----------------------------------------------------------------

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Block until at least `count` requests arrived; raise TimeoutError naming the count."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"fake Gemini got {len(self.requests)} requests, expected {count} "
                        f"within {timeout} s"
                    )
                self._lock.wait(remaining)
            return list(self.requests)

    async def await_requests(self, count: int, within: float = 10.0) -> list[RecordedRequest]:
        return await asyncio.to_thread(self.wait_for_requests, count, within)

    # --- serving ----------------------------------------------------------------

    def _next_reply(self, request: RecordedRequest) -> Reply:
        with self._lock:
            if self._always is not None:
                return self._always
            scripted = self._queue.popleft() if self._queue else self.default
            if scripted is None:
                self.unscripted.append(request)
                return Reply.error(
                    400,
                    f"fake Gemini has no scripted response for request #{len(self.requests)} "
                    f"({request.rpc} on model {request.model})",
                )
        if isinstance(scripted, Reply):
            return scripted
        return _as_reply(scripted(request))

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        split = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        match = _PATH.match(split.path)
        request = RecordedRequest(
            method=handler.command,
            path=split.path,
            query=parse_qs(split.query),
            model=match.group("model") if match else "",
            rpc=match.group("method") if match else "",
            headers={key.lower(): value for key, value in handler.headers.items()},
            body=body,
        )
        with self._lock:
            self.requests.append(request)
            self._lock.notify_all()
        if match is None or handler.command != "POST":
            self._send_json(
                handler, 404, error_body(404, f"fake Gemini does not serve {split.path}")
            )
            return
        if request.rpc not in ("generateContent", "streamGenerateContent"):
            self._send_json(
                handler, 404, error_body(404, f"fake Gemini does not serve {request.rpc}")
            )
            return
        try:
            reply = self._next_reply(request)
        except Exception as error:  # a broken responder must show up in the test, not hang it
            reply = Reply.error(500, f"fake Gemini responder raised {error!r}")
        if reply.delay_seconds:
            time.sleep(reply.delay_seconds)
        if reply.status != 200:
            self._send_json(handler, reply.status, error_body(reply.status, reply.message))
            return
        envelope = response_body(reply.text or "", request.model, reply)
        if request.rpc == "streamGenerateContent":
            self._send_stream(handler, envelope, sse=request.query.get("alt") == ["sse"])
        else:
            self._send_json(handler, 200, envelope)

    @staticmethod
    def _send_json(handler: BaseHTTPRequestHandler, status: int, value: Any) -> None:
        data = json.dumps(value).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json; charset=UTF-8")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (e.g. its timeout fired); nothing to answer

    @staticmethod
    def _send_stream(handler: BaseHTTPRequestHandler, envelope: dict[str, Any], sse: bool) -> None:
        if sse:
            data = f"data: {json.dumps(envelope)}\r\n\r\n".encode()
            content_type = "text/event-stream"
        else:
            data = json.dumps([envelope]).encode()
            content_type = "application/json; charset=UTF-8"
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
