"""The gateway's connections: NATS (JetStream, event store, KV, object store) and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

import asyncpg
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy.exc import DBAPIError, ProgrammingError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from stepwise_libs.jetstream import EventStore, connect, ensure_topology
from stepwise_libs.settings import redact_url

from .errors import DatabaseUnavailable, NatsUnavailable
from .notifications import ProjectionNotifier
from .pump import FeedHub
from .settings import GatewaySettings

logger = logging.getLogger(__name__)

# Seconds a Postgres connection attempt or statement may take before the request gets a 503.
DATABASE_CONNECT_TIMEOUT = 5.0
DATABASE_STATEMENT_TIMEOUT = 10.0


class Runtime:
    """Holds the connections one gateway process shares between its requests."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.nats: NATS | None = None
        self._js: JetStreamContext | None = None
        self._store: EventStore | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.nats_ready = asyncio.Event()
        self.engine: AsyncEngine = create_async_engine(
            settings.database_url,
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=10,
            pool_timeout=DATABASE_CONNECT_TIMEOUT,
            connect_args={
                "timeout": DATABASE_CONNECT_TIMEOUT,
                "command_timeout": DATABASE_STATEMENT_TIMEOUT,
            },
        )
        self.notifier = ProjectionNotifier(settings.database_url)
        # One shared tail per streamed session, for all of its WebSocket and SSE clients.
        self.feeds = FeedHub()

    async def start(self) -> None:
        # NATS may come up after the gateway: connect in the background and return 503 until then.
        self._connecting = asyncio.create_task(self._connect_nats(), name="connect-nats")

    async def stop(self) -> None:
        await self.feeds.stop()
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connecting
        if self.nats is not None and not self.nats.is_closed:
            with contextlib.suppress(Exception):
                await self.nats.close()
        await self.notifier.close()
        await self.engine.dispose()

    async def _connect_nats(self) -> None:
        url = self.settings.nats_url
        while True:
            try:
                client = await connect(url, "stepwise-gateway")
                js = client.jetstream()
                await ensure_topology(js, self.settings.stream_replicas)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # keep retrying until NATS is reachable
                logger.warning(
                    "connecting to NATS failed, retrying: %s",
                    error,
                    extra={"nats_url": redact_url(url)},
                )
                await asyncio.sleep(1.0)
                continue
            self.nats, self._js, self._store = client, js, EventStore(js)
            self.nats_ready.set()
            logger.info("service ready", extra={"nats_url": redact_url(url)})
            return

    @property
    def nats_connected(self) -> bool:
        return self.nats is not None and self.nats.is_connected

    def jetstream(self) -> tuple[JetStreamContext, EventStore]:
        """Return the JetStream context and event store, or raise 503 when NATS is not connected."""
        if self._js is None or self._store is None or not self.nats_connected:
            address = redact_url(self.settings.nats_url)
            raise NatsUnavailable(f"NATS at {address} is not connected; retry in a few seconds")
        return self._js, self._store


@contextlib.contextmanager
def nats_errors(action: str) -> Iterator[None]:
    """Turn a NATS failure during `action` into a 503 JSON error."""
    try:
        yield
    except (TimeoutError, nats.errors.Error, OSError) as error:
        raise NatsUnavailable(
            f"{action} failed because NATS is unavailable: {error or type(error).__name__}; retry"
        ) from error


@contextlib.asynccontextmanager
async def database_errors() -> AsyncIterator[None]:
    """Turn a Postgres failure into a 503 JSON error with the next step to take."""
    try:
        yield
    except ProgrammingError as error:
        if isinstance(getattr(error, "orig", None), Exception) and "does not exist" in str(
            error.orig
        ):
            raise DatabaseUnavailable(
                "the read-model tables do not exist; run `stepwise-projector migrate`"
            ) from error
        raise
    except (TimeoutError, DBAPIError, SQLAlchemyError, asyncpg.PostgresError, OSError) as error:
        detail = (
            str(getattr(error, "orig", None) or error).splitlines()[0]
            if str(error)
            else type(error).__name__
        )
        raise DatabaseUnavailable(
            f"Postgres is unavailable: {detail}; retry in a few seconds"
        ) from error
