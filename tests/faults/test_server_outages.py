"""nats-server restarted and Postgres stopped in the middle of a run."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import httpx
import pytest
import websockets

from stepwise.stack import Stack

from .harness import (
    PLAN_END,
    WITHOUT_EXECUTOR,
    alive,
    assert_consistent,
    create_session,
    eventually,
    fault_stack,
    service_log,
    wait_for_stream,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

# The gateway's documented close code when NATS goes away (services/gateway/README.md).
NATS_UNAVAILABLE = 1013
POSTGRES_DOWN_SECONDS = 15.0


def _ws_url(stack: Stack, session_id: str, since: int = 0) -> str:
    base = stack.gateway_url.replace("http://", "ws://", 1)
    return f"{base}/api/sessions/{session_id}/ws?since={since}"


async def _events_until(socket_: Any, done: frozenset[str], seconds: float) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []
    async with asyncio.timeout(seconds):
        while True:
            message = json.loads(await socket_.recv())
            if "seq" not in message:
                continue
            received.append(message)
            if message["type"] in done:
                return received


def _assert_error_body(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] and error["message"].strip(), error


async def _gateway_ready(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


async def test_nats_restart_mid_run_loses_no_accepted_command() -> None:
    with fault_stack(names=WITHOUT_EXECUTOR) as stack:
        assert stack.nats is not None
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
            tailed = await create_session(client)
            await wait_for_stream(stack.nats_url, [tailed])
            tail = await websockets.connect(_ws_url(stack, tailed))
            seen = await _events_until(tail, frozenset({"plan_completed"}), 30)

            stack.nats.stop()
            accepted: list[str] = []
            for _ in range(3):
                response = await client.post(
                    "/api/sessions",
                    json={
                        "test_case": 'Click "Login"',
                        "target_url": "http://127.0.0.1:9/",
                        "llm_model": "offline",
                    },
                )
                if response.status_code == 201:
                    accepted.append(response.json()["session_id"])
                else:
                    _assert_error_body(response, 503)
            control = await client.post(
                f"/api/sessions/{tailed}/plan/continue", json={"task_prompt": 'Click "Cart"'}
            )
            if control.status_code != 202:
                _assert_error_body(control, 503)
            # The tail either stays open or closes with the documented code.
            closed_code: int | None = None
            try:
                async with asyncio.timeout(5):
                    while True:
                        message = json.loads(await tail.recv())
                        if "seq" in message:
                            seen.append(message)
            except TimeoutError:
                pass
            except websockets.ConnectionClosed as closed:
                assert closed.rcvd is not None, "the tail was dropped without a close frame"
                closed_code = closed.rcvd.code
                assert closed_code == NATS_UNAVAILABLE, closed.rcvd

            stack.nats.start()  # same port, same store folder
            await eventually(lambda: _gateway_ready(client), 60, "the gateway to reach NATS again")

            if closed_code is not None:
                tail = await websockets.connect(_ws_url(stack, tailed, seen[-1]["seq"]))
            # The tailed session advances after the restart; the tail must see it.
            if control.status_code != 202:
                control = await client.post(
                    f"/api/sessions/{tailed}/plan/continue", json={"task_prompt": 'Click "Cart"'}
                )
                assert control.status_code == 202, control.text
            seen += await _events_until(tail, PLAN_END, 60)
            await tail.close()

            # Every service reconnected by itself: a new session is planned and projected.
            fresh = await create_session(client)
        streams = await wait_for_stream(stack.nats_url, [tailed, fresh, *accepted])
        for session_id in accepted:
            types = [event.type for event in streams[session_id]]
            assert types[0] == "session_created" and "plan_completed" in types, (session_id, types)
        got = [event["seq"] for event in seen]
        assert got == list(range(1, len(got) + 1)), f"the tail skipped or repeated events: {got}"
        assert [event.type for event in streams[tailed]].count("plan_completed") == 2
        alive(stack, "gateway", "planner", "projector")
        await assert_consistent(stack, [tailed, fresh, *accepted])


async def test_postgres_stopped_mid_run_projector_catches_up() -> None:
    with fault_stack(names=WITHOUT_EXECUTOR) as stack:
        assert stack.postgres is not None
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
            first = await create_session(client)
            await wait_for_stream(stack.nats_url, [first])
            # Sessions whose plans are made while Postgres is down.
            stack.stop_service("planner")
            waiting = [await create_session(client) for _ in range(3)]
            tails = [await websockets.connect(_ws_url(stack, sid)) for sid in waiting]
            projector_log_offset = len(service_log(stack, "projector"))

            stack.postgres.stop()
            down_at = time.monotonic()
            stack.start_service("planner")
            # The WebSocket stream needs only NATS: each tail sees its whole plan.
            for tail in tails:
                events = await _events_until(tail, PLAN_END, 60)
                assert events[-1]["type"] == "plan_completed", events[-1]
                await tail.close()
            listed = await client.get("/api/sessions")
            _assert_error_body(listed, 503)
            detail = await client.get(f"/api/sessions/{first}")
            if detail.status_code == 200:
                assert detail.json().get("source") == "event_stream", detail.text
            else:
                _assert_error_body(detail, 503)
            remaining = POSTGRES_DOWN_SECONDS - (time.monotonic() - down_at)
            if remaining > 0:
                await asyncio.sleep(remaining)  # the outage itself: nothing to wait on
            down_for = time.monotonic() - down_at
            stack.postgres.start()
            await eventually(lambda: _gateway_ready(client), 60, "the gateway to reach Postgres")

        await assert_consistent(stack, [first, *waiting])
        outage_log = service_log(stack, "projector")[projector_log_offset:]
        warnings = [line for line in outage_log.splitlines() if re.search(r"\bWARNING\b", line)]
        assert warnings, f"the projector logged no WARNING during the outage:\n{outage_log[-2000:]}"
        # Rate-limited: at most about one line a second, however fast it retries.
        assert len(warnings) <= down_for + 5, "\n".join(warnings[-20:])
        alive(stack, "gateway", "planner", "projector")
