"""The web UI: one HTML shell for every page, its static assets and the little config it needs.

The shell is served at `/` (session list and the new-session form) and
`/sessions/{id}` (the session page; `?at=<seq>` replays it as of that event).
The pages are plain ES modules under `/ui/`, served from the package's `static`
folder, so the UI works offline and needs no build step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from stepwise_gateway.dependencies import get_runtime
from stepwise_gateway.errors import GatewayError, NotFound
from stepwise_gateway.runtime import Runtime
from stepwise_gateway.validation import OFFLINE_MODEL, check_session_id

logger = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The Gemini model the form offers when the gateway has an API key.
GEMINI_FORM_MODEL = "gemini-2.5-flash"
# Browsers revalidate assets on each load (cheap with an ETag), so an upgraded
# gateway serves its new code at once.
ASSET_CACHE = "no-cache"


def _asset_names() -> dict[str, Path]:
    return {
        path.name: path
        for path in STATIC_DIR.iterdir()
        if path.is_file() and path.suffix in MEDIA_TYPES
    }


ASSETS = _asset_names()


def _shell() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type=MEDIA_TYPES[".html"],
        headers={"Cache-Control": ASSET_CACHE},
    )


@router.get("/")
async def home() -> FileResponse:
    return _shell()


@router.get("/sessions/{session_id}")
async def session_page(
    session_id: str, runtime: Annotated[Runtime, Depends(get_runtime)]
) -> FileResponse:
    """Serve the session page, with status 404 when no session has this id.

    The page reports an unknown session itself as well, after asking the API. When
    NATS is unavailable, the page is served with 200 and reports the connection problem.
    """
    page = _shell()
    try:
        check_session_id(session_id)
        _, store = runtime.jetstream()
        _, last_seq = await store.last(session_id)
    except GatewayError:
        page.status_code = 404
        return page
    except Exception as error:  # NATS unavailable: the page retries on its own
        logger.info("session page served without checking the session: %s", error)
        return page
    if last_seq == 0:
        page.status_code = 404
    return page


@router.get("/ui/config.json")
async def ui_config(runtime: Annotated[Runtime, Depends(get_runtime)]) -> dict[str, Any]:
    settings = runtime.settings
    models = [OFFLINE_MODEL]
    if settings.gemini_configured:
        models.append(GEMINI_FORM_MODEL)
    if settings.default_model not in models:
        models.append(settings.default_model)
    return {
        "models": models,
        "default_model": settings.default_model,
        "gemini_configured": settings.gemini_configured,
    }


@router.get("/ui/{name}")
async def asset(name: str) -> FileResponse:
    path = ASSETS.get(name)
    if path is None:
        raise NotFound(f"the web UI has no file {name!r}", field="name", code="asset_not_found")
    return FileResponse(
        path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": ASSET_CACHE}
    )
