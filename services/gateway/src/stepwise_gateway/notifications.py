"""Wake-ups from the projector, which sends NOTIFY on `stepwise_projection`.

The payload is '<session_id>:<last_seq>'.

A reader waiting for a session's read model to reach a seq re-queries when a
notification for that session arrives. It also re-queries at a short interval,
so it works when the projector sends no notifications or the listening
connection is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

import asyncpg
from sqlalchemy.engine import make_url
from stepwise_libs.readmodel import PROJECTION_CHANNEL

logger = logging.getLogger(__name__)

# Seconds between attempts to open the listening connection after one failed.
RECONNECT_INTERVAL = 5.0


class ProjectionNotifier:
    """One listening Postgres connection per process, fanning notifications out to waiters."""

    def __init__(self, database_url: str) -> None:
        self._dsn = (
            make_url(database_url)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False)
        )
        self._connection: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._last_attempt = float("-inf")
        self._waiters: dict[str, set[asyncio.Event]] = {}

    @property
    def listening(self) -> bool:
        return self._connection is not None and not self._connection.is_closed()

    async def ensure_listening(self) -> bool:
        """Open the listening connection if it is not open; return whether it is."""
        if self.listening:
            return True
        async with self._lock:
            if self.listening:
                return True
            if time.monotonic() - self._last_attempt < RECONNECT_INTERVAL:
                return False
            self._last_attempt = time.monotonic()
            try:
                connection = await asyncpg.connect(self._dsn, timeout=5)
                await connection.add_listener(PROJECTION_CHANNEL, self._on_notification)
            except (TimeoutError, OSError, asyncpg.PostgresError) as error:
                logger.warning("cannot listen for projector notifications: %s", error)
                return False
            self._connection = connection
            return True

    def _on_notification(self, connection: object, pid: int, channel: str, payload: str) -> None:
        session_id = payload.rsplit(":", 1)[0]
        for waiter in self._waiters.get(session_id, ()):
            waiter.set()

    @contextlib.contextmanager
    def watch(self, session_id: str) -> Iterator[asyncio.Event]:
        """Yield an event that is set whenever the projector reports progress on the session."""
        waiter = asyncio.Event()
        self._waiters.setdefault(session_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(session_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[session_id]

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close(timeout=2)
            self._connection = None
