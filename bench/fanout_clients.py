"""Many WebSocket clients of one session in one process, for scenario 5.

    python -m bench.fanout_clients URL CLIENTS LAST_SEQ SECONDS

Connects CLIENTS sockets to URL, prints `ready` once each has received the
session's first event, then reads until every client has LAST_SEQ events or
SECONDS have passed since `ready`, and prints one JSON line: latencies in ms
(receive time minus the event's `at`), events missed per client, events received
twice or out of order, the closes seen, and this process's CPU seconds while
reading. An event not received by then counts as lost.

Each client is a small asyncio protocol that does the RFC 6455 opening handshake
and reads unmasked server frames itself, answering pings. Payloads are decoded
only after the run. With clients of the `websockets` library instead, the same
gateway measured a p99 of 4.8 s rather than 90 ms on 2 cores, because the client
processes fell behind (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import os
import sys
import time
from datetime import datetime
from urllib.parse import urlsplit

import msgspec

_decoder = msgspec.json.Decoder(dict)
# The GUID that RFC 6455 appends to the client's key to compute Sec-WebSocket-Accept.
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TEXT, _CLOSE, _PING = 0x1, 0x8, 0x9


class Client(asyncio.Protocol):
    """One WebSocket client that keeps every text message with the time it arrived."""

    def __init__(self, host: str, target: str, expected: int) -> None:
        self.key = base64.b64encode(os.urandom(16))
        self.request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {self.key.decode()}\r\n\r\n"
        ).encode()
        self.expected = expected
        self.buffer = bytearray()
        self.open = False
        self.transport: asyncio.Transport | None = None
        self.messages: list[tuple[float, bytes]] = []
        loop = asyncio.get_running_loop()
        self.first = loop.create_future()  # the session's first event arrived
        self.finished = loop.create_future()  # every expected message, a close or an error
        self.closed: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"connection lost: {exc!r}")

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buffer += data
        if not self.open and not self._handshake():
            return
        buffer = self.buffer
        position = 0
        while len(buffer) - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            length = second & 0x7F
            start = position + 2
            if length == 126:
                if len(buffer) - start < 2:
                    break
                length = int.from_bytes(buffer[start : start + 2], "big")
                start += 2
            elif length == 127:
                if len(buffer) - start < 8:
                    break
                length = int.from_bytes(buffer[start : start + 8], "big")
                start += 8
            if len(buffer) - start < length:
                break
            payload = bytes(buffer[start : start + length])
            position = start + length
            if not first & 0x80 or second & 0x80:
                self._end("a fragmented or masked frame from the server")
                return
            self._frame(first & 0x0F, payload, now)
        del buffer[:position]

    def _handshake(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        del self.buffer[: end + 4]
        fields = (line.partition(":") for line in head[1:])
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        accept = base64.b64encode(hashlib.sha1(self.key + _WS_GUID).digest()).decode()
        if not head[0].startswith("HTTP/1.1 101") or headers.get("sec-websocket-accept") != accept:
            self._end(f"handshake failed: {head[0]!r}")
            return False
        self.open = True
        return True

    def _frame(self, opcode: int, payload: bytes, now: float) -> None:
        if opcode == _TEXT:
            self.messages.append((now, payload))
            if not self.first.done():
                self.first.set_result(None)
            if len(self.messages) >= self.expected:
                self._end(None)
        elif opcode == _PING:
            self._send(0xA, payload)  # pong
        elif opcode == _CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
            self._end(f"closed by the gateway: {code} {payload[2:].decode(errors='replace')}")

    def _send(self, opcode: int, payload: bytes) -> None:
        """Send a short control frame, masked as every client frame must be."""
        assert self.transport is not None and len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    def _end(self, reason: str | None) -> None:
        if not self.finished.done():
            self.closed = reason
            self.finished.set_result(None)
        if not self.first.done():
            self.first.set_exception(ConnectionError(reason or "ended before the first event"))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


async def main(url: str, count: int, last_seq: int, seconds: float) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(count):
        _, client = await asyncio.wait_for(
            loop.create_connection(lambda: Client(f"{host}:{port}", target, last_seq), host, port),
            60,
        )
        clients.append(client)
    await asyncio.wait_for(asyncio.gather(*(client.first for client in clients)), 60)
    cpu_before = time.process_time()
    print("ready", flush=True)
    _, pending = await asyncio.wait([client.finished for client in clients], timeout=seconds)
    cpu_seconds = time.process_time() - cpu_before
    for client in clients:
        client.close()

    latencies: list[float] = []
    missed: list[int] = []
    disorder = 0
    errors = [client.closed for client in clients if client.closed]
    errors += ["timed out"] * len(pending)
    for client in clients:
        seqs = []
        for received, message in client.messages:
            event = _decoder.decode(message)
            seqs.append(event["seq"])
            if event["seq"] > 1:  # seq 1 arrived before `ready`
                at = datetime.fromisoformat(event["at"]).timestamp()
                latencies.append((received - at) * 1000)
        got = set(seqs) & set(range(2, last_seq + 1))
        missed.append(last_seq - 1 - len(got))
        disorder += sum(1 for a, b in itertools.pairwise(seqs) if b != a + 1)
    print(
        json.dumps(
            {
                "latencies": latencies,
                "missed": missed,
                "disorder": disorder,
                "errors": errors,
                "cpu_seconds": cpu_seconds,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
