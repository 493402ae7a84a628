"""Garbage published straight onto the command subjects: rejected, acked, logged, survived."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from faults.harness import (
    alive,
    assert_consistent,
    create_session,
    eventually,
    service_log,
    wait_for_stream,
)
from stepwise_libs import subjects
from stepwise_libs.commands import MAX_COMMAND_BYTES
from stepwise_libs.jetstream import EventStore, connect

from stepwise.stack import Stack

pytestmark = pytest.mark.timeout(240)


def _command(session_id: str, command_type: str, data: dict[str, object], **extra: object) -> bytes:
    body = {
        "command_id": str(uuid.uuid4()),
        "session_id": session_id,
        "type": command_type,
        "at": datetime.now(UTC).isoformat(),
        "data": data,
        **extra,
    }
    return json.dumps(body).encode()


def hostile_messages(session_id: str, command_type: str) -> list[tuple[str, bytes, bool]]:
    """(description, message, whether it names `session_id`)."""
    oversized = _command(session_id, command_type, {"test_case": "x" * (MAX_COMMAND_BYTES + 1024)})
    return [
        ("not JSON", b"{this is not json", False),
        ("empty", b"", False),
        ("binary", bytes(range(256)), False),
        ("JSON list", b"[1, 2, 3]", False),
        ("missing fields", json.dumps({"session_id": session_id}).encode(), True),
        ("unknown version", _command(session_id, command_type, {}, version=999), True),
        ("unknown type", _command(session_id, "launch_rockets", {}), True),
        ("wrong body", _command(session_id, command_type, {"test_case": 42}), True),
        ("oversized", oversized, True),
    ]


async def _rejections(store: EventStore, session_id: str, before: int, count: int) -> list[Any]:
    """The session's command_rejected events after `before`, once there are `count` (or 20 s)."""

    async def enough() -> bool:
        events = (await store.read(session_id))[before:]
        return sum(event.type == "command_rejected" for event in events) >= count

    try:
        await eventually(enough, 20, f"{count} command_rejected events")
    except AssertionError:
        pass  # the caller compares what arrived with what it expected
    return [e for e in (await store.read(session_id))[before:] if e.type == "command_rejected"]


async def _consumer_drained(js: object, durable: str, seconds: float) -> None:
    info = None
    async with asyncio.timeout(seconds):
        while True:
            info = await js.consumer_info(subjects.COMMANDS_STREAM, durable)  # type: ignore[attr-defined]
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await asyncio.sleep(0.2)


@pytest.mark.parametrize(
    "service, subject, command_type",
    [
        ("planner", subjects.planner_command_subject("generate_plan"), "generate_plan"),
        ("executor", subjects.executor_command_subject("execute_plan"), "execute_plan"),
    ],
)
async def test_hostile_command_messages_are_rejected_acked_and_survived(
    hostile_stack: Stack, service: str, subject: str, command_type: str
) -> None:
    stack = hostile_stack
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        victim = await create_session(client)
    await wait_for_stream(stack.nats_url, [victim])

    client = await connect(stack.nats_url, "tests-hostile")
    try:
        js = client.jetstream()
        store = EventStore(js)
        before = len(await store.read(victim))
        messages = hostile_messages(victim, command_type)
        for _, data, _ in messages:
            await js.publish(subject, data, stream=subjects.COMMANDS_STREAM)

        try:
            await _consumer_drained(js, service, 30)
        except TimeoutError:
            info = await js.consumer_info(subjects.COMMANDS_STREAM, service)
            raise AssertionError(
                f"{service} left hostile commands unacknowledged: pending {info.num_pending}, "
                f"ack pending {info.num_ack_pending}, redelivered {info.num_redelivered}"
            ) from None

        naming = [name for name, _, names in messages if names]
        rejected = await _rejections(store, victim, before, len(naming))
        assert len(rejected) == len(naming), (naming, [event.data for event in rejected])
        for event in rejected:
            assert event.data["reason"], event.data
    finally:
        await client.close()

    log = service_log(stack, service)
    assert log.count("rejected command") >= len(messages), log[-3000:]
    assert subject in log, f"{service} log never names the subject {subject}"
    alive(stack, service)

    # Still serving: a valid command after the garbage is carried out.
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as http:
        session_id = await create_session(http)
        events = (await wait_for_stream(stack.nats_url, [session_id]))[session_id]
        assert events[-1].type == "plan_completed", [event.type for event in events]
        if service == "executor":
            # No browser is needed to prove the executor consumes: a start on a session
            # whose plan targets a closed loopback port is taken and reported.
            started = await http.post(f"/api/sessions/{session_id}/start")
            assert started.status_code == 202, started.text
            await wait_for_stream(
                stack.nats_url,
                [session_id],
                frozenset({"browser_closed"}),  # the last event of a run
                seconds=180,
            )
    await assert_consistent(stack, [victim, session_id])


async def test_oversized_command_is_rejected_on_its_session(hostile_stack: Stack) -> None:
    stack = hostile_stack
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as http:
        victim = await create_session(http)
    await wait_for_stream(stack.nats_url, [victim])
    client = await connect(stack.nats_url, "tests-hostile")
    try:
        js = client.jetstream()
        store = EventStore(js)
        before = len(await store.read(victim))
        big = {"test_case": "x" * (MAX_COMMAND_BYTES + 1024), "target_url": "http://127.0.0.1:9/"}
        await js.publish(
            subjects.planner_command_subject("generate_plan"),
            _command(victim, "generate_plan", big),
            stream=subjects.COMMANDS_STREAM,
        )
        rejected = await _rejections(store, victim, before, 1)
    finally:
        await client.close()
    assert len(rejected) == 1, "no command_rejected on the session the oversized command names"
    assert "byte" in rejected[0].data["reason"], rejected[0].data
