"""Many WebSocket clients of one session in one process, for scenario 5.

    python -m bench.fanout_clients URL CLIENTS LAST_SEQ SECONDS

Connects CLIENTS sockets to URL, prints `ready` once each has received the
session's first event, then reads until every client has LAST_SEQ or SECONDS
have passed since `ready`, and prints one JSON line: latencies in ms (receive
time minus the event's `at`), events missed per client, and closes seen. An
event not received by then counts as lost.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import datetime

import msgspec
import websockets

_decoder = msgspec.json.Decoder(dict)


async def client(
    url: str, last_seq: int, ready: asyncio.Queue, go: asyncio.Future, latencies: list[float]
) -> dict:
    seqs = 0
    closed = None
    async with websockets.connect(url, max_size=None, ping_interval=None, open_timeout=60) as ws:
        await asyncio.wait_for(ws.recv(), 60)  # session_created
        ready.put_nowait(1)
        deadline = await go
        raw: list[tuple[float, bytes | str]] = []
        try:
            while True:
                message = await asyncio.wait_for(ws.recv(), max(deadline - time.monotonic(), 0))
                raw.append((time.time(), message))
                seqs = _decoder.decode(message)["seq"]
                if seqs >= last_seq:
                    break
        except (TimeoutError, websockets.ConnectionClosed) as error:
            closed = repr(error)[:200]
    for received, message in raw:
        at = datetime.fromisoformat(_decoder.decode(message)["at"]).timestamp()
        latencies.append((received - at) * 1000)
    return {"received": len(raw), "closed": closed}


async def main(url: str, count: int, last_seq: int, seconds: float) -> None:
    ready: asyncio.Queue = asyncio.Queue()
    go: asyncio.Future = asyncio.get_running_loop().create_future()
    latencies: list[float] = []
    tasks = [asyncio.create_task(client(url, last_seq, ready, go, latencies)) for _ in range(count)]
    for _ in range(count):
        await ready.get()
    go.set_result(time.monotonic() + seconds)
    print("ready", flush=True)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    expected = last_seq - 1
    missed = [expected - o["received"] if isinstance(o, dict) else expected for o in outcomes]
    errors = [o["closed"] if isinstance(o, dict) else repr(o) for o in outcomes]
    print(
        json.dumps({"latencies": latencies, "missed": missed, "errors": [e for e in errors if e]}),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
