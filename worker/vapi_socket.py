"""The Vapi transport socket, with its messages handed over in the loop turn they arrive in.

websockets' asyncio connection queues every incoming message for a task that awaits `recv()`:
for Vapi's audio, 50 messages a second per call, that is a task switch, the message assembler's
queue and `recv`'s machinery per 20 ms frame, about as much as the rest of what the worker does
with the frame (docs/performance.md, "Against a direct bridge"). `VapiConnection` (passed to
`connect` as `create_connection`, the library's way to customise a connection) hands each
whole message to a callback instead, from `process_event`, which the library documents as the
method subclasses override.

Order is kept: a message goes to the callback only while nothing queued before it waits for
`recv()` (those that arrived before the callback was set, a fragmented message, text that is
not valid UTF-8, which `recv()` then fails the connection over as before). Control frames, the
close and keepalive are the library's, untouched; the reading task still runs `recv()` to take
what was queued and to see the socket close.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode

__all__ = ["VapiConnection"]

OnMessage = Callable[[bytes | str], None]
_DATA = (Opcode.BINARY, Opcode.TEXT, Opcode.CONT)  # a whole message ends with one of these, `fin` set


class VapiConnection(ClientConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_message: OnMessage | None = None
        self._queued = 0  # whole messages handed to the library's queue, not yet taken by recv()

    def take_messages(self, on_message: OnMessage) -> None:
        """From now on, hand each whole message to `on_message` as it arrives (it must not
        raise), unless messages queued before it still wait for `recv()`."""
        self._on_message = on_message

    def process_event(self, event: Any) -> None:
        take = self._on_message
        if take is not None and not self._queued and isinstance(event, Frame) and event.fin:
            if event.opcode is Opcode.BINARY:
                take(bytes(event.data))
                return
            if event.opcode is Opcode.TEXT:
                try:
                    text = bytes(event.data).decode()
                except UnicodeDecodeError:
                    pass  # queued: recv() fails the connection over it, as it always has
                else:
                    take(text)
                    return
        if isinstance(event, Frame) and event.fin and event.opcode in _DATA:
            self._queued += 1
        super().process_event(event)

    async def recv(self, decode: bool | None = None) -> Any:
        message = await super().recv(decode)
        self._queued -= 1
        return message
