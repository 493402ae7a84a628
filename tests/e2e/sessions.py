"""Drive a session through the real gateway: create it, start it, read its WebSocket."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets

# Events after which an execution does no more work.
EXECUTION_END = frozenset({"execution_completed", "execution_failed", "execution_cancelled"})
PLAN_END = frozenset({"plan_completed", "plan_failed"})


@dataclass
class SessionRecord:
    session_id: str
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_seq(self) -> int:
        return self.events[-1]["seq"]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == kind]


def websocket_url(gateway_url: str, session_id: str, since: int) -> str:
    return (
        f"{gateway_url.replace('http://', 'ws://', 1)}/api/sessions/{session_id}/ws?since={since}"
    )


async def receive_until(
    socket: Any, done: frozenset[str] | set[str], seconds: float
) -> list[dict[str, Any]]:
    """Receive events until one whose type is in `done`; fail after `seconds`."""
    received: list[dict[str, Any]] = []
    async with asyncio.timeout(seconds):
        while True:
            message = json.loads(await socket.recv())
            if "seq" not in message:
                continue  # a reply to a socket command, not an event
            received.append(message)
            if message["type"] in done:
                return received


async def create_session(client: httpx.AsyncClient, test_case: str, target_url: str) -> str:
    response = await client.post(
        "/api/sessions",
        json={"test_case": test_case, "target_url": target_url, "llm_model": "offline"},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["session_id"])


async def run_test_case(gateway_url: str, test_case: str, target_url: str) -> SessionRecord:
    """Run a test case to its end through the gateway; return its events as the socket sent them.

    Ends after `browser_closed`, so the session is idle when this returns.
    """
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        session_id = await create_session(client, test_case, target_url)
        record = SessionRecord(session_id)
        async with websockets.connect(websocket_url(gateway_url, session_id, 0)) as socket:
            record.events += await receive_until(socket, PLAN_END, 120)
            assert record.events[-1]["type"] == "plan_completed", record.events[-1]
            started = await client.post(f"/api/sessions/{session_id}/start")
            assert started.status_code == 202, started.text
            record.events += await receive_until(socket, EXECUTION_END, 600)
            record.events += await receive_until(socket, {"browser_closed"}, 60)
        return record
