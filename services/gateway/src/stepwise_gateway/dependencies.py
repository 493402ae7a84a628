"""FastAPI dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header, Path, Request
from starlette.requests import HTTPConnection

from .runtime import Runtime
from .validation import check_idempotency_key, check_session_id


def runtime_of(connection: HTTPConnection) -> Runtime:
    runtime: Runtime = connection.app.state.runtime
    return runtime


def get_runtime(request: Request) -> Runtime:
    return runtime_of(request)


def session_id_path(
    session_id: Annotated[str, Path(description="Session id, as returned by POST /api/sessions.")],
) -> str:
    return check_session_id(session_id)


def idempotency_key_header(
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Any unique string, such as a UUID; "
            "the same key twice runs the command once.",
        ),
    ] = None,
) -> str | None:
    return check_idempotency_key(idempotency_key)
