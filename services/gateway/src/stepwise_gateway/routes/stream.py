"""Events straight from JetStream: a paged REST read, a WebSocket and a server-sent-events stream.

WebSocket `/api/sessions/{id}/ws?since=N` sends each event after N as its JSON
envelope (with `seq` and `position`), then live ones. It also takes control
commands, such as `{"command": "pause_execution"}`, and replies to each on the
same socket. Events carry a `seq` and replies do not.

Close codes: 4401 missing or invalid API token (see auth.py), 4404 unknown
session, 4422 invalid `since` or one after the session's last seq, 4008 the client fell more than
STEPWISE_CLIENT_BUFFER messages behind (reconnect with since=<last seq
received>), 1013 NATS unavailable. The server pings every
STEPWISE_WS_PING_INTERVAL seconds and drops a client that sends no pong within
STEPWISE_WS_PING_TIMEOUT seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, Header, Query, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from stepwise_libs.jetstream import EventStore

from stepwise_gateway import socket_commands
from stepwise_gateway.dependencies import get_runtime, runtime_of, session_id_path
from stepwise_gateway.errors import (
    GatewayError,
    InvalidInput,
    SessionNotFound,
    SinceAfterLastSeq,
)
from stepwise_gateway.history import read_after_time
from stepwise_gateway.metrics import EVENTS_SENT, SLOW_CLIENT_CLOSES, WS_EVENTS_QUEUED
from stepwise_gateway.pump import (
    CLOSE_INVALID,
    CLOSE_NOT_FOUND,
    CLOSE_TOO_SLOW,
    CLOSE_UNAVAILABLE,
    Frame,
    Outbox,
    Subscriber,
    cancel_all,
    is_event,
)
from stepwise_gateway.runtime import Runtime, nats_errors
from stepwise_gateway.schemas import ErrorResponse, EventList
from stepwise_gateway.validation import check_session_id
from stepwise_gateway.wsframes import FrameWriter, frame_writer

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/sessions/{session_id}", tags=["events"])

MAX_EVENTS_PAGE = 10_000
# Seconds between keep-alive comments on an idle server-sent-events stream.
SSE_KEEPALIVE = 15.0

_encoder = msgspec.json.Encoder()


@router.get(
    "/events",
    response_model=EventList,
    responses={
        404: {"model": ErrorResponse, "description": "Unknown session."},
        422: {"model": ErrorResponse, "description": "Invalid query parameter."},
        503: {"model": ErrorResponse, "description": "NATS is unavailable."},
    },
    summary="Read a session's events from the stream, after a seq or a time",
)
async def read_events(
    session_id: Annotated[str, Depends(session_id_path)],
    runtime: Annotated[Runtime, Depends(get_runtime)],
    since: Annotated[int, Query(ge=0, description="Return events with seq greater than this.")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS_PAGE, description="Events per page.")] = 1000,
    since_time: Annotated[
        datetime | None,
        Query(
            description="Return only events stamped after this ISO 8601 time, "
            "which must carry a UTC offset."
        ),
    ] = None,
) -> Response:
    if since_time is not None and since_time.utcoffset() is None:
        raise InvalidInput(
            f"since_time {since_time.isoformat()} has no UTC offset; "
            "add one, like 2026-01-01T12:00:00+00:00",
            field="since_time",
        )
    js, store = runtime.jetstream()
    with nats_errors(f"reading the events of session {session_id}"):
        _, last_seq = await store.last(session_id)
        if last_seq == 0:
            raise SessionNotFound(session_id)
        last_seq = await _check_since(store, session_id, since, last_seq, "since")
        if since_time is None:
            events = await store.read(session_id, since, limit)
        else:
            events = await read_after_time(
                js, store, session_id, since_time, since, last_seq, limit
            )
    next_since = events[-1].seq if events else since
    body = {
        "session_id": session_id,
        "events": events,
        "last_seq": last_seq,
        "next_since": next_since,
    }
    return Response(_encoder.encode(body), media_type="application/json")


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Each event as `id: <seq>`, `event: <type>`, `data: <envelope>`.",
        },
        404: {"model": ErrorResponse, "description": "Unknown session."},
        422: {"model": ErrorResponse, "description": "since after the session's last seq."},
    },
    summary="Stream a session's events as server-sent events after since or Last-Event-ID",
)
async def stream_events(
    session_id: Annotated[str, Depends(session_id_path)],
    runtime: Annotated[Runtime, Depends(get_runtime)],
    since: Annotated[int, Query(ge=0, description="Send events with seq greater than this.")] = 0,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    since_field = "since"
    if last_event_id is not None:
        if not last_event_id.isdigit():
            raise InvalidInput(
                f"Last-Event-ID {last_event_id!r} is not an event seq", field="Last-Event-ID"
            )
        if int(last_event_id) > since:
            since, since_field = int(last_event_id), "Last-Event-ID"
    _, store = runtime.jetstream()
    with nats_errors(f"reading the events of session {session_id}"):
        _, last_seq = await store.last(session_id)
        if last_seq == 0:
            raise SessionNotFound(session_id)
        last_seq = await _check_since(store, session_id, since, last_seq, since_field)
    capacity = runtime.settings.client_buffer

    async def frames() -> AsyncIterator[bytes]:
        feed, subscriber, replay = runtime.feeds.join(store, session_id, since, capacity, last_seq)
        outbox = subscriber.outbox
        sent = EVENTS_SENT.labels("sse")
        stop = asyncio.ensure_future(_stopped(subscriber))
        getter: asyncio.Task[Any] | None = None
        try:
            while True:
                getter = asyncio.create_task(outbox.get())
                done, _ = await asyncio.wait(
                    {getter, stop}, timeout=SSE_KEEPALIVE, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                if getter in done:
                    frame: Frame = getter.result()
                    outbox.last_sent_seq = frame.seq
                    sent.inc()
                    yield frame.sse()
                    outbox.done()
                elif outbox.overflowed.is_set():
                    SLOW_CLIENT_CLOSES.labels("sse").inc()
                    note = {"reason": "client too slow", "resume_since": outbox.last_sent_seq}
                    yield b"event: overflow\ndata: %s\n\n" % _encoder.encode(note)
                    return
                elif subscriber.failed.is_set():
                    # End the stream, so the client reconnects with Last-Event-ID.
                    return
                else:
                    yield b": keep-alive\n\n"
        finally:
            # A client that goes away cancels this generator while it waits for the getter.
            await cancel_all(stop, *([getter] if getter is not None else []))
            await runtime.feeds.leave(feed, subscriber, replay)

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.websocket("/ws")
async def session_socket(websocket: WebSocket, session_id: str) -> None:
    """Send a session's events after `since`, then live ones, and take control commands."""
    runtime = runtime_of(websocket)
    await websocket.accept()
    since_text = websocket.query_params.get("since", "0")
    try:
        check_session_id(session_id)
    except GatewayError:
        await _close(websocket, session_id, CLOSE_NOT_FOUND, f"no session with id {session_id!r}")
        return
    if not since_text.isdigit():
        reason = f"since={since_text!r} is not a non-negative integer"
        await _close(websocket, session_id, CLOSE_INVALID, reason)
        return
    try:
        _, store = runtime.jetstream()
        _, last_seq = await store.last(session_id)
    except Exception as error:  # any NATS failure means: try again later
        await _close(websocket, session_id, CLOSE_UNAVAILABLE, f"NATS unavailable: {error}")
        return
    if last_seq == 0:
        await _close(websocket, session_id, CLOSE_NOT_FOUND, f"no session with id {session_id!r}")
        return
    try:
        last_seq = await _check_since(store, session_id, int(since_text), last_seq, "since")
    except SinceAfterLastSeq as error:
        await _close(websocket, session_id, CLOSE_INVALID, error.message)
        return
    except Exception as error:  # any NATS failure means: try again later
        await _close(websocket, session_id, CLOSE_UNAVAILABLE, f"NATS unavailable: {error}")
        return

    writer = _counted(frame_writer(websocket.scope))
    feed, subscriber, replay = runtime.feeds.join(
        store, session_id, int(since_text), runtime.settings.client_buffer, last_seq, writer
    )
    outbox = subscriber.outbox
    receiver = asyncio.create_task(_receive_commands(websocket, runtime, session_id, outbox))
    sender = asyncio.create_task(_send(websocket, outbox, writer))
    stopped = asyncio.create_task(_stopped(subscriber))
    try:
        await asyncio.wait({receiver, sender, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if outbox.overflowed.is_set():
            await cancel_all(sender)
            SLOW_CLIENT_CLOSES.labels("websocket").inc()
            reason = f"client too slow; reconnect with since={outbox.last_sent_seq}"
            await _close(websocket, session_id, CLOSE_TOO_SLOW, reason)
        elif subscriber.failed.is_set():
            await cancel_all(sender)
            reason = f"event stream unavailable; reconnect with since={outbox.last_sent_seq}"
            await _close(websocket, session_id, CLOSE_UNAVAILABLE, reason)
    except Exception:  # the client may be gone already, so closing can fail
        logger.debug("closing the socket failed", exc_info=True, extra={"session_id": session_id})
    finally:
        await cancel_all(receiver, sender, stopped)
        await runtime.feeds.leave(feed, subscriber, replay)


async def _check_since(
    store: EventStore, session_id: str, since: int, last_seq: int, field: str
) -> int:
    """Return the session's last seq, or raise SinceAfterLastSeq if `since` is past it.

    Seqs are dense, so a client that read the stream has a since of at most the last
    seq. `last_seq` may come from a replica that lags, so a larger since is checked
    again against the stream leader before it is rejected.
    """
    if since <= last_seq:
        return last_seq
    _, last_seq = await store.last(session_id, direct=False)
    if since > last_seq:
        raise SinceAfterLastSeq(field, since, last_seq)
    return last_seq


async def _stopped(subscriber: Subscriber) -> None:
    """Return once the client fell too far behind or its event stream failed."""
    overflow = asyncio.ensure_future(subscriber.outbox.overflowed.wait())
    failed = asyncio.ensure_future(subscriber.failed.wait())
    try:
        await asyncio.wait({overflow, failed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        overflow.cancel()
        failed.cancel()


async def _close(websocket: WebSocket, session_id: str, code: int, reason: str) -> None:
    # A close frame's reason is at most 123 bytes of UTF-8.
    reason = reason.encode()[:123].decode(errors="ignore")
    logger.info("closing WebSocket: %s", reason, extra={"session_id": session_id, "code": code})
    await websocket.close(code, reason)


def _counted(writer: FrameWriter | None) -> FrameWriter | None:
    """Wrap a frame writer so that each frame it writes counts as a sent event."""
    if writer is None:
        return None
    sent = EVENTS_SENT.labels("websocket")

    def write(frame: bytes) -> bool:
        if writer(frame):
            sent.inc()
            return True
        return False

    return write


async def _send(websocket: WebSocket, outbox: Outbox, writer: FrameWriter | None) -> None:
    """Send what the client's outbox has queued, in order: events it fell behind on, replies."""
    sent = EVENTS_SENT.labels("websocket")
    while True:
        item = await outbox.get()
        if is_event(item):
            WS_EVENTS_QUEUED.inc()
            # The same text, encoded once by the session's feed, goes to every client.
            if writer is None or not writer(item.ws()):
                await websocket.send_text(item.text)
                sent.inc()
            outbox.last_sent_seq = item.seq
        else:
            await websocket.send_text(_encoder.encode(item).decode())
        outbox.done()


async def _receive_commands(
    websocket: WebSocket, runtime: Runtime, session_id: str, outbox: Outbox
) -> None:
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                text = (message.get("bytes") or b"").decode("utf-8", errors="replace")
            try:
                reply = await socket_commands.handle(runtime, session_id, text)
            except Exception as error:  # one bad command must not end the stream
                logger.exception("WebSocket command failed", extra={"session_id": session_id})
                reply = {
                    "type": "error",
                    "code": "internal_error",
                    "message": f"internal error: {type(error).__name__}; see the gateway log",
                }
            outbox.put(reply)
    except WebSocketDisconnect:
        return
