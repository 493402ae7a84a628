"""Plan execution in a real headless Chromium against the bundled sample site."""

from __future__ import annotations

from nats.aio.client import Client as NATS
from stepwise_executor.browser import session_processes
from stepwise_executor.session import LiveSession
from stepwise_executor.settings import ExecutorSettings
from stepwise_libs import subjects
from stepwise_libs.events import Event
from stepwise_libs.jetstream import EventStore

from stepwise.sample_site import SampleSite, sample_test_case

from .conftest import create_planned_session

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


async def run_plan(
    nats_client: NATS,
    settings: ExecutorSettings,
    test_case: str,
    target_url: str,
    model: str = "offline",
) -> tuple[LiveSession, list[Event]]:
    """Run a plan in-process to its end and return the live session and the session's events."""
    js = nats_client.jetstream()
    store = EventStore(js)
    state = await create_planned_session(store, test_case, target_url, model)
    live = LiveSession(js, store, settings, state)
    live.start_execution("task-1", "command-1", "execution")
    assert live.task is not None
    await live.task
    return live, await store.read(state.session_id)


async def test_checkout_passes_every_step(
    nats_client: NATS, sample_site: SampleSite, make_settings
) -> None:
    live, events = await run_plan(
        nats_client, make_settings(), sample_test_case("checkout"), sample_site.base_url
    )
    types = [event.type for event in events]
    failures = [event.data for event in events if event.type == "step_failed"]
    assert failures == []
    assert types.count("step_completed") == 16
    assert types[-2:] == ["execution_completed", "browser_closed"]
    completed = events[types.index("execution_completed")].data
    assert completed["success"] is True
    assert completed["passed"] == 16
    assert all(event.command_id == "command-1" for event in events[3:])

    store = await nats_client.jetstream().object_store(subjects.SCREENSHOTS_BUCKET)
    for event in events:
        if event.type != "step_completed":
            continue
        names = event.data["screenshots"]
        assert len(names) >= 1
        stored = await store.get(names[0])
        assert stored.data is not None
        assert stored.data.startswith(PNG_SIGNATURE)
    actions = [event.data["action"]["name"] for event in events if event.type == "action_executed"]
    assert {"navigate", "input", "click", "select_dropdown"} <= set(actions)
    assert session_processes(live.browser.folder) == []
    assert not live.browser.folder.exists()


async def test_missing_text_fails_step(
    nats_client: NATS, sample_site: SampleSite, make_settings
) -> None:
    live, events = await run_plan(
        nats_client, make_settings(), sample_test_case("failing"), sample_site.base_url
    )
    types = [event.type for event in events]
    assert types.count("step_completed") == 5
    failed = [event.data for event in events if event.type == "step_failed"]
    assert len(failed) == 1
    assert failed[0]["step_number"] == 6
    assert failed[0]["category"] == "check_failed"
    assert 'Text "Free shipping on every order" was not found on the page' in failed[0]["error"]
    assert types[-2:] == ["execution_failed", "browser_closed"]
    assert events[types.index("execution_failed")].data["failed_step"] == 6
    assert session_processes(live.browser.folder) == []
