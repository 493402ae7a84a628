import asyncio
import json
import socket
import uuid
from datetime import datetime, timedelta

import httpx
import pytest
import websockets
from stepwise_libs import events as ev
from stepwise_libs.jetstream import EventStore
from websockets.asyncio.client import ClientConnection

from .conftest import GatewayServer, build_session, gateway_settings

RECEIVE_TIMEOUT = 10.0


async def append_progress(
    store: EventStore, session_id: str, count: int, tag: str = "p"
) -> list[ev.Event]:
    return [
        await store.append(session_id, ev.PlanProgress(plan_id=tag, message=f"{tag}{index}"))
        for index in range(count)
    ]


async def receive_json(socket: ClientConnection) -> dict:
    return json.loads(await asyncio.wait_for(socket.recv(), RECEIVE_TIMEOUT))


async def receive_events(socket: ClientConnection, count: int) -> list[dict]:
    return [await receive_json(socket) for _ in range(count)]


@pytest.mark.parametrize("since", [0, 1, 7, 12])
async def test_websocket_sends_events_after_since_then_live(
    gateway: GatewayServer, store: EventStore, since: int
) -> None:
    session_id = str(uuid.uuid4())
    stored = await append_progress(store, session_id, 12)

    async with websockets.connect(
        f"{gateway.ws_url}/api/sessions/{session_id}/ws?since={since}"
    ) as socket:
        replayed = await receive_events(socket, 12 - since)
        live = await append_progress(store, session_id, 3, tag="live")
        # A marker event after the live ones proves nothing was sent twice in between.
        marker = await store.append(session_id, ev.BrowserClosed(reason="marker"))
        received_live = await receive_events(socket, 4)

    assert [event["seq"] for event in replayed] == list(range(since + 1, 13))
    assert [event["id"] for event in replayed] == [event.id for event in stored[since:]]
    assert [event["position"] for event in replayed] == [event.position for event in stored[since:]]
    assert all(event["session_id"] == session_id for event in replayed)
    assert [event["seq"] for event in received_live] == [13, 14, 15, 16]
    assert [event["id"] for event in received_live] == [event.id for event in [*live, marker]]
    assert received_live[0]["data"] == {"plan_id": "live", "message": "live0", "attempt": None}


async def test_websocket_unknown_session_closes_4404(gateway: GatewayServer) -> None:
    async with websockets.connect(f"{gateway.ws_url}/api/sessions/{uuid.uuid4()}/ws") as socket:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), RECEIVE_TIMEOUT)

    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4404


async def test_websocket_invalid_since_closes_4422(
    gateway: GatewayServer, store: EventStore
) -> None:
    built = await build_session(store, "created")

    async with websockets.connect(
        f"{gateway.ws_url}/api/sessions/{built.session_id}/ws?since=-3"
    ) as socket:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), RECEIVE_TIMEOUT)

    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4422


async def test_websocket_commands_answered_on_socket(
    gateway: GatewayServer, store: EventStore
) -> None:
    built = await build_session(store, "plan_ready")
    url = f"{gateway.ws_url}/api/sessions/{built.session_id}/ws?since={len(built.events)}"

    async with websockets.connect(url) as socket:
        await socket.send(json.dumps({"command": "pause_execution", "request_id": "r1"}))
        # The rejection is also an event on the session, so both arrive, in either order;
        # events carry a seq and replies do not.
        first_two = await receive_events(socket, 2)
        rejected = next(message for message in first_two if "seq" not in message)
        rejected_event = next(message for message in first_two if "seq" in message)
        await socket.send(json.dumps({"command": "start", "request_id": "r2"}))
        queued = await receive_json(socket)
        await socket.send(json.dumps({"command": "dance"}))
        unknown = await receive_json(socket)
        await socket.send("not json")
        malformed = await receive_json(socket)
        await socket.send(json.dumps({"command": "act", "task": ""}))
        invalid = await receive_json(socket)
        # A binary frame works as well as a text frame.
        await socket.send(json.dumps({"command": "task_status"}).encode())
        status = await receive_json(socket)

    assert rejected["type"] == "command_rejected"
    assert rejected["code"] == "not_running"
    assert rejected["request_id"] == "r1"
    assert "not running" in rejected["reason"]
    assert rejected_event["type"] == "command_rejected"
    assert rejected_event["data"]["command_type"] == "pause_execution"
    assert queued["type"] == "execution_queued"
    assert queued["request_id"] == "r2"
    assert queued["status"] == "queued"
    assert queued["task_id"] == queued["command_id"]
    assert unknown["type"] == "error"
    assert unknown["code"] == "unknown_command"
    assert malformed["code"] == "invalid_json"
    assert invalid["field"] == "task"
    assert status["type"] == "task_status"
    assert status["session_status"] == "plan_ready"


@pytest.mark.parametrize(
    ("command", "state", "reply"),
    [
        ("run_till_end", "plan_ready", "run_till_end_queued"),
        ("pause_execution", "running", "pause_queued"),
        ("continue_execution", "paused", "continue_queued"),
        ("stop_all", "paused", "stop_all_queued"),
        ("cancel_task", "running", "cancel_queued"),
        ("retry_step", "blocked", "retry_step_queued"),
        ("skip_step", "blocked", "skip_step_queued"),
    ],
)
async def test_websocket_command_reply_types(
    gateway: GatewayServer, store: EventStore, command: str, state: str, reply: str
) -> None:
    built = await build_session(store, state)
    url = f"{gateway.ws_url}/api/sessions/{built.session_id}/ws?since={len(built.events)}"

    async with websockets.connect(url) as socket:
        await socket.send(json.dumps({"command": command}))
        answer = await receive_json(socket)

    assert answer["type"] == reply
    assert answer["status"] == "queued"


async def test_slow_websocket_client_closed_with_4008(
    nats_server, gateway_database, store: EventStore
) -> None:
    server = GatewayServer(
        gateway_settings(nats_server.url, gateway_database, client_buffer=4)
    ).start()
    session_id = str(uuid.uuid4())
    await store.append(
        session_id,
        ev.SessionCreated(test_case="t", target_url="http://127.0.0.1:9/", llm_model="offline"),
    )
    big = "x" * 200_000
    # A small fixed receive buffer (no autotuning), no compression and a client queue of one
    # message: a client that does not read soon fills TCP and then the gateway's outbox.
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32_768)
    raw.setblocking(False)
    try:
        server.wait_nats()
        await asyncio.get_running_loop().sock_connect(
            raw, (server.settings.host, server.settings.port)
        )
        async with websockets.connect(
            f"{server.ws_url}/api/sessions/{session_id}/ws",
            sock=raw,
            max_queue=1,
            max_size=None,
            compression=None,
        ) as client_socket:
            for index in range(80):
                await store.append(
                    session_id, ev.PlanProgress(plan_id="p", message=f"{index}{big}")
                )
            seqs = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    message = json.loads(
                        await asyncio.wait_for(client_socket.recv(), RECEIVE_TIMEOUT)
                    )
                    seqs.append(message["seq"])
    finally:
        server.stop()

    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4008
    assert f"since={seqs[-1]}" in closed.value.rcvd.reason
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) < 81


async def test_events_rest_since_and_limit(client: httpx.AsyncClient, store: EventStore) -> None:
    session_id = str(uuid.uuid4())
    stored = await append_progress(store, session_id, 9)

    page = await client.get(f"/api/sessions/{session_id}/events", params={"since": 2, "limit": 4})
    rest = await client.get(
        f"/api/sessions/{session_id}/events", params={"since": page.json()["next_since"]}
    )
    empty = await client.get(f"/api/sessions/{session_id}/events", params={"since": 9})

    assert page.status_code == 200
    assert [event["seq"] for event in page.json()["events"]] == [3, 4, 5, 6]
    assert page.json()["events"][0]["position"] == stored[2].position
    assert page.json()["last_seq"] == 9
    assert page.json()["next_since"] == 6
    assert [event["seq"] for event in rest.json()["events"]] == [7, 8, 9]
    assert empty.json()["events"] == []
    assert empty.json()["next_since"] == 9


async def test_events_rest_since_time(client: httpx.AsyncClient, store: EventStore) -> None:
    session_id, other = str(uuid.uuid4()), str(uuid.uuid4())
    stored = []
    # Another session's events in between make the positions non-contiguous.
    for index in range(6):
        stored.append(
            await store.append(session_id, ev.PlanProgress(plan_id="p", message=str(index)))
        )
        await store.append(other, ev.PlanProgress(plan_id="q", message=str(index)))
    cut = stored[3].at

    after = await client.get(
        f"/api/sessions/{session_id}/events", params={"since_time": cut.isoformat()}
    )
    shifted = cut.astimezone(datetime.now().astimezone().tzinfo).isoformat()
    after_local = await client.get(
        f"/api/sessions/{session_id}/events", params={"since_time": shifted}
    )
    limited = await client.get(
        f"/api/sessions/{session_id}/events",
        params={"since_time": (cut - timedelta(days=1)).isoformat(), "limit": 2},
    )
    combined = await client.get(
        f"/api/sessions/{session_id}/events",
        params={"since": 5, "since_time": (cut - timedelta(days=1)).isoformat()},
    )
    future = await client.get(
        f"/api/sessions/{session_id}/events",
        params={"since_time": (cut + timedelta(days=1)).isoformat()},
    )
    naive = await client.get(
        f"/api/sessions/{session_id}/events", params={"since_time": "2026-01-01T00:00:00"}
    )
    garbage = await client.get(
        f"/api/sessions/{session_id}/events", params={"since_time": "yesterday"}
    )

    assert [event["seq"] for event in after.json()["events"]] == [5, 6]
    assert [event["seq"] for event in after_local.json()["events"]] == [5, 6]
    assert [event["seq"] for event in limited.json()["events"]] == [1, 2]
    assert [event["seq"] for event in combined.json()["events"]] == [6]
    assert future.json()["events"] == []
    assert future.json()["next_since"] == 0
    assert naive.status_code == 422
    assert naive.json()["error"]["field"] == "since_time"
    assert garbage.status_code == 422
    assert garbage.json()["error"]["field"] == "since_time"


@pytest.mark.parametrize(
    ("params", "field"),
    [({"since": -1}, "since"), ({"limit": 0}, "limit"), ({"limit": "many"}, "limit")],
)
async def test_events_rest_rejects_bad_query(
    client: httpx.AsyncClient, store: EventStore, params: dict, field: str
) -> None:
    built = await build_session(store, "created")

    response = await client.get(f"/api/sessions/{built.session_id}/events", params=params)

    assert response.status_code == 422
    assert response.json()["error"]["field"] == field


async def test_sse_resumes_after_last_event_id(
    client: httpx.AsyncClient, store: EventStore
) -> None:
    session_id = str(uuid.uuid4())
    await append_progress(store, session_id, 5)
    frames: list[dict] = []

    async def read() -> None:
        async with client.stream(
            "GET",
            f"/api/sessions/{session_id}/stream",
            params={"since": 1},
            headers={"Last-Event-ID": "3"},
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            frame: dict = {}
            async for line in response.aiter_lines():
                if line == "":
                    if "id" in frame:
                        frames.append(frame)
                    frame = {}
                    if len(frames) == 3:
                        return
                    continue
                key, _, value = line.partition(": ")
                frame[key] = value

    reader = asyncio.create_task(read())
    await store.append(session_id, ev.BrowserClosed(reason="live"))
    await asyncio.wait_for(reader, RECEIVE_TIMEOUT)

    assert [frame["id"] for frame in frames] == ["4", "5", "6"]
    assert [frame["event"] for frame in frames] == [
        "plan_progress",
        "plan_progress",
        "browser_closed",
    ]
    assert json.loads(frames[2]["data"])["data"] == {"reason": "live"}
