"""SIGKILL the planner mid-model-call and the gateway under 20 live WebSocket tails."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets
from fakes.gemini import FakeGemini, Reply

from .harness import (
    PLAN_END,
    WITHOUT_EXECUTOR,
    alive,
    assert_consistent,
    create_session,
    fault_stack,
    restart,
    sigkill,
    wait_for_stream,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

MODEL = "gemini-2.5-flash"
PLAN = {
    "steps": [
        {"description": "Open the login page"},
        {"description": 'Type "standard_user" into "Username"'},
        {"description": 'Click "Login"'},
    ],
    "unparsed": [],
}


async def test_planner_killed_during_slow_model_call_plans_once() -> None:
    with FakeGemini() as fake:
        # The first call hangs long enough to be killed in the middle; later calls answer.
        fake.reply_json(PLAN, delay_seconds=60.0)
        fake.default = Reply.json(PLAN)
        env = {"GEMINI_API_KEY": "test-key", "STEPWISE_GEMINI_BASE_URL": fake.base_url}
        with fault_stack(env, names=WITHOUT_EXECUTOR) as stack:
            async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
                session_id = await create_session(client, llm_model=MODEL)
            await fake.await_requests(1, within=60)
            sigkill(stack, "planner")
            restart(stack, "planner")
            events = (await wait_for_stream(stack.nats_url, [session_id]))[session_id]
            types = [event.type for event in events]
            assert types.count("plan_completed") == 1, types
            assert "plan_failed" not in types, types
            assert len(fake.requests) >= 2, "the restarted planner never called the model again"
            alive(stack, "planner", "projector", "gateway")
            await assert_consistent(stack, [session_id])


def _ws_url(gateway_url: str, session_id: str, since: int) -> str:
    base = gateway_url.replace("http://", "ws://", 1)
    return f"{base}/api/sessions/{session_id}/ws?since={since}"


async def _events_until(socket: Any, done: frozenset[str], seconds: float) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []
    async with asyncio.timeout(seconds):
        while True:
            message = json.loads(await socket.recv())
            if "seq" not in message:
                continue
            received.append(message)
            if message["type"] in done:
                return received


async def test_gateway_killed_under_twenty_tails_resume_exactly_once() -> None:
    with fault_stack(names=WITHOUT_EXECUTOR) as stack:
        # With the planner down the sessions hold only `session_created` until the
        # gateway is dead; their plans are made while no client is connected.
        stack.stop_service("planner")
        async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
            session_ids = list(await asyncio.gather(*(create_session(client) for _ in range(20))))
        sockets = [
            await websockets.connect(_ws_url(stack.gateway_url, session_id, 0))
            for session_id in session_ids
        ]
        received: dict[str, list[dict[str, Any]]] = {}
        for session_id, socket in zip(session_ids, sockets, strict=True):
            received[session_id] = await _events_until(socket, frozenset({"session_created"}), 30)

        sigkill(stack, "gateway")
        for socket in sockets:
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(30):
                    while True:
                        await socket.recv()
        restart(stack, "planner")
        await wait_for_stream(stack.nats_url, session_ids)
        restart(stack, "gateway")

        async def resume(session_id: str) -> None:
            since = received[session_id][-1]["seq"]
            async with websockets.connect(_ws_url(stack.gateway_url, session_id, since)) as socket:
                received[session_id] += await _events_until(socket, PLAN_END, 60)

        await asyncio.gather(*(resume(session_id) for session_id in session_ids))
        streams = await wait_for_stream(stack.nats_url, session_ids)
        for session_id in session_ids:
            got = [(event["seq"], event["id"]) for event in received[session_id]]
            stored = [(event.seq, event.id) for event in streams[session_id]]
            assert got == stored, f"session {session_id}: socket gave {got}, stream holds {stored}"
        alive(stack, "gateway", "planner", "projector")
        await assert_consistent(stack, session_ids)
