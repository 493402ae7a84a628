"""The egress guard keeps blocking after browser-use reconnects to Chromium.

A server on 127.0.0.2 records every request. Nothing else is contacted.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from browser_use.browser.events import BrowserReconnectedEvent
from stepwise_executor.browser import SessionBrowser
from stepwise_executor.egress import EgressGuard, parse_allowed_hosts


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
