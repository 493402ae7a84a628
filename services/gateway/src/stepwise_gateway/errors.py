"""Errors the gateway turns into JSON responses: `{"error": {"code", "message", "field"}}`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class GatewayError(Exception):
    """Base of every error the gateway returns as a JSON body."""

    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


class InvalidInput(GatewayError):
    status_code = 422
    code = "invalid_input"


class SinceAfterLastSeq(InvalidInput):
    """A `since` past the session's last seq, which no client that read the stream can have."""

    def __init__(self, field: str, since: int, last_seq: int) -> None:
        super().__init__(
            f"{field}={since} is after the last seq {last_seq} of this session; "
            f"pass the seq of the last event you received, at most {last_seq}",
            field=field,
        )
        self.last_seq = last_seq

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["last_seq"] = self.last_seq
        return body


class SessionNotFound(GatewayError):
    status_code = 404
    code = "session_not_found"

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"no session with id {session_id!r}; create one with POST /api/sessions",
            field="session_id",
        )
        self.session_id = session_id


class NotFound(GatewayError):
    status_code = 404
    code = "not_found"


class CommandConflict(GatewayError):
    """A control sent in a session state where it cannot run, returned as 409."""

    status_code = 409
    code = "invalid_state"

    def __init__(
        self, command_type: str, reason: str, code: str = "invalid_state", status: str | None = None
    ) -> None:
        super().__init__(reason, code=code)
        self.command_type = command_type
        self.status = status

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["command_type"] = self.command_type
        body["error"]["status"] = self.status
        return body


class ServiceUnavailable(GatewayError):
    status_code = 503
    code = "service_unavailable"


class NatsUnavailable(ServiceUnavailable):
    code = "nats_unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def _field_name(location: Sequence[Any]) -> str | None:
    # Drop the part of the request ("body", "query", ...) and keep the field path.
    # A location that is only the part ("body" for a body that is not an object) names it.
    parts = [str(part) for part in location]
    if len(parts) > 1 and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or None


def _encodable(text: str) -> str:
    # A JSON key can be an unpaired surrogate, which the response encoder cannot write.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _validation_field(error: dict[str, Any]) -> str | None:
    if error.get("type") == "json_invalid":
        return "body"
    field = _field_name(error.get("loc", ()))
    return _encodable(field) if field is not None else None


def _validation_message(error: dict[str, Any], field: str | None) -> str:
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if error.get("type") == "json_invalid":
        reason = str(error.get("ctx", {}).get("error", message))
        return f"request body is not valid JSON ({reason}); send a JSON object"
    if field == "body" and error.get("type") in ("model_attributes_type", "dict_type"):
        return (
            "request body must be a JSON object with the fields this endpoint takes, "
            "sent with Content-Type: application/json"
        )
    if error.get("type") == "missing":
        return f"{field} is required" if field else "a required value is missing"
    if error.get("type") == "extra_forbidden":
        return f"{field} is not a known field; remove it"
    return f"{field}: {message}" if field else message


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = list(error.errors())
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    field = _validation_field(first)
    code = "invalid_json" if first.get("type") == "json_invalid" else "invalid_input"
    body = error_body(code, _encodable(_validation_message(first, field)), field)
    body["error"]["details"] = [
        {
            "field": _validation_field(item),
            "message": _encodable(_validation_message(item, _validation_field(item))),
            "type": item.get("type"),
        }
        for item in errors
    ]
    return JSONResponse(body, status_code=422)


async def _gateway_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, GatewayError)
    if error.status_code >= 500:
        logger.warning("request failed: %s", error.message, extra={"path": request.url.path})
    return JSONResponse(error.body(), status_code=error.status_code)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = str(error.detail)
    if error.status_code == 404 and message == "Not Found":
        message = f"no route for {request.method} {request.url.path}"
    if error.status_code == 400 and message == "There was an error parsing the body":
        # FastAPI's message when json.loads fails, also on a body nested too deep to decode.
        return JSONResponse(
            error_body(
                "invalid_json",
                "the request body could not be decoded as JSON (invalid, or nested too "
                "deeply); send a JSON object",
                "body",
            ),
            status_code=422,
        )
    return JSONResponse(
        error_body(codes.get(error.status_code, "http_error"), message),
        status_code=error.status_code,
        headers=getattr(error, "headers", None),
    )


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unexpected error", extra={"path": request.url.path})
    return JSONResponse(
        error_body(
            "internal_error", f"internal error: {type(error).__name__}; see the gateway log"
        ),
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
