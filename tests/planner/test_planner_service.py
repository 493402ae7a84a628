"""The planner as its own process (`stepwise-planner`) on the real NATS server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable

from fakes.gemini import FakeGemini, RecordedRequest, Reply
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from planner_helpers import (
    PLANNER_SCRIPT,
    PlannerProcess,
    create_session,
    is_plan_end,
    wait_for_event,
)
from stepwise_libs import subjects
from stepwise_libs.commands import ContinuePlan, GeneratePlan, encode_command, new_command
from stepwise_libs.events import Event
from stepwise_libs.jetstream import EventStore, publish_command

from stepwise.embedded import EmbeddedNats

CHECKOUT = """\
1. Open the login page
2. Type "standard_user" into "Username"
3. Type "secret_sauce" into "Password"
4. Click "Login"
5. Admire the products
6. Check that the page shows "Products"
"""

PLAN_EVENTS = ["session_created", "plan_started", "plan_progress", "plan_completed"]


def types_of(events: list[Event]) -> list[str]:
    return [event.type for event in events]


async def publish_plan(nats_client: NATS, session_id: str, test_case: str, model: str) -> str:
    # The target URL names the session, so a fake Gemini can tell this test's requests apart.
    target_url = f"http://127.0.0.1:9/shop-{session_id}/"
    command = new_command(
        session_id, GeneratePlan(test_case=test_case, target_url=target_url, llm_model=model)
    )
    await publish_command(
        nats_client.jetstream(), subjects.planner_command_subject("generate_plan"), command
    )
    return command.command_id


async def test_offline_plan_through_process(
    nats_client: NATS, store: EventStore, start_planner: Callable[..., PlannerProcess]
) -> None:
    planner = start_planner()
    session_id = await create_session(store, CHECKOUT)

    command_id = await publish_plan(nats_client, session_id, CHECKOUT, "offline")
    events = await wait_for_event(store, session_id, is_plan_end)

    assert types_of(events) == [
        "session_created",
        "plan_started",
        "plan_progress",
        "plan_completed",
    ]
    assert [event.seq for event in events] == [1, 2, 3, 4]
    assert all(event.command_id == command_id for event in events[1:])
    completed = events[-1].data
    assert completed["plan_id"] == command_id
    assert completed["kind"] == "initial"
    assert [step["description"] for step in completed["steps"]] == [
        "Open the login page",
        'Type "standard_user" into "Username"',
        'Type "secret_sauce" into "Password"',
        'Click "Login"',
        'Check that the page shows "Products"',
    ]
    assert [step["number"] for step in completed["steps"]] == [1, 2, 3, 4, 5]
    assert completed["unparsed"] == ["Admire the products"]
    assert "Admire the products" in completed["plan_text"]
    assert "plan completed" in planner.wait_for_log("plan completed")


async def test_nothing_understood_fails_plan(
    nats_client: NATS, store: EventStore, start_planner: Callable[..., PlannerProcess]
) -> None:
    start_planner()
    session_id = await create_session(store, "Buy a nice hat")

    await publish_plan(nats_client, session_id, "Buy a nice hat", "offline")
    events = await wait_for_event(store, session_id, is_plan_end)

    assert events[-1].type == "plan_failed"
    assert events[-1].data["category"] == "no_steps"
    assert "'Buy a nice hat'" in events[-1].data["error"]
    assert 'Click "Login"' in events[-1].data["error"]


async def test_redelivered_command_is_acked_once(
    nats_client: NATS, store: EventStore, start_planner: Callable[..., PlannerProcess]
) -> None:
    planner = start_planner()
    session_id = await create_session(store, CHECKOUT)
    command = new_command(
        session_id, GeneratePlan(test_case=CHECKOUT, target_url="http://x/", llm_model="offline")
    )
    js = nats_client.jetstream()

    async def publish_copy() -> None:
        # Each copy gets its own Nats-Msg-Id, as a publisher retrying past the duplicate
        # window would send it, so JetStream stores and delivers every copy.
        await js.publish(
            subjects.planner_command_subject("generate_plan"),
            encode_command(command),
            headers={"Nats-Msg-Id": str(uuid.uuid4())},
        )

    # Two copies at once: the second arrives while the first runs or right after it.
    await publish_copy()
    await publish_copy()
    await wait_for_event(store, session_id, is_plan_end)
    await wait_until_consumed(js)
    # A third copy after the plan ended is only acknowledged.
    await publish_copy()
    planner.wait_for_log("command already handled")
    await wait_until_consumed(js)

    events = await store.read(session_id)
    assert types_of(events) == PLAN_EVENTS


async def wait_until_consumed(js: JetStreamContext, within: float = 20.0) -> None:
    """Wait until the planner consumer has no message pending or awaiting its ack."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        info = await js.consumer_info(subjects.COMMANDS_STREAM, subjects.PLANNER_CONSUMER)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"planner consumer still has {info.num_pending} pending and "
                f"{info.num_ack_pending} unacknowledged messages after {within} s"
            )
        await asyncio.sleep(0.1)


async def test_continue_plan_appends_steps(
    nats_client: NATS, store: EventStore, start_planner: Callable[..., PlannerProcess]
) -> None:
    start_planner()
    session_id = await create_session(store, CHECKOUT)
    await publish_plan(nats_client, session_id, CHECKOUT, "offline")
    await wait_for_event(store, session_id, is_plan_end)
    command = new_command(
        session_id,
        ContinuePlan(task_prompt='Click "Add Backpack to cart", then click "Cart"', llm_model=""),
    )

    await publish_command(
        nats_client.jetstream(), subjects.planner_command_subject("continue_plan"), command
    )
    events = await wait_for_event(
        store, session_id, lambda e: is_plan_end(e) and e.command_id == command.command_id
    )

    continuation = events[-1].data
    assert events[-1].type == "plan_completed"
    assert continuation["kind"] == "continuation"
    assert [(s["number"], s["description"]) for s in continuation["steps"]] == [
        (1, 'Click "Add Backpack to cart"'),
        (2, 'Click "Cart"'),
    ]
    assert '6. Click "Add Backpack to cart"' in continuation["plan_text"]
    started = [e for e in events if e.type == "plan_started" and e.command_id == command.command_id]
    assert started[0].data["kind"] == "continuation"
    assert started[0].data["model"] == "offline"  # the session's model when the command names none


async def test_continue_without_plan_rejected(
    nats_client: NATS, store: EventStore, start_planner: Callable[..., PlannerProcess]
) -> None:
    start_planner()
    session_id = await create_session(store, CHECKOUT)
    command = new_command(session_id, ContinuePlan(task_prompt='Click "Cart"', llm_model="offline"))

    await publish_command(
        nats_client.jetstream(), subjects.planner_command_subject("continue_plan"), command
    )
    events = await wait_for_event(store, session_id, is_plan_end)

    assert types_of(events) == ["session_created", "command_rejected"]
    assert events[-1].command_id == command.command_id
    assert events[-1].data["command_type"] == "continue_plan"
    assert events[-1].data["code"] == "invalid_state"
    assert "no plan to continue" in events[-1].data["reason"]


async def test_gemini_retries_through_process(
    nats_client: NATS,
    store: EventStore,
    start_planner: Callable[..., PlannerProcess],
    fake_gemini: FakeGemini,
) -> None:
    session_id = await create_session(store, "Log in", llm_model="gemini-2.5-flash")
    calls: list[RecordedRequest] = []

    def answer(request: RecordedRequest) -> object:
        # Only this test's session gets scripted responses, whatever else the planner consumes.
        if session_id not in request.prompt_text:
            return Reply.error(400, "not this test's session")
        calls.append(request)
        if len(calls) <= 2:
            return Reply.error(503)
        return {"steps": [{"description": "click the 'Login' button"}]}

    fake_gemini.default = answer
    start_planner(
        GEMINI_API_KEY="test-key",
        STEPWISE_GEMINI_BASE_URL=fake_gemini.base_url,
        STEPWISE_RETRY_BASE_SECONDS="0.05",
    )

    command_id = await publish_plan(nats_client, session_id, "Log in", "gemini-2.5-flash")
    events = await wait_for_event(store, session_id, is_plan_end)

    assert len(calls) == 3
    assert calls[0].path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert calls[0].generation_config["responseSchema"]["properties"]["steps"]["type"] == "ARRAY"
    progress = [e.data for e in events if e.type == "plan_progress"]
    assert [p["attempt"] for p in progress] == [1, 2, 3]
    assert "503" in progress[1]["message"]
    assert events[-1].type == "plan_completed"
    assert events[-1].command_id == command_id
    assert events[-1].data["steps"] == [{"number": 1, "description": 'Click "Login"'}]


async def test_killed_planner_plan_is_resumed(
    nats_client: NATS,
    store: EventStore,
    start_planner: Callable[..., PlannerProcess],
    fake_gemini: FakeGemini,
) -> None:
    session_id = await create_session(store, "Log in", llm_model="gemini-2.5-flash")
    calls: list[RecordedRequest] = []

    def answer(request: RecordedRequest) -> object:
        if session_id not in request.prompt_text:
            return Reply.error(400, "not this test's session")
        calls.append(request)
        plan = {"steps": [{"description": 'Click "Login"'}]}
        # The first planner is killed while it waits for this slow response.
        return Reply.json(plan, delay_seconds=10.0 if len(calls) == 1 else 0.0)

    fake_gemini.default = answer
    env = {
        "GEMINI_API_KEY": "test-key",
        "STEPWISE_GEMINI_BASE_URL": fake_gemini.base_url,
        "STEPWISE_PLANNER_ACK_WAIT_SECONDS": "2",
        "STEPWISE_MODEL_TIMEOUT": "30",
    }
    first = start_planner(**env)
    await publish_plan(nats_client, session_id, "Log in", "gemini-2.5-flash")
    await fake_gemini.await_requests(1, within=20)
    await wait_for_event(store, session_id, lambda e: e.type == "plan_progress")

    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    second = start_planner(**env)
    events = await wait_for_event(store, session_id, is_plan_end, within=30)

    assert types_of(events).count("plan_started") == 1
    assert events[-1].type == "plan_completed"
    assert len(calls) == 2
    assert "resuming a plan started before" in second.wait_for_log("resuming")


async def test_sigterm_stops_cleanly(start_planner: Callable[..., PlannerProcess]) -> None:
    planner = start_planner()

    code = planner.stop()

    assert code == 0
    assert "service stopped" in planner.wait_for_log("service stopped", timeout=5)


async def test_plans_run_concurrently(
    nats_client: NATS,
    store: EventStore,
    start_planner: Callable[..., PlannerProcess],
    fake_gemini: FakeGemini,
) -> None:
    sessions = [
        await create_session(store, "Log in", llm_model="gemini-2.5-flash") for _ in range(3)
    ]
    # Each call waits until all three are in flight, which a planner that handles one
    # command at a time never reaches.
    all_in_flight = threading.Barrier(3, timeout=15)

    def answer(request: RecordedRequest) -> object:
        if not any(session_id in request.prompt_text for session_id in sessions):
            return Reply.error(400, "not this test's session")
        try:
            all_in_flight.wait()
        except threading.BrokenBarrierError:
            return Reply.error(400, "the three plans did not run at the same time")
        return {"steps": [{"description": 'Click "Login"'}]}

    fake_gemini.default = answer
    start_planner(
        GEMINI_API_KEY="test-key",
        STEPWISE_GEMINI_BASE_URL=fake_gemini.base_url,
        STEPWISE_PLANNER_CONCURRENCY="3",
    )

    for session_id in sessions:
        await publish_plan(nats_client, session_id, "Log in", "gemini-2.5-flash")
    ends = [await wait_for_event(store, session_id, is_plan_end) for session_id in sessions]

    for events in ends:
        assert events[-1].type == "plan_completed", events[-1].data


def test_bad_setting_fails_at_start(nats_server: EmbeddedNats) -> None:
    environment = {**os.environ, "STEPWISE_NATS_URL": nats_server.url}
    environment["STEPWISE_PLANNER_CONCURRENCY"] = "many"

    result = subprocess.run(
        [str(PLANNER_SCRIPT)], env=environment, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 2
    assert "STEPWISE_PLANNER_CONCURRENCY='many'" in result.stderr
    assert "expected an integer" in result.stderr
