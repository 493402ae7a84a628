"""Many streaming clients of one session share one JetStream consumer in the gateway."""

import asyncio
import gc
import json
import logging
import time
import uuid
from typing import Any

import httpx
import pytest
import websockets
from nats.js import JetStreamContext
from stepwise_gateway import metrics, pump
from stepwise_gateway.settings import GatewaySettings
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.jetstream import EventStore
from stepwise_libs.settings import SettingsError
from websockets.asyncio.client import ClientConnection

from .conftest import GatewayServer, gateway_settings

RECEIVE_TIMEOUT = 10.0


async def session_consumers(js: JetStreamContext, session_id: str) -> int:
    """Consumers on the events stream that read this session's subject."""
    subject = subjects.session_events_subject(session_id)
    infos = await js.consumers_info(subjects.EVENTS_STREAM)
    return sum(1 for info in infos if info.config.filter_subject == subject)


async def wait_for_consumers(
    js: JetStreamContext, session_id: str, count: int, seconds: float = 20.0
) -> None:
    deadline = time.monotonic() + seconds
    while (found := await session_consumers(js, session_id)) != count:
        assert time.monotonic() < deadline, f"{found} consumers on the session, expected {count}"
        await asyncio.sleep(0.1)


async def append_progress(store: EventStore, session_id: str, count: int, tag: str) -> None:
    for index in range(count):
        await store.append(session_id, ev.PlanProgress(plan_id=tag, message=f"{tag}{index}"))


async def read_events(socket: ClientConnection, count: int) -> list[str]:
    """The next `count` event messages, as the exact text received."""
    received: list[str] = []
    while len(received) < count:
        text = await asyncio.wait_for(socket.recv(), RECEIVE_TIMEOUT)
        assert isinstance(text, str), "events must arrive as text frames"
        if "seq" in json.loads(text):
            received.append(text)
    return received


def seqs(texts: list[str]) -> list[int]:
    return [json.loads(text)["seq"] for text in texts]


async def test_clients_of_one_session_share_one_consumer(
    gateway: GatewayServer, store: EventStore, js: JetStreamContext
) -> None:
    session_id = str(uuid.uuid4())
    await append_progress(store, session_id, 5, "old")
    base = f"{gateway.ws_url}/api/sessions/{session_id}/ws"
    # Half replay the whole session, half resume after seq 2.
    sinces = [0, 2] * 10
    sockets = [await websockets.connect(f"{base}?since={since}") for since in sinces]
    try:
        replayed = await asyncio.gather(
            *(read_events(socket, 5 - since) for socket, since in zip(sockets, sinces, strict=True))
        )
        consumers_streaming = await session_consumers(js, session_id)

        await append_progress(store, session_id, 30, "live")
        live = await asyncio.gather(*(read_events(socket, 30) for socket in sockets))
        # A marker after the live events shows that none of them came twice.
        await store.append(session_id, ev.BrowserClosed(reason="marker"))
        markers = await asyncio.gather(*(read_events(socket, 1) for socket in sockets))
    finally:
        for socket in sockets:
            await socket.close()

    assert consumers_streaming == 1
    for since, old, new, marker in zip(sinces, replayed, live, markers, strict=True):
        assert seqs(old) == list(range(since + 1, 6))
        assert seqs(new) == list(range(6, 36))
        assert seqs(marker) == [36]
    # Every client got the same text for each live event.
    assert all(texts == live[0] for texts in live)
    # The last client gone, the gateway drops the session's consumer.
    await wait_for_consumers(js, session_id, 0)


async def test_late_client_replays_then_joins_feed(
    gateway: GatewayServer, store: EventStore, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A feed that caches 3 frames: a client that joins later must read the rest from the stream.
    monkeypatch.setattr(pump, "CACHE_FRAMES", 3)
    session_id = str(uuid.uuid4())
    await append_progress(store, session_id, 1, "first")
    base = f"{gateway.ws_url}/api/sessions/{session_id}/ws"
    async with websockets.connect(f"{base}?since=0") as early:
        assert seqs(await read_events(early, 1)) == [1]
        await append_progress(store, session_id, 40, "before")
        assert seqs(await read_events(early, 40)) == list(range(2, 42))

        # Live events keep coming while the late client replays seq 1 to 41.
        writer = asyncio.create_task(append_progress(store, session_id, 60, "during"))
        async with websockets.connect(f"{base}?since=0") as late:
            received = await read_events(late, 101)
            await writer
            early_rest = await read_events(early, 60)
            await wait_for_consumers(js, session_id, 1)

    assert seqs(received) == list(range(1, 102))
    assert seqs(early_rest) == list(range(42, 102))
    await wait_for_consumers(js, session_id, 0)


async def test_sse_and_websocket_clients_share_the_feed(
    gateway: GatewayServer, store: EventStore, js: JetStreamContext
) -> None:
    session_id = str(uuid.uuid4())
    await append_progress(store, session_id, 3, "old")
    frames: list[dict[str, str]] = []
    sse_open, sse_read_all, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def read_sse() -> None:
        async with (
            httpx.AsyncClient(base_url=gateway.url, timeout=30) as http,
            http.stream("GET", f"/api/sessions/{session_id}/stream") as response,
        ):
            frame: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line == "":
                    if "id" in frame:
                        frames.append(frame)
                        if len(frames) == 3:
                            sse_open.set()
                    frame = {}
                    if len(frames) == 8:
                        # Stay connected until the consumers are counted.
                        sse_read_all.set()
                        await release.wait()
                        return
                    continue
                key, _, value = line.partition(": ")
                frame[key] = value

    reader = asyncio.create_task(read_sse())
    await asyncio.wait_for(sse_open.wait(), RECEIVE_TIMEOUT)
    async with websockets.connect(
        f"{gateway.ws_url}/api/sessions/{session_id}/ws?since=3"
    ) as socket:
        await append_progress(store, session_id, 5, "live")
        texts = await read_events(socket, 5)
        await asyncio.wait_for(sse_read_all.wait(), RECEIVE_TIMEOUT)
        try:
            await wait_for_consumers(js, session_id, 1)
        finally:
            release.set()
        await asyncio.wait_for(reader, RECEIVE_TIMEOUT)

    assert [frame["id"] for frame in frames] == [str(seq) for seq in range(1, 9)]
    assert seqs(texts) == list(range(4, 9))
    assert [frame["data"] for frame in frames[3:]] == texts


async def test_websocket_compression_off_unless_set(
    gateway: GatewayServer, store: EventStore, nats_server, gateway_database: str
) -> None:
    session_id = str(uuid.uuid4())
    await append_progress(store, session_id, 1, "only")
    path = f"/api/sessions/{session_id}/ws"
    compressing = GatewayServer(
        gateway_settings(nats_server.url, gateway_database, ws_compression=True)
    ).start()
    try:
        compressing.wait_nats()
        # The websockets client offers permessage-deflate by default.
        async with websockets.connect(f"{gateway.ws_url}{path}") as plain:
            plain_events = await read_events(plain, 1)
            plain_extensions = plain.response.headers.get("Sec-WebSocket-Extensions")
        async with websockets.connect(f"{compressing.ws_url}{path}") as deflated:
            deflated_events = await read_events(deflated, 1)
            deflated_extensions = deflated.response.headers.get("Sec-WebSocket-Extensions")
    finally:
        compressing.stop()

    assert plain_extensions is None
    assert deflated_extensions is not None
    assert "permessage-deflate" in deflated_extensions
    assert seqs(plain_events) == [1]
    assert deflated_events == plain_events


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("off", False), ("on", True)])
def test_ws_compression_setting(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool
) -> None:
    monkeypatch.setenv("STEPWISE_DATABASE_URL", "postgresql+asyncpg://stepwise@127.0.0.1:5/x")
    if value is None:
        monkeypatch.delenv("STEPWISE_WS_COMPRESSION", raising=False)
    else:
        monkeypatch.setenv("STEPWISE_WS_COMPRESSION", value)

    assert GatewaySettings().ws_compression is expected


def test_ws_compression_setting_rejects_other_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPWISE_DATABASE_URL", "postgresql+asyncpg://stepwise@127.0.0.1:5/x")
    monkeypatch.setenv("STEPWISE_WS_COMPRESSION", "yes")

    with pytest.raises(SettingsError) as error:
        GatewaySettings()

    assert "STEPWISE_WS_COMPRESSION" in str(error.value)
    assert "on or off" in str(error.value)


def counted(counter: Any) -> float:
    """Return the value of a prometheus counter of the gateway serving in this process."""
    return counter._value.get()


async def test_live_events_skip_the_outbox(gateway: GatewayServer, store: EventStore) -> None:
    session_id = str(uuid.uuid4())
    await append_progress(store, session_id, 1, "first")
    sent = metrics.EVENTS_SENT.labels("websocket")
    async with websockets.connect(
        f"{gateway.ws_url}/api/sessions/{session_id}/ws?since=1"
    ) as socket:
        sent_before, queued_before = counted(sent), counted(metrics.WS_EVENTS_QUEUED)
        await append_progress(store, session_id, 20, "live")
        received = await read_events(socket, 20)

    assert seqs(received) == list(range(2, 22))
    assert counted(sent) - sent_before == 20
    # A client that keeps up gets each frame written to its socket by the feed.
    assert counted(metrics.WS_EVENTS_QUEUED) - queued_before == 0


async def test_client_behind_gets_queued_events_in_order(
    gateway: GatewayServer, store: EventStore
) -> None:
    session_id = str(uuid.uuid4())
    await append_progress(store, session_id, 1, "first")
    # Large events, so that the unread ones fill the socket buffers and the gateway's
    # transport passes its high-water mark: the later ones then wait in the outbox.
    filler = "x" * 20_000
    queued_before = counted(metrics.WS_EVENTS_QUEUED)
    reading = asyncio.Event()

    async def append_big() -> None:
        # Keep appending while the client catches up, so new frames meet a non-empty outbox.
        index = 0
        while not reading.is_set() or index < 600:
            await store.append(session_id, ev.PlanProgress(plan_id="big", message=f"{filler}"))
            index += 1
            if index > 5_000:
                raise AssertionError("no event went through the outbox after 5,000 appends")
        await store.append(session_id, ev.BrowserClosed(reason="marker"))

    async with websockets.connect(
        f"{gateway.ws_url}/api/sessions/{session_id}/ws?since=0", max_queue=1
    ) as socket:
        assert seqs(await read_events(socket, 1)) == [1]
        writer = asyncio.create_task(append_big())
        deadline = time.monotonic() + 60
        while counted(metrics.WS_EVENTS_QUEUED) == queued_before:
            assert time.monotonic() < deadline, "no event went through the outbox in 60 s"
            assert not writer.done(), writer
            await asyncio.sleep(0.01)
        reading.set()
        received: list[dict[str, Any]] = []
        while not received or received[-1]["type"] != "browser_closed":
            received.extend(json.loads(text) for text in await read_events(socket, 1))
        await writer

    assert [event["seq"] for event in received] == list(range(2, len(received) + 2))
    assert len(received) > 600


async def test_sse_disconnect_leaves_no_task(
    gateway: GatewayServer,
    store: EventStore,
    js: JetStreamContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    session_id = str(uuid.uuid4())
    await append_progress(store, session_id, 3, "old")
    caplog.set_level(logging.ERROR, logger="asyncio")

    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        for _ in range(5):
            # Each client reads one event, then goes away while the gateway waits for more.
            async with http.stream("GET", f"/api/sessions/{session_id}/stream?since=2") as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break
    await wait_for_consumers(js, session_id, 0)
    gc.collect()

    assert "Task was destroyed but it is pending" not in caplog.text
