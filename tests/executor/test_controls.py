"""Pause, continue, act, run till end, stop-all and owner loss across three executor processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator

import psutil
import pytest
from nats.aio.client import Client as NATS
from nats.js.kv import KV_DEL, KV_PURGE
from stepwise_libs import commands as cmd
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.events import Event
from stepwise_libs.fold import fold
from stepwise_libs.jetstream import EventStore, publish_command

from stepwise.embedded import EmbeddedNats
from stepwise.sample_site import SampleSite

from .conftest import create_planned_session
from .test_service import EXECUTOR, ExecutorProcess, wait_for_event


@pytest.fixture(scope="module")
def cluster(
    nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ExecutorProcess]]:
    """Three executor processes sharing one NATS server and one STEPWISE_HOME."""
    base = tmp_path_factory.mktemp("cluster")
    home = base / "home"
    executors: dict[str, ExecutorProcess] = {}
    for name in ("a", "b", "c"):
        executor_id = f"ex-{name}-{uuid.uuid4().hex[:6]}"
        env = dict(os.environ)
        env.update(
            STEPWISE_NATS_URL=nats_server.url,
            STEPWISE_HOME=str(home),
            STEPWISE_EXECUTOR_ID=executor_id,
            STEPWISE_STEP_TIMEOUT="60",
            # The sample site, the only site these tests serve, listens on 127.0.0.1.
            STEPWISE_ALLOWED_HOSTS="127.0.0.1",
        )
        env.pop("GEMINI_API_KEY", None)
        env.pop("GOOGLE_API_KEY", None)
        log_path = base / f"{executor_id}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen([EXECUTOR], env=env, stdout=log, stderr=subprocess.STDOUT)
        executors[executor_id] = ExecutorProcess(process, log_path, home)
    try:
        for executor in executors.values():
            executor.wait_ready()
        yield executors
    finally:
        for executor in executors.values():
            executor.stop()


async def send(nats_client: NATS, session_id: str, body: cmd.CommandBody) -> cmd.Command:
    command = cmd.new_command(session_id, body)
    await publish_command(
        nats_client.jetstream(), subjects.executor_command_subject(command.type), command
    )
    return command


async def owner_of(nats_client: NATS, session_id: str) -> str:
    leases = await nats_client.jetstream().key_value(subjects.LEASES_BUCKET)
    entry = await leases.get(session_id)
    assert entry.value
    return entry.value.decode()


def step_started(number: int):
    return lambda event: event.data["step_number"] == number


def types_of(events: list[Event]) -> list[str]:
    return [event.type for event in events]


async def wait_for_lease_release(nats_client: NATS, session_id: str, within: float) -> None:
    """Wait until no executor holds the session's lease, which it drops once its task ended."""
    leases = await nats_client.jetstream().key_value(subjects.LEASES_BUCKET)
    watcher = await leases.watch(session_id)
    lease_held = False

    async def follow() -> None:
        nonlocal lease_held
        async for entry in watcher:
            if entry is None:
                if not lease_held:
                    return
            elif entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                return
            else:
                lease_held = True

    try:
        await asyncio.wait_for(follow(), timeout=within)
    except TimeoutError:
        raise AssertionError(
            f"the lease on session {session_id} was held after {within} s"
        ) from None
    finally:
        await watcher.stop()


LOGIN = '1. Open the login page\n2. Type "standard_user" into "Username"\n3. Type "secret_sauce" into "Password"\n4. Click "Login"\n5. Check that the page shows "Products"'


async def test_pause_then_continue_same_browser(
    cluster: dict[str, ExecutorProcess], nats_client: NATS, sample_site: SampleSite
) -> None:
    store = EventStore(nats_client.jetstream())
    state = await create_planned_session(store, LOGIN, sample_site.base_url)
    sid = state.session_id
    await send(nats_client, sid, cmd.ExecutePlan(task_id="run-1"))
    await wait_for_event(store, sid, "step_started", within=120, match=step_started(2))
    pause = await send(nats_client, sid, cmd.PauseExecution())
    events = await wait_for_event(store, sid, "execution_paused", within=60)
    paused = events[-1]
    assert paused.command_id == pause.command_id
    after_step = paused.data["after_step"]
    assert after_step in (2, 3)
    owner = await owner_of(nats_client, sid)
    chromium = psutil.Process(cluster[owner].process.pid).children(recursive=True)
    assert chromium, "the paused session's browser is not running"
    assert fold(sid, await store.read(sid)).status == "paused"

    resume = await send(nats_client, sid, cmd.ContinueExecution(task_id="run-1"))
    events = await wait_for_event(store, sid, "browser_closed", within=120)
    types = types_of(events)
    resumed = events[types.index("execution_resumed")]
    assert resumed.command_id == resume.command_id
    assert resumed.data["from_step"] == after_step + 1
    assert types.count("step_completed") == 5
    assert "step_failed" not in types
    assert events[types.index("execution_completed")].data["success"] is True
    # The steps after the pause typed into and submitted the page opened before it, so
    # they ran in the same browser: a fresh one would start on a blank page.
    _, alive = psutil.wait_procs(chromium, timeout=10)
    assert alive == []


async def test_act_mode_starts_browser_and_stop_all(
    cluster: dict[str, ExecutorProcess], nats_client: NATS, sample_site: SampleSite
) -> None:
    store = EventStore(nats_client.jetstream())
    state = await create_planned_session(store, LOGIN, sample_site.base_url)
    sid = state.session_id
    first = await send(nats_client, sid, cmd.Act(task_id="act-1", task="Open the login page"))
    events = await wait_for_event(store, sid, "act_mode_completed", within=120)
    completed = events[-1]
    assert completed.command_id == first.command_id
    assert completed.data["screenshot"] == subjects.screenshot_object_name(sid, "act-act-1", 1)
    assert [a["name"] for a in completed.data["actions"]] == ["navigate"]
    screenshots = await nats_client.jetstream().object_store(subjects.SCREENSHOTS_BUCKET)
    image = await screenshots.get(completed.data["screenshot"])
    assert image.data is not None and image.data.startswith(b"\x89PNG")

    await send(nats_client, sid, cmd.Act(task_id="act-2", task='Type "ada" into "Username"'))
    events = await wait_for_event(
        store, sid, "act_mode_completed", within=120, match=lambda e: e.data["task_id"] == "act-2"
    )
    assert [a["name"] for a in events[-1].data["actions"]] == ["input"]

    await send(nats_client, sid, cmd.Act(task_id="act-3", task='Click "Sign up"'))
    events = await wait_for_event(store, sid, "act_mode_failed", within=120)
    assert events[-1].data["category"] == "element_not_found"

    owner = await owner_of(nats_client, sid)
    chromium = psutil.Process(cluster[owner].process.pid).children(recursive=True)
    assert chromium
    stop = await send(nats_client, sid, cmd.StopAll())
    events = await wait_for_event(store, sid, "browser_closed", within=60)
    assert events[-1].command_id == stop.command_id
    assert events[-1].data["reason"] == "stop_all"
    _, alive = psutil.wait_procs(chromium, timeout=10)
    assert alive == []
    assert fold(sid, await store.read(sid)).status == "stopped"


async def test_first_act_starts_on_target_url(
    cluster: dict[str, ExecutorProcess], nats_client: NATS, sample_site: SampleSite
) -> None:
    store = EventStore(nats_client.jetstream())
    state = await create_planned_session(store, LOGIN, sample_site.base_url)
    sid = state.session_id
    await send(nats_client, sid, cmd.Act(task_id="act-t", task='Type "ada" into "Username"'))
    # On a blank page the act fails with element_not_found, and this wait lists it.
    events = await wait_for_event(store, sid, "act_mode_completed", within=120)
    assert [a["name"] for a in events[-1].data["actions"]] == ["input"]
    assert events[-1].data["url"].startswith(sample_site.base_url)
    await send(nats_client, sid, cmd.StopAll())
    await wait_for_event(store, sid, "browser_closed", within=60)


RETRYABLE = '1. Open the login page\n2. Check that the page shows "Username and password do not match"\n3. Type "standard_user" into "Username"'


async def test_run_till_end_retry_after_act(
    cluster: dict[str, ExecutorProcess], nats_client: NATS, sample_site: SampleSite
) -> None:
    store = EventStore(nats_client.jetstream())
    state = await create_planned_session(store, RETRYABLE, sample_site.base_url)
    sid = state.session_id
    await send(nats_client, sid, cmd.RunTillEnd(task_id="rte-1"))
    events = await wait_for_event(store, sid, "run_till_end_paused", within=120)
    assert events[-1].data["step_number"] == 2
    assert "run_till_end_progress" in types_of(events)
    assert fold(sid, await store.read(sid)).blocked_step == 2

    rejected = await send(nats_client, sid, cmd.ContinueExecution(task_id="rte-1"))
    events = await wait_for_event(store, sid, "command_rejected", within=60)
    assert events[-1].command_id == rejected.command_id

    for task_id, instruction in (
        ("fix-1", 'Type "nobody" into "Username"'),
        ("fix-2", 'Type "wrong" into "Password"'),
        ("fix-3", 'Click "Login"'),
    ):
        await send(nats_client, sid, cmd.Act(task_id=task_id, task=instruction))
        await wait_for_event(
            store,
            sid,
            "act_mode_completed",
            within=120,
            match=lambda e, t=task_id: e.data["task_id"] == t,
        )

    await send(nats_client, sid, cmd.RetryStep(task_id="rte-1"))
    events = await wait_for_event(store, sid, "run_till_end_completed", within=120)
    assert events[-1].data["success"] is True
    assert events[-1].data["skipped_steps"] == []
    retried = [e for e in events if e.type == "step_started" and e.data["step_number"] == 2]
    assert [e.data["attempt"] for e in retried] == [1, 2]
    await wait_for_event(store, sid, "browser_closed", within=60)


async def test_run_till_end_skip_step(
    cluster: dict[str, ExecutorProcess], nats_client: NATS, sample_site: SampleSite
) -> None:
    store = EventStore(nats_client.jetstream())
    test_case = '1. Open the login page\n2. Check that the page shows "Free shipping"\n3. Type "standard_user" into "Username"'
    state = await create_planned_session(store, test_case, sample_site.base_url)
    sid = state.session_id
    await send(nats_client, sid, cmd.RunTillEnd(task_id="rte-2"))
    await wait_for_event(store, sid, "run_till_end_paused", within=120)
    skip = await send(nats_client, sid, cmd.SkipStep(task_id="rte-2"))
    events = await wait_for_event(store, sid, "run_till_end_completed", within=120)
    skipped = next(e for e in events if e.type == "step_skipped")
    assert skipped.command_id == skip.command_id
    assert skipped.data["step_number"] == 2
    assert events[-1].data["skipped_steps"] == [2]
    assert events[-1].data["success"] is True
    final = fold(sid, await store.read(sid))
    assert [step.status for step in final.steps] == ["passed", "skipped", "passed"]


async def test_cancel_mid_step_stops_typing(
    cluster: dict[str, ExecutorProcess], nats_client: NATS, sample_site: SampleSite
) -> None:
    store = EventStore(nats_client.jetstream())
    test_case = '1. Open the login page\n2. Wait for "Never shown" for 60 seconds\n3. Type "late" into "Username"'
    state = await create_planned_session(store, test_case, sample_site.base_url)
    sid = state.session_id
    await send(nats_client, sid, cmd.ExecutePlan(task_id="run-c"))
    await wait_for_event(store, sid, "step_started", within=120, match=step_started(2))
    owner = await owner_of(nats_client, sid)
    chromium = psutil.Process(cluster[owner].process.pid).children(recursive=True)
    assert chromium
    cancel = await send(nats_client, sid, cmd.CancelTask())
    # Step 2 waits 60 s, so a browser gone within 10 s was killed by the cancel. The
    # cancel latency itself is measured by the cancel scenario in bench/.
    _, alive = await asyncio.to_thread(psutil.wait_procs, chromium, 10)
    assert alive == []
    events = await wait_for_event(store, sid, "browser_closed", within=30)
    types = types_of(events)
    cancelled = events[types.index("execution_cancelled")]
    assert cancelled.command_id == cancel.command_id
    after = types[types.index("execution_cancelled") + 1 :]
    assert after == ["browser_closed"]
    assert (
        "step_completed"
        not in types[types.index("step_started", types.index("step_started") + 1) :]
    )
    assert fold(sid, await store.read(sid)).status == "cancelled"


async def test_owner_killed_session_resumes_elsewhere(
    cluster: dict[str, ExecutorProcess], nats_client: NATS, sample_site: SampleSite
) -> None:
    store = EventStore(nats_client.jetstream())
    test_case = (
        '1. Open the login page\n2. Open the login page\n3. Type "standard_user" into "Username"'
    )
    state = await create_planned_session(store, test_case, sample_site.base_url)
    sid = state.session_id
    await send(nats_client, sid, cmd.ExecutePlan(task_id="run-k"))
    await wait_for_event(store, sid, "step_started", within=120, match=step_started(1))
    await send(nats_client, sid, cmd.PauseExecution())
    events = await wait_for_event(store, sid, "execution_paused", within=60)
    after_step = events[-1].data["after_step"]
    owner = await owner_of(nats_client, sid)
    victim = cluster[owner]
    chromium = psutil.Process(victim.process.pid).children(recursive=True)
    assert chromium
    killed_at = asyncio.get_running_loop().time()
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    events = await wait_for_event(store, sid, "session_interrupted", within=30)
    assert asyncio.get_running_loop().time() - killed_at < 15.0
    interrupted = events[-1]
    assert interrupted.data["executor_id"] == owner
    assert interrupted.data["last_completed_step"] == after_step
    # The survivor killed the dead owner's orphaned Chromium.
    _, alive = psutil.wait_procs(chromium, timeout=10)
    assert alive == []

    await send(nats_client, sid, cmd.ContinueExecution(task_id="run-k"))
    events = await wait_for_event(store, sid, "execution_completed", within=120)
    resumed = next(e for e in events if e.type == "execution_resumed")
    assert resumed.data["from_step"] == after_step + 1
    assert events[-1].data["success"] is True
    new_owner_events = [e for e in events if e.type == "step_completed"]
    assert [e.data["step_number"] for e in new_owner_events] == [1, 2, 3]


SHOP = LOGIN + '\n6. Click "Cart"\n7. Check that the page shows "Your Cart"'


async def test_continue_after_stop_reopens_page(
    cluster: dict[str, ExecutorProcess], nats_client: NATS, sample_site: SampleSite
) -> None:
    store = EventStore(nats_client.jetstream())
    state = await create_planned_session(store, SHOP, sample_site.base_url)
    sid = state.session_id
    await send(nats_client, sid, cmd.ExecutePlan(task_id="run-s"))
    await wait_for_event(store, sid, "step_started", within=120, match=step_started(4))
    await send(nats_client, sid, cmd.StopAll())
    events = await wait_for_event(store, sid, "browser_closed", within=120)
    assert events[-1].data["reason"] == "stop_all"
    after_step = next(e for e in events if e.type == "execution_paused").data["after_step"]
    # Step 4, "Click "Login"", moved the browser to the products page before the stop.
    assert after_step in (4, 5)
    stopped = fold(sid, await store.read(sid))
    assert stopped.status == "stopped"
    assert stopped.last_url.endswith("/inventory.html")
    first_urls = [e.data["url"] for e in events if e.type == "step_completed"]
    assert first_urls[0].startswith(sample_site.base_url.rstrip("/"))
    assert first_urls[3].endswith("/inventory.html")

    await send(nats_client, sid, cmd.ContinueExecution(task_id="run-s"))
    stop_closed = events[-1].seq
    events = await wait_for_event(
        store, sid, "browser_closed", within=180, match=lambda e: e.seq > stop_closed
    )
    types = types_of(events)
    resumed_at = types.index("execution_resumed")
    assert events[resumed_at].data["from_step"] == after_step + 1
    after = events[resumed_at:]
    # A fresh browser on a blank page could not check the products page or click "Cart".
    assert "step_failed" not in types_of(after)
    completed = [e for e in after if e.type == "step_completed"]
    assert [e.data["step_number"] for e in completed] == list(range(after_step + 1, 8))
    assert completed[-1].data["url"].endswith("/cart.html")
    assert events[types.index("execution_completed")].data["success"] is True
    await wait_for_lease_release(nats_client, sid, within=30)

    # The finished run takes no act, and cancel and stop leave its result as it is.
    for body in (
        cmd.Act(task_id="act-s", task='Check that the page shows "Your Cart"'),
        cmd.CancelTask(),
        cmd.StopAll(),
    ):
        command = await send(nats_client, sid, body)
        events = await wait_for_event(
            store,
            sid,
            "command_rejected",
            within=60,
            match=lambda e, c=command: e.command_id == c.command_id,
        )
        reason = events[-1].data["reason"]
        assert events[-1].data["code"] == "invalid_state"
        if isinstance(body, cmd.Act):
            assert "act runs only on a paused, plan_ready, stopped or interrupted" in reason
        else:
            assert "already ended as completed and no browser is open" in reason
    finished = await store.read(sid)
    assert "act_mode_started" not in types_of(finished)
    assert fold(sid, finished).status == "completed"


async def test_cancel_and_stop_keep_finished_status(
    cluster: dict[str, ExecutorProcess], nats_client: NATS, sample_site: SampleSite
) -> None:
    """A browser still open on a finished session closes, and the session stays completed."""
    for body in (cmd.CancelTask(), cmd.StopAll()):
        store = EventStore(nats_client.jetstream())
        state = await create_planned_session(store, LOGIN, sample_site.base_url)
        sid = state.session_id
        await send(nats_client, sid, cmd.Act(task_id="act-f", task="Open the login page"))
        await wait_for_event(store, sid, "act_mode_completed", within=120)
        owner = await owner_of(nats_client, sid)
        chromium = psutil.Process(cluster[owner].process.pid).children(recursive=True)
        assert chromium
        # The events of a run that passed while the act's browser stayed open, as an
        # executor of an earlier version could leave a session.
        await store.append(sid, ev.ExecutionStarted(task_id="run-f", from_step=1, total_steps=5))
        await store.append(
            sid,
            ev.ExecutionCompleted(
                task_id="run-f", passed=5, failed=0, skipped=0, total=5, success=True
            ),
        )

        command = await send(nats_client, sid, body)
        events = await wait_for_event(
            store,
            sid,
            "browser_closed",
            within=60,
            match=lambda e, c=command: e.command_id == c.command_id,
        )
        assert events[-1].data["reason"] == "closed after the run ended"
        after = [e.type for e in events if e.command_id == command.command_id]
        assert after == ["browser_closed"], type(body).__name__
        _, alive = psutil.wait_procs(chromium, timeout=10)
        assert alive == []
        final = fold(sid, await store.read(sid))
        assert final.status == "completed", type(body).__name__
        assert final.browser_open is False
