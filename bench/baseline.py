"""The design Stepwise replaces: Postgres as the log, Redis pub/sub as the live feed.

Each event is INSERTed and COMMITted into a Postgres table, then PUBLISHed on a
Redis channel per session; a WebSocket endpoint subscribes to that channel and
forwards every message to its client. This is the usual "write to the database,
then notify" design, kept small: a few lines of SQL, one channel per session,
and a FastAPI endpoint served by uvicorn like the Stepwise gateway.

Run the endpoint as its own process: `python -m bench.baseline PORT REDIS_PORT`.
It sends `{"type": "subscribed"}` once its Redis subscription is active.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import asyncpg
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

TABLE_SQL = """
CREATE TABLE IF NOT EXISTS baseline_events (
    position bigserial PRIMARY KEY,
    session_id text NOT NULL,
    seq integer NOT NULL,
    data jsonb NOT NULL,
    UNIQUE (session_id, seq)
)
"""


class Resp:
    """Just enough of the Redis protocol (RESP2) for PUBLISH and SUBSCRIBE."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Resp:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, *args: str | bytes) -> None:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode() if isinstance(arg, str) else arg
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.writer.write(b"".join(parts))

    async def reply(self) -> object:
        line = (await self.reader.readline()).rstrip(b"\r\n")
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"redis error: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            return (await self.reader.readexactly(size + 2))[:-2]
        if kind == b"*":
            return [await self.reply() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected redis reply {line!r}")

    async def command(self, *args: str | bytes) -> object:
        self.send(*args)
        return await self.reply()

    def close(self) -> None:
        self.writer.close()


def channel(session_id: str) -> str:
    return f"session:{session_id}"


class BaselineWriter:
    """The writer side: INSERT + COMMIT, then PUBLISH, one event at a time."""

    def __init__(self, connection: asyncpg.Connection, redis: Resp) -> None:
        self.connection = connection
        self.redis = redis
        self.seqs: dict[str, int] = {}

    @classmethod
    async def open(cls, dsn: str, redis_port: int) -> BaselineWriter:
        connection = await asyncpg.connect(dsn)
        await connection.execute(TABLE_SQL)
        return cls(connection, await Resp.connect(redis_port))

    async def append(self, session_id: str, data: dict) -> None:
        seq = self.seqs.get(session_id, 0) + 1
        self.seqs[session_id] = seq
        body = json.dumps({"session_id": session_id, "seq": seq, "data": data})
        async with self.connection.transaction():  # COMMIT on leaving the block
            await self.connection.execute(
                "INSERT INTO baseline_events (session_id, seq, data) VALUES ($1, $2, $3::jsonb)",
                session_id,
                seq,
                body,
            )
        await self.redis.command("PUBLISH", channel(session_id), body)

    async def close(self) -> None:
        await self.connection.close()
        self.redis.close()


def create_app(redis_port: int) -> FastAPI:
    app = FastAPI()

    @app.websocket("/ws/{session_id}")
    async def forward(websocket: WebSocket, session_id: str) -> None:
        await websocket.accept()
        redis = await Resp.connect(redis_port)
        try:
            await redis.command("SUBSCRIBE", channel(session_id))
            await websocket.send_text('{"type": "subscribed"}')
            while True:
                message = await redis.reply()
                # ["message", channel, body]
                assert isinstance(message, list) and message[0] == b"message"
                await websocket.send_text(message[2].decode())
        except (WebSocketDisconnect, ConnectionError):
            pass
        finally:
            redis.close()

    return app


def now_ms() -> float:
    return time.time() * 1000


if __name__ == "__main__":
    import uvicorn

    port, redis_port = int(sys.argv[1]), int(sys.argv[2])
    uvicorn.run(create_app(redis_port), host="127.0.0.1", port=port, log_level="warning")
