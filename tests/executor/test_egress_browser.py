"""The egress guard in a real Chromium: after a CDP reconnect, and for Gemini's navigations.

A server on 127.0.0.2 records every request, and the executor allows 127.0.0.1 only.
Nothing else is contacted: Gemini is the fake server on loopback.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from browser_use.browser.events import BrowserReconnectedEvent
from fakes.gemini import FakeGemini
from nats.aio.client import Client as NATS
from stepwise_executor.browser import SessionBrowser
from stepwise_executor.egress import EgressGuard, parse_allowed_hosts

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
