"""Reads from the Postgres read models, and the response bodies built from their rows."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine
from stepwise_libs import readmodel
from stepwise_libs.fold import SessionState

from .errors import InvalidInput
from .notifications import ProjectionNotifier
from .schemas import Counts, Plan, Screenshot, SessionDetail, SessionSummary, Step, Task

# Re-query interval, in seconds, while waiting for the read model without notifications.
POLL_INTERVAL = 0.2

Rows = dict[str, list[dict[str, Any]]]


def screenshot_url(session_id: str, name: str) -> str:
    return f"/api/sessions/{session_id}/screenshots/{quote(name)}"


def summary_from_row(row: dict[str, Any]) -> SessionSummary:
    return SessionSummary(
        session_id=row["session_id"],
        status=row["status"],
        title=row["title"],
        target_url=row["target_url"],
        llm_model=row["llm_model"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_seq=row["last_seq"],
        counts=Counts(
            steps_total=row["steps_total"],
            passed=row["passed_count"],
            failed=row["failed_count"],
            skipped=row["skipped_count"],
        ),
        current_task_id=row["current_task_id"],
    )


def _task(row: dict[str, Any]) -> Task:
    return Task(**{key: row[key] for key in Task.model_fields})


def detail_from_rows(rows: Rows, source: Literal["read_model", "event_stream"]) -> SessionDetail:
    """Build the session body from `readmodel.session_rows` output, stored or freshly folded."""
    session = rows["sessions"][0]
    session_id = session["session_id"]
    tasks = [_task(row) for row in rows["tasks"]]
    tasks.sort(key=lambda task: (task.created_at is None, task.created_at or datetime.min))
    current = next((task for task in tasks if task.task_id == session["current_task_id"]), None)
    plans = sorted(rows["plans"], key=lambda row: row["ordinal"])
    steps = sorted(rows["steps"], key=lambda row: row["step_number"])
    return SessionDetail(
        **summary_from_row(session).model_dump(),
        test_case=session["test_case"],
        browser_open=session["browser_open"],
        blocked_step=session["blocked_step"],
        last_rejection=session["last_rejection"],
        plans=[Plan(**{key: row[key] for key in Plan.model_fields}) for row in plans],
        steps=[
            Step(
                number=row["step_number"],
                plan_id=row["plan_id"],
                description=row["description"],
                status=row["status"],
                attempts=row["attempts"],
                thinking=row["thinking"],
                actions=list(row["actions"] or []),
                results=list(row["results"] or []),
                screenshots=[
                    Screenshot(name=name, url=screenshot_url(session_id, name))
                    for name in row["screenshots"] or []
                ],
                error=row["error"],
                error_category=row["error_category"],
                started_at=row["started_at"],
                finished_at=row["finished_at"],
                duration_ms=row["duration_ms"],
            )
            for row in steps
        ],
        tasks=tasks,
        current_task=current,
        source=source,
    )


def detail_from_state(state: SessionState) -> SessionDetail:
    return detail_from_rows(readmodel.session_rows(state), "event_stream")


async def load_session_rows(engine: AsyncEngine, session_id: str) -> Rows | None:
    """Return the stored rows of one session, or None when the projector has not written it."""
    async with engine.connect() as connection:
        found = await connection.execute(
            select(readmodel.sessions).where(readmodel.sessions.c.session_id == session_id)
        )
        session = found.mappings().first()
        if session is None:
            return None
        rows: Rows = {"sessions": [dict(session)]}
        for table in (readmodel.plans, readmodel.steps, readmodel.tasks):
            result = await connection.execute(select(table).where(table.c.session_id == session_id))
            rows[table.name] = [dict(row) for row in result.mappings()]
        return rows


async def stored_last_seq(engine: AsyncEngine, session_id: str) -> int | None:
    async with engine.connect() as connection:
        result = await connection.execute(
            select(readmodel.sessions.c.last_seq).where(
                readmodel.sessions.c.session_id == session_id
            )
        )
        return result.scalar_one_or_none()


async def wait_for_seq(
    engine: AsyncEngine, notifier: ProjectionNotifier, session_id: str, seq: int, max_wait: float
) -> bool:
    """Wait until the read model reaches `seq`; return False if `max_wait` seconds pass first."""
    deadline = time.monotonic() + max_wait
    listening = await notifier.ensure_listening()
    with notifier.watch(session_id) as progressed:
        while True:
            progressed.clear()
            last_seq = await stored_last_seq(engine, session_id)
            if last_seq is not None and last_seq >= seq:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            # A notification wakes the loop at once; the interval covers a projector that
            # sends none.
            interval = POLL_INTERVAL * 5 if listening else POLL_INTERVAL
            try:
                await asyncio.wait_for(progressed.wait(), timeout=min(remaining, interval))
            except TimeoutError:
                pass


def encode_cursor(row: dict[str, Any]) -> str:
    raw = f"{row['created_at'].isoformat()}|{row['session_id']}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, session_id = raw.split("|", 1)
        return datetime.fromisoformat(created_at), session_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidInput(
            f"cursor {cursor!r} is not a cursor this API returned; "
            "pass next_cursor from the last page",
            field="cursor",
        ) from None


async def list_sessions(
    engine: AsyncEngine, statuses: list[str], limit: int, offset: int, cursor: str | None
) -> tuple[list[SessionSummary], str | None]:
    """Return a page of sessions, newest first, and the cursor of the next page."""
    table = readmodel.sessions
    query = select(table).order_by(table.c.created_at.desc(), table.c.session_id.desc())
    if statuses:
        query = query.where(table.c.status.in_(statuses))
    if cursor is not None:
        created_at, session_id = decode_cursor(cursor)
        query = query.where(
            tuple_(table.c.created_at, table.c.session_id) < (created_at, session_id)
        )
    query = query.offset(offset).limit(limit + 1)
    async with engine.connect() as connection:
        rows = [dict(row) for row in (await connection.execute(query)).mappings()]
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return [summary_from_row(row) for row in rows[:limit]], next_cursor
