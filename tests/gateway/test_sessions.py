import httpx
import pytest
from nats.js import JetStreamContext
from stepwise_libs import subjects
from stepwise_libs.jetstream import EventStore

from .conftest import GatewayServer, commands_for, gateway_settings

VALID = {
    "test_case": '1. Open the home page\n2. Click "Cart"',
    "target_url": "http://127.0.0.1:8123/shop",
}


async def test_create_session_appends_event_and_queues_plan(
    client: httpx.AsyncClient, store: EventStore, js: JetStreamContext
) -> None:
    response = await client.post("/api/sessions", json=VALID)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "created"
    assert body["llm_model"] == "offline"
    assert body["last_seq"] == 1
    events = await store.read(body["session_id"])
    assert [event.type for event in events] == ["session_created"]
    assert events[0].data["test_case"] == VALID["test_case"]
    assert events[0].data["target_url"] == VALID["target_url"]
    assert events[0].command_id == body["command_id"]
    queued = await commands_for(js, body["session_id"])
    assert [subject for subject, _ in queued] == [subjects.planner_command_subject("generate_plan")]
    assert queued[0][1].command_id == body["command_id"]
    assert queued[0][1].data == {
        "test_case": VALID["test_case"],
        "target_url": VALID["target_url"],
        "llm_model": "offline",
    }


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"test_case": ""}, "test_case", "must not be empty"),
        ({"test_case": "   \n\t"}, "test_case", "must not be empty"),
        ({"test_case": "click\x00 here"}, "test_case", "U+0000"),
        ({"test_case": "beep\x07"}, "test_case", "control character"),
        ({"test_case": "x" * 100_001}, "test_case", "100,000"),
        ({"target_url": "ftp://127.0.0.1/file"}, "target_url", "ftp://"),
        ({"target_url": "127.0.0.1:8000/login"}, "target_url", "http"),
        ({"target_url": "http://user:secret@127.0.0.1/"}, "target_url", "credentials"),
        ({"target_url": "http:///path-only"}, "target_url", "no host"),
        ({"target_url": "http://127.0.0.1:99999/"}, "target_url", "not a valid URL"),
        ({"target_url": "http://127.0.0.1/" + "a" * 2040}, "target_url", "2,048"),
        ({"target_url": "http://127.0.0.1/a b"}, "target_url", "spaces"),
        ({"llm_model": "gpt-4o"}, "llm_model", "not a known model"),
        ({"llm_model": "gemini-2.5-flash"}, "llm_model", "GEMINI_API_KEY"),
        ({"test_case": 12}, "test_case", "string"),
        ({"surprise": 1}, "surprise", "not a known field"),
    ],
)
async def test_create_session_rejects_invalid_field(
    client: httpx.AsyncClient, change: dict[str, object], field: str, words: str
) -> None:
    response = await client.post("/api/sessions", json=VALID | change)

    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field
    assert words in error["message"]


async def test_create_session_rejects_missing_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/sessions", json={"test_case": "Open the page"})

    assert response.status_code == 422
    assert response.json()["error"]["field"] == "target_url"
    assert response.json()["error"]["message"] == "target_url is required"


async def test_create_session_rejects_malformed_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/sessions", content=b'{"test_case": ', headers={"Content-Type": "application/json"}
    )

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_json"


async def test_create_session_accepts_gemini_with_key(
    nats_server, gateway_database, store: EventStore
) -> None:
    server = GatewayServer(
        gateway_settings(nats_server.url, gateway_database, gemini_configured=True)
    ).start()
    try:
        server.wait_nats()
        async with httpx.AsyncClient(base_url=server.url) as http:
            response = await http.post(
                "/api/sessions", json=VALID | {"llm_model": "gemini-2.5-flash"}
            )
    finally:
        server.stop()

    assert response.status_code == 201, response.text
    events = await store.read(response.json()["session_id"])
    assert events[0].data["llm_model"] == "gemini-2.5-flash"


async def test_create_session_idempotency_key_creates_once(
    client: httpx.AsyncClient, store: EventStore, js: JetStreamContext
) -> None:
    headers = {"Idempotency-Key": "create-" + VALID["target_url"][-4:] + str(id(client))}

    first = await client.post("/api/sessions", json=VALID, headers=headers)
    second = await client.post("/api/sessions", json=VALID, headers=headers)

    assert first.status_code == second.status_code == 201
    assert first.json()["session_id"] == second.json()["session_id"]
    session_id = first.json()["session_id"]
    assert [event.type for event in await store.read(session_id)] == ["session_created"]
    assert len(await commands_for(js, session_id)) == 1


async def test_unknown_session_is_404(client: httpx.AsyncClient) -> None:
    unknown = "00000000-0000-4000-8000-000000000000"

    for method, path in [
        ("GET", f"/api/sessions/{unknown}"),
        ("GET", f"/api/sessions/{unknown}/events"),
        ("GET", f"/api/sessions/{unknown}/task/status"),
        ("POST", f"/api/sessions/{unknown}/start"),
        ("POST", f"/api/sessions/{unknown}/pause"),
        ("GET", "/api/sessions/not.a*session"),
    ]:
        response = await client.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "session_not_found"


async def test_unknown_route_is_json_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/nothing-here")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
