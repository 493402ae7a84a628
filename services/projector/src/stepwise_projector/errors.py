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


class MissingPositionError(ProjectorError):
    """A stream position inside a batch's range could not be read.

    A direct get may be served by a replica that has not stored the message yet, so
    the batch is written later, not without the message.
    """

    def __init__(self, position: int, top: int) -> None:
        super().__init__(
            f"stream position {position} (below the batch's last position {top}) was not "
            "found; the batch is retried until a replica serves it"
        )
        self.position = position
        self.top = top


class EarlierEventsError(ProjectorError):
    """A session's earlier events could not be read in full, so its state cannot be folded.

    Folding from the later event alone would store a row without the session's start
    (an empty test case, for one), so the batch is retried instead.
    """

    def __init__(self, session_id: str, seq: int, detail: str) -> None:
        super().__init__(
            f"reading events 1..{seq - 1} of session {session_id} failed: {detail}; "
            "the batch is retried"
        )
        self.session_id = session_id
        self.seq = seq
