"""Projector batches in process: the position guard, gap filling and cache misses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS
from projector_scenarios import append_sessions
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy.ext.asyncio import AsyncEngine
from stepwise_libs import events as ev
from stepwise_libs import subjects
from stepwise_libs.jetstream import EventStore
from stepwise_projector import database, schema
from stepwise_projector.errors import MissingPositionError
from stepwise_projector.handlers import BatchWriter, Record, decode_record
from stepwise_projector.projection import Projector
from support.readmodels import assert_read_models_match_stream, dump, read_model_snapshot

from stepwise.embedded import EmbeddedNats


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await asyncio.to_thread(schema.upgrade, database_url)
    engine = database.create_engine(database_url)
    yield engine
    await engine.dispose()


async def _stream_records(js_client: NATS) -> list[Record]:
    """Return every message of the events stream as the consumer would deliver it."""
    js = js_client.jetstream()
    info = await js.stream_info(subjects.EVENTS_STREAM)
    records = []
    for position in range(1, info.state.last_seq + 1):
        message = await js.get_msg(subjects.EVENTS_STREAM, seq=position, direct=True)
        records.append(decode_record(message.subject or "", message.data, position))
    return records


async def test_reapplying_batch_changes_nothing(
    engine: AsyncEngine,
    store: EventStore,
    js_client: NATS,
    events_nats: EmbeddedNats,
    database_url: str,
) -> None:
    # Arrange
    await append_sessions(store)
    records = await _stream_records(js_client)
    projector = Projector(engine, js_client.jetstream())
    first = await projector.apply(records[:60])
    second = await projector.apply(records[60:])
    before = await read_model_snapshot(database_url)

    # Act: the same batches again, in order, out of order, and through a cold cache.
    again = [
        await projector.apply(records[:60]),
        await projector.apply(records),
        await projector.apply(records[30:90]),
        await Projector(engine, js_client.jetstream()).apply(records[10:]),
    ]
    after = await read_model_snapshot(database_url)

    # Assert
    assert first.applied == 60
    assert second.applied == len(records) - 60
    assert second.position == len(records)
    assert [result.applied for result in again] == [0, 0, 0, 0]
    assert [result.position for result in again] == [len(records)] * 4
    assert after == before, dump(after)
    await assert_read_models_match_stream(database_url, events_nats.url)


async def test_batch_fills_positions_missing_before_it(
    engine: AsyncEngine,
    store: EventStore,
    js_client: NATS,
    events_nats: EmbeddedNats,
    database_url: str,
) -> None:
    # Arrange: a batch that starts 40 positions after the stored one, as after a
    # crash when redelivered messages arrive after newer ones.
    await append_sessions(store)
    records = await _stream_records(js_client)
    projector = Projector(engine, js_client.jetstream())
    await projector.apply(records[:10])

    # Act
    result = await projector.apply(records[50:] + records[20:30])

    # Assert
    assert result.applied == len(records) - 10
    assert result.position == len(records)
    await assert_read_models_match_stream(database_url, events_nats.url)


async def test_batch_waits_for_position_not_yet_served(
    engine: AsyncEngine, store: EventStore, js_client: NATS
) -> None:
    # Arrange: a batch whose range includes positions the replica serving direct gets
    # does not have, as when a follower lags the leader in a cluster.
    await append_sessions(store)
    records = await _stream_records(js_client)
    projector = Projector(engine, js_client.jetstream())
    await projector.apply(records[:10])
    beyond = Record(len(records) + 5, records[-1].subject, records[-1].event)

    # Act
    with pytest.raises(MissingPositionError) as raised:
        await projector.apply([beyond])

    # Assert: nothing was written, so the retried batch will not skip those positions.
    assert raised.value.position == len(records) + 1
    async with engine.connect() as connection:
        assert await database.read_position(connection) == 10


async def test_cold_cache_rebuilds_sessions_from_stream(
    engine: AsyncEngine,
    store: EventStore,
    js_client: NATS,
    events_nats: EmbeddedNats,
    database_url: str,
) -> None:
    # Arrange: one projector applies the first half of every session's events.
    await append_sessions(store)
    records = await _stream_records(js_client)
    half = len(records) // 2
    await Projector(engine, js_client.jetstream()).apply(records[:half])

    # Act: a new projector, with no cached state, applies the rest.
    result = await Projector(engine, js_client.jetstream()).apply(records[half:])

    # Assert
    assert result.applied == len(records) - half
    await assert_read_models_match_stream(database_url, events_nats.url)


async def test_concurrent_projectors_serialize_on_position(
    engine: AsyncEngine,
    store: EventStore,
    js_client: NATS,
    events_nats: EmbeddedNats,
    database_url: str,
) -> None:
    # Arrange
    await append_sessions(store, rounds=2)
    records = await _stream_records(js_client)
    chunks = [records[start : start + 25] for start in range(0, len(records), 25)]
    projectors = [Projector(engine, js_client.jetstream()) for _ in range(3)]

    # Act: three projectors write interleaved chunks at the same time.
    results = await asyncio.gather(
        *(projectors[index % 3].apply(chunk) for index, chunk in enumerate(chunks))
    )

    # Assert: every position was applied exactly once, by one of the projectors.
    assert sum(result.applied for result in results) == len(records)
    assert max(result.position for result in results) == len(records)
    await assert_read_models_match_stream(database_url, events_nats.url)


async def test_malformed_record_advances_position(
    engine: AsyncEngine,
    store: EventStore,
    js_client: NATS,
    events_nats: EmbeddedNats,
    database_url: str,
) -> None:
    # Arrange
    js = js_client.jetstream()
    await append_sessions(store)
    await js.publish(subjects.session_events_subject("rogue"), b"[1, 2, 3]")
    records = await _stream_records(js_client)

    # Act
    result = await Projector(engine, js).apply(records)

    # Assert
    assert records[-1].event is None
    assert result.position == len(records)
    assert result.applied == len(records)
    snapshot = await read_model_snapshot(database_url)
    assert len(snapshot["events"]) == len(records) - 1
    await assert_read_models_match_stream(database_url, events_nats.url)


async def test_value_postgres_rejects_is_skipped(
    engine: AsyncEngine,
    store: EventStore,
    js_client: NATS,
    events_nats: EmbeddedNats,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Arrange: Postgres text cannot hold a NUL character, which a scraped page may contain.
    good = await append_sessions(store)
    bad = "session-with-nul"
    await store.append(
        bad,
        ev.SessionCreated(test_case="a\x00b", target_url="http://127.0.0.1/", llm_model="offline"),
    )
    await store.append(bad, ev.PlanStarted(plan_id="plan-of-nul", model="offline"))
    good.update(await append_sessions(store))
    records = await _stream_records(js_client)
    writer = BatchWriter(Projector(engine, js_client.jetstream()), asyncio.Event(), 1.0)

    # Act
    written = await writer.write(records)

    # Assert: the stream moved on past the two rejected events.
    assert written
    snapshot = await read_model_snapshot(database_url)
    assert snapshot["projector_position"][0]["position"] == len(records)
    assert bad not in {row["session_id"] for row in snapshot["sessions"]}
    assert bad not in {row["session_id"] for row in snapshot["events"]}
    assert set(good) == {row["session_id"] for row in snapshot["sessions"]}
    await assert_read_models_match_stream(database_url, events_nats.url, list(good))
    skipped = [record for record in caplog.records if "cannot store" in record.getMessage()]
    assert [record.position for record in skipped] == [  # type: ignore[attr-defined]
        record.position for record in records if record.event and record.event.session_id == bad
    ]


async def test_batch_statements_do_not_grow_with_sessions(
    engine: AsyncEngine,
    store: EventStore,
    js_client: NATS,
    events_nats: EmbeddedNats,
    database_url: str,
) -> None:
    # Arrange: every scenario three times, each in its own session, in one batch.
    await append_sessions(store, rounds=3)
    records = await _stream_records(js_client)
    sessions = {record.event.session_id for record in records if record.event is not None}
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        statements.append(statement)

    sqlalchemy_event.listen(engine.sync_engine, "before_cursor_execute", count)

    # Act
    try:
        result = await Projector(engine, js_client.jetstream()).apply(records)
    finally:
        sqlalchemy_event.remove(engine.sync_engine, "before_cursor_execute", count)

    # Assert: the lock, one insert of the events, one upsert per table, one delete per
    # table except sessions, one notify and the new position, whatever the session count.
    assert len(sessions) >= 10
    assert result.applied == len(records)
    assert len(statements) <= 12, "\n".join(statements)
    await assert_read_models_match_stream(database_url, events_nats.url)
