"""The executor attached to a Chromium that runs elsewhere, through STEPWISE_BROWSER_CDP_URL.

The test starts its own headless Chromium with a DevTools port on loopback and plays the
browser pool. The executor must drive that browser, launch none of its own, close only its
own pages, and leave the browser running.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from nats.aio.client import Client as NATS
from stepwise_executor.browser import SessionBrowser
from stepwise_executor.errors import BrowserStartError
from stepwise_executor.settings import ExecutorSettings
from stepwise_libs import commands as cmd
from stepwise_libs import subjects
from stepwise_libs.fold import fold
from stepwise_libs.jetstream import EventStore, connect, ensure_topology
from stepwise_libs.settings import SettingsError

from stepwise.embedded import EmbeddedNats
from stepwise.sample_site import SampleSite

from .conftest import create_planned_session
from .test_controls import LOGIN, send, step_started, types_of
from .test_service import EXECUTOR, ExecutorProcess, wait_for_event

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RemoteChromium:
    """A Chromium this test started, standing in for a browser pool."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def targets(self) -> list[dict[str, str]]:
        response = httpx.get(f"{self.http_url}/json/list", timeout=5)
        response.raise_for_status()
        return list(response.json())

    def page_ids(self, url_prefix: str) -> set[str]:
        return {
            target["id"]
            for target in self.targets()
            if target["type"] == "page" and target["url"].startswith(url_prefix)
        }

    def assert_alive(self) -> None:
        assert self.process.poll() is None, "the remote Chromium exited"
        version = httpx.get(f"{self.http_url}/json/version", timeout=5)
        assert version.status_code == 200
        assert version.json()["webSocketDebuggerUrl"].startswith("ws://127.0.0.1:")


@pytest.fixture(scope="module")
def remote_chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteChromium]:
    profile = tmp_path_factory.mktemp("remote-chromium")
    port = free_port()
    process = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--remote-debugging-address=127.0.0.1",
            f"--remote-debugging-port={port}",
            f"--user-data-dir={profile}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    remote = RemoteChromium(process, port)
    deadline = time.monotonic() + 60
    while True:
        try:
            remote.assert_alive()
            break
        except (httpx.HTTPError, AssertionError):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(
                    f"Chromium with DevTools on port {port} did not start"
                ) from None
            time.sleep(0.1)
    try:
        yield remote
    finally:
        process.kill()
        process.wait(timeout=10)


def start_executor(
    nats_server: EmbeddedNats, base: Path, cdp_url: str, site: SampleSite
) -> ExecutorProcess:
    base.mkdir(parents=True, exist_ok=True)
    home = base / "home"
    log_path = base / "executor.log"
    env = dict(os.environ)
    env.update(
        STEPWISE_NATS_URL=nats_server.url,
        STEPWISE_HOME=str(home),
        STEPWISE_EXECUTOR_ID=f"cdp-{uuid.uuid4().hex[:8]}",
        STEPWISE_STEP_TIMEOUT="60",
        STEPWISE_BROWSER_CDP_URL=cdp_url,
        # The sample site is on loopback, which the egress guard refuses unless allowed.
        STEPWISE_ALLOWED_HOSTS=f"127.0.0.1:{urlsplit(site.base_url).port}",
        # Attached, the executor needs no Chromium of its own: a missing binary must not matter.
        STEPWISE_CHROMIUM=str(base / "no-chromium-here"),
    )
    env.pop("GEMINI_API_KEY", None)
    env.pop("GOOGLE_API_KEY", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen([EXECUTOR], env=env, stdout=log, stderr=subprocess.STDOUT)
    executor = ExecutorProcess(process, log_path, home)
    try:
        executor.wait_ready()
    except BaseException:
        executor.stop()
        raise
    return executor


@pytest.fixture(scope="module")
def attached_executor(
    nats_server: EmbeddedNats,
    remote_chromium: RemoteChromium,
    sample_site: SampleSite,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ExecutorProcess]:
    executor = start_executor(
        nats_server, tmp_path_factory.mktemp("attached"), remote_chromium.http_url, sample_site
    )
    try:
        yield executor
    finally:
        executor.stop()


@dataclass
class Watch:
    """What a background watcher saw while a session ran."""

    session_pages: set[str] = field(default_factory=set)
    chromium_children: set[str] = field(default_factory=set)
    samples: int = 0


async def watch_while(
    condition: Callable[[], bool],
    executor: ExecutorProcess,
    remote: RemoteChromium,
    url_prefix: str,
    watch: Watch,
) -> None:
    """Until `condition()` holds, record the remote browser's pages on `url_prefix` and any
    Chromium process below the executor."""
    root = psutil.Process(executor.process.pid)
    while not condition():
        pages = await asyncio.to_thread(remote.page_ids, url_prefix)
        watch.session_pages |= pages
        for child in root.children(recursive=True):
            try:
                if "chrom" in child.name().lower() or any(
                    "chrom" in part.lower() for part in child.cmdline()[:1]
                ):
                    watch.chromium_children.add(f"{child.pid} {child.cmdline()[:1]}")
            except psutil.NoSuchProcess:
                continue
        watch.samples += 1
        await asyncio.sleep(0.05)


async def run_watched(
    store: EventStore,
    session_id: str,
    until: str,
    within: float,
    executor: ExecutorProcess,
    remote: RemoteChromium,
    url_prefix: str,
    match: Callable[..., bool] = lambda event: True,
) -> tuple[list, Watch]:
    watch = Watch()
    done = asyncio.Event()
    watcher = asyncio.create_task(watch_while(done.is_set, executor, remote, url_prefix, watch))
    try:
        events = await wait_for_event(store, session_id, until, within=within, match=match)
    finally:
        done.set()
        await watcher
    return events, watch


async def test_attached_session_uses_remote_browser(
    attached_executor: ExecutorProcess,
    remote_chromium: RemoteChromium,
    nats_client: NATS,
    sample_site: SampleSite,
) -> None:
    store = EventStore(nats_client.jetstream())
    pages_before = {target["id"] for target in remote_chromium.targets()}
    state = await create_planned_session(store, LOGIN, sample_site.base_url)
    sid = state.session_id
    await send(nats_client, sid, cmd.ExecutePlan(task_id="run-attached"))
    events, watch = await run_watched(
        store,
        sid,
        "browser_closed",
        180,
        attached_executor,
        remote_chromium,
        sample_site.base_url,
    )
    types = types_of(events)
    assert types.count("step_completed") == 5, [
        (event.type, event.data.get("error")) for event in events
    ]
    assert "step_failed" not in types
    completed = [event for event in events if event.type == "step_completed"]
    assert all(event.data["screenshots"] for event in completed)
    assert completed[-1].data["url"].startswith(sample_site.base_url)
    assert events[-1].data["reason"] == "execution finished"

    assert watch.samples > 0
    assert watch.session_pages, "the remote browser never showed a page of the sample site"
    assert watch.chromium_children == set(), "the executor started Chromium of its own"
    remote_chromium.assert_alive()
    pages_after = {target["id"] for target in remote_chromium.targets()}
    assert watch.session_pages & pages_after == set()
    # The session opened pages in its own context and closed all of them.
    assert pages_after - pages_before == set()
    assert "attached to remote browser" in attached_executor.log()


async def test_cancel_closes_only_session_pages(
    attached_executor: ExecutorProcess,
    remote_chromium: RemoteChromium,
    nats_client: NATS,
    sample_site: SampleSite,
) -> None:
    store = EventStore(nats_client.jetstream())
    test_case = (
        '1. Open the login page\n2. Wait for "Never shown" for 60 seconds\n'
        '3. Type "late" into "Username"'
    )
    state = await create_planned_session(store, test_case, sample_site.base_url)
    sid = state.session_id
    await send(nats_client, sid, cmd.ExecutePlan(task_id="run-cancel"))
    _, watch = await run_watched(
        store,
        sid,
        "step_started",
        120,
        attached_executor,
        remote_chromium,
        sample_site.base_url,
        match=step_started(2),
    )
    assert watch.session_pages, "the remote browser never showed a page of the sample site"
    assert watch.chromium_children == set()
    session_pages = watch.session_pages

    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    cancel = await send(nats_client, sid, cmd.CancelTask())

    async def pages_gone() -> None:
        while True:
            shown = await asyncio.to_thread(remote_chromium.page_ids, sample_site.base_url)
            if not session_pages & shown:
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(pages_gone(), timeout=10)
    # Step 2 waits 60 s, so pages closed within 5 s show that cancel did not wait for it.
    assert loop.time() - sent_at < 5.0, "cancel took too long to close the session's pages"
    events = await wait_for_event(store, sid, "browser_closed", within=30)
    types = types_of(events)
    cancelled = events[types.index("execution_cancelled")]
    assert cancelled.command_id == cancel.command_id
    assert types[types.index("execution_cancelled") + 1 :] == ["browser_closed"]
    second_step = types.index("step_started", types.index("step_started") + 1)
    assert "step_completed" not in types[second_step:]
    assert fold(sid, await store.read(sid)).status == "cancelled"
    remote_chromium.assert_alive()
    assert session_pages & {target["id"] for target in remote_chromium.targets()} == set()


async def test_pause_act_stop_all_when_attached(
    attached_executor: ExecutorProcess,
    remote_chromium: RemoteChromium,
    nats_client: NATS,
    sample_site: SampleSite,
) -> None:
    store = EventStore(nats_client.jetstream())
    state = await create_planned_session(store, LOGIN, sample_site.base_url)
    sid = state.session_id
    await send(nats_client, sid, cmd.ExecutePlan(task_id="run-pause"))
    await wait_for_event(store, sid, "step_started", within=120, match=step_started(2))
    pause = await send(nats_client, sid, cmd.PauseExecution())
    events = await wait_for_event(store, sid, "execution_paused", within=60)
    assert events[-1].command_id == pause.command_id
    assert fold(sid, await store.read(sid)).status == "paused"
    # Paused, the session keeps its page open in the remote browser.
    paused_pages = remote_chromium.page_ids(sample_site.base_url)
    assert paused_pages

    act = await send(nats_client, sid, cmd.Act(task_id="act-1", task="Open the login page"))
    events, watch = await run_watched(
        store,
        sid,
        "act_mode_completed",
        120,
        attached_executor,
        remote_chromium,
        sample_site.base_url,
    )
    completed = events[-1]
    assert completed.command_id == act.command_id
    assert [action["name"] for action in completed.data["actions"]] == ["navigate"]
    screenshots = await nats_client.jetstream().object_store(subjects.SCREENSHOTS_BUCKET)
    image = await screenshots.get(completed.data["screenshot"])
    assert image.data is not None
    assert image.data.startswith(b"\x89PNG")
    assert watch.chromium_children == set()
    session_pages = paused_pages | watch.session_pages

    stop = await send(nats_client, sid, cmd.StopAll())
    events = await wait_for_event(store, sid, "browser_closed", within=60)
    assert events[-1].command_id == stop.command_id
    assert events[-1].data["reason"] == "stop_all"
    assert fold(sid, await store.read(sid)).status == "stopped"
    remote_chromium.assert_alive()
    assert session_pages & {target["id"] for target in remote_chromium.targets()} == set()


async def test_unreachable_remote_browser_fails_step(
    sample_site: SampleSite, tmp_path: Path
) -> None:
    # A NATS server of its own: the attached executor above must not take this session.
    nats_server = EmbeddedNats(tmp_path / "nats").start()
    dead_url = f"http://127.0.0.1:{free_port()}"
    client = await connect(nats_server.url, "tests-unreachable")
    executor: ExecutorProcess | None = None
    try:
        await ensure_topology(client.jetstream())
        executor = start_executor(nats_server, tmp_path / "unreachable", dead_url, sample_site)
        store = EventStore(client.jetstream())
        state = await create_planned_session(store, LOGIN, sample_site.base_url)
        sid = state.session_id
        started = time.monotonic()
        await send(client, sid, cmd.ExecutePlan(task_id="run-dead"))
        events = await wait_for_event(store, sid, "step_failed", within=60)
        assert time.monotonic() - started < 30
        failed = events[-1]
        assert failed.data["step_number"] == 1
        assert failed.data["category"] == "browser_error"
        assert dead_url in failed.data["error"]
        assert "unreachable" in failed.data["error"]
        events = await wait_for_event(store, sid, "execution_failed", within=30)
        assert dead_url in events[-1].data["error"]
        assert psutil.Process(executor.process.pid).children(recursive=True) == []
    finally:
        if executor is not None:
            executor.stop()
        await client.close()
        nats_server.stop()


async def test_unreachable_websocket_url_fails_start(tmp_path: Path) -> None:
    dead_url = f"ws://127.0.0.1:{free_port()}/devtools/browser/none"
    browser = SessionBrowser("dead", CHROMIUM, tmp_path, "", cdp_url=dead_url)
    started = time.monotonic()
    with pytest.raises(BrowserStartError) as raised:
        await browser.start()
    assert time.monotonic() - started < 20
    assert dead_url in raised.value.message
    assert "unreachable" in raised.value.message
    assert raised.value.category == "browser_error"
    assert not browser.is_open
    assert browser.kill_processes() == []


async def test_attached_sessions_keep_separate_cookies(
    remote_chromium: RemoteChromium, sample_site: SampleSite, tmp_path: Path
) -> None:
    first = SessionBrowser("first", CHROMIUM, tmp_path, "", cdp_url=remote_chromium.http_url)
    second = SessionBrowser("second", CHROMIUM, tmp_path, "", cdp_url=remote_chromium.http_url)

    async def evaluate(browser: SessionBrowser, expression: str) -> object:
        assert browser.session is not None
        page = await browser.session.get_or_create_cdp_session()
        result = await page.cdp_client.send.Runtime.evaluate(
            params={"expression": expression, "returnByValue": True},
            session_id=page.session_id,
        )
        return result["result"].get("value")

    try:
        for browser in (first, second):
            session = await browser.start()
            await session.navigate_to(sample_site.base_url)
            assert (await session.get_current_page_url()).startswith(sample_site.base_url)
        assert first.context_id is not None and second.context_id is not None
        assert first.context_id != second.context_id
        await evaluate(first, "document.cookie = 'owner=first; path=/'")
        assert await evaluate(first, "document.cookie") == "owner=first"
        assert await evaluate(second, "document.cookie") == ""
        # Each session's focused page belongs to its own context in the remote browser.
        assert first.session is not None
        targets = await first.session.cdp_client.send.Target.getTargets()
        context_of = {
            info["targetId"]: info.get("browserContextId") for info in targets["targetInfos"]
        }
        for browser in (first, second):
            assert browser.session is not None
            focused = browser.session.agent_focus_target_id
            assert focused is not None
            assert context_of[focused] == browser.context_id
    finally:
        await first.close()
        await second.close()
    remote_chromium.assert_alive()
    assert remote_chromium.page_ids(sample_site.base_url) == set()


@pytest.mark.parametrize(
    "value",
    ["browser-pool:9222", "ftp://browser-pool:9222", "http://", "ws://:9222", "http://pool:x"],
)
def test_settings_reject_bad_cdp_url(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("STEPWISE_BROWSER_CDP_URL", value)
    with pytest.raises(SettingsError) as raised:
        ExecutorSettings()
    assert raised.value.variable == "STEPWISE_BROWSER_CDP_URL"
    assert value in str(raised.value)


@pytest.mark.parametrize(
    "value",
    [
        "http://browser-pool:9222",
        "https://pool.example.test",
        "ws://127.0.0.1:9222/devtools/browser/abc",
        "wss://pool.example.test/devtools/browser/abc",
    ],
)
def test_settings_accept_cdp_url_without_chromium(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    monkeypatch.setenv("STEPWISE_BROWSER_CDP_URL", value)
    monkeypatch.setenv("STEPWISE_CHROMIUM", str(tmp_path / "missing"))
    settings = ExecutorSettings()
    assert settings.browser_cdp_url == value


def test_bad_cdp_url_stops_executor(tmp_path: Path) -> None:
    env = dict(os.environ, STEPWISE_HOME=str(tmp_path), STEPWISE_BROWSER_CDP_URL="pool:9222")
    result = subprocess.run([EXECUTOR], env=env, capture_output=True, timeout=60, check=False)
    assert result.returncode == 2
    assert b"STEPWISE_BROWSER_CDP_URL='pool:9222'" in result.stderr
