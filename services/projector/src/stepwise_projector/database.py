"""Writes to the Postgres read models: event rows, session rows, the stored position.

Every function takes an open connection inside a transaction; the caller
commits, so the rows and the position they came from land together.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert
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


async def insert_events(connection: AsyncConnection, events: list[Event]) -> None:
    """Insert the event rows; a row already stored (same position, id or seq) is left as is."""
    if not events:
        return
    statement = insert(readmodel.events).on_conflict_do_nothing()
    await connection.execute(statement, [event_row(event) for event in events])


async def write_session(connection: AsyncConnection, state: SessionState) -> None:
    """Make the session-derived rows of one session equal `session_rows(state)`."""
    rows = readmodel.session_rows(state)
    for table in readmodel.SESSION_TABLES:
        keys = _KEYS[table.name]
        table_rows = rows[table.name]
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

        # Rows of this session that the state no longer has, such as plans of a
        # state rebuilt after a retention limit dropped old events.
        stale = delete(table).where(table.c.session_id == state.session_id)
        if table_rows and len(keys) == 1:
            stale = stale.where(table.c[keys[0]].not_in([row[keys[0]] for row in table_rows]))
        elif table_rows:
            key_columns = tuple_(*(table.c[name] for name in keys))
            stale = stale.where(
                key_columns.not_in([tuple(row[n] for n in keys) for row in table_rows])
            )
        await connection.execute(stale)


async def notify_projected(connection: AsyncConnection, state: SessionState) -> None:
    """Queue a `<session_id>:<last_seq>` notice; Postgres delivers it on commit."""
    await connection.execute(
        select(func.pg_notify(NOTIFY_CHANNEL, f"{state.session_id}:{state.last_seq}"))
    )


async def truncate_read_models(connection: AsyncConnection) -> None:
    """Empty every read-model table and the stored position."""
    names = ", ".join(table.name for table in (*readmodel.SESSION_TABLES, readmodel.events))
    await connection.execute(text(f"TRUNCATE {names}, {readmodel.projector_position.name}"))
