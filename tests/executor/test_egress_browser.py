"""The egress guard in a real Chromium: after a CDP reconnect, for Gemini's navigations,
and for URLs of schemes other than http and https.

A server on 127.0.0.2 records every request, and the executor allows 127.0.0.1 only.
Nothing else is contacted: Gemini is the fake server on loopback. The local file the
scheme tests try to open is one this module writes into the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from browser_use.browser.events import BrowserReconnectedEvent
from fakes.gemini import FakeGemini
from nats.aio.client import Client as NATS
from PIL import Image
from stepwise_executor.browser import SessionBrowser
from stepwise_executor.egress import EgressGuard, parse_allowed_hosts
from stepwise_libs import subjects
from stepwise_libs.events import Event

from stepwise.sample_site import SampleSite

from .test_gemini import MODEL, agent_output, gemini_env
from .test_run import run_plan


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[str]]]:
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<title>internal</title>")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.2:{server.server_address[1]}/internal", requests
    server.shutdown()
    server.server_close()


async def test_guard_blocks_after_reconnect(
    make_settings, recording_server: tuple[str, list[str]]
) -> None:
    url, requests = recording_server
    settings = make_settings()
    browser = SessionBrowser("egress-reconnect", settings.chromium, settings.browsers_dir, "")
    guard = EgressGuard(parse_allowed_hosts("127.0.0.1"), "egress-reconnect")
    try:
        session = await browser.start()
        await guard.attach(session)
        reconnects: asyncio.Queue[BrowserReconnectedEvent] = asyncio.Queue()

        async def on_reconnected(event: BrowserReconnectedEvent) -> None:
            await reconnects.put(event)

        session.event_bus.on(BrowserReconnectedEvent, on_reconnected)

        # Drop browser-use's DevTools connection; browser-use reconnects on its own.
        old_client = session.cdp_client
        assert old_client.ws is not None
        await old_client.ws.close()
        event = await asyncio.wait_for(reconnects.get(), timeout=60)
        # Every handler of the event, the guard's included, has finished.
        await asyncio.wait_for(event, timeout=30)
        assert session.cdp_client is not old_client

        with pytest.raises(Exception):  # noqa: B017 (browser-use raises its own error types)
            await asyncio.wait_for(session.navigate_to(url), timeout=30)
        assert [blocked.url for blocked in guard.blocked_requests] == [url]
        assert requests == []
    finally:
        await browser.close()


async def test_gemini_navigation_blocked(
    nats_client: NATS,
    sample_site: SampleSite,
    fake_gemini: FakeGemini,
    make_settings,
    recording_server: tuple[str, list[str]],
) -> None:
    url, requests = recording_server
    fake_gemini.reply_json(
        agent_output({"navigate": {"url": url, "new_tab": False}}, "open the admin page")
    )
    fake_gemini.reply_json(
        agent_output({"done": {"text": "The admin page is open", "success": True}}, "finish")
    )

    _, events = await run_plan(
        nats_client,
        make_settings(**gemini_env(fake_gemini)),
        "Open the admin page",
        sample_site.base_url,
        MODEL,
    )

    failures = [event.data for event in events if event.type == "step_failed"]
    assert len(failures) == 1
    assert failures[0]["category"] == "navigation_blocked"
    assert f"navigation to {url} was blocked" in failures[0]["error"]
    assert "its host 127.0.0.2 is a loopback address" in failures[0]["error"]
    assert "step_completed" not in [event.type for event in events]
    assert requests == []


# --- schemes other than http and https --------------------------------------------------

ONLY_HTTP = "Only http and https URLs are allowed (and about:blank)"


@dataclass
class MarkerFile:
    """A local HTML file whose title and text must never reach an event or a screenshot."""

    path: Path
    title: str
    text: str

    @property
    def url(self) -> str:
        return self.path.as_uri()


@pytest.fixture
def marker_file(tmp_path: Path) -> MarkerFile:
    marker = MarkerFile(tmp_path / "users.html", "Local users file", "password-5e1f0c7a")
    marker.path.write_text(f"<title>{marker.title}</title><h1>{marker.text}</h1>")
    return marker


def assert_marker_absent(events: list[Event], marker: MarkerFile) -> None:
    for event in events:
        dumped = json.dumps(event.data)
        assert marker.text not in dumped, event.type
        assert marker.title not in dumped, event.type


async def assert_screenshots_blank(nats_client: NATS, failure: dict) -> None:
    """Every screenshot of the failed step is of one colour: about:blank, not the marker page."""
    assert failure["screenshots"] != []
    store = await nats_client.jetstream().object_store(subjects.SCREENSHOTS_BUCKET)
    for name in failure["screenshots"]:
        stored = await store.get(name)
        assert stored.data is not None
        image = Image.open(io.BytesIO(stored.data))
        assert image.getcolors(maxcolors=1) is not None, name


async def test_fetch_blocks_file_request(make_settings, marker_file: MarkerFile) -> None:
    # Chromium pauses a file: document request like an http one, so the guard fails it
    # even when a navigation bypasses the agent's navigate action.
    settings = make_settings()
    browser = SessionBrowser("egress-file", settings.chromium, settings.browsers_dir, "")
    guard = EgressGuard(parse_allowed_hosts("127.0.0.1"), "egress-file")
    try:
        session = await browser.start()
        await guard.attach(session)
        blocked = asyncio.Event()
        guard.on_blocked = lambda request: blocked.set()
        client = session.cdp_client
        target_id = session.agent_focus_target_id
        assert target_id is not None
        cdp_session = await session.get_or_create_cdp_session(target_id=target_id)
        await client.send.Page.navigate(
            params={"url": marker_file.url}, session_id=cdp_session.session_id
        )

        await asyncio.wait_for(blocked.wait(), timeout=30)
        assert [request.url for request in guard.blocked_requests] == [marker_file.url]
        assert guard.blocked_requests[0].category == "forbidden scheme"
        title = await client.send.Runtime.evaluate(
            params={"expression": "document.title", "returnByValue": True},
            session_id=cdp_session.session_id,
        )
        assert title["result"].get("value") != marker_file.title
    finally:
        await browser.close()


async def test_forbidden_page_left(make_settings) -> None:
    # A page of another scheme that opened anyway (here through browser-use, past the
    # navigate action's check) is recorded and navigated to about:blank.
    settings = make_settings()
    browser = SessionBrowser("egress-leave", settings.chromium, settings.browsers_dir, "")
    guard = EgressGuard(parse_allowed_hosts("127.0.0.1"), "egress-leave")
    try:
        session = await browser.start()
        await guard.attach(session)
        # browser-use's own navigation, which waits for the page to load.
        await asyncio.wait_for(session.navigate_to("chrome://version/"), timeout=30)
        targets = (await session.cdp_client.send.Target.getTargets())["targetInfos"]
        assert "chrome://version/" in [target["url"] for target in targets]

        left = await guard.leave_forbidden_pages(session)

        assert [blocked.url for blocked in left] == ["chrome://version/"]
        assert [blocked.url for blocked in guard.blocked_requests] == ["chrome://version/"]
        target_id = session.agent_focus_target_id
        assert target_id is not None
        cdp_session = await session.get_or_create_cdp_session(target_id=target_id)
        tree = await session.cdp_client.send.Page.getFrameTree(session_id=cdp_session.session_id)
        assert tree["frameTree"]["frame"]["url"] == "about:blank"
        assert await guard.leave_forbidden_pages(session) == []
    finally:
        await browser.close()


async def test_offline_go_to_file_blocked(
    nats_client: NATS, sample_site: SampleSite, make_settings, marker_file: MarkerFile
) -> None:
    _, events = await run_plan(
        nats_client,
        make_settings(),
        f"1. Go to {marker_file.url}",
        sample_site.base_url,
    )

    failures = [event.data for event in events if event.type == "step_failed"]
    assert len(failures) == 1
    assert failures[0]["category"] == "navigation_blocked"
    assert f"navigation to {marker_file.url} was blocked" in failures[0]["error"]
    assert "its scheme file: is not allowed" in failures[0]["error"]
    assert ONLY_HTTP in failures[0]["error"]
    assert not failures[0]["url"].startswith("file:")
    assert "step_completed" not in [event.type for event in events]
    assert_marker_absent(events, marker_file)
    await assert_screenshots_blank(nats_client, failures[0])


@pytest.mark.parametrize("new_tab", [False, True])
async def test_gemini_file_navigation_blocked(
    nats_client: NATS,
    sample_site: SampleSite,
    fake_gemini: FakeGemini,
    make_settings,
    marker_file: MarkerFile,
    new_tab: bool,
) -> None:
    fake_gemini.reply_json(
        agent_output({"navigate": {"url": marker_file.url, "new_tab": new_tab}}, "open the file")
    )
    fake_gemini.reply_json(
        agent_output({"done": {"text": "The file is open", "success": True}}, "finish")
    )

    _, events = await run_plan(
        nats_client,
        make_settings(**gemini_env(fake_gemini)),
        "Open the users file",
        sample_site.base_url,
        MODEL,
    )

    failures = [event.data for event in events if event.type == "step_failed"]
    assert len(failures) == 1
    assert failures[0]["category"] == "navigation_blocked"
    assert f"navigation to {marker_file.url} was blocked" in failures[0]["error"]
    assert ONLY_HTTP in failures[0]["error"]
    assert not failures[0]["url"].startswith("file:")
    assert "step_completed" not in [event.type for event in events]
    assert_marker_absent(events, marker_file)
    await assert_screenshots_blank(nats_client, failures[0])
    # The model never got the file's text.
    for request in fake_gemini.requests:
        assert marker_file.text not in request.prompt_text
