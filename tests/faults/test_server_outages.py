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
POSTGRES_DOWN_SECONDS = 30.0
# The projector's WARNING for each failed attempt to write a batch while Postgres is down.
RETRY_WARNING = re.compile(
    r"\bWARNING\b.*database unavailable, retrying the batch in (?P<delay>[\d.]+) s"
    r".*\battempt=(?P<attempt>\d+)"
)


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


async def _assert_reads_unavailable(client: httpx.AsyncClient, session_id: str) -> None:
    """Assert that each read of the Postgres read models returns 503 with a JSON error body."""
    _assert_error_body(await client.get("/api/sessions"), 503)
    _assert_error_body(await client.get(f"/api/sessions/{session_id}"), 503)
    assert (await client.get("/readyz")).status_code == 503


def _batch_retries(log: str) -> list[tuple[int, float]]:
    """Return (attempt, delay in seconds) of each WARNING the projector logged for a batch retry."""
    return [(int(match["attempt"]), float(match["delay"])) for match in RETRY_WARNING.finditer(log)]


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

            def outage_log() -> str:
                return service_log(stack, "projector")[projector_log_offset:]

            stack.postgres.stop()
            down_at = time.monotonic()
            stack.start_service("planner")
            # The WebSocket stream needs only NATS: each tail sees its whole plan.
            for tail in tails:
                events = await _events_until(tail, PLAN_END, 60)
                assert events[-1]["type"] == "plan_completed", events[-1]
                await tail.close()

            read_checks = 0

            async def outage_done() -> bool:
                nonlocal read_checks
                await _assert_reads_unavailable(client, first)
                read_checks += 1
                elapsed = time.monotonic() - down_at
                return elapsed >= POSTGRES_DOWN_SECONDS and len(_batch_retries(outage_log())) >= 3

            # The outage lasts until it is long enough and the projector has retried a few times,
            # and the reads are checked once a second all along.
            await eventually(
                outage_done,
                POSTGRES_DOWN_SECONDS + 60,
                f"a {POSTGRES_DOWN_SECONDS:.0f} s outage with 3 projector retries",
                every=1.0,
            )
            # At the end of the outage a new tail still streams a session from its first event.
            late_tail = await websockets.connect(_ws_url(stack, first))
            replayed = await _events_until(late_tail, PLAN_END, 30)
            await late_tail.close()
            down_for = time.monotonic() - down_at
            retries_during_outage = _batch_retries(outage_log())
            stack.postgres.start()
            await eventually(lambda: _gateway_ready(client), 60, "the gateway to reach Postgres")
            listed = await client.get("/api/sessions")

        assert down_for >= POSTGRES_DOWN_SECONDS, down_for
        assert read_checks >= POSTGRES_DOWN_SECONDS / 2, read_checks
        assert [event["seq"] for event in replayed] == list(range(1, len(replayed) + 1))
        assert replayed[-1]["type"] == "plan_completed", replayed[-1]
        assert listed.status_code == 200, listed.text

        # Nothing lost: the read models catch up with every session, events of the outage included.
        await assert_consistent(stack, [first, *waiting])

        log = outage_log()
        # One WARNING per attempt, numbered without a gap, with a growing delay between them.
        attempts = [attempt for attempt, _ in retries_during_outage]
        assert attempts == list(range(1, len(attempts) + 1)), "\n".join(log.splitlines()[-30:])
        delays = [delay for _, delay in retries_during_outage]
        assert max(delays) >= 4 * delays[0], delays
        # Rate-limited by the backoff (0.5 s doubling to 10 s, with jitter): about 9 attempts in
        # 30 s, and at most one WARNING per 2 s on average however long Postgres stays down.
        assert len(attempts) <= down_for / 2, (len(attempts), down_for)
        assert re.search(r"\bwrote the batch after \d+ attempts\b", log), log[-3000:]
        alive(stack, "gateway", "planner", "projector")
