"""The projector as its own process against real NATS and Postgres: it projects, survives
SIGKILL, skips malformed messages and rebuilds to identical rows."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from nats.aio.client import Client as NATS
from projector_process import ProjectorProcess
from projector_scenarios import SCENARIOS, append_sessions, completed_run
from stepwise_libs import subjects
from stepwise_libs.jetstream import EventStore
from support.readmodels import (
    assert_read_models_match_stream,
    asyncpg_dsn,
    dump,
    read_model_snapshot,
    wait_for_position,
    wait_for_sessions,
)

from stepwise.embedded import EmbeddedNats, EmbeddedPostgres


async def _stream_last_position(js_client: NATS) -> int:
    info = await js_client.jetstream().stream_info(subjects.EVENTS_STREAM)
    return int(info.state.last_seq)


async def test_projector_projects_every_scenario(
    projector: ProjectorProcess, store: EventStore, events_nats: EmbeddedNats, database_url: str
) -> None:
    # Arrange: sessions appended before the projector starts, then more while it runs.
    before = await append_sessions(store)
    projector.start()
    after = await append_sessions(store)

    # Act
    await wait_for_sessions(database_url, {**before, **after}, timeout_seconds=60)

    # Assert
    await assert_read_models_match_stream(database_url, events_nats.url)
    snapshot = await read_model_snapshot(database_url)
    assert len(snapshot["sessions"]) == 2 * len(SCENARIOS)
    statuses = sorted(row["status"] for row in snapshot["sessions"])
    assert statuses == sorted(
        ["completed", "failed", "paused", "cancelled", "completed", "failed"] * 2
    )
    assert "service ready" in projector.logs()
    assert projector.stop() == 0


async def test_projector_sigkill_loses_nothing(
    projector: ProjectorProcess,
    store: EventStore,
    js_client: NATS,
    events_nats: EmbeddedNats,
    database_url: str,
) -> None:
    # Arrange: a backlog of about a thousand events, projected in batches of 50.
    expected = await append_sessions(store, rounds=10)
    projector.start()

    # Act: kill the projector part-way through, append more while it is down, restart it.
    await wait_for_position(database_url, 200, timeout_seconds=60)
    projector.kill()
    killed_at = await _read_position(database_url)
    expected.update(await append_sessions(store, rounds=3))
    projector.start()
    expected.update(await append_sessions(store, rounds=2))
    await wait_for_sessions(database_url, expected, timeout_seconds=120)

    # Assert
    last = await _stream_last_position(js_client)
    assert 200 <= killed_at < last - 500
    assert await _read_position(database_url) == last
    await assert_read_models_match_stream(database_url, events_nats.url)
    assert projector.stop() == 0


async def _read_position(database_url: str) -> int:
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return int(await connection.fetchval("SELECT position FROM projector_position") or 0)
    finally:
        await connection.close()


async def test_projector_skips_malformed_messages(
    projector: ProjectorProcess,
    store: EventStore,
    js_client: NATS,
    events_nats: EmbeddedNats,
    database_url: str,
) -> None:
    # Arrange: one good session, then three kinds of bad message, then another good session.
    js = js_client.jetstream()
    first = "good-before"
    await completed_run(store, first)
    garbage = await js.publish(subjects.session_events_subject("rogue-1"), b"\x00not json{")
    unknown = await js.publish(
        subjects.session_events_subject("rogue-2"),
        b'{"id":"x","session_id":"rogue-2","seq":1,"type":"no_such_event",'
        b'"at":"2026-01-01T00:00:00Z","data":{}}',
    )
    wrong_payload = await js.publish(
        subjects.session_events_subject("rogue-3"),
        b'{"id":"y","session_id":"rogue-3","seq":1,"type":"step_started",'
        b'"at":"2026-01-01T00:00:00Z","data":{"step_number":"two"}}',
    )
    second = "good-after"
    await completed_run(store, second)

    # Act
    projector.start()
    expected = {first: (await store.last(first))[1], second: (await store.last(second))[1]}
    await wait_for_sessions(database_url, expected, timeout_seconds=60)

    # Assert: the good sessions match, nothing of the rogue ones was written.
    await assert_read_models_match_stream(database_url, events_nats.url)
    snapshot = await read_model_snapshot(database_url)
    assert {row["session_id"] for row in snapshot["sessions"]} == {first, second}
    assert snapshot["projector_position"][0]["position"] == await _stream_last_position(js_client)
    logs = projector.logs()
    for ack in (garbage, unknown, wrong_payload):
        line = next((line for line in logs.splitlines() if f"position={ack.seq}" in line), None)
        assert line is not None, f"no log line for position {ack.seq}:\n{logs}"
        assert "skipping malformed event" in line
        assert "subject=stepwise.events.rogue-" in line
    assert projector.stop() == 0


async def test_rebuild_gives_identical_rows(
    projector: ProjectorProcess,
    store: EventStore,
    events_nats: EmbeddedNats,
    postgres_server: EmbeddedPostgres,
    database_url: str,
) -> None:
    # Arrange: project a stream, then stop the projector.
    expected = await append_sessions(store, rounds=2)
    projector.start()
    await wait_for_sessions(database_url, expected, timeout_seconds=60)
    assert projector.stop() == 0
    projected = await read_model_snapshot(database_url)

    # Act: rebuild the same database, then another empty one.
    rebuilt = projector.command("rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    again = await read_model_snapshot(database_url)

    other_url = postgres_server.create_database(f"rebuild_{uuid.uuid4().hex[:12]}")
    fresh = ProjectorProcess(events_nats.url, other_url, projector.log_dir / "fresh", 50)
    fresh.log_dir.mkdir()
    into_empty = fresh.command("rebuild")
    assert into_empty.returncode == 0, into_empty.stderr
    from_empty = await read_model_snapshot(other_url)

    # Assert
    assert again == projected, dump(again)
    assert from_empty == projected, dump(from_empty)
    assert len(projected["events"]) == sum(expected.values())

    # The live projector resumes after the rebuild without re-applying or missing events.
    more = await append_sessions(store)
    projector.start()
    await wait_for_sessions(database_url, {**expected, **more}, timeout_seconds=60)
    await assert_read_models_match_stream(database_url, events_nats.url)
    assert projector.stop() == 0


async def test_rebuild_beside_running_projector(
    projector: ProjectorProcess, store: EventStore, events_nats: EmbeddedNats, database_url: str
) -> None:
    # Arrange: a live projector that has caught up.
    expected = await append_sessions(store, rounds=2)
    projector.start()
    await wait_for_sessions(database_url, expected, timeout_seconds=60)
    projected = await read_model_snapshot(database_url)

    # Act: rebuild while it runs; the rebuild replaces its durable consumer.
    rebuilt = await asyncio.to_thread(projector.command, "rebuild")
    after_rebuild = await read_model_snapshot(database_url)
    expected.update(await append_sessions(store))
    await wait_for_sessions(database_url, expected, timeout_seconds=60)

    # Assert
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert after_rebuild["events"] == projected["events"]
    assert after_rebuild["sessions"] == projected["sessions"]
    await assert_read_models_match_stream(database_url, events_nats.url)
    assert projector.stop() == 0


async def test_projector_replays_stream_into_empty_database(
    projector: ProjectorProcess,
    store: EventStore,
    events_nats: EmbeddedNats,
    postgres_server: EmbeddedPostgres,
    database_url: str,
) -> None:
    # Arrange: the durable consumer has acknowledged the whole stream for one database.
    expected = await append_sessions(store)
    projector.start()
    await wait_for_sessions(database_url, expected, timeout_seconds=60)
    assert projector.stop() == 0
    projected = await read_model_snapshot(database_url)

    # Act: a projector on an empty database finds the consumer ahead of its tables.
    other_url = postgres_server.create_database(f"empty_{uuid.uuid4().hex[:12]}")
    other = ProjectorProcess(events_nats.url, other_url, projector.log_dir / "other", 50)
    other.log_dir.mkdir()
    other.start()
    try:
        await wait_for_sessions(other_url, expected, timeout_seconds=60)
        replayed = await read_model_snapshot(other_url)
        assert other.stop() == 0
    finally:
        if other.process is not None and other.process.poll() is None:
            other.kill()

    # Assert
    assert replayed == projected, dump(replayed)
    assert "the durable consumer acknowledged position" in other.logs()
