"""Session controls over REST: each queues one command or returns 409 with the reason."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, status

from stepwise_gateway.controls import CONTROLS, Queued, load_state, submit
from stepwise_gateway.dependencies import get_runtime, idempotency_key_header, session_id_path
from stepwise_gateway.errors import NotFound
from stepwise_gateway.runtime import Runtime, nats_errors
from stepwise_gateway.schemas import (
    ActRequest,
    ContinuePlanRequest,
    ErrorResponse,
    QueuedResponse,
    TaskStatusResponse,
)
from stepwise_gateway.validation import (
    MAX_CONTEXT_CHARS,
    MAX_INSTRUCTION_CHARS,
    MAX_TEST_CASE_CHARS,
    check_placeholder_names,
    check_text,
)

router = APIRouter(prefix="/api/sessions/{session_id}", tags=["controls"])

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Unknown session."},
    409: {
        "model": ErrorResponse,
        "description": "The control does not fit the session's state; "
        "a command_rejected event records it.",
    },
    422: {"model": ErrorResponse, "description": "Invalid input; `error.field` names the field."},
    503: {"model": ErrorResponse, "description": "NATS is unavailable."},
}

SessionId = Annotated[str, Depends(session_id_path)]
IdempotencyKey = Annotated[str | None, Depends(idempotency_key_header)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _response(queued: Queued) -> QueuedResponse:
    return QueuedResponse(
        task_id=queued.task_id,
        command_id=queued.command_id,
        command_type=queued.command_type,
        session_id=queued.session_id,
    )


async def _queue(
    runtime: Runtime,
    session_id: str,
    name: str,
    key: str | None,
    params: dict[str, Any] | None = None,
) -> QueuedResponse:
    js, store = runtime.jetstream()
    return _response(await submit(js, store, session_id, CONTROLS[name], params or {}, key))


def _post(path: str, summary: str):  # type: ignore[no-untyped-def]
    return router.post(
        path,
        status_code=status.HTTP_202_ACCEPTED,
        response_model=QueuedResponse,
        responses=ERRORS,
        summary=summary,
    )


@_post("/start", "Run the plan (execute_plan); needs status plan_ready")
async def start(session_id: SessionId, runtime: RuntimeDep, key: IdempotencyKey) -> QueuedResponse:
    return await _queue(runtime, session_id, "start", key)


@_post("/pause", "Pause after the current step (pause_execution); needs status running")
async def pause(session_id: SessionId, runtime: RuntimeDep, key: IdempotencyKey) -> QueuedResponse:
    return await _queue(runtime, session_id, "pause", key)


@_post("/continue", "Resume a paused, stopped or interrupted run (continue_execution)")
async def continue_execution(
    session_id: SessionId, runtime: RuntimeDep, key: IdempotencyKey
) -> QueuedResponse:
    return await _queue(runtime, session_id, "continue", key)


@_post(
    "/act", "Run one instruction in the live browser (act); needs a paused or plan_ready session"
)
async def act(
    session_id: SessionId, body: ActRequest, runtime: RuntimeDep, key: IdempotencyKey
) -> QueuedResponse:
    task = check_text(body.task, "task", MAX_INSTRUCTION_CHARS)
    check_placeholder_names(task, "task")
    context = body.previous_context
    if context is not None:
        check_text(context, "previous_context", MAX_CONTEXT_CHARS, required=False)
    return await _queue(
        runtime, session_id, "act", key, {"task": task, "previous_context": context}
    )


@_post("/run-till-end", "Run every remaining step, pausing on a failed one (run_till_end)")
async def run_till_end(
    session_id: SessionId, runtime: RuntimeDep, key: IdempotencyKey
) -> QueuedResponse:
    return await _queue(runtime, session_id, "run_till_end", key)


@_post("/retry-step", "Retry the failed step a run till end is paused on (retry_step)")
async def retry_step(
    session_id: SessionId, runtime: RuntimeDep, key: IdempotencyKey
) -> QueuedResponse:
    return await _queue(runtime, session_id, "retry_step", key)


@_post("/skip-step", "Skip the failed step a run till end is paused on (skip_step)")
async def skip_step(
    session_id: SessionId, runtime: RuntimeDep, key: IdempotencyKey
) -> QueuedResponse:
    return await _queue(runtime, session_id, "skip_step", key)


@_post("/task/cancel", "Abort the work in progress at once and close the browser (cancel_task)")
async def cancel_task(
    session_id: SessionId, runtime: RuntimeDep, key: IdempotencyKey
) -> QueuedResponse:
    return await _queue(runtime, session_id, "cancel", key)


@_post("/stop", "Pause and close the browser (stop_all)")
async def stop_all(
    session_id: SessionId, runtime: RuntimeDep, key: IdempotencyKey
) -> QueuedResponse:
    return await _queue(runtime, session_id, "stop", key)


@_post("/plan/continue", "Generate a continuation plan whose steps are appended (continue_plan)")
async def continue_plan(
    session_id: SessionId, body: ContinuePlanRequest, runtime: RuntimeDep, key: IdempotencyKey
) -> QueuedResponse:
    prompt = check_text(body.task_prompt, "task_prompt", MAX_TEST_CASE_CHARS)
    check_placeholder_names(prompt, "task_prompt")
    return await _queue(runtime, session_id, "continue_plan", key, {"task_prompt": prompt})


@router.get(
    "/task/status",
    response_model=TaskStatusResponse,
    responses={404: ERRORS[404], 503: ERRORS[503]},
    summary="Status of the session's current task, or of one task by id",
)
async def task_status(
    session_id: SessionId,
    runtime: RuntimeDep,
    task_id: Annotated[
        str | None, Query(description="A task id; default: the current task.")
    ] = None,
) -> TaskStatusResponse:
    _, store = runtime.jetstream()
    with nats_errors(f"reading the events of session {session_id}"):
        events = await store.read(session_id)
    state = load_state(events, session_id)
    task = state.tasks.get(task_id) if task_id is not None else state.current_task
    if task_id is not None and task is None:
        raise NotFound(
            f"session {session_id} has no task {task_id!r} yet; "
            "a queued task appears once its work starts",
            field="task_id",
            code="task_not_found",
        )
    if task is None:
        return TaskStatusResponse(
            task_id=None,
            task_type=None,
            status=None,
            progress="",
            error=None,
            session_status=state.status,
        )
    return TaskStatusResponse(
        task_id=task.task_id,
        task_type=task.task_type,
        status=task.status,
        progress=task.progress,
        error=task.error,
        session_status=state.status,
    )
