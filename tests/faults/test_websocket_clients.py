"""WebSocket clients that misbehave: one that never reads, and 200 whose network vanishes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.jetstream import EventStore, connect

from stepwise.stack import Stack

from .harness import (
    WITHOUT_EXECUTOR,
    alive,
    assert_consistent,
    create_session,
    eventually,
    fault_stack,
    gateway_pid,
    open_sockets,
    process_rss_kib,
    wait_for_stream,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

CLIENT_BUFFER = 8
PING_INTERVAL = 1.0
PING_TIMEOUT = 2.0
# The websockets library waits this long for the closing handshake before dropping a socket.
CLOSE_TIMEOUT = 10.0


@pytest.fixture
def buffer_stack() -> Iterator[Stack]:
    # Default pings (every 20 s): a client that does not read must hit the buffer limit first.
    env = {"STEPWISE_CLIENT_BUFFER": str(CLIENT_BUFFER)}
    with fault_stack(env, names=WITHOUT_EXECUTOR) as stack:
        yield stack


@pytest.fixture
def ping_stack() -> Iterator[Stack]:
    env = {
        "STEPWISE_WS_PING_INTERVAL": str(PING_INTERVAL),
        "STEPWISE_WS_PING_TIMEOUT": str(PING_TIMEOUT),
    }
    with fault_stack(env, names=WITHOUT_EXECUTOR) as stack:
        yield stack


def _ws_url(stack: Stack, session_id: str, since: int = 0) -> str:
    base = stack.gateway_url.replace("http://", "ws://", 1)
    return f"{base}/api/sessions/{session_id}/ws?since={since}"


async def _planned_session(stack: Stack) -> str:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        session_id = await create_session(client)
    await wait_for_stream(stack.nats_url, [session_id])
    return session_id


async def _read_all(socket_: Any, count: int, seconds: float) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []
    async with asyncio.timeout(seconds):
        while len(received) < count:
            message = json.loads(await socket_.recv())
            if "seq" in message:
                received.append(message)
    return received


async def test_resume_far_behind_reads_whole_backlog(buffer_stack: Stack) -> None:
    """A client resuming with a backlog much larger than its buffer reads it at its own pace."""
    stack = buffer_stack
    session_id = await _planned_session(stack)
    client = await connect(stack.nats_url, "tests-faults")
    store = EventStore(client.jetstream())
    # 10 MB: more than the feed's cache of recent frames, so the resuming client's
    # backlog is replayed from the stream, and far more than its buffer of 8 events.
    backlog, size = 100, 100_000
    _, base_seq = await store.last(session_id)
    # A live client keeps the session's shared feed running at the end of the stream.
    live = await websockets.connect(_ws_url(stack, session_id, base_seq), max_size=None)
    try:

        async def append() -> None:
            for index in range(backlog):
                await store.append(
                    session_id,
                    ev.CommandRejected(
                        command_type="flood", reason=f"{index} " + "x" * size, code="flood"
                    ),
                )

        await asyncio.gather(append(), _read_all(live, backlog, 120))
        last_seq = base_seq + backlog
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32_768)
        raw.setblocking(False)
        host, port = stack.gateway_url.removeprefix("http://").split(":")
        await asyncio.get_running_loop().sock_connect(raw, (host, int(port)))
        async with websockets.connect(
            _ws_url(stack, session_id), sock=raw, max_queue=1, max_size=None, compression=None
        ) as resumed:
            received = await _read_all(resumed, last_seq, 120)
        assert [event["seq"] for event in received] == list(range(1, last_seq + 1))
    finally:
        await live.close()
        await client.close()


async def test_client_that_never_reads_is_closed_and_resumes(buffer_stack: Stack) -> None:
    stack = buffer_stack
    session_id = await _planned_session(stack)
    client = await connect(stack.nats_url, "tests-faults")
    store = EventStore(client.jetstream())
    _, base_seq = await store.last(session_id)
    flood, size = 200, 200_000  # 40 MB of events

    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32_768)
    raw.setblocking(False)
    pid = gateway_pid(stack)
    try:
        host, port = stack.gateway_url.removeprefix("http://").split(":")
        await asyncio.get_running_loop().sock_connect(raw, (host, int(port)))
        slow = await websockets.connect(
            _ws_url(stack, session_id), sock=raw, max_queue=1, max_size=None, compression=None
        )
        fast = [
            await websockets.connect(_ws_url(stack, session_id), max_size=None) for _ in range(3)
        ]
        for socket_ in fast:
            await _read_all(socket_, base_seq, 30)
        rss_before = process_rss_kib(pid)
        peak = rss_before

        async def append() -> None:
            for index in range(flood):
                await store.append(
                    session_id,
                    ev.CommandRejected(
                        command_type="flood", reason=f"{index} " + "x" * size, code="flood"
                    ),
                )

        async def watch_memory() -> None:
            nonlocal peak
            while True:
                peak = max(peak, process_rss_kib(pid))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch_memory())
        # The fast clients read everything while the flood goes on.
        results = await asyncio.gather(
            append(), *(_read_all(socket_, flood, 120) for socket_ in fast)
        )
        watcher.cancel()
        for received in results[1:]:
            assert [event["seq"] for event in received] == list(
                range(base_seq + 1, base_seq + flood + 1)
            )
        growth_mib = (peak - rss_before) / 1024
        assert growth_mib < 25, (
            f"gateway memory grew by {growth_mib:.0f} MiB while one client did not read "
            f"{flood * size / 2**20:.0f} MiB of events"
        )

        # Now the slow client reads: it gets a prefix of the events, then close code 4008.
        seqs: list[int] = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(60):
                while True:
                    message = json.loads(await slow.recv())
                    if "seq" in message:
                        seqs.append(message["seq"])
        assert closed.value.rcvd is not None, "the gateway never sent a close frame"
        assert closed.value.rcvd.code == 4008, closed.value.rcvd
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) < base_seq + flood

        # It resumes from its last seq and gets the rest exactly once.
        async with websockets.connect(
            _ws_url(stack, session_id, seqs[-1]), max_size=None
        ) as resumed:
            rest = await _read_all(resumed, base_seq + flood - seqs[-1], 60)
        assert [event["seq"] for event in rest] == list(range(seqs[-1] + 1, base_seq + flood + 1))
        for socket_ in fast:
            await socket_.close()
    finally:
        raw.close()
        await client.close()
    alive(stack, "gateway", "projector", "planner")
    await assert_consistent(stack, [session_id], seconds=180)


async def _handshake_then_vanish(host: str, port: int, path: str) -> socket.socket:
    """Open a WebSocket the raw way, then never read or answer anything again."""
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 30)
    assert b" 101 " in status, status
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    # Keep the socket open but take it away from asyncio: nothing reads it from now on.
    raw: socket.socket = writer.get_extra_info("socket").dup()
    writer.transport.pause_reading()
    return raw


async def _events_consumers(stack: Stack) -> int:
    client = await connect(stack.nats_url, "tests-faults")
    try:
        info = await client.jetstream().stream_info(subjects.EVENTS_STREAM)
        return info.state.consumer_count
    finally:
        await client.close()


async def test_two_hundred_vanished_clients_are_freed(ping_stack: Stack) -> None:
    stack = ping_stack
    session_id = await _planned_session(stack)
    pid = gateway_pid(stack)
    sockets_before = open_sockets(pid)
    consumers_before = await _events_consumers(stack)
    host, port = stack.gateway_url.removeprefix("http://").split(":")
    path = f"/api/sessions/{session_id}/ws?since=0"

    dead = await asyncio.gather(
        *(_handshake_then_vanish(host, int(port), path) for _ in range(200))
    )
    try:
        during = open_sockets(pid)
        assert during >= sockets_before + 200, (sockets_before, during)
        consumers_during = await _events_consumers(stack)
        limit = PING_INTERVAL + PING_TIMEOUT + CLOSE_TIMEOUT + 5
        freed_after = await eventually(
            lambda: open_sockets(pid) <= sockets_before + 5,
            limit + 30,
            "the gateway to close the 200 dead sockets",
        )
        assert freed_after <= limit, f"the gateway freed the dead clients after {freed_after:.1f} s"
        if consumers_during > consumers_before:

            async def consumers_gone() -> bool:
                return await _events_consumers(stack) <= consumers_before

            await eventually(consumers_gone, 30, "the dead clients' stream consumers to go")

        # A live client still works.
        async with websockets.connect(_ws_url(stack, session_id)) as live:
            events = await _read_all(live, 1, 30)
        assert events[0]["seq"] == 1
    finally:
        for raw in dead:
            raw.close()
    alive(stack, "gateway", "projector", "planner")
    await assert_consistent(stack, [session_id])
