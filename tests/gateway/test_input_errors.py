"""Input the gateway must reject with a precise error: unpaired surrogates, a since after the
last seq, invalid placeholders, bodies that are not JSON objects and command-less messages."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets
from stepwise_libs import events as ev
from stepwise_libs.jetstream import EventStore

from .conftest import GatewayServer, build_session, commands_for, gateway_settings

RECEIVE_TIMEOUT = 10.0
GOOD_URL = "http://127.0.0.1:9/"
JSON_HEADERS = {"Content-Type": "application/json"}
# A JSON body as raw text, since the JSON encoders of httpx and websockets reject a lone
# surrogate. `\\ud800` in these strings is the six-character JSON escape.
CREATE_BODIES = {
    "test_case": '{"test_case": "Open \\ud800 page", "target_url": "http://127.0.0.1:9/"}',
    "target_url": '{"test_case": "Open the page", "target_url": "http://127.0.0.1:9/\\ud800"}',
    "secrets.pin": (
        '{"test_case": "Type {{pin}}", "target_url": "http://127.0.0.1:9/", '
        '"secrets": {"pin": "12\\udc00"}}'
    ),
}


async def receive_json(socket: websockets.ClientConnection) -> dict:
    return json.loads(await asyncio.wait_for(socket.recv(), RECEIVE_TIMEOUT))


@pytest.mark.parametrize("field", CREATE_BODIES)
async def test_create_rejects_unpaired_surrogate(client: httpx.AsyncClient, field: str) -> None:
    response = await client.post(
        "/api/sessions", content=CREATE_BODIES[field].encode(), headers=JSON_HEADERS
    )

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert "unpaired surrogate" in error["message"]
    assert "invalid Unicode" in error["message"]
    assert "at position" in error["message"]


async def test_surrogate_key_rejected_without_500(client: httpx.AsyncClient) -> None:
    body = '{"test_case": "Open", "target_url": "http://127.0.0.1:9/", "\\ud800": 1}'

    response = await client.post("/api/sessions", content=body.encode(), headers=JSON_HEADERS)

    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_input"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("act", '{"task": "Click \\ud800"}', "task"),
        ("act", '{"task": "Click", "previous_context": "x\\udfff"}', "previous_context"),
        ("plan/continue", '{"task_prompt": "Then \\ud800 check"}', "task_prompt"),
    ],
)
async def test_controls_reject_unpaired_surrogate(
    client: httpx.AsyncClient, store: EventStore, path: str, body: str, field: str
) -> None:
    built = await build_session(store, "paused")

    response = await client.post(
        f"/api/sessions/{built.session_id}/{path}", content=body.encode(), headers=JSON_HEADERS
    )

    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert "unpaired surrogate" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ('{"command": "act", "task": "Click \\ud800"}', "task"),
        ('{"command": "act", "task": "Click", "request_id": "r\\ud800"}', "request_id"),
        ('{"command": "pa\\ud800use"}', "command"),
    ],
)
async def test_websocket_rejects_unpaired_surrogate(
    gateway: GatewayServer, store: EventStore, message: str, field: str
) -> None:
    built = await build_session(store, "paused")
    url = f"{gateway.ws_url}/api/sessions/{built.session_id}/ws?since={len(built.events)}"

    async with websockets.connect(url) as socket:
        await socket.send(message)
        reply = await receive_json(socket)
        await socket.send('{"command": "task_status", "request_id": "after"}')
        status = await receive_json(socket)

    assert reply["type"] == "error"
    assert reply["code"] == "invalid_input"
    assert reply["field"] == field
    assert "unpaired surrogate" in reply["message"]
    assert status["request_id"] == "after"


async def test_websocket_message_without_command(gateway: GatewayServer, store: EventStore) -> None:
    built = await build_session(store, "paused")
    url = f"{gateway.ws_url}/api/sessions/{built.session_id}/ws?since={len(built.events)}"

    async with websockets.connect(url) as socket:
        await socket.send('{"nocommand": 1, "request_id": 7}')
        reply = await receive_json(socket)

    assert reply["type"] == "error"
    assert reply["code"] == "missing_command"
    assert reply["field"] == "command"
    assert reply["request_id"] == 7
    assert "command field is missing" in reply["message"]
    assert "pause_execution" in reply["message"]
    assert "None" not in reply["message"]


async def test_websocket_rejects_unknown_field(gateway: GatewayServer, store: EventStore) -> None:
    built = await build_session(store, "paused")
    url = f"{gateway.ws_url}/api/sessions/{built.session_id}/ws?since={len(built.events)}"

    async with websockets.connect(url) as socket:
        await socket.send('{"command": "act", "task": "Click Login", "bogus": 1, "request_id": 3}')
        reply = await receive_json(socket)

    assert reply["type"] == "error"
    assert reply["code"] == "invalid_input"
    assert reply["field"] == "bogus"
    assert reply["request_id"] == 3
    assert "bogus is not a known field of act" in reply["message"]
    assert await commands_for(store._js, built.session_id) == []


@pytest.mark.parametrize("content", [b"not json", b'{"task": '])
async def test_body_not_json_names_body(
    client: httpx.AsyncClient, store: EventStore, content: bytes
) -> None:
    built = await build_session(store, "paused")

    response = await client.post(
        f"/api/sessions/{built.session_id}/act", content=content, headers=JSON_HEADERS
    )

    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "body"
    assert response.json()["error"]["code"] == "invalid_json"
    assert "JSON object" in response.json()["error"]["message"]


async def test_body_array_must_be_object(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/sessions", json=[1, 2])

    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "body"
    assert "must be a JSON object" in response.json()["error"]["message"]


async def test_deeply_nested_body_is_422(client: httpx.AsyncClient) -> None:
    body = b"[" * 100_000 + b"]" * 100_000

    response = await client.post("/api/sessions", content=body, headers=JSON_HEADERS)

    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_json"
    assert response.json()["error"]["field"] == "body"
    assert "nested too deeply" in response.json()["error"]["message"]


async def test_plain_text_body_names_content_type(client: httpx.AsyncClient) -> None:
    body = b'{"test_case": "1. Open the page", "target_url": "http://127.0.0.1/"}'

    response = await client.post(
        "/api/sessions", content=body, headers={"Content-Type": "text/plain"}
    )

    assert response.status_code == 422, response.text
    assert "Content-Type: application/json" in response.json()["error"]["message"]


async def test_javascript_url_names_its_scheme(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/sessions", json={"test_case": "1. Open the page", "target_url": "javascript:alert(1)"}
    )

    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "has the scheme 'javascript'" in message
    assert "javascript://" not in message


# --- secret placeholders ----------------------------------------------------------------


async def test_spaced_placeholder_needs_its_secret(client: httpx.AsyncClient) -> None:
    case = 'Type "{{ password }}" into "Password"'

    missing = await client.post("/api/sessions", json={"test_case": case, "target_url": GOOD_URL})
    with_secret = await client.post(
        "/api/sessions",
        json={"test_case": case, "target_url": GOOD_URL, "secrets": {"password": "hunter2"}},
    )

    assert missing.status_code == 422, missing.text
    assert missing.json()["error"]["field"] == "secrets.password"
    assert with_secret.status_code == 201, with_secret.text
    assert with_secret.json()["secret_names"] == ["password"]


@pytest.mark.parametrize("placeholder", ["{{1pw}}", "{{ pass-word }}"])
async def test_invalid_placeholder_name_rejected(
    client: httpx.AsyncClient, placeholder: str
) -> None:
    body = {"test_case": f"Type {placeholder} into the box", "target_url": GOOD_URL}

    response = await client.post("/api/sessions", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "test_case"
    assert placeholder in response.json()["error"]["message"]
    assert "a name is a letter or underscore" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("act", {"task": "Type {{1pw}}"}, "task"),
        ("plan/continue", {"task_prompt": "Type {{1pw}}"}, "task_prompt"),
    ],
)
async def test_controls_reject_invalid_placeholder(
    client: httpx.AsyncClient, store: EventStore, path: str, body: dict, field: str
) -> None:
    built = await build_session(store, "paused")

    response = await client.post(f"/api/sessions/{built.session_id}/{path}", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert "{{1pw}}" in response.json()["error"]["message"]


# --- since after the last seq -----------------------------------------------------------


async def test_events_since_after_last_seq_rejected(
    client: httpx.AsyncClient, store: EventStore
) -> None:
    built = await build_session(store, "created")
    last_seq = len(built.events)

    past = await client.get(f"/api/sessions/{built.session_id}/events", params={"since": 999})
    at_end = await client.get(
        f"/api/sessions/{built.session_id}/events", params={"since": last_seq}
    )

    assert past.status_code == 422, past.text
    assert past.json()["error"]["field"] == "since"
    assert past.json()["error"]["last_seq"] == last_seq
    assert f"last seq {last_seq}" in past.json()["error"]["message"]
    assert at_end.status_code == 200, at_end.text
    assert at_end.json()["events"] == []


@pytest.mark.parametrize(
    ("params", "headers", "field"),
    [({"since": 999}, {}, "since"), ({}, {"Last-Event-ID": "999"}, "Last-Event-ID")],
)
async def test_sse_since_after_last_seq_rejected(
    client: httpx.AsyncClient, store: EventStore, params: dict, headers: dict, field: str
) -> None:
    built = await build_session(store, "created")

    response = await client.get(
        f"/api/sessions/{built.session_id}/stream", params=params, headers=headers
    )

    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field
    assert response.json()["error"]["last_seq"] == len(built.events)


async def test_websocket_since_after_last_seq_closes_4422(
    gateway: GatewayServer, store: EventStore
) -> None:
    built = await build_session(store, "created")
    url = f"{gateway.ws_url}/api/sessions/{built.session_id}/ws?since=999"

    async with websockets.connect(url) as socket:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), RECEIVE_TIMEOUT)

    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4422
    assert "since=999" in closed.value.rcvd.reason
    assert f"last seq {len(built.events)}" in closed.value.rcvd.reason


async def test_websocket_since_equal_last_seq_gets_live_events(
    gateway: GatewayServer, store: EventStore
) -> None:
    built = await build_session(store, "created")
    url = f"{gateway.ws_url}/api/sessions/{built.session_id}/ws?since={len(built.events)}"

    async with websockets.connect(url) as socket:
        # A reply shows the socket stayed open and joined the feed.
        await socket.send('{"command": "task_status", "request_id": "ready"}')
        ready = await receive_json(socket)
        appended = await store.append(built.session_id, ev.PlanStarted(plan_id="p", model="x"))
        live = await receive_json(socket)

    assert ready["request_id"] == "ready"
    assert live["seq"] == appended.seq


# --- wait_for_seq -----------------------------------------------------------------------


async def test_wait_for_seq_timeout_sets_header(
    nats_server, gateway_database: str, store: EventStore
) -> None:
    built = await build_session(store, "created")
    last_seq = len(built.events)
    server = GatewayServer(
        gateway_settings(nats_server.url, gateway_database, max_wait_for_seq=0.2)
    ).start()
    try:
        server.wait_nats()
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            behind = await http.get(
                f"/api/sessions/{built.session_id}", params={"wait_for_seq": last_seq + 5}
            )
            reached = await http.get(
                f"/api/sessions/{built.session_id}", params={"wait_for_seq": last_seq}
            )
    finally:
        server.stop()

    assert behind.status_code == 200, behind.text
    assert behind.headers.get("X-Stepwise-Wait-Timed-Out") == "true"
    assert behind.json()["last_seq"] == last_seq
    assert reached.status_code == 200, reached.text
    assert "X-Stepwise-Wait-Timed-Out" not in reached.headers
