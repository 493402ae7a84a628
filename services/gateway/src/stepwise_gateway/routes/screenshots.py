"""Screenshots from the JetStream object store, scoped to their session."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Response
from nats.js.errors import ObjectNotFoundError
from stepwise_libs import subjects

from stepwise_gateway.dependencies import get_runtime, session_id_path
from stepwise_gateway.errors import NotFound
from stepwise_gateway.runtime import Runtime, nats_errors
from stepwise_gateway.schemas import ErrorResponse

router = APIRouter(prefix="/api/sessions/{session_id}", tags=["screenshots"])

# `<step>/<n>.png` inside a session: step is a number or `act-<task id>`.
_NAME_IN_SESSION = re.compile(r"[A-Za-z0-9_-]{1,80}/[0-9]{1,6}\.png")
# Object names never change content, so clients may cache them for a year.
CACHE_CONTROL = "public, max-age=31536000, immutable"


@router.get(
    "/screenshots/{name:path}",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "The PNG."},
        404: {"model": ErrorResponse, "description": "No such screenshot in this session."},
        503: {"model": ErrorResponse, "description": "NATS is unavailable."},
    },
    summary="Get a screenshot: `<session>/<step>/<n>.png` or `<step>/<n>.png`",
)
async def get_screenshot(
    session_id: Annotated[str, Depends(session_id_path)],
    name: Annotated[
        str, Path(description="Object name, with or without the `<session_id>/` prefix.")
    ],
    runtime: Annotated[Runtime, Depends(get_runtime)],
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    relative = name.removeprefix(f"{session_id}/")
    if not _NAME_IN_SESSION.fullmatch(relative):
        raise NotFound(
            f"{name!r} is not a screenshot of session {session_id}; names look like "
            f"{session_id}/<step>/<n>.png",
            field="name",
            code="screenshot_not_found",
        )
    object_name = f"{session_id}/{relative}"
    js, _ = runtime.jetstream()
    with nats_errors(f"reading screenshot {object_name}"):
        store = await js.object_store(subjects.SCREENSHOTS_BUCKET)
        try:
            info = await store.get_info(object_name)
            etag = f'"{info.digest}"' if info.digest else None
            if etag is not None and if_none_match == etag:
                return Response(
                    status_code=304, headers={"ETag": etag, "Cache-Control": CACHE_CONTROL}
                )
            result = await store.get(object_name)
        except ObjectNotFoundError:
            raise NotFound(
                f"session {session_id} has no screenshot {relative!r}",
                field="name",
                code="screenshot_not_found",
            ) from None
    headers = {"Cache-Control": CACHE_CONTROL}
    if etag is not None:
        headers["ETag"] = etag
    return Response(content=result.data or b"", media_type="image/png", headers=headers)
