"""uvicorn's sans-I/O WebSocket protocol, with a shorter path for the Twilio media socket's frames.

Through ASGI every message Twilio sends is a dict put on the connection's queue, a task switch
to the app's `receive()` and Starlette's state checks, and uvicorn stops reading the socket until
the app has taken it; every message we send goes through Starlette's `send` and uvicorn's, a
coroutine each. At 50 frames a second each way per call that was about 12 % of the gateway
(docs/performance.md, "What the 4 December round changed").

`MediaProtocol` is uvicorn's `WebSocketsSansIOProtocol` (framing, handshake, keepalive and
close all stay uvicorn's and the `websockets` library's) that offers the app, through the ASGI
scope's extensions (`taps(ws)`), two things:

- `take_text(callback)`: each whole text message is handed to `callback` in the loop turn that
  read it, unless something is still waiting in the ASGI queue (messages from before the
  callback was set, a disconnect): then it is queued behind them, so order is kept. Binary
  messages, invalid UTF-8, pings, closes and the disconnect take uvicorn's path.
- `send_text_now(text)`: send at once, as uvicorn's `send` would, when that needs no wait; False
  (nothing sent) when writing is paused or the socket is closing, and the caller uses the ASGI
  path, which waits or raises as before.

Served by another protocol (uvicorn's own `--ws` choices, a test client) `taps()` is None and the
app uses plain ASGI. The class relies on the attributes of uvicorn's implementation named below;
`usable()` checks them at start-up, and `server_config` falls back to uvicorn's class without
them (a later uvicorn that renamed them costs speed, not calls).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from starlette.websockets import WebSocket
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

__all__ = ["EXTENSION", "MediaProtocol", "receive_taking", "taps", "usable"]

EXTENSION = "callbridge.twilio_socket"
T = TypeVar("T")
Message = Mapping[str, Any]  # an ASGI receive event

# What of uvicorn's protocol this relies on (read from uvicorn 0.55; `usable()` checks it).
_ATTRIBUTES = ("queue", "frames", "curr_msg_data_type", "close_sent", "conn", "transport",
               "writable", "disconnected", "handshake_complete", "initial_response")
_METHODS = ("handle_connect", "send_receive_event_to_app")


class MediaProtocol(WebSocketsSansIOProtocol):
    """See the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._take: Callable[[str], None] | None = None

    # The app's side ----------------------------------------------------------------------------

    def take_text(self, callback: Callable[[str], None] | None) -> None:
        """Hand whole text messages to `callback` from now on (None: back to the ASGI queue).
        The callback must not raise: an exception would reach uvicorn's reading of the socket."""
        self._take = callback

    def send_text_now(self, text: str) -> bool:
        """Send `text` at once if nothing would make uvicorn's `send` wait or fail."""
        if (not self.writable.is_set() or self.disconnected or self.close_sent
                or not self.handshake_complete or self.initial_response is not None
                or self.transport.is_closing()):
            return False
        try:
            self.conn.send_text(text.encode())
        except InvalidState:
            return False
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True

    # uvicorn's side ----------------------------------------------------------------------------

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # none when the handshake was refused
        if scope is not None:
            scope["extensions"][EXTENSION] = self

    def send_receive_event_to_app(self) -> None:
        take = self._take
        if (take is None or self.close_sent or self.curr_msg_data_type != "text"
                or not self.queue.empty()):
            super().send_receive_event_to_app()
            return
        frames = self.frames
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        try:
            text = data.decode()
        except UnicodeDecodeError:  # uvicorn's path closes with 1007 and says why
            super().send_receive_event_to_app()
            return
        self.frames = []
        take(text)


async def receive_taking(ws: WebSocket, proto: MediaProtocol, take: Callable[[str], None],
                         done: asyncio.Future[T], on_message: Callable[[Message], T | None]) -> T:
    """Read a socket whose text messages go to `take` as they are read: the ASGI queue still
    brings what was queued before (and anything `take` could not have), to `on_message`, and the
    disconnect. Returns `done`'s result once `take` resolves it, or the first value
    `on_message` returns (raises what either raised)."""
    proto.take_text(take)
    pending: list[asyncio.Future[Any]] = []
    try:
        while True:
            recv: asyncio.Future[Any] = asyncio.ensure_future(ws.receive())
            pending = [recv]
            await asyncio.wait((recv, done), return_when=asyncio.FIRST_COMPLETED)
            if done.done():
                return done.result()
            result = on_message(recv.result())
            if result is not None:
                return result
    finally:
        proto.take_text(None)
        for f in pending:
            f.cancel()  # a receive still waiting (a no-op on one that finished)


def taps(ws: WebSocket) -> MediaProtocol | None:
    """The socket's `MediaProtocol`, when it is served by one."""
    scope = getattr(ws, "scope", None) or {}
    proto = (scope.get("extensions") or {}).get(EXTENSION)
    return proto if isinstance(proto, MediaProtocol) else None


def usable() -> bool:
    """Whether the installed uvicorn has what `MediaProtocol` relies on."""
    probe = WebSocketsSansIOProtocol.__init__.__code__.co_names
    return (all(name in probe for name in _ATTRIBUTES)
            and all(callable(getattr(WebSocketsSansIOProtocol, m, None)) for m in _METHODS))
