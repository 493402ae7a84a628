"""Checks that the Postgres read models equal a fold of the JetStream events stream.

Any test that runs the projector can call:

    await wait_for_sessions(database_url, {session_id: last_seq})
    await assert_read_models_match_stream(database_url, nats_url, [session_id])

Import it as `from support.readmodels import ...` (pytest puts `tests/` on sys.path).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from sqlalchemy import Table, select
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from stepwise_libs import readmodel, subjects
from stepwise_libs.events import Event, decode_event
from stepwise_libs.fold import fold
from stepwise_libs.jetstream import EventStore, connect

NOTIFY_CHANNEL = readmodel.PROJECTION_CHANNEL

_KEYS: dict[str, tuple[str, ...]] = {
    "sessions": ("session_id",),
    "plans": ("plan_id",),
    "steps": ("session_id", "step_number"),
    "tasks": ("task_id",),
    "events": ("position",),
    "projector_position": ("name",),
}
_SNAPSHOT_TABLES = (*readmodel.SESSION_TABLES, readmodel.events, readmodel.projector_position)


def normalize(value: Any) -> Any:
    """Return `value` in one comparable form: UTC ISO timestamps, plain JSON types."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise AssertionError(f"naive timestamp {value!r}: read-model times must be tz-aware")
        return value.astimezone(UTC).isoformat()
    if isinstance(value, dict):
        return {str(key): normalize(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [normalize(item) for item in value]
    if isinstance(value, msgspec.Struct):
        return normalize(msgspec.to_builtins(value))
    return value


def _row_key(table: str, row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(row[name] for name in _KEYS[table])


def _normalized_rows(table: str, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    normalized = [normalize(dict(row)) for row in rows]
    return sorted(normalized, key=lambda row: _row_key(table, row))


async def _select(
    connection: AsyncConnection, table: Table, session_ids: list[str] | None = None
) -> list[dict[str, Any]]:
    statement = select(table)
    if session_ids is not None:
        statement = statement.where(table.c.session_id.in_(session_ids))
    result = await connection.execute(statement)
    return _normalized_rows(table.name, (row._mapping for row in result))


async def read_model_snapshot(database_url: str) -> dict[str, list[dict[str, Any]]]:
    """Return every row of every read-model table, normalized and sorted by key."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            return {table.name: await _select(connection, table) for table in _SNAPSHOT_TABLES}
    finally:
        await engine.dispose()


def _decode(subject: str, data: bytes | None, position: int) -> Event | None:
    """Decode a stream message as the projector must: a malformed one is None."""
    try:
        event = decode_event(data or b"", position)
        event.payload()
    except msgspec.MsgspecError:
        return None
    if subject != subjects.session_events_subject(event.session_id):
        return None
    return event


async def read_stream(
    nats_url: str, session_ids: list[str] | None = None
) -> dict[str, list[Event]]:
    """Return the well-formed events of the stream, by session, in stream order."""
    client = await connect(nats_url, "tests-readmodels")
    try:
        js = client.jetstream()
        if session_ids is not None:
            store = EventStore(js)
            return {session_id: await store.read(session_id) for session_id in session_ids}

        info = await js.stream_info(subjects.EVENTS_STREAM)
        last = info.state.last_seq
        by_session: dict[str, list[Event]] = {}
        if not info.state.messages:
            return by_session
        subscription = await js.subscribe(
            f"{subjects.EVENTS_PREFIX}.*",
            stream=subjects.EVENTS_STREAM,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        try:
            position = 0
            while position < last:
                try:
                    message = await subscription.next_msg(timeout=30)
                except NatsTimeoutError:
                    raise AssertionError(
                        f"reading the events stream stalled at position {position} of {last}"
                    ) from None
                position = message.metadata.sequence.stream
                event = _decode(message.subject, message.data, position)
                if event is not None:
                    by_session.setdefault(event.session_id, []).append(event)
        finally:
            await subscription.unsubscribe()
        return by_session
    finally:
        await client.close()


def _expected_event_row(event: Event) -> dict[str, Any]:
    return normalize(
        {
            "position": event.position,
            "session_id": event.session_id,
            "seq": event.seq,
            "event_id": event.id,
            "type": event.type,
            "at": event.at,
            "command_id": event.command_id,
            "version": event.version,
            "data": event.data,
        }
    )


def _first_difference(
    table: str, expected: list[dict[str, Any]], actual: list[dict[str, Any]]
) -> str:
    expected_by_key = {_row_key(table, row): row for row in expected}
    actual_by_key = {_row_key(table, row): row for row in actual}
    missing = sorted(set(expected_by_key) - set(actual_by_key))
    extra = sorted(set(actual_by_key) - set(expected_by_key))
    if missing:
        return f"{table}: rows missing from Postgres: {missing[:5]}"
    if extra:
        return f"{table}: rows in Postgres that the fold does not produce: {extra[:5]}"
    for key, row in expected_by_key.items():
        other = actual_by_key[key]
        for column, value in row.items():
            if other.get(column) != value:
                return (
                    f"{table} row {key}: column {column} is {other.get(column)!r} in Postgres, "
                    f"{value!r} in the fold of the stream"
                )
    return f"{table}: rows differ"


async def assert_read_models_match_stream(
    database_url: str, nats_url: str, session_ids: list[str] | None = None
) -> None:
    """Assert that the read models equal `session_rows(fold(events))` and the events table.

    With `session_ids` None every session of the stream is checked, and Postgres
    may hold no session the stream lacks; otherwise only the named sessions.
    """
    by_session = await read_stream(nats_url, session_ids)
    checked = sorted(by_session) if session_ids is None else list(session_ids)

    expected: dict[str, list[dict[str, Any]]] = {
        table.name: [] for table in readmodel.SESSION_TABLES
    }
    expected["events"] = []
    for session_id in checked:
        events = by_session.get(session_id, [])
        if not events:
            continue
        seqs = [event.seq for event in events]
        assert seqs == list(range(1, len(events) + 1)), (
            f"session {session_id}: stream seqs are not dense from 1: {seqs}"
        )
        rows = readmodel.session_rows(fold(session_id, events))
        for table, table_rows in rows.items():
            expected[table].extend(table_rows)
        expected["events"].extend(_expected_event_row(event) for event in events)

    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            filter_ids = None if session_ids is None else checked
            actual = {
                table.name: await _select(connection, table, filter_ids)
                for table in (*readmodel.SESSION_TABLES, readmodel.events)
            }
            position_rows = await _select(connection, readmodel.projector_position)
    finally:
        await engine.dispose()

    for table, rows in expected.items():
        folded = _normalized_rows(table, rows)
        assert actual[table] == folded, _first_difference(table, folded, actual[table])

    # The events table: dense seq per session, no duplicates, positions from the stream.
    seqs_by_session: dict[str, list[int]] = {}
    for row in actual["events"]:
        seqs_by_session.setdefault(row["session_id"], []).append(row["seq"])
    for session_id, seqs in seqs_by_session.items():
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), (
            f"session {session_id}: events table seqs are not dense from 1: {sorted(seqs)}"
        )
    event_ids = [row["event_id"] for row in actual["events"]]
    assert len(event_ids) == len(set(event_ids)), "events table holds an event id twice"

    if expected["events"]:
        highest = max(row["position"] for row in expected["events"])
        stored = max((row["position"] for row in position_rows), default=0)
        assert stored >= highest, (
            f"projector_position is {stored}, below position {highest} of a projected event"
        )


def asyncpg_dsn(database_url: str) -> str:
    """Return the asyncpg DSN of a `postgresql+asyncpg://` SQLAlchemy URL."""
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def wait_for_read_models(
    database_url: str,
    check: Callable[[asyncpg.Connection], Awaitable[bool]],
    timeout_seconds: float,
    description: str,
) -> None:
    """Wait until `check` holds, testing it at start and after each projector commit.

    Listens on the projector's NOTIFY channel, so it wakes on commits instead of
    polling; raises AssertionError naming `description` after `timeout_seconds`.
    """
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    woken = asyncio.Event()

    def on_notice(*_: object) -> None:
        woken.set()

    try:
        # Listen first, then check: a commit after the check always wakes the wait.
        await connection.add_listener(NOTIFY_CHANNEL, on_notice)
        deadline = asyncio.get_running_loop().time() + timeout_seconds
        while True:
            woken.clear()
            try:
                if await check(connection):
                    return
            except asyncpg.UndefinedTableError:
                pass  # the projector has not migrated yet
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(woken.wait(), timeout=max(remaining, 0))
            except TimeoutError:
                raise AssertionError(
                    f"timed out after {timeout_seconds} s waiting for {description}"
                ) from None
    finally:
        await connection.close(timeout=5)


async def wait_for_sessions(
    database_url: str, expected: Mapping[str, int], timeout_seconds: float = 60.0
) -> None:
    """Wait until every session in `expected` is projected up to at least its `last_seq`."""

    async def reached(connection: asyncpg.Connection) -> bool:
        rows = await connection.fetch(
            "SELECT session_id, last_seq FROM sessions WHERE session_id = ANY($1::text[])",
            list(expected),
        )
        seen = {row["session_id"]: row["last_seq"] for row in rows}
        return all(seen.get(session_id, 0) >= seq for session_id, seq in expected.items())

    await wait_for_read_models(
        database_url, reached, timeout_seconds, f"{len(expected)} sessions to reach their last seq"
    )


async def wait_for_position(
    database_url: str, position: int, timeout_seconds: float = 60.0
) -> None:
    """Wait until the projector has stored a stream position of at least `position`."""

    async def reached(connection: asyncpg.Connection) -> bool:
        stored = await connection.fetchval("SELECT max(position) FROM projector_position")
        return (stored or 0) >= position

    await wait_for_read_models(
        database_url, reached, timeout_seconds, f"stream position {position}"
    )


def dump(snapshot: Mapping[str, Any]) -> str:
    """Return a snapshot as sorted JSON, for a readable assertion diff."""
    return json.dumps(snapshot, indent=1, sort_keys=True, default=str)
