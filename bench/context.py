"""What every scenario gets: the servers, the mode, and connections to them."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client as NATS
from stepwise_libs.jetstream import EventStore, connect, ensure_topology

from stepwise.embedded import free_port, port_open

from .servers import Redis, Servers, _stop, _wait


@dataclass
class Bench:
    servers: Servers
    workdir: Path
    short: bool
    redis: Redis | None  # None when no redis-server could be started

    @property
    def nats_url(self) -> str:
        return self.servers.nats.url

    @property
    def postgres_dsn(self) -> str:
        """The asyncpg DSN of the main stepwise database."""
        return self.servers.postgres.url.replace("postgresql+asyncpg://", "postgresql://")

    async def event_store(self, name: str) -> tuple[NATS, EventStore]:
        """A NATS connection with the Stepwise topology, and an event store on it."""
        nc = await connect(self.nats_url, name)
        js = nc.jetstream()
        await ensure_topology(js)
        return nc, EventStore(js)

    def baseline_endpoint(self) -> BaselineEndpoint:
        assert self.redis is not None
        return BaselineEndpoint(self.redis.port, self.workdir)


class BaselineEndpoint:
    """`python -m bench.baseline`: the Redis-forwarding WebSocket endpoint, as its own process."""

    def __init__(self, redis_port: int, workdir: Path) -> None:
        self.port = free_port()
        log = workdir / f"baseline-{self.port}.log"
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.baseline", str(self.port), str(redis_port)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
        _wait(lambda: port_open("127.0.0.1", self.port), self.process, "baseline endpoint", log)

    def ws_url(self, session_id: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/{session_id}"

    def __enter__(self) -> BaselineEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.process)
