"""Errors of the planner service."""

from __future__ import annotations


class PlannerError(Exception):
    """Base of the planner's errors."""


class PlanFailedError(PlannerError):
    """Plan generation failed for good; the handler records it as `plan_failed`.

    `category` is machine-readable: `no_steps`, `invalid_model_output`,
    `model_unavailable`, `model_error`, `unsupported_model` or `configuration`. The
    handler also records `internal_error` when a model raises anything else.
    """

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category
        self.message = message


class AppendFailedError(PlannerError):
    """Appending an event failed, so the command is left for redelivery."""
