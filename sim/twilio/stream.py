"""One Media Stream: the WebSocket client Twilio opens to the gateway, and its pacing.

Twilio sends a 160-byte μ-law `media` frame every 20 ms for the whole stream (silence when the
caller is quiet), numbering every message after `start` with one string counter. Frames are due
on a deadline grid (frame k at first_due + 20 ms·k) and sent by the sim's shared ticker; a stream
that fell behind catches up a few frames per tick, and a socket whose write buffer is full skips
its tick rather than stall every other call (TCP backpressure).

What the stream reads is validated (wire.py) and handed to its call: media, marks and clears go
to the playout model, bad messages become protocol errors.

Docs: docs/protocols.md, section "Twilio Media Streams", "Messages Twilio sends".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State

from . import wire as w
from .errors import TwilioSimError

if TYPE_CHECKING:
    from .call import SimCall

log = logging.getLogger("sim.twilio")

FRAMES_PER_S = 1.0 / w.FRAME_S  # 50
MAX_BURST = 10  # frames one stream may send per 20 ms when catching up (200 ms), split over the ticks
WRITE_LIMIT = 2**16  # websocket write buffer high-water mark
SEND_HEADROOM = 2048  # skip a stream's tick rather than let a send block the shared ticker
WS_OPEN_TIMEOUT = 10.0
WS_CLOSE_TIMEOUT = 2.0
_mono = time.monotonic


def first_due(start: float, epoch: float, phases: int = 1) -> float:
    """Due time of a new stream's first frame: on the shared ticker's grid that starts at `epoch`
    (`phases` ticks per 20 ms), half a tick before the tick that sends it, which is the first
    tick ≥ 20 ms after `start` (the frame's audio must exist). With one phase every stream's
    frames go out in one burst per 20 ms; with more, each stream keeps the phase its start fell
    in, as real calls' streams do."""
    tick = w.FRAME_S / phases
    k = math.ceil((start + w.FRAME_S - epoch) / tick)
    return epoch + k * tick - tick / 2


async def connect(call: SimCall, target: str, signature: str, hint: str) -> ClientConnection:
    """Open the stream's socket the way Twilio does (signed upgrade, its User-Agent, no
    compression). Raises TwilioSimError 31920 (handshake refused) or 31902 (no connection)."""
    try:
        return await ws_connect(
            target,
            additional_headers={"X-Twilio-Signature": signature},
            user_agent_header=w.TWILIO_WS_USER_AGENT,
            compression=None,
            proxy=None,
            open_timeout=WS_OPEN_TIMEOUT,
            close_timeout=WS_CLOSE_TIMEOUT,
            write_limit=WRITE_LIMIT,
            max_size=2**22,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        raise TwilioSimError(
            f"{w.ERR_HANDSHAKE} stream handshake rejected: HTTP {status} ({target}){hint}", call
        ) from exc
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise TwilioSimError(
            f"{w.ERR_CONNECT} stream connection failed: {exc!r} ({target})", call
        ) from exc


class MediaStream:
    """One Media Stream WebSocket of a call."""

    __slots__ = (
        "call",
        "closed",
        "first_due",
        "frames",
        "initiator",
        "name",
        "open",
        "parts",
        "pending_dtmf",
        "pos0",
        "reader",
        "seq",
        "sid",
        "started_at",
        "status_callback",
        "url",
        "ws",
    )

    def __init__(
        self,
        call: SimCall,
        ws: ClientConnection,
        sid: str,
        url: str,
        name: str | None,
        status_callback: tuple[str, str] | None,
    ) -> None:
        self.call = call
        self.ws = ws
        self.sid = sid
        self.url = url
        self.name = name
        self.status_callback = status_callback
        self.seq = 1  # `start` is "1"; every later message takes the next number
        self.frames = 0  # media frames sent (chunk = frames + 1)
        self.open = True
        self.initiator: str | None = None  # who ended the stream; None → the server closed it
        self.closed = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None
        self.pending_dtmf: list[str] = []
        self.started_at = 0.0
        self.first_due = 0.0  # monotonic due time of media frame 0
        self.pos0 = 0  # call-timeline sample index of media frame 0
        self.parts = w.media_msg_parts(sid)

    def usable(self) -> bool:
        return self.open and self.ws.state is State.OPEN

    async def send_start(self, custom_parameters: dict[str, str]) -> None:
        """`connected`, then `start` (sequenceNumber "1"). A socket closed meanwhile is left to
        the reader, which sees the close at once and ends the stream normally."""
        call = self.call
        try:
            await self.ws.send(w.CONNECTED_MSG)
            await self.ws.send(
                w.start_msg(
                    account_sid=call.account_sid,
                    stream_sid=self.sid,
                    call_sid=call.call_sid,
                    custom_parameters=custom_parameters,
                )
            )
        except ConnectionClosed:
            pass

    async def emit(self, build: Callable[[int], str]) -> bool:
        """Send one numbered message. The number is taken right before the (synchronous)
        socket write, so wire order == sequenceNumber order across tasks."""
        if not self.usable():
            return False
        self.seq += 1
        try:
            await self.ws.send(build(self.seq))
        except ConnectionClosed:
            return False
        except Exception:  # pragma: no cover - defensive: never crash a caller of emit
            log.exception("send failed on %s", self.sid)
            return False
        return True

    def due(self, now: float) -> int:
        """How many media frames are due by `now` and not yet sent."""
        elapsed = now - self.first_due
        if elapsed < 0:
            return 0
        return math.floor(elapsed * FRAMES_PER_S) + 1 - self.frames

    async def pump(self, now: float) -> None:
        """Send every media frame due by `now` (called by the shared ticker)."""
        n = self.due(now)
        if n <= 0:
            return
        burst = MAX_BURST // self.call._sim.phases or 1  # per tick: the same catch-up per 20 ms
        if n > burst:
            n = burst
        ws = self.ws
        if ws.state is not State.OPEN:
            return
        transport = ws.transport
        call = self.call
        observer = call._sim.observer
        a, b, c, d, e = self.parts
        for _ in range(n):
            if transport.get_write_buffer_size() > WRITE_LIMIT - SEND_HEADROOM:
                return  # TCP backpressure: frames stay due and go out on a later tick
            if self.pending_dtmf:
                digits, self.pending_dtmf = self.pending_dtmf, []
                for digit in digits:
                    self.seq += 1
                    await ws.send(w.dtmf_msg(self.sid, self.seq, digit))
                    call._event("dtmf-sent", digit=digit, stream=self.sid)
            frame, b64 = call._next_caller_frame()
            idx = self.frames
            self.seq += 1
            await ws.send(
                a + str(self.seq) + b + str(idx + 1) + c + str(idx * 20) + d + b64 + e
            )
            self.frames = idx + 1
            pos = self.pos0 + idx * w.FRAME_BYTES
            call._record_sent(now, pos, frame)
            if observer is not None:
                observer.caller_frame_sent(call, frame, _mono(), pos)

    async def read(self) -> None:
        """Read until the socket closes, validating each message like Twilio (31950 binary
        frame, 31951 invalid message: recorded and ignored) and handing the rest to the call."""
        ws = self.ws
        call = self.call
        code: int | None = None
        reason = ""
        try:
            while True:
                msg = await ws.recv()
                now = _mono()
                if not isinstance(msg, str):
                    call._protocol_error(
                        self, f"{w.ERR_BINARY_FRAME} binary frame received ({len(msg)} bytes)"
                    )
                    continue
                try:
                    kind, value = w.parse_server_message(msg, self.sid)
                except w.ProtocolViolation as exc:
                    call._protocol_error(self, str(exc))
                    continue
                if kind == "media":
                    call._on_media(value, now)
                elif kind == "mark":
                    await call._on_mark(self, value, now)
                else:
                    await call._on_clear(self, now)
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                code, reason = exc.rcvd.code, exc.rcvd.reason
        except asyncio.CancelledError:
            raise
        except Exception:  # never let a reader crash the simulator
            log.exception("reader failed on %s", self.sid)
        finally:
            call._stream_closed(self, code, reason)

    async def close(self) -> None:
        """Close the socket (bounded) and let the reader finish (cancelled if it does not)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(1000), WS_CLOSE_TIMEOUT + 1.0)
        reader = self.reader
        if reader is not None and reader is not asyncio.current_task() and not reader.done():
            await asyncio.wait({reader}, timeout=WS_CLOSE_TIMEOUT)
            if not reader.done():
                reader.cancel()
