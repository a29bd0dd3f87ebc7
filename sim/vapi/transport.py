"""The ``WS /{id}/transport`` socket: websockets' sans-I/O server core on a plain asyncio protocol.

``docs/protocols.md``, "Vapi websocket transport" / "Audio formats": binary frames are audio in the
call's format, text frames JSON control messages, both ways; unknown or already-connected calls
are refused during the handshake (404/409/410).

Why not ASGI: 100 sessions at 50 frames/s each way on 2 cores. uvicorn hands the upgraded
connection to :class:`TransportProtocol` (its ``ws=`` protocol class, so REST and WebSocket share
one port) and every frame reaches the session as one synchronous call. Owning the socket also
gives tests what ASGI hides: ``abort()`` (a TCP drop without close frame) and switchable pongs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, ClassVar, cast

from websockets.frames import Frame, Opcode
from websockets.http11 import Request as WsRequest
from websockets.protocol import State
from websockets.server import ServerProtocol

if TYPE_CHECKING:
    from sim.vapi.session import VapiSession
    from sim.vapi.sim import VapiSim

log = logging.getLogger("sim.vapi")

#: a client that does not answer our close frame within this is cut off.
CLOSE_TIMEOUT_S = 2.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def bind(sim: VapiSim) -> type[TransportProtocol]:
    """A protocol class for uvicorn that serves ``sim``'s calls (uvicorn instantiates it)."""
    return cast(
        type[TransportProtocol],
        type("_BoundTransportProtocol", (TransportProtocol,), {"sim": sim}),
    )


class _ServerConn(ServerProtocol):
    """websockets' server protocol with switchable automatic pongs."""

    def __init__(self, owner: TransportProtocol, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owner = owner

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.PING and not self._owner.answer_pings():
            self.events.append(frame)  # seen, not answered
            return
        super().recv_frame(frame)


class TransportProtocol(asyncio.Protocol):
    """One transport socket. uvicorn hands the upgraded connection over to this class."""

    sim: ClassVar[VapiSim]

    def __init__(
        self,
        config: Any = None,
        server_state: Any = None,
        app_state: Any = None,
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._connections: set[Any] | None = getattr(server_state, "connections", None)
        self.conn = _ServerConn(self, max_size=MAX_MESSAGE_BYTES)
        self.transport: asyncio.Transport | None = None
        self.session: VapiSession | None = None
        self._frags: list[bytes] = []
        self._frag_text = False
        self._close_timer: asyncio.TimerHandle | None = None

    # uvicorn interface

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self._connections is not None:
            self._connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.conn.receive_data(data)
            events = self.conn.events_received()
        except Exception:
            log.exception("vapi sim: websocket parse failure")
            self.abort()
            return
        for event in events:
            try:
                if isinstance(event, WsRequest):
                    self._handshake(event)
                elif isinstance(event, Frame):
                    self._frame(event)
            except Exception:  # client input must never break the server
                log.exception("vapi sim: error handling client input")
        self._flush()

    def eof_received(self) -> bool | None:
        with contextlib.suppress(Exception):
            self.conn.receive_eof()
            self.conn.events_received()
            self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._connections is not None:
            self._connections.discard(self)
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        session, self.session = self.session, None
        if session is not None:
            rcvd = self.conn.close_rcvd
            clean = rcvd is not None or self.conn.close_sent is not None
            try:
                session._on_transport_lost(rcvd.code if rcvd is not None else None, clean)
            except Exception:
                log.exception("vapi sim: error closing session")

    def shutdown(self) -> None:
        """Called by uvicorn on server shutdown."""
        self.close(1001, immediate=True)

    # internals

    def answer_pings(self) -> bool:
        return bool(self.sim.respond_to_pings)

    def _handshake(self, request: WsRequest) -> None:
        path = request.path.split("?", 1)[0].strip("/").split("/")
        session = None
        status: int | None = 404
        if len(path) == 2 and path[1] == "transport":
            session = self.sim.sessions.get(path[0])
            if session is not None:
                status = session._connectable()
        if status is not None or session is None:
            response = self.conn.reject(status or 404, "Call not found or not connectable\n")
            self.conn.send_response(response)
            self.sim.rejected_handshakes.append((request.path, status or 404))
            return
        response = self.conn.accept(request)
        self.conn.send_response(response)
        if response.status_code != 101:
            return
        self._flush()
        self.session = session
        headers = {k.lower(): v for k, v in request.headers.raw_items()}
        session._attach(self, headers)

    def _frame(self, frame: Frame) -> None:
        op = frame.opcode
        if op is Opcode.BINARY or op is Opcode.TEXT:
            if not frame.fin:
                self._frags = [bytes(frame.data)]
                self._frag_text = op is Opcode.TEXT
                return
            self._message(bytes(frame.data), op is Opcode.TEXT)
        elif op is Opcode.CONT:
            self._frags.append(bytes(frame.data))
            if frame.fin:
                data, self._frags = b"".join(self._frags), []
                self._message(data, self._frag_text)
        elif op is Opcode.PING:
            if self.session is not None:
                self.session._on_ping()

    def _message(self, data: bytes, text: bool) -> None:
        session = self.session
        if session is None:
            return
        if text:
            session._on_text(data)
        else:
            session._on_binary(data)

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for chunk in self.conn.data_to_send():
            if transport.is_closing():
                return
            if chunk:
                transport.write(chunk)
            else:  # SEND_EOF: the server closes the TCP connection
                transport.close()

    # what the session calls

    def send_binary(self, data: bytes) -> None:
        if self.conn.state is State.OPEN:
            self.conn.send_binary(data)
            self._flush()

    def send_text(self, data: bytes) -> None:
        if self.conn.state is State.OPEN:
            self.conn.send_text(data)
            self._flush()

    def close(self, code: int = 1000, reason: str = "", *, immediate: bool = False) -> None:
        """Start the closing handshake; abort if the client does not finish it in time."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.conn.state is State.OPEN:
            self.conn.send_close(code, reason)
            self._flush()
        if immediate:
            transport.close()
        elif self._close_timer is None and not transport.is_closing():
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT_S, self.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
