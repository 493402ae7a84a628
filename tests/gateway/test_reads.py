import asyncio
import struct
import uuid
import zlib

import httpx
import websockets
from nats.js import JetStreamContext
from sqlalchemy import delete, insert, text
from sqlalchemy.ext.asyncio import create_async_engine
from stepwise.embedded import EmbeddedNats, free_port
from stepwise_libs import events as ev
from stepwise_libs import readmodel, subjects
from stepwise_libs.fold import fold
from stepwise_libs.jetstream import EventStore

from .conftest import GatewayServer, build_session, gateway_settings


def png(width: int = 2, height: int = 2) -> bytes:
    """Return a real RGB PNG of the given size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


async def project(
    database_url: str, store: EventStore, session_id: str, notify: bool = True
) -> int:
    """Write the session's read-model rows as the projector does; return the seq they reach."""
    state = fold(session_id, await store.read(session_id))
    engine = create_async_engine(database_url)
    async with engine.begin() as connection:
        for table in readmodel.SESSION_TABLES:
            await connection.execute(delete(table).where(table.c.session_id == session_id))
        for name, rows in readmodel.session_rows(state).items():
            if rows:
                await connection.execute(insert(readmodel.metadata.tables[name]), rows)
        if notify:
            await connection.execute(
                text("select pg_notify('stepwise_projection', :payload)"),
                {"payload": f"{session_id}:{state.last_seq}"},
            )
    await engine.dispose()
    return state.last_seq


async def test_screenshot_served_from_object_store(
    client: httpx.AsyncClient, store: EventStore, js: JetStreamContext
) -> None:
    built = await build_session(store, "paused")
    image = png()
    objects = await js.object_store(subjects.SCREENSHOTS_BUCKET)
    await objects.put(subjects.screenshot_object_name(built.session_id, 1, 1), image)

    full = await client.get(
        f"/api/sessions/{built.session_id}/screenshots/{built.session_id}/1/1.png"
    )
    short = await client.get(f"/api/sessions/{built.session_id}/screenshots/1/1.png")
    cached = await client.get(
        f"/api/sessions/{built.session_id}/screenshots/1/1.png",
        headers={"If-None-Match": full.headers["etag"]},
    )

    assert full.status_code == 200
    assert full.headers["content-type"] == "image/png"
    assert full.content == image
    assert "max-age" in full.headers["cache-control"]
    assert short.content == image
    assert cached.status_code == 304


async def test_screenshot_outside_session_is_404(
    client: httpx.AsyncClient, store: EventStore, js: JetStreamContext
) -> None:
    mine, other = await build_session(store, "paused"), await build_session(store, "paused")
    objects = await js.object_store(subjects.SCREENSHOTS_BUCKET)
    await objects.put(subjects.screenshot_object_name(other.session_id, 1, 1), png())

    for name in [
        f"{other.session_id}/1/1.png",
        f"../{other.session_id}/1/1.png",
        "1/2.png",
        "1/1.jpg",
        "etc/passwd",
    ]:
        response = await client.get(f"/api/sessions/{mine.session_id}/screenshots/{name}")
        assert response.status_code == 404, name
        # httpx resolves "../" before sending, so that request does not reach the screenshot route.
        if not name.startswith(".."):
            assert response.json()["error"]["code"] == "screenshot_not_found", name


async def test_session_detail_from_read_model(
    client: httpx.AsyncClient, store: EventStore, gateway_database: str
) -> None:
    built = await build_session(store, "paused")
    await project(gateway_database, store, built.session_id)

    response = await client.get(f"/api/sessions/{built.session_id}")

    assert response.status_code == 200
    body = response.json()
    assert body["source"] == "read_model"
    assert body["status"] == "paused"
    assert body["llm_model"] == "offline"
    assert body["target_url"] == "http://127.0.0.1:9/"
    assert body["last_seq"] == len(built.events)
    assert body["counts"] == {"steps_total": 3, "passed": 1, "failed": 0, "skipped": 0}
    assert body["plans"][0]["unparsed"] == ["wiggle the mouse"]
    assert body["plans"][0]["plan_text"].startswith("1. Open the home page")
    assert [step["status"] for step in body["steps"]] == ["passed", "pending", "pending"]
    assert body["steps"][0]["thinking"] == "opened"
    assert body["steps"][0]["screenshots"] == [
        {
            "name": f"{built.session_id}/1/1.png",
            "url": f"/api/sessions/{built.session_id}/screenshots/{built.session_id}/1/1.png",
        }
    ]
    assert body["current_task"]["task_id"] == built.task_id
    assert body["current_task"]["task_type"] == "execution"


async def test_session_detail_falls_back_to_stream(
    client: httpx.AsyncClient, store: EventStore
) -> None:
    built = await build_session(store, "plan_ready")

    response = await client.get(f"/api/sessions/{built.session_id}")

    assert response.status_code == 200
    assert response.json()["source"] == "event_stream"
    assert response.json()["status"] == "plan_ready"
    assert len(response.json()["steps"]) == 3


async def test_wait_for_seq_returns_once_projected(
    client: httpx.AsyncClient, store: EventStore, gateway_database: str
) -> None:
    built = await build_session(store, "plan_ready")
    await project(gateway_database, store, built.session_id)
    reached = await store.append(built.session_id, ev.BrowserClosed(reason="x"))

    waiting = asyncio.create_task(
        client.get(f"/api/sessions/{built.session_id}", params={"wait_for_seq": reached.seq})
    )
    done, _ = await asyncio.wait({waiting}, timeout=0.5)
    assert not done, "the read must wait for the projector"
    await project(gateway_database, store, built.session_id)
    response = await asyncio.wait_for(waiting, 10)

    assert response.status_code == 200
    assert response.json()["source"] == "read_model"
    assert response.json()["last_seq"] == reached.seq


async def test_list_sessions_newest_first_with_filter(
    client: httpx.AsyncClient, store: EventStore, gateway_database: str
) -> None:
    built = [
        await build_session(store, state) for state in ("created", "paused", "completed", "paused")
    ]
    for session in built:
        await project(gateway_database, store, session.session_id)
    ours = {session.session_id for session in built}

    everything = await client.get("/api/sessions", params={"limit": 500})
    paused = await client.get("/api/sessions", params={"status": "paused", "limit": 500})
    first_page = await client.get("/api/sessions", params={"limit": 2})
    second_page = await client.get(
        "/api/sessions", params={"limit": 2, "cursor": first_page.json()["next_cursor"]}
    )
    offset_page = await client.get("/api/sessions", params={"limit": 2, "offset": 2})
    bad_status = await client.get("/api/sessions", params={"status": "sleeping"})
    bad_cursor = await client.get("/api/sessions", params={"cursor": "???"})

    listed = [
        row["session_id"] for row in everything.json()["sessions"] if row["session_id"] in ours
    ]
    assert listed == [session.session_id for session in reversed(built)]
    paused_ids = [
        row["session_id"] for row in paused.json()["sessions"] if row["session_id"] in ours
    ]
    assert paused_ids == [built[3].session_id, built[1].session_id]
    assert all(row["status"] == "paused" for row in paused.json()["sessions"])
    all_ids = [row["session_id"] for row in everything.json()["sessions"]]
    assert [row["session_id"] for row in first_page.json()["sessions"]] == all_ids[:2]
    assert [row["session_id"] for row in second_page.json()["sessions"]] == all_ids[2:4]
    assert [row["session_id"] for row in offset_page.json()["sessions"]] == all_ids[2:4]
    assert bad_status.status_code == 422
    assert bad_status.json()["error"]["field"] == "status"
    assert bad_cursor.status_code == 422
    assert bad_cursor.json()["error"]["field"] == "cursor"


async def test_postgres_down_is_503_and_websocket_works(
    nats_server: EmbeddedNats, store: EventStore
) -> None:
    unreachable = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing"
    server = GatewayServer(gateway_settings(nats_server.url, unreachable)).start()
    built = await build_session(store, "plan_ready")
    try:
        server.wait_nats()
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            listing = await http.get("/api/sessions")
            detail = await http.get(f"/api/sessions/{built.session_id}")
            ready = await http.get("/readyz")
            created = await http.post(
                "/api/sessions",
                json={"test_case": "Open the page", "target_url": "http://127.0.0.1:9/"},
            )
        async with websockets.connect(
            f"{server.ws_url}/api/sessions/{built.session_id}/ws"
        ) as socket:
            first = await asyncio.wait_for(socket.recv(), 10)
    finally:
        server.stop()

    assert listing.status_code == 503
    assert listing.json()["error"]["code"] == "database_unavailable"
    assert detail.status_code == 503
    assert ready.status_code == 503
    assert ready.json()["nats"] == "ok"
    assert ready.json()["database"].startswith("unreachable")
    assert created.status_code == 201
    assert '"seq":1' in first


async def test_nats_down_is_503(gateway_database: str) -> None:
    server = GatewayServer(
        gateway_settings(f"nats://127.0.0.1:{free_port()}", gateway_database)
    ).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            created = await http.post(
                "/api/sessions",
                json={"test_case": "Open the page", "target_url": "http://127.0.0.1:9/"},
            )
            start = await http.post(f"/api/sessions/{uuid.uuid4()}/start")
            ready = await http.get("/readyz")
            health = await http.get("/healthz")
            listing = await http.get("/api/sessions")
    finally:
        server.stop()

    assert created.status_code == 503
    assert created.json()["error"]["code"] == "nats_unavailable"
    assert "NATS" in created.json()["error"]["message"]
    assert start.status_code == 503
    assert ready.status_code == 503
    assert ready.json()["nats"] == "not connected"
    assert health.status_code == 200
    assert listing.status_code == 200


async def test_health_and_openapi(client: httpx.AsyncClient) -> None:
    health = await client.get("/healthz")
    ready = await client.get("/readyz")
    spec = (await client.get("/openapi.json")).json()

    assert health.json() == {"status": "ok"}
    assert ready.json() == {"status": "ready", "nats": "ok", "database": "ok"}
    schemas = spec["components"]["schemas"]
    for name in [
        "CreateSessionRequest",
        "SessionCreatedResponse",
        "SessionDetail",
        "QueuedResponse",
        "EventList",
        "ErrorResponse",
    ]:
        assert name in schemas, name
    create = spec["paths"]["/api/sessions"]["post"]
    assert create["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "SessionCreatedResponse"
    )
    assert create["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ErrorResponse"
    )
    start = spec["paths"]["/api/sessions/{session_id}/start"]["post"]
    assert "409" in start["responses"]
    assert any(parameter["name"] == "Idempotency-Key" for parameter in start["parameters"])


async def test_missing_tables_is_503_naming_migrate(
    nats_server: EmbeddedNats, postgres_server, store: EventStore
) -> None:
    empty = postgres_server.create_database(f"gateway_empty_{uuid.uuid4().hex[:8]}")
    server = GatewayServer(gateway_settings(nats_server.url, empty)).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            listing = await http.get("/api/sessions")
    finally:
        server.stop()

    assert listing.status_code == 503
    assert "stepwise-projector migrate" in listing.json()["error"]["message"]
