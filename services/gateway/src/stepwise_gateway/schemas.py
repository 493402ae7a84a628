"""Request and response bodies of the HTTP API, as typed models for validation and OpenAPI."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests -----------------------------------------------------------------


class CreateSessionRequest(Body):
    test_case: str = Field(
        description="The test in plain language: 1 to 100,000 characters; newline, tab and "
        "carriage return are the only control characters allowed.",
        examples=['1. Open the login page\n2. Type "standard_user" into "Username"'],
    )
    target_url: str = Field(
        description="Absolute http:// or https:// URL with a host and no user:password part, "
        "at most 2,048 characters.",
        examples=["https://example.com/login"],
    )
    llm_model: str | None = Field(
        default=None,
        description="'offline', or a Gemini model such as 'gemini-2.5-flash' (needs "
        "GEMINI_API_KEY or GOOGLE_API_KEY). Default: the server's default model.",
    )
    secrets: dict[str, SecretStr] | None = Field(
        default=None,
        description="Values of the `{{name}}` placeholders in the test case, by name: at most "
        "50, names of a letter or underscore and then up to 63 letters, digits or "
        "underscores, values of 1 to 4,096 bytes (UTF-8). Every placeholder of the test case "
        "needs a value. The values are typed into the browser in place of the placeholders "
        "and never appear in events, logs, read models or responses.",
        examples=[{"password": "the password"}],
    )


class ActRequest(Body):
    task: str = Field(
        description="One instruction to run in the live browser, at most 10,000 characters."
    )
    previous_context: str | None = Field(
        default=None,
        description="Context for the instruction; by default the executor passes the results "
        "of the session's earlier act instructions.",
    )


class ContinuePlanRequest(Body):
    task_prompt: str = Field(
        description="What the continuation plan should do next, at most 100,000 characters."
    )


# --- responses ----------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(
        description="Machine-readable error code, such as invalid_input or invalid_state."
    )
    message: str = Field(description="What was wrong, with the value, and what to do.")
    field: str | None = Field(default=None, description="The request field the error is about.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class SessionCreatedResponse(BaseModel):
    session_id: str
    status: str = Field(description="Session status; 'created' right after creation.")
    test_case: str
    target_url: str
    llm_model: str
    created_at: datetime
    last_seq: int = Field(
        description="Seq of the session_created event; pass it as wait_for_seq to read your write."
    )
    command_id: str = Field(description="Id of the generate_plan command queued for the planner.")
    secret_names: list[str] = Field(
        default_factory=list, description="Names of the secrets supplied; never their values."
    )


class QueuedResponse(BaseModel):
    task_id: str
    status: Literal["queued"] = "queued"
    command_id: str
    command_type: str
    session_id: str


class TaskStatusResponse(BaseModel):
    task_id: str | None = Field(description="Null when the session has no task yet.")
    task_type: str | None = Field(
        description="plan_generation, execution, act_mode or run_till_end."
    )
    status: str | None = Field(description="queued, running, completed, failed or cancelled.")
    progress: str
    error: str | None
    session_status: str


class Counts(BaseModel):
    steps_total: int
    passed: int
    failed: int
    skipped: int


class Plan(BaseModel):
    plan_id: str
    ordinal: int
    kind: str
    model: str
    prompt: str
    status: str
    plan_text: str
    unparsed: list[str] = Field(
        description="Parts of the test case the model could not turn into a step."
    )
    error: str | None
    created_at: datetime | None
    completed_at: datetime | None


class Screenshot(BaseModel):
    name: str = Field(description="Object name in the screenshots object store.")
    url: str = Field(description="Gateway path that serves the PNG.")


class Step(BaseModel):
    number: int
    plan_id: str
    description: str
    status: str = Field(description="pending, running, passed, failed or skipped.")
    attempts: int
    thinking: str
    actions: list[dict[str, Any]]
    results: list[str]
    screenshots: list[Screenshot]
    error: str | None
    error_category: str | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None


class Task(BaseModel):
    task_id: str
    task_type: str
    status: str
    progress: str
    error: str | None
    result: dict[str, Any]
    created_at: datetime | None
    updated_at: datetime | None


class SessionSummary(BaseModel):
    session_id: str
    status: str
    title: str
    target_url: str
    llm_model: str
    created_at: datetime | None
    updated_at: datetime | None
    last_seq: int
    counts: Counts
    current_task_id: str | None


class SessionDetail(SessionSummary):
    test_case: str
    browser_open: bool
    blocked_step: int | None = Field(
        description="Step a run-till-end is paused on, waiting for retry or skip."
    )
    last_rejection: str | None
    plans: list[Plan]
    steps: list[Step]
    tasks: list[Task]
    current_task: Task | None
    source: Literal["read_model", "event_stream"] = Field(
        description="read_model when served from Postgres; event_stream when the read model had "
        "not caught up and the gateway folded the session's events instead."
    )


class SessionList(BaseModel):
    sessions: list[SessionSummary]
    next_cursor: str | None = Field(
        description="Pass as cursor to get the next page; null on the last page."
    )


class EventEnvelope(BaseModel):
    id: str
    session_id: str
    seq: int = Field(description="Per-session sequence number, 1-based and dense.")
    type: str
    at: datetime
    data: dict[str, Any]
    command_id: str | None
    version: int
    position: int | None = Field(description="JetStream stream sequence of the event.")


class EventList(BaseModel):
    session_id: str
    events: list[EventEnvelope]
    last_seq: int = Field(description="Seq of the session's newest event when the page was read.")
    next_since: int = Field(description="Pass as since to read the events after this page.")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    nats: str
    database: str
