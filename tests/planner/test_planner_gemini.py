"""The Gemini plan model through the real google-genai client against the fake Gemini server.

The planner's handler runs in this process on the real NATS server; only the
Gemini HTTP API is fake.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from fakes.gemini import FakeGemini, RecordedRequest
from planner_helpers import create_session
from stepwise_libs.commands import ContinuePlan, GeneratePlan, new_command
from stepwise_libs.events import Event, PlanCompleted, PlanStarted
from stepwise_libs.jetstream import EventStore
from stepwise_planner.handlers import PlannerService
from stepwise_planner.settings import PlannerSettings, RetrySettings

MODEL = "gemini-2.5-flash"
LOGIN_PLAN = {
    "steps": [
        {"description": "Open the login page"},
        {"description": "1. type 'standard_user' into the 'Username' field"},
        {"description": 'Click "Login"'},
        {"description": "Make sure the product grid looks right"},
    ],
    "unparsed": [],
}


def make_service(store: EventStore, fake: FakeGemini, **retry: float) -> PlannerService:
    settings = PlannerSettings(
        gemini_api_key="test-key",
        gemini_base_url=fake.base_url,
        retry=replace(
            RetrySettings(base_seconds=0.01, call_timeout_seconds=5.0),
            **retry,  # type: ignore[arg-type]
        ),
    )
    return PlannerService(store, settings)


async def run_plan(
    store: EventStore, service: PlannerService, test_case: str = "Log in as standard_user"
) -> tuple[str, str, list[Event]]:
    session_id = await create_session(store, test_case, llm_model=MODEL)
    command = new_command(
        session_id,
        GeneratePlan(test_case=test_case, target_url="http://127.0.0.1:9/", llm_model=MODEL),
    )

    await service.process(command, command.body())

    return session_id, command.command_id, await store.read(session_id)


def of_type(events: list[Event], event_type: str) -> list[Event]:
    return [event for event in events if event.type == event_type]


async def test_gemini_plan_uses_schema(store: EventStore, fake_gemini: FakeGemini) -> None:
    fake_gemini.reply_json(LOGIN_PLAN)
    service = make_service(store, fake_gemini)

    session_id, command_id, events = await run_plan(store, service)

    # The real client sent the prompt and a JSON schema of a list of step descriptions.
    (request,) = fake_gemini.requests
    assert request.path == f"/v1beta/models/{MODEL}:generateContent"
    assert request.headers["x-goog-api-key"] == "test-key"
    config = request.generation_config
    assert config["responseMimeType"] == "application/json"
    schema = config["responseSchema"]
    assert schema["type"] == "OBJECT"
    assert schema["required"] == ["steps"]
    assert schema["properties"]["steps"]["type"] == "ARRAY"
    assert schema["properties"]["steps"]["items"]["properties"]["description"]["type"] == "STRING"
    assert "Log in as standard_user" in request.prompt_text
    assert 'Type "standard_user" into "Username"' in request.prompt_text  # the phrase forms

    # The plan from the fake's JSON lands in plan_completed, in the canonical forms.
    assert [event.type for event in events] == [
        "session_created",
        "plan_started",
        "plan_progress",
        "plan_completed",
    ]
    assert all(event.command_id == command_id for event in events[1:])
    started = events[1].payload()
    assert isinstance(started, PlanStarted)
    assert started.model == MODEL
    assert started.plan_id == command_id
    assert MODEL in events[2].data["message"]
    completed = events[3].payload()
    assert isinstance(completed, PlanCompleted)
    assert completed.plan_id == command_id
    assert [(step.number, step.description) for step in completed.steps] == [
        (1, "Open the login page"),
        (2, 'Type "standard_user" into "Username"'),
        (3, 'Click "Login"'),
        (4, "Make sure the product grid looks right"),
    ]
    assert "4. Make sure the product grid looks right" in completed.plan_text
    await service.drain(1)
    assert session_id


async def test_gemini_retries_503_twice(store: EventStore, fake_gemini: FakeGemini) -> None:
    fake_gemini.reply_status(503, times=2).reply_json(LOGIN_PLAN)
    service = make_service(store, fake_gemini)

    _, _, events = await run_plan(store, service)

    assert len(fake_gemini.requests) == 3
    progress = of_type(events, "plan_progress")
    retries = [event for event in progress if "retry" in event.data["message"]]
    assert len(retries) == 2
    assert [event.data["attempt"] for event in retries] == [2, 3]
    assert "HTTP 503 UNAVAILABLE" in retries[0].data["message"]
    assert "retry 1 of 3" in retries[0].data["message"]
    assert "retry 2 of 3" in retries[1].data["message"]
    assert events[-1].type == "plan_completed"
    assert len(events[-1].data["steps"]) == 4
    await service.drain(1)


async def test_gemini_always_503_fails(store: EventStore, fake_gemini: FakeGemini) -> None:
    fake_gemini.always_status(503)
    service = make_service(store, fake_gemini)

    _, command_id, events = await run_plan(store, service)

    assert len(fake_gemini.requests) == 4  # the first call and 3 retries
    retries = [e for e in of_type(events, "plan_progress") if "retry" in e.data["message"]]
    assert len(retries) == 3
    assert events[-1].type == "plan_failed"
    assert events[-1].command_id == command_id
    assert events[-1].data["category"] == "model_unavailable"
    assert "4 calls failed" in events[-1].data["error"]
    assert "503" in events[-1].data["error"]
    assert of_type(events, "plan_completed") == []
    await service.drain(1)


@pytest.mark.parametrize("status", [429, 500])
async def test_gemini_retries_other_transient(
    store: EventStore, fake_gemini: FakeGemini, status: int
) -> None:
    fake_gemini.reply_status(status).reply_json(LOGIN_PLAN)
    service = make_service(store, fake_gemini)

    _, _, events = await run_plan(store, service)

    assert len(fake_gemini.requests) == 2
    assert f"HTTP {status}" in of_type(events, "plan_progress")[-1].data["message"]
    assert events[-1].type == "plan_completed"
    await service.drain(1)


async def test_gemini_timeout_is_retried(store: EventStore, fake_gemini: FakeGemini) -> None:
    fake_gemini.reply_json(LOGIN_PLAN, delay_seconds=2.0).reply_json(LOGIN_PLAN)
    service = make_service(store, fake_gemini, call_timeout_seconds=0.5)

    _, _, events = await run_plan(store, service)

    assert len(fake_gemini.requests) == 2
    assert "timed out" in of_type(events, "plan_progress")[-1].data["message"]
    assert events[-1].type == "plan_completed"
    await service.drain(1)


async def test_gemini_client_error_not_retried(store: EventStore, fake_gemini: FakeGemini) -> None:
    fake_gemini.reply_status(404, "models/gemini-9 is not found")
    service = make_service(store, fake_gemini)

    _, _, events = await run_plan(store, service)

    assert len(fake_gemini.requests) == 1
    assert events[-1].type == "plan_failed"
    assert events[-1].data["category"] == "model_error"
    assert "HTTP 404" in events[-1].data["error"]
    await service.drain(1)


async def test_gemini_invalid_json_fails(store: EventStore, fake_gemini: FakeGemini) -> None:
    fake_gemini.reply_text("Sure! Here is your plan: step 1 ...")
    fake_gemini.reply_json({"steps": "not a list"})
    fake_gemini.reply_json({"plan": []})
    service = make_service(store, fake_gemini)

    _, _, events = await run_plan(store, service)

    assert len(fake_gemini.requests) == 3  # budget of 2 invalid outputs, then fail
    invalid = [e for e in of_type(events, "plan_progress") if "invalid" in e.data["message"]]
    assert len(invalid) == 2
    assert events[-1].type == "plan_failed"
    assert events[-1].data["category"] == "invalid_model_output"
    assert "3 times" in events[-1].data["error"]
    assert of_type(events, "plan_completed") == []
    await service.drain(1)


async def test_gemini_invalid_then_valid(store: EventStore, fake_gemini: FakeGemini) -> None:
    fake_gemini.reply_text('{"steps": [')
    fake_gemini.reply_json(LOGIN_PLAN)
    service = make_service(store, fake_gemini)

    _, _, events = await run_plan(store, service)

    assert len(fake_gemini.requests) == 2
    assert events[-1].type == "plan_completed"
    await service.drain(1)


async def test_redelivery_does_not_duplicate(store: EventStore, fake_gemini: FakeGemini) -> None:
    fake_gemini.reply_json(LOGIN_PLAN)
    service = make_service(store, fake_gemini)
    session_id, command_id, first = await run_plan(store, service)
    command = new_command(
        session_id,
        GeneratePlan(test_case="x", target_url="http://127.0.0.1:9/", llm_model=MODEL),
        command_id=command_id,
    )

    await service.process(command, command.body())

    assert await store.read(session_id) == first
    assert len(fake_gemini.requests) == 1
    await service.drain(1)


async def test_half_done_plan_is_finished(store: EventStore, fake_gemini: FakeGemini) -> None:
    fake_gemini.reply_json(LOGIN_PLAN)
    service = make_service(store, fake_gemini)
    session_id = await create_session(store, "Log in", llm_model=MODEL)
    command = new_command(
        session_id, GeneratePlan(test_case="Log in", target_url="http://x/", llm_model=MODEL)
    )
    # A planner that died after plan_started left this behind.
    await store.append(
        session_id,
        PlanStarted(plan_id=command.command_id, model=MODEL),
        command_id=command.command_id,
    )

    await service.process(command, command.body())

    events = await store.read(session_id)
    assert [event.type for event in events] == [
        "session_created",
        "plan_started",
        "plan_progress",
        "plan_completed",
    ]
    assert events[-1].data["plan_id"] == command.command_id
    await service.drain(1)


async def test_continuation_sends_existing_steps(
    store: EventStore, fake_gemini: FakeGemini
) -> None:
    fake_gemini.reply_json(LOGIN_PLAN)

    def continuation(request: RecordedRequest) -> dict[str, object]:
        assert '3. Click "Login"' in request.prompt_text
        assert "now check out" in request.prompt_text
        return {"steps": [{"description": "click on the 'Checkout' button"}]}

    fake_gemini.reply_with(continuation)
    service = make_service(store, fake_gemini)
    session_id, _, _ = await run_plan(store, service)
    command = new_command(session_id, ContinuePlan(task_prompt="now check out", llm_model=MODEL))

    await service.process(command, command.body())

    events = await store.read(session_id)
    assert len(fake_gemini.requests) == 2
    assert fake_gemini.unscripted == []
    started = events[-3].payload()
    assert isinstance(started, PlanStarted)
    assert started.kind == "continuation"
    assert started.prompt == "now check out"
    completed = events[-1].payload()
    assert isinstance(completed, PlanCompleted)
    assert completed.kind == "continuation"
    assert [(step.number, step.description) for step in completed.steps] == [
        (1, 'Click "Checkout"')
    ]
    assert '5. Click "Checkout"' in completed.plan_text
    assert json.dumps(events[-1].data)  # the event body is plain JSON
    await service.drain(1)


@pytest.mark.parametrize(
    ("model", "category", "text"),
    [
        ("gemini-2.5-flash", "configuration", "GEMINI_API_KEY"),
        ("gpt-4o", "unsupported_model", "Unsupported model 'gpt-4o'"),
    ],
)
async def test_unusable_model_fails_plan(
    store: EventStore, model: str, category: str, text: str
) -> None:
    service = PlannerService(store, PlannerSettings(gemini_api_key=None))
    session_id = await create_session(store, 'Click "Login"', llm_model=model)
    command = new_command(
        session_id, GeneratePlan(test_case='Click "Login"', target_url="http://x/", llm_model=model)
    )

    await service.process(command, command.body())

    events = await store.read(session_id)
    assert [event.type for event in events] == ["session_created", "plan_started", "plan_failed"]
    assert events[-1].data["category"] == category
    assert text in events[-1].data["error"]
    await service.drain(1)
