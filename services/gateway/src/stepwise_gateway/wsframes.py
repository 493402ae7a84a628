"""Write an event's WebSocket frame straight to each client's socket.

A server's WebSocket frames are not masked, and without a negotiated extension
(the gateway accepts permessage-deflate only when `STEPWISE_WS_COMPRESSION=on`)
a text frame is the same bytes for every client. So a session's feed builds each
event's frame once and writes it to every live client's transport, with no task
switch and no ASGI message per client. A client whose socket cannot take the
frame that way gets it through its outbox and `websocket.send_text` instead.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

# Scope key under which `RawSendMiddleware` puts the server's own ASGI `send`.
RAW_SEND = "stepwise.raw_send"

# First byte of an unfragmented text frame: FIN set, opcode 1.
_TEXT_FIN = 0x81

FrameWriter = Callable[[bytes], bool]


class RawSendMiddleware:
    """Record the server's `send` in a WebSocket scope, before other middleware wraps it.

    Added last, so it runs first.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope[RAW_SEND] = send
        await self.app(scope, receive, send)


def text_frame(payload: bytes) -> bytes:
    """Return an unmasked, unfragmented WebSocket text frame carrying `payload`."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", _TEXT_FIN, length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", _TEXT_FIN, 126, length)
    else:
        header = struct.pack("!BBQ", _TEXT_FIN, 127, length)
    return header + payload


def frame_writer(scope: Scope) -> FrameWriter | None:
    """Return a function that writes a prepared frame to this accepted WebSocket's socket.

    The function returns False, and writes nothing, when the frame must go through
    `send_text` instead: the connection is closing, or its write buffer is above the
    high-water mark (the server waits for it to drain before it sends more). Returns
    None when the server is not uvicorn's websockets-sansio protocol or an extension
    was negotiated, because the prepared bytes would then not be a valid frame.
    """
    protocol = getattr(scope.get(RAW_SEND), "__self__", None)
    if not isinstance(protocol, WebSocketsSansIOProtocol) or protocol.conn.extensions:
        return None
    transport = protocol.transport
    writable = protocol.writable

    def write(frame: bytes) -> bool:
        if protocol.close_sent or not writable.is_set() or transport.is_closing():
            return False
        transport.write(frame)
        return True

    return write
