"""Postgres read models: the tables the projector writes and the gateway reads.

Every row is derived from a `SessionState` (the fold of a session's events) by
`session_rows`, so "read models equal a fold of the stream" can be checked by
comparing the tables with `session_rows(fold(events))`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

from .fold import SessionState

metadata = MetaData()

JSONType = JSON().with_variant(JSONB(), "postgresql")

sessions = Table(
    "sessions",
    metadata,
    Column("session_id", String(64), primary_key=True),
    Column("status", String(32), nullable=False),
    Column("test_case", Text, nullable=False),
    Column("target_url", Text, nullable=False),
    Column("llm_model", String(128), nullable=False),
    Column("title", Text, nullable=False),
    Column("created_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True)),
    Column("last_seq", Integer, nullable=False),
    Column("steps_total", Integer, nullable=False),
    Column("passed_count", Integer, nullable=False),
    Column("failed_count", Integer, nullable=False),
    Column("skipped_count", Integer, nullable=False),
    Column("current_task_id", String(64)),
    Column("browser_open", Boolean, nullable=False),
    Column("blocked_step", Integer),
    Column("last_rejection", Text),
    Index("ix_sessions_created_at", "created_at"),
)

plans = Table(
    "plans",
    metadata,
    Column("plan_id", String(64), primary_key=True),
    Column("session_id", String(64), nullable=False, index=True),
    Column("ordinal", Integer, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("model", String(128), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("status", String(32), nullable=False),
    Column("plan_text", Text, nullable=False),
    Column("unparsed", JSONType, nullable=False),
    Column("error", Text),
    Column("created_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True)),
)

# One row per plan step with the outcome of its latest run.
steps = Table(
    "steps",
    metadata,
    Column("session_id", String(64), primary_key=True),
    Column("step_number", Integer, primary_key=True),
    Column("plan_id", String(64), nullable=False),
    Column("description", Text, nullable=False),
    Column("status", String(32), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("thinking", Text, nullable=False),
    Column("actions", JSONType, nullable=False),
    Column("results", JSONType, nullable=False),
    Column("screenshots", JSONType, nullable=False),
    Column("error", Text),
    Column("error_category", String(64)),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("duration_ms", Integer),
)

tasks = Table(
    "tasks",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("session_id", String(64), nullable=False, index=True),
    Column("task_type", String(32), nullable=False),
    Column("status", String(32), nullable=False),
    Column("progress", Text, nullable=False),
    Column("error", Text),
    Column("result", JSONType, nullable=False),
    Column("created_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True)),
)

events = Table(
    "events",
    metadata,
    Column("position", BigInteger, primary_key=True, autoincrement=False),
    Column("session_id", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("type", String(64), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("command_id", String(64)),
    Column("version", Integer, nullable=False),
    Column("data", JSONType, nullable=False),
    UniqueConstraint("session_id", "seq", name="uq_events_session_seq"),
)

# The last stream position applied to the tables above, written in the same
# transaction as the rows it produced.
projector_position = Table(
    "projector_position",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", BigInteger, nullable=False),
)

# Postgres channel on which the projector sends `<session_id>:<last_seq>` when a
# transaction that wrote that session commits, so readers can wait for their writes.
PROJECTION_CHANNEL = "stepwise_projection"

# Tables whose rows are derived from a session's state, in the order they are written.
SESSION_TABLES = (sessions, plans, steps, tasks)


def _plain(value: Any) -> Any:
    return msgspec.to_builtins(value)


def session_rows(state: SessionState) -> dict[str, list[dict[str, Any]]]:
    """Return the rows of every session-derived table for one folded session."""
    session_row = {
        "session_id": state.session_id,
        "status": state.status,
        "test_case": state.test_case,
        "target_url": state.target_url,
        "llm_model": state.llm_model,
        "title": state.title,
        "created_at": state.created_at,
        "updated_at": state.updated_at,
        "last_seq": state.last_seq,
        "steps_total": len(state.steps),
        "passed_count": state.passed_count,
        "failed_count": state.failed_count,
        "skipped_count": state.skipped_count,
        "current_task_id": state.current_task_id,
        "browser_open": state.browser_open,
        "blocked_step": state.blocked_step,
        "last_rejection": state.last_rejection,
    }
    plan_rows = [
        {
            "plan_id": plan.plan_id,
            "session_id": state.session_id,
            "ordinal": ordinal,
            "kind": plan.kind,
            "model": plan.model,
            "prompt": plan.prompt,
            "status": plan.status,
            "plan_text": plan.plan_text,
            "unparsed": list(plan.unparsed),
            "error": plan.error,
            "created_at": plan.created_at,
            "completed_at": plan.completed_at,
        }
        for ordinal, plan in enumerate(state.plans, start=1)
    ]
    step_rows = [
        {
            "session_id": state.session_id,
            "step_number": step.number,
            "plan_id": step.plan_id,
            "description": step.description,
            "status": step.status,
            "attempts": step.attempts,
            "thinking": step.thinking,
            "actions": _plain(step.actions),
            "results": list(step.results),
            "screenshots": list(step.screenshots),
            "error": step.error,
            "error_category": step.error_category,
            "started_at": step.started_at,
            "finished_at": step.finished_at,
            "duration_ms": step.duration_ms,
        }
        for step in state.steps
    ]
    task_rows = [
        {
            "task_id": task.task_id,
            "session_id": state.session_id,
            "task_type": task.task_type,
            "status": task.status,
            "progress": task.progress,
            "error": task.error,
            "result": _plain(task.result),
            "created_at": task.created_at,
            "updated_at": task.updated_at,
        }
        for task in state.tasks.values()
    ]
    return {"sessions": [session_row], "plans": plan_rows, "steps": step_rows, "tasks": task_rows}
