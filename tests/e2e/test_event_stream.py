"""The session WebSocket: replay from any seq, exactly once and in order, then live events."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from stepwise.sample_site import SampleSite
from stepwise.stack import Stack

from .conftest import SampleRuns
from .sessions import EXECUTION_END, PLAN_END, create_session, receive_until, websocket_url

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SHORT_CASE = """\
1. Open the login page
2. Type "standard_user" into "Username"
3. Check that the page shows "Stepwise Sample Shop"
"""


async def _replay(gateway_url: str, session_id: str, since: int, last_seq: int) -> list[dict]:
    """Read a finished session's socket from `since` through `last_seq`, then expect silence."""
    async with websockets.connect(websocket_url(gateway_url, session_id, since)) as socket:
        events: list[dict] = []
        async with asyncio.timeout(30):
            while not events or events[-1]["seq"] < last_seq:
                message = json.loads(await socket.recv())
                if "seq" in message:
                    events.append(message)
        # The session is idle: anything more would be a duplicate or an invented event.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.5):
                extra = await socket.recv()
                pytest.fail(f"unexpected message after the last event: {extra!r}")
    return events


@pytest.mark.parametrize("since_fraction", [0.0, 0.5, 0.9])
async def test_websocket_replays_events_after_since(
    sample_runs: SampleRuns, stack: Stack, gateway: httpx.AsyncClient, since_fraction: float
) -> None:
    run = sample_runs.checkout
    since = int(run.last_seq * since_fraction)

    events = await _replay(stack.gateway_url, run.session_id, since, run.last_seq)

    assert [event["seq"] for event in events] == list(range(since + 1, run.last_seq + 1))
    assert [event["id"] for event in events] == [event["id"] for event in run.events[since:]]
    page = await gateway.get(f"/api/sessions/{run.session_id}/events", params={"since": since})
    assert page.status_code == 200, page.text
    assert [event["id"] for event in page.json()["events"]] == [event["id"] for event in events]


async def test_websocket_delivers_live_events_after_replay(
    stack: Stack, e2e_site: SampleSite, gateway: httpx.AsyncClient
) -> None:
    session_id = await create_session(gateway, SHORT_CASE, e2e_site.base_url)

    # Socket A follows from the start; socket B joins once the plan is ready.
    async with websockets.connect(websocket_url(stack.gateway_url, session_id, 0)) as first:
        planned = await receive_until(first, PLAN_END, 120)
        assert planned[-1]["type"] == "plan_completed", planned[-1]
        joined_at = planned[-1]["seq"]
        async with websockets.connect(
            websocket_url(stack.gateway_url, session_id, joined_at)
        ) as second:
            # Both sockets now wait on live events only: the execution has not started.
            started = await gateway.post(f"/api/sessions/{session_id}/start")
            assert started.status_code == 202, started.text
            first_live = await receive_until(first, EXECUTION_END, 300)
            second_live = await receive_until(second, EXECUTION_END, 300)
            first_live += await receive_until(first, {"browser_closed"}, 60)
            second_live += await receive_until(second, {"browser_closed"}, 60)

    everything = planned + first_live
    last_seq = everything[-1]["seq"]
    assert [event["seq"] for event in everything] == list(range(1, last_seq + 1))
    assert [event["seq"] for event in second_live] == list(range(joined_at + 1, last_seq + 1))
    assert [event["id"] for event in second_live] == [event["id"] for event in first_live]
    assert first_live[0]["type"] == "execution_started"
    completed = [event for event in first_live if event["type"] == "execution_completed"]
    assert completed and completed[0]["data"]["success"] is True, first_live

    page = await gateway.get(f"/api/sessions/{session_id}/events")
    assert [event["id"] for event in page.json()["events"]] == [event["id"] for event in everything]
