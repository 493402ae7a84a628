"""What an executor records when a session's browser is lost with its owner."""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client as NATS
from stepwise_executor.handlers import ExecutorService
from stepwise_executor.settings import ExecutorSettings
from stepwise_libs import events as ev
from stepwise_libs.fold import fold
from stepwise_libs.jetstream import EventStore, ensure_topology

from .conftest import create_planned_session

TEST_CASE = '1. Open the login page\n2. Type "standard_user" into "Username"'


async def _started(store: EventStore) -> str:
    state = await create_planned_session(store, TEST_CASE, "http://127.0.0.1:9/")
    await store.append(
        state.session_id, ev.ExecutionStarted(task_id="run", from_step=1, total_steps=2)
    )
    return state.session_id


async def test_lost_browser_of_ended_run_keeps_status(
    nats_client: NATS, make_settings: Callable[..., ExecutorSettings]
) -> None:
    js = nats_client.jetstream()
    await ensure_topology(js)
    store = EventStore(js)
    service = ExecutorService(nats_client, js, store, make_settings())
    session_id = await _started(store)
    for number in (1, 2):
        await store.append(session_id, ev.StepCompleted(task_id="run", step_number=number))
    await store.append(
        session_id,
        ev.ExecutionCompleted(task_id="run", passed=2, failed=0, skipped=0, total=2, success=True),
    )
    before = fold(session_id, await store.read(session_id))
    assert before.status == "completed"
    assert before.browser_open

    # The owner died between execution_completed and browser_closed.
    recorded = await service._record_lost_browser(before, "executor-gone", "lease expired")

    assert recorded == "browser_closed"
    events = await store.read(session_id)
    assert events[-1].type == "browser_closed"
    after = fold(session_id, events)
    assert after.status == "completed"
    assert not after.browser_open


async def test_lost_browser_of_running_session_interrupts(
    nats_client: NATS, make_settings: Callable[..., ExecutorSettings]
) -> None:
    js = nats_client.jetstream()
    await ensure_topology(js)
    store = EventStore(js)
    service = ExecutorService(nats_client, js, store, make_settings())
    session_id = await _started(store)
    await store.append(session_id, ev.StepCompleted(task_id="run", step_number=1))
    before = fold(session_id, await store.read(session_id))
    assert before.status == "running"

    recorded = await service._record_lost_browser(before, "executor-gone", "lease expired")

    assert recorded == "session_interrupted"
    events = await store.read(session_id)
    assert events[-1].type == "session_interrupted"
    assert events[-1].data["executor_id"] == "executor-gone"
    assert events[-1].data["last_completed_step"] == 1
    assert fold(session_id, events).status == "interrupted"


async def test_unrecorded_work_interrupts_planned_session(
    nats_client: NATS, make_settings: Callable[..., ExecutorSettings]
) -> None:
    js = nats_client.jetstream()
    await ensure_topology(js)
    store = EventStore(js)
    service = ExecutorService(nats_client, js, store, make_settings())
    state = await create_planned_session(store, TEST_CASE, "http://127.0.0.1:9/")
    assert state.status == "plan_ready"

    # A start command was accepted, then the executor stopped before execution_started.
    recorded = await service._record_lost_browser(
        state, "executor-stopping", "executor shut down", interrupted=True
    )

    assert recorded == "session_interrupted"
    events = await store.read(state.session_id)
    assert fold(state.session_id, events).status == "interrupted"
