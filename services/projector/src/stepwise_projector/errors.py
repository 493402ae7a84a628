"""Errors the projector raises."""

from __future__ import annotations


class ProjectorError(RuntimeError):
    """Base of every projector error."""


class MigrationError(ProjectorError):
    """The read-model schema could not be brought to the requested revision."""

    def __init__(self, revision: str, reason: str) -> None:
        super().__init__(f"migrating the read models to revision {revision!r} failed: {reason}")
        self.revision = revision
        self.reason = reason
