"""Twilio -> Redis for one media socket: every Twilio event becomes one entry on `call:{sid}:in`
(raw μ-law, not base64) through the process's batch writer, until `stop` or the socket closes.

A message that is not a valid Media Streams message is counted and dropped; the ones after it go
on. Served by `gateway/twilio_socket.py`, the messages come to `on_text` in the loop turn that
read them (no task switch, no ASGI dict per frame); the task still reads the ASGI queue, for what
was queued before that and for the disconnect. Either way each message is handled by `_text`,
in the order Twilio sent them (docs/performance.md, "What the 4 December round changed").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from starlette.websockets import WebSocket

from gateway import twilio_socket
from gateway.records import ensure_ttl
from gateway.state import GatewayState, SocketInfo
from shared import metrics
from shared import streams as S
from shared.twilio_proto import Dtmf, Mark, Media, ProtocolError, Stop, TwilioEvent, Unknown, parse

__all__ = ["TwilioReceiver", "decode"]

# Per-frame counters, tallied (shared/metrics.py, `Tally`).
_FRAMES_IN = metrics.Tally(metrics.FRAMES.labels("in", "twilio"))
_BYTES_IN = metrics.Tally(metrics.AUDIO_BYTES.labels("in", "twilio"))


def decode(msg: Mapping[str, Any], limit: int) -> TwilioEvent:
    """One ASGI websocket message -> a Twilio event; ProtocolError (for the caller to count and
    drop) when it is binary, oversized or not a valid Media Streams message."""
    return _event(msg.get("text"), limit)


def _event(text: str | None, limit: int) -> TwilioEvent:
    if text is None:
        raise ProtocolError("binary")
    if len(text) > limit:
        raise ProtocolError("oversized")
    return parse(text)


class TwilioReceiver:
    def __init__(self, ws: WebSocket, st: GatewayState, in_key: str, maxlen: int,
                 info: SocketInfo, stream_sid: str, call_key: str) -> None:
        self._ws, self._st = ws, st
        self._in_key, self._maxlen, self._call_key = in_key, maxlen, call_key
        self._info, self._stream_sid = info, stream_sid
        self._limit = st.settings.max_message_bytes
        self._xadd = st.writer.xadd
        self._ended: asyncio.Future[str] | None = None  # how `on_text` ended the stream

    async def run(self) -> str:
        """The receiver task: returns why the stream ended ("stop", or the socket's close:
        our sender's for a hang-up, the idle watchdog's, Twilio's); raises what handling a
        message raised, wherever it was handled."""
        proto = twilio_socket.taps(self._ws)
        receive = self._ws.receive
        if proto is None:
            while True:
                cause = self._message(await receive())
                if cause is not None:
                    return cause
        ended = self._ended = asyncio.get_running_loop().create_future()
        return await twilio_socket.receive_taking(self._ws, proto, self.on_text, ended, self._message)

    def on_text(self, text: str) -> None:
        """A whole text message, from the socket's protocol in the turn that read it."""
        ended = self._ended
        if ended is None or ended.done():
            return  # the stream is over for us: nobody reads the queue either
        try:
            cause = self._text(text)
        except Exception as exc:  # the task raises it, as if its own handling had
            ended.set_exception(exc)
            return
        if cause is not None:
            ended.set_result(cause)

    def _message(self, msg: Mapping[str, Any]) -> str | None:
        """An ASGI message from the queue: the stream's end cause, or None to go on."""
        if msg["type"] == "websocket.disconnect":
            return self._info.closed_by or "closed"
        return self._text(msg.get("text"))

    def _text(self, text: str | None) -> str | None:
        """One message however it came (None: binary): the stream's end cause, or None."""
        self._info.last_rx = time.monotonic()
        try:
            event = _event(text, self._limit)
        except ProtocolError as exc:
            metrics.dropped(exc.cause)
            return None
        return self._handle(event)

    def _handle(self, event: TwilioEvent) -> str | None:
        xadd, in_key, maxlen = self._xadd, self._in_key, self._maxlen
        if isinstance(event, Media):
            xadd(in_key, S.entry(S.IN_MEDIA, event.payload), maxlen)
            _FRAMES_IN.inc()
            _BYTES_IN.inc(len(event.payload))
        elif isinstance(event, Mark):
            xadd(in_key, S.entry(S.IN_MARK, value=event.name), maxlen)
        elif isinstance(event, Dtmf):
            xadd(in_key, S.entry(S.IN_DTMF, value=event.digit), maxlen)
        elif isinstance(event, Stop):
            xadd(in_key, S.entry(S.IN_STOP, stream=self._stream_sid), maxlen)
            # Recorded here too, so a worker taking the call over later knows it is over.
            st = self._st
            st.writer.command("hset", self._call_key, mapping={
                "status": S.STATUS_ENDED, "end_reason": "caller-hangup", "ended_at": str(time.time())})
            ensure_ttl(st.writer, st.settings.call_ttl_s, in_key, self._call_key)
            return "stop"
        elif isinstance(event, Unknown):
            metrics.dropped("unknown_event")
        else:
            metrics.dropped("unexpected_event")  # a second connected/start
        return None
