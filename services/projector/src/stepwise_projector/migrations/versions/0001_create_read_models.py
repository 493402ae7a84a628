"""Create the read-model tables.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every timestamp is timestamptz, so readers get aware datetimes in UTC.
TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("session_id", sa.String(64), primary_key=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("test_case", sa.Text(), nullable=False),
        sa.Column("target_url", sa.Text(), nullable=False),
        sa.Column("llm_model", sa.String(128), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("created_at", TIMESTAMP),
        sa.Column("updated_at", TIMESTAMP),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("steps_total", sa.Integer(), nullable=False),
        sa.Column("passed_count", sa.Integer(), nullable=False),
        sa.Column("failed_count", sa.Integer(), nullable=False),
        sa.Column("skipped_count", sa.Integer(), nullable=False),
        sa.Column("current_task_id", sa.String(64)),
        sa.Column("browser_open", sa.Boolean(), nullable=False),
        sa.Column("blocked_step", sa.Integer()),
        sa.Column("last_rejection", sa.Text()),
    )
    op.create_index("ix_sessions_created_at", "sessions", ["created_at"])

    op.create_table(
        "plans",
        sa.Column("plan_id", sa.String(64), primary_key=True),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("plan_text", sa.Text(), nullable=False),
        sa.Column("unparsed", postgresql.JSONB(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", TIMESTAMP),
        sa.Column("completed_at", TIMESTAMP),
    )
    op.create_index("ix_plans_session_id", "plans", ["session_id"])

    op.create_table(
        "steps",
        sa.Column("session_id", sa.String(64), primary_key=True),
        sa.Column("step_number", sa.Integer(), primary_key=True),
        sa.Column("plan_id", sa.String(64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("thinking", sa.Text(), nullable=False),
        sa.Column("actions", postgresql.JSONB(), nullable=False),
        sa.Column("results", postgresql.JSONB(), nullable=False),
        sa.Column("screenshots", postgresql.JSONB(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("error_category", sa.String(64)),
        sa.Column("started_at", TIMESTAMP),
        sa.Column("finished_at", TIMESTAMP),
        sa.Column("duration_ms", sa.Integer()),
    )

    op.create_table(
        "tasks",
        sa.Column("task_id", sa.String(64), primary_key=True),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("task_type", sa.String(32), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("progress", sa.Text(), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("result", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", TIMESTAMP),
        sa.Column("updated_at", TIMESTAMP),
    )
    op.create_index("ix_tasks_session_id", "tasks", ["session_id"])

    op.create_table(
        "events",
        sa.Column("position", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False, unique=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("at", TIMESTAMP, nullable=False),
        sa.Column("command_id", sa.String(64)),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("data", postgresql.JSONB(), nullable=False),
        sa.UniqueConstraint("session_id", "seq", name="uq_events_session_seq"),
    )

    op.create_table(
        "projector_position",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("position", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("projector_position")
    op.drop_table("events")
    op.drop_index("ix_tasks_session_id", table_name="tasks")
    op.drop_table("tasks")
    op.drop_table("steps")
    op.drop_index("ix_plans_session_id", table_name="plans")
    op.drop_table("plans")
    op.drop_index("ix_sessions_created_at", table_name="sessions")
    op.drop_table("sessions")
