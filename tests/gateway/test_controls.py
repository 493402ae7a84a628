import json

import httpx
import pytest
from nats.js import JetStreamContext
from nats.js.errors import KeyValueError
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.jetstream import EventStore

from .conftest import build_session, commands_for, rejections

# (REST path, session state, expected rejection code)
WRONG_STATES = [
    ("start", "created", "plan_not_ready"),
    ("start", "generating_plan", "plan_not_ready"),
    ("start", "running", "already_running"),
    ("start", "completed", "invalid_state"),
    ("start", "cancelled", "session_cancelled"),
    ("pause", "plan_ready", "not_running"),
    ("pause", "paused", "not_running"),
    ("pause", "cancelled", "session_cancelled"),
    ("continue", "running", "not_paused"),
    ("continue", "plan_ready", "not_paused"),
    ("continue", "blocked", "step_blocked"),
    ("act", "running", "already_running"),
    ("act", "created", "plan_not_ready"),
    ("act", "cancelled", "session_cancelled"),
    ("act", "completed", "invalid_state"),
    ("run-till-end", "running", "already_running"),
    ("run-till-end", "created", "plan_not_ready"),
    ("run-till-end", "blocked", "step_blocked"),
    ("run-till-end", "completed", "nothing_to_run"),
    ("retry-step", "paused", "not_blocked"),
    ("retry-step", "running", "not_blocked"),
    ("skip-step", "plan_ready", "not_blocked"),
    ("task/cancel", "completed", "nothing_to_cancel"),
    ("task/cancel", "cancelled", "session_cancelled"),
    ("stop", "completed", "nothing_to_stop"),
    ("stop", "plan_ready", "nothing_to_stop"),
    ("stop", "stopped", "nothing_to_stop"),
    ("plan/continue", "generating_plan", "plan_not_ready"),
    ("plan/continue", "cancelled", "session_cancelled"),
]

BODIES = {
    "act": {"task": "close the cookie banner"},
    "plan/continue": {"task_prompt": "now check out"},
}

COMMAND_TYPES = {
    "start": "execute_plan",
    "pause": "pause_execution",
    "continue": "continue_execution",
    "act": "act",
    "run-till-end": "run_till_end",
    "retry-step": "retry_step",
    "skip-step": "skip_step",
    "task/cancel": "cancel_task",
    "stop": "stop_all",
    "plan/continue": "continue_plan",
}


@pytest.mark.parametrize(("path", "state", "code"), WRONG_STATES)
async def test_control_in_wrong_state_is_409_and_recorded(
    client: httpx.AsyncClient,
    store: EventStore,
    js: JetStreamContext,
    path: str,
    state: str,
    code: str,
) -> None:
    built = await build_session(store, state)

    response = await client.post(f"/api/sessions/{built.session_id}/{path}", json=BODIES.get(path))

    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["command_type"] == COMMAND_TYPES[path]
    assert error["message"]
    recorded = await rejections(store, built.session_id)
    assert len(recorded) == 1
    assert recorded[0].data == {
        "command_type": COMMAND_TYPES[path],
        "reason": error["message"],
        "code": code,
    }
    assert await commands_for(js, built.session_id) == []


@pytest.mark.parametrize(
    ("state", "suggestion"),
    [
        ("completed", "create a new session"),
        ("paused", "send continue"),
        ("stopped", "send continue"),
        ("blocked", "send retry-step or skip-step"),
    ],
)
async def test_start_rejection_suggests_working_control(
    client: httpx.AsyncClient, store: EventStore, state: str, suggestion: str
) -> None:
    built = await build_session(store, state)

    response = await client.post(f"/api/sessions/{built.session_id}/start")

    assert response.status_code == 409, response.text
    message = response.json()["error"]["message"]
    assert suggestion in message
    if state == "completed":
        assert "continue" not in message
        assert "run-till-end" not in message


# (REST path, session state, whether the task id is the running task's)
RIGHT_STATES = [
    ("start", "plan_ready", False),
    ("pause", "running", True),
    ("continue", "paused", True),
    ("continue", "stopped", True),
    ("act", "paused", False),
    ("act", "plan_ready", False),
    ("act", "stopped", False),
    ("run-till-end", "plan_ready", False),
    ("run-till-end", "paused", False),
    ("retry-step", "blocked", True),
    ("skip-step", "blocked", True),
    ("task/cancel", "running", True),
    ("task/cancel", "paused", True),
    ("stop", "paused", True),
    ("stop", "running", True),
    ("plan/continue", "completed", False),
]


@pytest.mark.parametrize(("path", "state", "same_task"), RIGHT_STATES)
async def test_control_in_right_state_queues_command(
    client: httpx.AsyncClient,
    store: EventStore,
    js: JetStreamContext,
    path: str,
    state: str,
    same_task: bool,
) -> None:
    built = await build_session(store, state)

    response = await client.post(f"/api/sessions/{built.session_id}/{path}", json=BODIES.get(path))

    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert body["command_type"] == COMMAND_TYPES[path]
    if same_task:
        assert body["task_id"] == built.task_id
    else:
        assert body["task_id"] == body["command_id"]
    queued = await commands_for(js, built.session_id)
    assert len(queued) == 1
    subject, command = queued[0]
    planner = path == "plan/continue"
    expected_subject = (
        subjects.planner_command_subject(COMMAND_TYPES[path])
        if planner
        else subjects.executor_command_subject(COMMAND_TYPES[path])
    )
    assert subject == expected_subject
    assert command.command_id == body["command_id"]
    assert command.type == COMMAND_TYPES[path]
    if "task_id" in command.data:
        assert command.data["task_id"] == body["task_id"]
    if path == "act":
        assert command.data["task"] == "close the cookie banner"
    if path == "plan/continue":
        assert command.data == {"task_prompt": "now check out", "llm_model": "offline"}
    assert await rejections(store, built.session_id) == []


@pytest.mark.parametrize(
    ("path", "action", "state"),
    [("pause", "pause", "running"), ("task/cancel", "cancel", "paused")],
)
async def test_pause_and_cancel_set_control_flag(
    client: httpx.AsyncClient,
    store: EventStore,
    js: JetStreamContext,
    path: str,
    action: str,
    state: str,
) -> None:
    built = await build_session(store, state)

    response = await client.post(f"/api/sessions/{built.session_id}/{path}")

    assert response.status_code == 202, response.text
    bucket = await js.key_value(subjects.CONTROL_BUCKET)
    entry = await bucket.get(built.session_id)
    flag = json.loads(entry.value or b"")
    assert flag["action"] == action
    assert flag["command_id"] == response.json()["command_id"]


async def test_idempotency_key_runs_command_once(
    client: httpx.AsyncClient, store: EventStore, js: JetStreamContext
) -> None:
    built = await build_session(store, "plan_ready")
    url = f"/api/sessions/{built.session_id}/start"

    first = await client.post(url, headers={"Idempotency-Key": "start-once"})
    second = await client.post(url, headers={"Idempotency-Key": "start-once"})
    other = await client.post(url, headers={"Idempotency-Key": "start-twice"})

    assert first.status_code == second.status_code == 202
    assert first.json()["task_id"] == second.json()["task_id"]
    assert first.json()["command_id"] == second.json()["command_id"]
    assert other.json()["task_id"] != first.json()["task_id"]
    queued = [command.command_id for _, command in await commands_for(js, built.session_id)]
    assert queued == [first.json()["command_id"], other.json()["command_id"]]


async def test_idempotency_key_replays_after_work_started(
    client: httpx.AsyncClient, store: EventStore, js: JetStreamContext
) -> None:
    built = await build_session(store, "plan_ready")
    url = f"/api/sessions/{built.session_id}/start"
    first = await client.post(url, headers={"Idempotency-Key": "k1"})
    task_id = first.json()["task_id"]
    # The executor starts the task; the session is now running, so a fresh start is a 409.
    await store.append(
        built.session_id,
        ev.ExecutionStarted(task_id=task_id, from_step=1, total_steps=3),
        command_id=first.json()["command_id"],
    )

    repeated = await client.post(url, headers={"Idempotency-Key": "k1"})
    fresh = await client.post(url)

    assert repeated.status_code == 202, repeated.text
    assert repeated.json()["task_id"] == task_id
    assert fresh.status_code == 409
    assert len(await commands_for(js, built.session_id)) == 1


async def test_idempotency_key_replays_rejection_once(
    client: httpx.AsyncClient, store: EventStore
) -> None:
    built = await build_session(store, "created")
    url = f"/api/sessions/{built.session_id}/start"

    first = await client.post(url, headers={"Idempotency-Key": "early"})
    second = await client.post(url, headers={"Idempotency-Key": "early"})

    assert first.status_code == second.status_code == 409
    assert first.json()["error"]["message"] == second.json()["error"]["message"]
    assert len(await rejections(store, built.session_id)) == 1


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "ключ"])
async def test_invalid_idempotency_key_is_422(
    client: httpx.AsyncClient, store: EventStore, key: str
) -> None:
    built = await build_session(store, "plan_ready")

    response = await client.post(
        f"/api/sessions/{built.session_id}/start", headers={"Idempotency-Key": key.encode()}
    )

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "Idempotency-Key"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("act", {"task": ""}, "task"),
        ("act", {}, "task"),
        ("act", {"task": "x\x1b[2J"}, "task"),
        ("act", {"task": "ok", "previous_context": "\x00"}, "previous_context"),
        ("plan/continue", {"task_prompt": " "}, "task_prompt"),
    ],
)
async def test_control_body_is_validated(
    client: httpx.AsyncClient, store: EventStore, path: str, body: dict[str, str], field: str
) -> None:
    built = await build_session(store, "paused")

    response = await client.post(f"/api/sessions/{built.session_id}/{path}", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


async def test_empty_act_asks_for_one_instruction(
    client: httpx.AsyncClient, store: EventStore
) -> None:
    built = await build_session(store, "paused")

    response = await client.post(f"/api/sessions/{built.session_id}/act", json={"task": " "})

    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.startswith("task must not be empty; write one instruction")
    assert "step" not in message


async def test_task_status_reports_current_task(
    client: httpx.AsyncClient, store: EventStore
) -> None:
    built = await build_session(store, "blocked")

    response = await client.get(f"/api/sessions/{built.session_id}/task/status")
    by_id = await client.get(
        f"/api/sessions/{built.session_id}/task/status", params={"task_id": built.plan_id}
    )
    missing = await client.get(
        f"/api/sessions/{built.session_id}/task/status", params={"task_id": "nope"}
    )

    assert response.status_code == 200
    assert response.json() == {
        "task_id": built.task_id,
        "task_type": "run_till_end",
        "status": "running",
        "progress": "paused at failed step 1",
        "error": None,
        "session_status": "paused",
    }
    assert by_id.json()["task_type"] == "plan_generation"
    assert by_id.json()["status"] == "completed"
    assert missing.status_code == 404


async def test_continue_clears_pause_flag(
    client: httpx.AsyncClient, store: EventStore, js: JetStreamContext
) -> None:
    built = await build_session(store, "running")
    bucket = await js.key_value(subjects.CONTROL_BUCKET)
    paused = await client.post(f"/api/sessions/{built.session_id}/pause")
    flagged = await bucket.get(built.session_id)
    await store.append(built.session_id, ev.ExecutionPaused(task_id=built.task_id, after_step=1))

    resumed = await client.post(f"/api/sessions/{built.session_id}/continue")

    assert paused.status_code == resumed.status_code == 202
    assert json.loads(flagged.value or b"")["action"] == "pause"
    with pytest.raises(KeyValueError):
        await bucket.get(built.session_id)


async def test_cancel_flag_survives_continue_attempt(
    client: httpx.AsyncClient, store: EventStore, js: JetStreamContext
) -> None:
    built = await build_session(store, "paused")
    bucket = await js.key_value(subjects.CONTROL_BUCKET)

    cancelled = await client.post(f"/api/sessions/{built.session_id}/task/cancel")
    await store.append(built.session_id, ev.ExecutionCancelled(task_id=built.task_id))
    rejected = await client.post(f"/api/sessions/{built.session_id}/continue")

    assert cancelled.status_code == 202
    assert rejected.status_code == 409
    assert json.loads((await bucket.get(built.session_id)).value or b"")["action"] == "cancel"
