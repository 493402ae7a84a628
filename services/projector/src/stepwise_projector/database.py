"""Writes to the Postgres read models: event rows, session rows, the stored position.

Every function takes an open connection inside a transaction; the caller
commits, so the rows and the position they came from land together.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Integer,
    Text,
    bindparam,
    delete,
    select,
    text,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from stepwise_libs import readmodel
from stepwise_libs.events import Event
from stepwise_libs.fold import SessionState

# Row of `projector_position` that this projector owns.
POSITION_NAME = "projector"
NOTIFY_CHANNEL = readmodel.PROJECTION_CHANNEL

# Primary-key columns of each session-derived table.
_KEYS: dict[str, tuple[str, ...]] = {
    "sessions": ("session_id",),
    "plans": ("plan_id",),
    "steps": ("session_id", "step_number"),
    "tasks": ("task_id",),
}


def create_engine(database_url: str) -> AsyncEngine:
    """Return an engine whose pool drops connections that died while Postgres was away."""
    return create_async_engine(database_url, pool_pre_ping=True, pool_size=2, max_overflow=2)


async def lock_position(connection: AsyncConnection) -> int:
    """Return the stored position, locking its row until the transaction ends.

    The lock serializes writers: a second projector (or a rebuild) waits here and
    then reads the position the first one committed.
    """
    table = readmodel.projector_position
    await connection.execute(
        insert(table).values(name=POSITION_NAME, position=0).on_conflict_do_nothing()
    )
    result = await connection.execute(
        select(table.c.position).where(table.c.name == POSITION_NAME).with_for_update()
    )
    return int(result.scalar_one())


async def read_position(connection: AsyncConnection) -> int:
    """Return the stored position without locking it, 0 when none is stored."""
    table = readmodel.projector_position
    result = await connection.execute(select(table.c.position).where(table.c.name == POSITION_NAME))
    return int(result.scalar_one_or_none() or 0)


async def set_position(connection: AsyncConnection, position: int) -> None:
    table = readmodel.projector_position
    await connection.execute(
        table.update().where(table.c.name == POSITION_NAME).values(position=position)
    )


def event_row(event: Event) -> dict[str, Any]:
    """Return the `events` row of one event read from the stream."""
    return {
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


# One INSERT for a whole batch: each column arrives as one array parameter. Rows already
# stored (same position, event id or session and seq) are skipped, so a redelivered batch
# inserts nothing twice.
_INSERT_EVENTS = text(
    "INSERT INTO events (position, session_id, seq, event_id, type, at, command_id, version, data)"
    " SELECT position, session_id, seq, event_id, type, at, command_id, version, data::jsonb"
    " FROM unnest(:position, :session_id, :seq, :event_id, :type, :at, :command_id, :version,"
    " :data) AS batch(position, session_id, seq, event_id, type, at, command_id, version, data)"
    " ON CONFLICT DO NOTHING"
).bindparams(
    bindparam("position", type_=ARRAY(BigInteger)),
    bindparam("session_id", type_=ARRAY(Text)),
    bindparam("seq", type_=ARRAY(Integer)),
    bindparam("event_id", type_=ARRAY(Text)),
    bindparam("type", type_=ARRAY(Text)),
    bindparam("at", type_=ARRAY(DateTime(timezone=True))),
    bindparam("command_id", type_=ARRAY(Text)),
    bindparam("version", type_=ARRAY(Integer)),
    bindparam("data", type_=ARRAY(Text)),
)


async def insert_events(connection: AsyncConnection, events: list[Event]) -> None:
    """Insert the event rows in one statement, leaving any row already stored as it is."""
    if not events:
        return
    rows = [event_row(event) for event in events]
    columns: dict[str, list[Any]] = {name: [row[name] for row in rows] for name in rows[0]}
    columns["data"] = [json.dumps(data) for data in columns["data"]]
    await connection.execute(_INSERT_EVENTS, columns)


async def write_sessions(connection: AsyncConnection, states: Sequence[SessionState]) -> None:
    """Make the session-derived rows of these sessions equal `session_rows` of each state.

    One upsert and one delete per table cover every session of the batch, so a batch
    costs the same number of statements whether it touches one session or hundreds.
    """
    if not states:
        return
    all_rows: dict[str, list[dict[str, Any]]] = {
        table.name: [] for table in readmodel.SESSION_TABLES
    }
    for state in states:
        for name, table_rows in readmodel.session_rows(state).items():
            all_rows[name].extend(table_rows)
    session_ids = [state.session_id for state in states]
    for table in readmodel.SESSION_TABLES:
        keys = _KEYS[table.name]
        table_rows = all_rows[table.name]
        if table_rows:
            statement = insert(table)
            updates = {
                column.name: statement.excluded[column.name]
                for column in table.columns
                if column.name not in keys
            }
            await connection.execute(
                statement.on_conflict_do_update(index_elements=list(keys), set_=updates),
                table_rows,
            )
        if table is readmodel.sessions:
            continue

        # Rows of these sessions that their states no longer have, such as plans of a
        # state rebuilt after a retention limit dropped old events.
        stale = delete(table).where(table.c.session_id.in_(session_ids))
        if table_rows and len(keys) == 1:
            stale = stale.where(table.c[keys[0]].not_in([row[keys[0]] for row in table_rows]))
        elif table_rows:
            key_columns = tuple_(*(table.c[name] for name in keys))
            stale = stale.where(
                key_columns.not_in([tuple(row[n] for n in keys) for row in table_rows])
            )
        await connection.execute(stale)


_NOTIFY_ALL = text("SELECT pg_notify(:channel, notice) FROM unnest(:notices) AS notice").bindparams(
    bindparam("notices", type_=ARRAY(Text))
)


async def notify_projected_all(connection: AsyncConnection, states: Sequence[SessionState]) -> None:
    """Queue one `<session_id>:<last_seq>` notice per session, which Postgres sends on commit."""
    if not states:
        return
    notices = [f"{state.session_id}:{state.last_seq}" for state in states]
    await connection.execute(_NOTIFY_ALL, {"channel": NOTIFY_CHANNEL, "notices": notices})


async def truncate_read_models(connection: AsyncConnection) -> None:
    """Empty every read-model table and the stored position."""
    names = ", ".join(table.name for table in (*readmodel.SESSION_TABLES, readmodel.events))
    await connection.execute(text(f"TRUNCATE {names}, {readmodel.projector_position.name}"))
