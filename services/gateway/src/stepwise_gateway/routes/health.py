"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text

from stepwise_gateway.dependencies import get_runtime
from stepwise_gateway.errors import error_body
from stepwise_gateway.runtime import Runtime
from stepwise_gateway.schemas import ErrorResponse, Health, Readiness

router = APIRouter(tags=["health"])

# Seconds the readiness probe waits for Postgres.
DATABASE_PROBE_TIMEOUT = 3.0


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": ErrorResponse, "description": "NATS or Postgres is not reachable."}},
    summary="NATS is connected and Postgres answers",
)
async def readyz(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Readiness | JSONResponse:
    nats_state = "ok" if runtime.nats_connected else "not connected"
    try:
        async with asyncio.timeout(DATABASE_PROBE_TIMEOUT):
            async with runtime.engine.connect() as connection:
                await connection.execute(text("select 1"))
        database_state = "ok"
    except Exception as error:  # any failure means not ready
        database_state = (
            f"unreachable: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        )
    if nats_state == "ok" and database_state == "ok":
        return Readiness(status="ready", nats=nats_state, database=database_state)
    problems = [
        f"NATS {nats_state}" if nats_state != "ok" else "",
        f"Postgres {database_state}" if database_state != "ok" else "",
    ]
    body = error_body("not_ready", "; ".join(part for part in problems if part))
    body["nats"] = nats_state
    body["database"] = database_state
    return JSONResponse(body, status_code=503)
