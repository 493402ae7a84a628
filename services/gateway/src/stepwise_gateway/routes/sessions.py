"""Create sessions and read them from the Postgres read models."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated, Any

import nats.errors
from fastapi import APIRouter, Depends, Query, Response, status
from stepwise_libs import subjects
from stepwise_libs.commands import GeneratePlan, new_command
from stepwise_libs.events import SessionCreated
from stepwise_libs.fold import fold
from stepwise_libs.jetstream import publish_command
from stepwise_libs.secrets import store_secrets

from stepwise_gateway.controls import IDEMPOTENCY_NAMESPACE
from stepwise_gateway.dependencies import get_runtime, idempotency_key_header, session_id_path
from stepwise_gateway.errors import InvalidInput, NatsUnavailable, SessionNotFound
from stepwise_gateway.metrics import COMMANDS_PUBLISHED
from stepwise_gateway.readmodels import (
    detail_from_rows,
    detail_from_state,
    list_sessions,
    load_session_rows,
    wait_for_seq,
)
from stepwise_gateway.runtime import Runtime, database_errors, nats_errors
from stepwise_gateway.schemas import (
    CreateSessionRequest,
    ErrorResponse,
    SessionCreatedResponse,
    SessionDetail,
    SessionList,
)
from stepwise_gateway.validation import (
    MAX_TEST_CASE_CHARS,
    check_model,
    check_secrets,
    check_target_url,
    check_text,
)

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/sessions", tags=["sessions"])

TITLE_CHARS = 80
MAX_PAGE = 500
STATUSES = (
    "created generating_plan plan_ready running paused completed failed cancelled stopped "
    "interrupted timed_out"
).split()

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Unknown session."},
    422: {"model": ErrorResponse, "description": "Invalid input; `error.field` names the field."},
    503: {"model": ErrorResponse, "description": "NATS or Postgres is unavailable."},
}


def _title(test_case: str) -> str:
    first_line = next((line.strip() for line in test_case.splitlines() if line.strip()), "")
    return first_line if len(first_line) <= TITLE_CHARS else first_line[: TITLE_CHARS - 1] + "…"


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=SessionCreatedResponse,
    responses=ERRORS,
    summary="Create a session and queue its plan generation",
)
async def create_session(
    request: CreateSessionRequest,
    runtime: Annotated[Runtime, Depends(get_runtime)],
    idempotency_key: Annotated[str | None, Depends(idempotency_key_header)],
) -> SessionCreatedResponse:
    test_case = check_text(request.test_case, "test_case", MAX_TEST_CASE_CHARS)
    target_url = check_target_url(request.target_url)
    settings = runtime.settings
    model = check_model(
        request.llm_model,
        default=settings.default_model,
        gemini_configured=settings.gemini_configured,
    )
    secrets = check_secrets(
        {name: value.get_secret_value() for name, value in (request.secrets or {}).items()},
        test_case,
    )
    secret_names = list(secrets)
    js, store = runtime.jetstream()

    if idempotency_key is None:
        session_id, command_id, event_id = str(uuid.uuid4()), str(uuid.uuid4()), None
    else:
        # The same key gives the same ids, so a retried request finds or re-sends the same writes.
        session_id = str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"session\n{idempotency_key}"))
        command_id = str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"generate_plan\n{session_id}"))
        event_id = str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"session_created\n{session_id}"))

    with nats_errors("creating the session"):
        existing = await store.read(session_id, limit=1) if idempotency_key else []
        if existing and existing[0].data.get("test_case") != test_case:
            raise InvalidInput(
                "Idempotency-Key was already used for a session with another test case; "
                "use a new key",
                field="Idempotency-Key",
            )
        if existing and existing[0].data.get("secret_names", []) != secret_names:
            raise InvalidInput(
                "Idempotency-Key was already used for a session with other secret names; "
                "use a new key",
                field="Idempotency-Key",
            )
        # The values go to the secrets bucket before the session exists, so the executor
        # finds them whenever it runs a step. The event carries only their names. A retry
        # of a request that created the session has stored them already.
        if secrets and not existing:
            await store_secrets(js, session_id, secrets)
        created = (
            existing[0]
            if existing
            else await store.append(
                session_id,
                SessionCreated(
                    test_case=test_case,
                    target_url=target_url,
                    llm_model=model,
                    title=_title(test_case),
                    secret_names=secret_names,
                ),
                command_id=command_id,
                event_id=event_id,
            )
        )
    # The planner writes this session next, so the cached tail would only go stale.
    store.forget(session_id)
    command = new_command(
        session_id,
        GeneratePlan(test_case=test_case, target_url=target_url, llm_model=model),
        command_id=command_id,
    )
    try:
        await publish_command(js, subjects.planner_command_subject("generate_plan"), command)
        COMMANDS_PUBLISHED.labels("generate_plan").inc()
    except (nats.errors.Error, TimeoutError, OSError) as error:
        # The session exists now, so the error message explains how to get its plan queued.
        logger.warning(
            "session created but generate_plan not queued: %s",
            error,
            extra={"session_id": session_id, "command_id": command_id},
        )
        raise NatsUnavailable(
            f"session {session_id} was created, but queueing its plan generation failed "
            f"because NATS is unavailable ({error or type(error).__name__}); send the request "
            "again with an Idempotency-Key header so a retry reuses the session"
        ) from error

    logger.info(
        "session created",
        extra={
            "session_id": session_id,
            "command_id": command_id,
            "llm_model": model,
            "secret_names": ",".join(secret_names),
        },
    )
    return SessionCreatedResponse(
        session_id=session_id,
        status="created",
        test_case=test_case,
        target_url=created.data["target_url"],
        llm_model=created.data["llm_model"],
        created_at=created.at,
        last_seq=created.seq,
        command_id=command_id,
        secret_names=created.data.get("secret_names", []),
    )


@router.get("", response_model=SessionList, responses=ERRORS, summary="List sessions, newest first")
async def get_sessions(
    runtime: Annotated[Runtime, Depends(get_runtime)],
    status_filter: Annotated[
        list[str] | None,
        Query(
            alias="status",
            description="Only sessions with this status; repeat or comma-separate for several.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Sessions per page.")] = 50,
    offset: Annotated[int, Query(ge=0, description="Sessions to skip.")] = 0,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> SessionList:
    statuses = [
        part.strip() for value in status_filter or [] for part in value.split(",") if part.strip()
    ]
    unknown = [value for value in statuses if value not in STATUSES]
    if unknown:
        raise InvalidInput(
            f"status {unknown[0]!r} is not a session status; use one of {', '.join(STATUSES)}",
            field="status",
        )
    async with database_errors():
        sessions, next_cursor = await list_sessions(runtime.engine, statuses, limit, offset, cursor)
    return SessionList(sessions=sessions, next_cursor=next_cursor)


# Set on a wait_for_seq read that timed out before the session reached that seq.
WAIT_TIMED_OUT_HEADER = "X-Stepwise-Wait-Timed-Out"


@router.get(
    "/{session_id}",
    response_model=SessionDetail,
    responses=ERRORS,
    summary="Read a session: status, plans, steps with results, tasks",
)
async def get_session(
    session_id: Annotated[str, Depends(session_id_path)],
    runtime: Annotated[Runtime, Depends(get_runtime)],
    response: Response,
    wait_for_seq_: Annotated[
        int | None,
        Query(
            alias="wait_for_seq",
            ge=0,
            description="Wait, at most STEPWISE_MAX_WAIT_FOR_SEQ seconds (10 by default), until "
            "the read model includes this event seq; if it still lags then, "
            "the answer is folded from the event stream. When that answer still lacks "
            f"the seq too, the response has the header {WAIT_TIMED_OUT_HEADER}: true.",
        ),
    ] = None,
) -> SessionDetail:
    detail = await _read_session(session_id, runtime, wait_for_seq_)
    if wait_for_seq_ is not None and detail.last_seq < wait_for_seq_:
        response.headers[WAIT_TIMED_OUT_HEADER] = "true"
    return detail


async def _read_session(
    session_id: str, runtime: Runtime, wait_for_seq_: int | None
) -> SessionDetail:
    async with database_errors():
        caught_up = True
        if wait_for_seq_ is not None:
            caught_up = await wait_for_seq(
                runtime.engine,
                runtime.notifier,
                session_id,
                wait_for_seq_,
                runtime.settings.max_wait_for_seq,
            )
        rows = await load_session_rows(runtime.engine, session_id)
    if rows is not None and caught_up:
        return detail_from_rows(rows, "read_model")

    # The projector has not written this session (or not up to the seq asked for):
    # fold its events, which is what the read model will show once it catches up.
    if not runtime.nats_connected and rows is not None:
        return detail_from_rows(rows, "read_model")
    _, store = runtime.jetstream()
    with nats_errors(f"reading the events of session {session_id}"):
        events = await store.read(session_id)
    if not events:
        raise SessionNotFound(session_id)
    return detail_from_state(fold(session_id, events))
