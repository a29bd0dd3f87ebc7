"""Twilio simulator: places phone calls against the gateway the way Twilio does.

What it does (wire details: /work/shared/design/twilio-media-streams.md):

* signed voice webhook (`POST {public}/twilio/voice`, form-encoded standard params) → TwiML;
* executes TwiML: `<Say>`, `<Play>`, `<Pause>`, `<Hangup>`, `<Reject>`, `<Dial>`, `<Redirect>`,
  `<Connect action><Stream url><Parameter/></Stream></Connect>`;
* Media Stream: signed WebSocket handshake, `connected`, `start`, then 160-byte μ-law `media`
  frames every 20 ms (silence when the caller is quiet), `dtmf`, `stop`; all calls share ONE
  20 ms ticker task (deadline based, never `sleep(0.02)` drift);
* Twilio's outbound playout buffer: gateway `media` is queued and "played" at 8000 B/s on the
  sim's monotonic clock; `mark`s echo when the audio before them has played (or at once when
  nothing is buffered); `clear` drops unplayed audio and echoes pending marks at once;
* validates what the gateway sends (31950 binary frame, 31951 invalid message) and ignores bad
  messages, recording them in `SimCall.protocol_errors`;
* when the gateway closes the socket: follows `<Connect action>` (Hangup / Dial / Say /
  a fresh `<Connect><Stream>`), or continues the document, or ends the call;
* a REST stand-in (`POST /2010-04-01/Accounts/{AC}/Calls/{CA}.json`, Basic auth) for
  `Status=completed` hang-ups and `Twiml=`/`Url=` redirects.

Clock and recordings (per call): call time t=0 is the moment the first stream's `start` was
sent; earlier events have negative times. `heard` and `sent` are **μ-law** byte timelines at
8 kHz indexed by call time (byte i = t of i/8000 s; gaps filled with 0xFF silence).

Typical use::

    async with TwilioSim(gateway_url=gw, public_url=pub, account_sid=ac, auth_token=tok) as sim:
        call = await sim.place_call()
        call.say_pcm(pcm16_8k)
        await call.wait_speaking_done()
        reason = await call.wait_ended(timeout=10)
"""

from __future__ import annotations

import asyncio
import binascii
import bisect
import contextlib
import logging
import math
import secrets
import socket
import time
import warnings
import wave
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Generator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State

from sim import twilio_wire as w

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["SimCall", "TwilioSim", "TwilioSimError"]

log = logging.getLogger("sim.twilio")

_FRAMES_PER_S = 1.0 / w.FRAME_S  # 50
_MAX_BURST = 10  # frames one stream may send per tick when catching up (200 ms)
_WRITE_LIMIT = 2**16  # websocket write buffer high-water mark
_SEND_HEADROOM = 2048  # skip a stream's tick rather than let a send block the shared ticker
_MAX_DOCUMENTS = 100  # TwiML documents per call (loop guard)
_MARK_TOLERANCE = 8  # samples (1 ms): timer callbacks may fire a hair early
_WS_OPEN_TIMEOUT = 10.0
_WS_CLOSE_TIMEOUT = 2.0
_SILENCE_B64 = w.SILENCE_FRAME_B64
_SILENCE = w.SILENCE_FRAME
_b2a = binascii.b2a_base64
_mono = time.monotonic


class TwilioSimError(RuntimeError):
    """A call could not be placed/continued the way the test expected (webhook error, no
    `<Connect><Stream>`, rejected WebSocket, …). `call` is the SimCall, if one exists."""

    def __init__(self, message: str, call: SimCall | None = None) -> None:
        super().__init__(message)
        self.call = call


class _Stream:
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

    async def pump(self, now: float) -> None:
        """Send every media frame due by `now` (called by the shared ticker)."""
        elapsed = now - self.first_due
        if elapsed < 0:
            return
        n = math.floor(elapsed * _FRAMES_PER_S) + 1 - self.frames
        if n <= 0:
            return
        if n > _MAX_BURST:
            n = _MAX_BURST
        ws = self.ws
        if ws.state is not State.OPEN:
            return
        transport = ws.transport
        call = self.call
        a, b, c, d, e = self.parts
        for _ in range(n):
            if transport.get_write_buffer_size() > _WRITE_LIMIT - _SEND_HEADROOM:
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
            call._record_sent(now, self.pos0 + idx * w.FRAME_BYTES, frame)


class SimCall:
    """One simulated phone call (may span several Media Stream sockets).

    Times in every recording are call times in seconds (t=0: first `start` sent).
    """

    def __init__(self, sim: TwilioSim, call_sid: str, from_: str, to: str) -> None:
        self._sim = sim
        self.call_sid = call_sid
        self.account_sid = sim.account_sid
        self.from_ = from_
        self.to = to
        self.created = _mono()
        self.created_wall = time.time()
        self._t0 = self.created
        self._t0_fixed = False
        self.answered_wall: float | None = None
        self.ended_wall: float | None = None

        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self.error: str | None = None
        self.streams: list[str] = []
        self.custom_parameters: dict[str, str] = {}
        self.twiml_log: list[str] = []
        self.say_texts: list[str] = []
        self.dial_target: str | None = None
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self.protocol_errors: list[str] = []
        self.received_media_times: list[tuple[float, int]] = []
        self.clears: list[float] = []
        self.marks_sent_by_server: list[tuple[float, str]] = []
        self.marks_echoed: list[tuple[float, str]] = []

        self._stream: _Stream | None = None
        self._started = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._interrupt = asyncio.Event()
        self._redirect: tuple[str, str, str] | None = None  # (kind, twiml-or-url, method)
        self._changed = asyncio.Event()
        self._waiters = 0

        # caller → gateway
        self._say_q: deque[bytes] = deque()
        self._say_idle = asyncio.Event()
        self._say_idle.set()
        self._sent = bytearray()
        self._sent_t: array[float] = array("d")
        self._sent_pos: array[int] = array("q")

        # gateway → caller (Twilio's playout buffer)
        self._heard = bytearray()
        self._play_end = 0  # call-timeline sample where buffered audio ends
        self._pending_marks: deque[tuple[int, str]] = deque()
        self._mark_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ public: state

    def __repr__(self) -> str:
        return f"<SimCall {self.call_sid} streams={len(self.streams)} end={self.end_reason}>"

    def now(self) -> float:
        """Current call time in seconds."""
        return _mono() - self._t0

    @property
    def stream_sid(self) -> str | None:
        """streamSid of the current (or last) Media Stream."""
        return self.streams[-1] if self.streams else None

    @property
    def stream_live(self) -> bool:
        return self._stream is not None and self._stream.open

    @property
    def heard(self) -> bytes:
        """μ-law 8 kHz timeline of what the caller has heard so far (index = call time × 8000)."""
        n = min(len(self._heard), max(0, self._pos(_mono())))
        return bytes(self._heard[:n])

    @property
    def sent(self) -> bytes:
        """μ-law 8 kHz timeline of what the caller sent (silence frames included)."""
        return bytes(self._sent)

    @property
    def sent_frames(self) -> list[tuple[float, int]]:
        """(send time, sample offset of the frame in `sent`) for every media frame sent.
        Within one stream, frame k sits at offset0 + 160·k."""
        return list(zip(self._sent_t, self._sent_pos, strict=True))

    def sent_time_at(self, t: float) -> float | None:
        """When the media frame holding call time `t` of `sent` went out (None if it did not).

        Latency of a reply = (heard time of its first byte) - sent_time_at(end of the utterance).
        """
        pos = int(t * w.SAMPLE_RATE)
        offs = self._sent_pos
        i = bisect.bisect_right(offs, pos) - 1
        if i < 0 or pos >= offs[i] + w.FRAME_BYTES:
            return None
        return self._sent_t[i]

    def heard_pcm16(self) -> bytes:
        return audioop.ulaw2lin(self.heard, 2)

    def sent_pcm16(self) -> bytes:
        return audioop.ulaw2lin(bytes(self._sent), 2)

    def heard_segments(
        self, *, threshold: int = 64, min_silence_s: float = 0.06
    ) -> list[tuple[float, float]]:
        """(start_s, end_s) runs of non-silent heard audio; a run ends after ≥ min_silence_s of
        silence (|PCM| ≤ threshold; μ-law 0xFF/0x7F decode to 0)."""
        return _segments(self.heard, threshold, min_silence_s)

    def sent_segments(
        self, *, threshold: int = 64, min_silence_s: float = 0.06
    ) -> list[tuple[float, float]]:
        return _segments(bytes(self._sent), threshold, min_silence_s)

    def write_wav(self, path: str) -> None:
        """Stereo 16-bit 8 kHz WAV: left = caller (sent), right = assistant (heard)."""
        left = np.frombuffer(self.sent_pcm16(), dtype=np.int16)
        right = np.frombuffer(self.heard_pcm16(), dtype=np.int16)
        n = max(left.size, right.size)
        out = np.zeros(2 * n, dtype="<i2")
        out[0 : 2 * left.size : 2] = left
        out[1 : 2 * right.size : 2] = right
        with wave.open(path, "wb") as wf:
            wf.setnchannels(2)
            wf.setsampwidth(2)
            wf.setframerate(w.SAMPLE_RATE)
            wf.writeframes(out.tobytes())

    # ------------------------------------------------------------------ public: caller actions

    def say(self, ulaw: bytes) -> None:
        """Queue μ-law 8 kHz audio for the caller to send (after what is already queued)."""
        if not ulaw:
            return
        fb = w.FRAME_BYTES
        rem = len(ulaw) % fb
        if rem:
            ulaw = bytes(ulaw) + _SILENCE[: fb - rem]
        q = self._say_q
        for i in range(0, len(ulaw), fb):
            q.append(bytes(ulaw[i : i + fb]))
        self._say_idle.clear()
        self._event("say", seconds=len(ulaw) / w.SAMPLE_RATE, queued_frames=len(q))

    def say_pcm(self, pcm16_8k: bytes) -> None:
        """Queue PCM16 (little-endian, mono, 8 kHz) audio; converted with audioop.lin2ulaw."""
        self.say(audioop.lin2ulaw(pcm16_8k, 2))

    def say_silence(self, seconds: float) -> None:
        self.say(b"\xff" * int(seconds * w.SAMPLE_RATE))

    def send_dtmf(self, digit: str) -> None:
        """Press a key: a `dtmf` event goes out on the next 20 ms tick (before that tick's media)."""
        if len(digit) != 1 or digit not in w.DTMF_DIGITS:
            raise ValueError(f"invalid DTMF digit {digit!r}")
        st = self._stream
        if st is None or not st.open:
            self._event("dtmf-dropped", digit=digit)
            return
        st.pending_dtmf.append(digit)

    async def hangup(self) -> None:
        """The caller hangs up: `stop` on the live socket, close it, end the call."""
        await self._finish("caller-hangup")

    async def wait_speaking_done(self, timeout: float | None = None) -> None:
        """Wait until all queued caller audio has been sent (or the call ended)."""
        if timeout is None:
            timeout = len(self._say_q) * w.FRAME_S + 10.0
        ended = asyncio.ensure_future(self.ended.wait())
        idle = asyncio.ensure_future(self._say_idle.wait())
        try:
            done, _ = await asyncio.wait(
                {ended, idle}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ended.cancel()
            idle.cancel()
        if not done:
            raise TimeoutError(f"{self.call_sid}: caller audio still queued after {timeout}s")

    async def wait_ended(self, timeout: float) -> str:
        """Wait for the call to end; returns end_reason (TimeoutError otherwise)."""
        await asyncio.wait_for(self.ended.wait(), timeout)
        assert self.end_reason is not None
        return self.end_reason

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until predicate() is true; re-checked whenever the call records something
        (stream start/close, media, marks, clear, protocol error, end)."""
        deadline = _mono() + timeout
        self._waiters += 1
        try:
            while not predicate():
                remaining = deadline - _mono()
                if remaining <= 0:
                    raise TimeoutError(f"{self.call_sid}: condition not met within {timeout}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
        finally:
            self._waiters -= 1

    async def wait_streams(self, n: int, timeout: float) -> str:
        """Wait until the n-th Media Stream has started; returns its streamSid."""
        await self.wait_for(lambda: len(self.streams) >= n or self.ended.is_set(), timeout)
        if len(self.streams) < n:
            raise TwilioSimError(
                f"call ended ({self.end_reason}) with {len(self.streams)} stream(s)", self
            )
        return self.streams[n - 1]

    # ------------------------------------------------------------------ internals: bookkeeping

    def _pos(self, now: float) -> int:
        return int((now - self._t0) * w.SAMPLE_RATE)

    def _event(self, kind: str, **data: Any) -> None:
        self.events.append((_mono() - self._t0, kind, data))

    def _notify(self) -> None:
        if self._waiters:
            self._changed.set()
            self._changed = asyncio.Event()

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self.call_sid}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _fix_t0(self, now: float) -> None:
        if self._t0_fixed:
            return
        delta = now - self._t0
        self.events[:] = [(t - delta, k, d) for (t, k, d) in self.events]
        self._t0 = now
        self._t0_fixed = True
        self.answered_wall = time.time()

    def _next_caller_frame(self) -> tuple[bytes, str]:
        q = self._say_q
        if not q:
            return _SILENCE, _SILENCE_B64
        frame = q.popleft()
        if not q:
            self._say_idle.set()
        return frame, _b2a(frame, newline=False).decode("ascii")

    def _record_sent(self, now: float, pos: int, frame: bytes) -> None:
        s = self._sent
        n = len(s)
        if n == pos:
            s += frame
        elif n < pos:
            s += b"\xff" * (pos - n)
            s += frame
        else:
            s[pos : pos + w.FRAME_BYTES] = frame
        self._sent_t.append(now - self._t0)
        self._sent_pos.append(pos)

    def _protocol_error(self, stream: _Stream, text: str) -> None:
        self.protocol_errors.append(text)
        self._event("protocol-error", error=text, stream=stream.sid)
        self._notify()

    # ------------------------------------------------------------------ internals: playout model

    def _on_media(self, audio: bytes, now: float) -> None:
        n = len(audio)
        self.received_media_times.append((now - self._t0, n))
        if n:
            start = self._pos(now)
            if self._play_end > start:
                start = self._play_end
            h = self._heard
            hn = len(h)
            if hn < start:
                h += b"\xff" * (start - hn)
            elif hn > start:
                del h[start:]
            h += audio
            self._play_end = start + n
        if self._waiters:
            self._notify()

    def _take_due_marks(self, now_pos: int) -> list[str]:
        names: list[str] = []
        pm = self._pending_marks
        while pm and pm[0][0] <= now_pos + _MARK_TOLERANCE:
            names.append(pm.popleft()[1])
        return names

    def _arm_mark_timer(self) -> None:
        if self._mark_timer is not None or not self._pending_marks:
            return
        due = self._t0 + self._pending_marks[0][0] / w.SAMPLE_RATE
        loop = asyncio.get_running_loop()
        self._mark_timer = loop.call_later(max(0.0, due - _mono()), self._on_mark_timer)

    def _cancel_mark_timer(self) -> None:
        if self._mark_timer is not None:
            self._mark_timer.cancel()
            self._mark_timer = None

    def _on_mark_timer(self) -> None:
        self._mark_timer = None
        st = self._stream
        names = self._take_due_marks(self._pos(_mono()))
        if names and st is not None:
            self._spawn(self._echo_marks(st, names, "played"), "mark-echo")
        self._arm_mark_timer()

    async def _echo_marks(self, st: _Stream, names: list[str], cause: str) -> None:
        sid = st.sid
        for name in names:

            def build(seq: int, name: str = name) -> str:
                return w.mark_echo_msg(sid, seq, name)

            if await st.emit(build):
                t = _mono() - self._t0
                self.marks_echoed.append((t, name))
                self._event("mark-echoed", name=name, cause=cause, stream=sid)
        self._notify()

    async def _on_mark(self, st: _Stream, name: str, now: float) -> None:
        self.marks_sent_by_server.append((now - self._t0, name))
        now_pos = self._pos(now)
        names = self._take_due_marks(now_pos)
        if not self._sim.playout_model or (
            not self._pending_marks and self._play_end <= now_pos + _MARK_TOLERANCE
        ):
            names.append(name)
        else:
            self._pending_marks.append((self._play_end, name))
            self._arm_mark_timer()
        if names:
            await self._echo_marks(st, names, "played")
        self._notify()

    async def _on_clear(self, st: _Stream, now: float) -> None:
        self.clears.append(now - self._t0)
        now_pos = self._pos(now)
        dropped = 0
        if self._sim.playout_model and self._play_end > now_pos:
            dropped = self._play_end - now_pos
            if len(self._heard) > now_pos:
                del self._heard[now_pos:]
            self._play_end = now_pos
        names = [n for _, n in self._pending_marks]
        self._pending_marks.clear()
        self._cancel_mark_timer()
        self._event("clear", dropped_s=dropped / w.SAMPLE_RATE, marks=len(names), stream=st.sid)
        if names:
            await self._echo_marks(st, names, "clear")
        self._notify()

    def _drop_unplayed(self, now: float) -> None:
        now_pos = self._pos(now)
        if self._play_end > now_pos:
            if len(self._heard) > now_pos:
                del self._heard[now_pos:]
            self._play_end = now_pos
        if self._pending_marks:
            self._event("marks-dropped", names=[n for _, n in self._pending_marks])
            self._pending_marks.clear()
        self._cancel_mark_timer()

    # ------------------------------------------------------------------ internals: sockets

    async def _read(self, st: _Stream) -> None:
        ws = st.ws
        code: int | None = None
        reason = ""
        try:
            while True:
                msg = await ws.recv()
                now = _mono()
                if not isinstance(msg, str):
                    self._protocol_error(
                        st, f"{w.ERR_BINARY_FRAME} binary frame received ({len(msg)} bytes)"
                    )
                    continue
                try:
                    kind, value = w.parse_server_message(msg, st.sid)
                except w.ProtocolViolation as exc:
                    self._protocol_error(st, str(exc))
                    continue
                if kind == "media":
                    self._on_media(value, now)
                elif kind == "mark":
                    await self._on_mark(st, value, now)
                else:
                    await self._on_clear(st, now)
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                code, reason = exc.rcvd.code, exc.rcvd.reason
        except asyncio.CancelledError:
            raise
        except Exception:  # never let a reader crash the simulator
            log.exception("reader failed on %s", st.sid)
        finally:
            self._stream_closed(st, code, reason)

    def _stream_closed(self, st: _Stream, code: int | None, reason: str = "") -> None:
        if not st.open:
            return
        st.open = False
        self._sim._live.pop(st, None)
        now = _mono()
        self._drop_unplayed(now)
        by = st.initiator or "server"
        self._event("stream-closed", stream=st.sid, by=by, code=code, reason=reason)
        if st.status_callback is not None:
            self._sim._status_callback(self, st, "stream-stopped")
        st.closed.set()
        self._notify()

    async def _terminate_stream(self, st: _Stream, initiator: str) -> None:
        """Twilio ends the stream: `stop`, then close the socket (bounded)."""
        if not st.open:
            return
        if st.initiator is None:
            st.initiator = initiator
        self._sim._live.pop(st, None)  # no more media frames
        acc, csid = self.account_sid, self.call_sid
        if await st.emit(lambda seq: w.stop_msg(st.sid, seq, acc, csid)):
            self._event("stop-sent", stream=st.sid, by=initiator)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(st.ws.close(1000), _WS_CLOSE_TIMEOUT + 1.0)
        reader = st.reader
        if reader is not None and reader is not asyncio.current_task() and not reader.done():
            await asyncio.wait({reader}, timeout=_WS_CLOSE_TIMEOUT)
            if not reader.done():
                reader.cancel()
        self._stream_closed(st, 1000)

    async def _open_stream(self, verb: w.Verb, base: str) -> _Stream:
        sim = self._sim
        raw = verb.attrs.get("url", "")
        if not raw.strip():
            raise TwilioSimError(f"{w.ERR_HANDSHAKE} <Stream> without url", self)
        url = w.resolve_url(raw, base)
        parts = urlsplit(url)
        if parts.scheme == "https":  # a relative url resolves against the https webhook
            parts = parts._replace(scheme="wss")
        if parts.scheme not in ("wss", "ws"):
            raise TwilioSimError(f"{w.ERR_SCHEME} stream url scheme must be wss: {url!r}", self)
        if parts.scheme == "ws":  # accepted for local setups; real Twilio rejects it
            self._event("warning", code=w.ERR_SCHEME, detail=f"ws:// stream url {url!r}")
        hint = ""
        if parts.query or parts.fragment:
            # "The url does not support query string parameters" (note §1.2): dropped, and the
            # handshake is signed without it.
            self._event("warning", code="stream-url-query-dropped", detail=url)
            hint = " (the <Stream url> query string was dropped, as Twilio does)"
        url = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        track = verb.attrs.get("track")
        if track not in (None, "inbound_track"):
            raise TwilioSimError(f"{w.ERR_TRACK} invalid track {track!r} for <Connect>", self)
        params = w.stream_parameters(verb)
        signature = w.sign(sim.auth_token, url, {})
        target = w.map_to_gateway(url, sim.public_url, sim.gateway_url)
        self._event("stream-connecting", url=url, target=target)
        try:
            ws = await ws_connect(
                target,
                additional_headers={"X-Twilio-Signature": signature},
                user_agent_header=w.TWILIO_WS_USER_AGENT,
                compression=None,
                proxy=None,
                open_timeout=_WS_OPEN_TIMEOUT,
                close_timeout=_WS_CLOSE_TIMEOUT,
                write_limit=_WRITE_LIMIT,
                max_size=2**22,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise TwilioSimError(
                f"{w.ERR_HANDSHAKE} stream handshake rejected: HTTP {status} ({target}){hint}",
                self,
            ) from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise TwilioSimError(
                f"{w.ERR_CONNECT} stream connection failed: {exc!r} ({target})", self
            ) from exc

        sid = w.new_sid("MZ")
        cb = verb.attrs.get("statusCallback")
        st = _Stream(
            self,
            ws,
            sid,
            url,
            verb.attrs.get("name"),
            (w.resolve_url(cb, base), verb.attrs.get("statusCallbackMethod", "POST").upper())
            if cb
            else None,
        )
        try:
            await ws.send(w.CONNECTED_MSG)
            await ws.send(
                w.start_msg(
                    account_sid=self.account_sid,
                    stream_sid=sid,
                    call_sid=self.call_sid,
                    custom_parameters=params,
                )
            )
        except ConnectionClosed:
            pass  # the reader sees the close right away and the stream ends normally
        now = _mono()
        self._fix_t0(now)
        st.started_at = now
        st.pos0 = self._pos(now)
        st.first_due = sim._first_due(now)
        self._play_end = max(self._play_end, st.pos0)
        self.streams.append(sid)
        self.custom_parameters = params
        self._stream = st
        self._event("stream-started", stream=sid, url=url, custom_parameters=params)
        st.reader = self._spawn(self._read(st), f"read:{sid}")
        sim._live[st] = None
        sim._ensure_ticker()
        if st.status_callback is not None:
            sim._status_callback(self, st, "stream-started")
        self._started.set()
        self._notify()
        return st

    # ------------------------------------------------------------------ internals: TwiML driver

    async def _drive(self) -> None:
        limit = asyncio.timeout(self._sim.max_call_duration)
        try:
            async with limit:
                await self._drive_documents()
        except TimeoutError as exc:
            if not limit.expired():
                self.error = f"timeout: {exc!r}"
                await self._finish("error")
                return
            self._event("time-limit")
            await self._finish("time-limit")
        except TwilioSimError as exc:
            self.error = str(exc)
            self._event("error", error=self.error)
            await self._finish("error")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # defensive: a sim bug must end the call, not hang it
            log.exception("call driver failed for %s", self.call_sid)
            self.error = f"simulator error: {exc!r}"
            await self._finish("error")

    async def _drive_documents(self) -> None:
        sim = self._sim
        doc: tuple[str, str] | None = (
            await self._fetch(sim.voice_url, "POST", "ringing"),
            sim.voice_url,
        )
        count = 0
        while doc is not None and self.end_reason is None:
            count += 1
            if count > _MAX_DOCUMENTS:
                raise TwilioSimError(f"more than {_MAX_DOCUMENTS} TwiML documents", self)
            doc = await self._execute(*doc)
        if self.end_reason is None:
            await self._finish("completed")

    async def _fetch(self, url: str, method: str, status: str) -> str:
        sim = self._sim
        params = w.call_params(
            account_sid=self.account_sid,
            call_sid=self.call_sid,
            from_=self.from_,
            to=self.to,
            status=status,
        )
        self._event("webhook", url=url, method=method, status=status)
        try:
            resp = await sim._request(url, method, params)
        except httpx.HTTPError as exc:
            raise TwilioSimError(
                f"{w.ERR_HTTP_RETRIEVAL} HTTP retrieval failure for {url}: {exc!r}", self
            ) from exc
        if not 200 <= resp.status_code < 300:
            raise TwilioSimError(
                f"{w.ERR_HTTP_RETRIEVAL} {method} {url} answered HTTP {resp.status_code}: "
                f"{resp.text[:200]!r}",
                self,
            )
        self.twiml_log.append(resp.text)
        self._event("twiml", url=url, twiml=resp.text)
        return resp.text

    async def _take_redirect(self, base: str) -> tuple[str, str] | None:
        red = self._redirect
        if red is None:
            return None
        self._redirect = None
        self._interrupt.clear()
        kind, value, method = red
        if kind == "twiml":
            return value, base
        return await self._fetch(value, method, "in-progress"), value

    async def _execute(self, xml: str, base: str) -> tuple[str, str] | None:
        try:
            verbs = w.parse_twiml(xml)
        except w.TwimlError as exc:
            raise TwilioSimError(str(exc), self) from exc
        for verb in verbs:
            red = await self._take_redirect(base)
            if red is not None:
                return red
            if self.end_reason is not None:
                return None
            tag = verb.tag
            if tag == "Say":
                self.say_texts.append(verb.text)
                self._event("say-verb", text=verb.text)
            elif tag == "Play":
                self._event("play-verb", url=verb.text, digits=verb.attrs.get("digits"))
            elif tag == "Pause":
                try:
                    length = float(verb.attrs.get("length", "1"))
                except ValueError:
                    length = 1.0
                self._event("pause-verb", length=length)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._interrupt.wait(), max(0.0, length))
            elif tag == "Hangup":
                await self._finish("hangup")
                return None
            elif tag == "Reject":
                await self._finish("rejected")
                return None
            elif tag == "Dial":
                self.dial_target = w.dial_target(verb)
                self._event("dial", target=self.dial_target)
                await self._finish("dial")
                return None
            elif tag == "Redirect":
                url = w.resolve_url(verb.text, base)
                method = verb.attrs.get("method", "POST").upper()
                return await self._fetch(url, method, "in-progress"), url
            elif tag == "Connect":
                stream_verb = verb.child("Stream")
                if stream_verb is None:
                    nouns = [c.tag for c in verb.children]
                    raise TwilioSimError(f"unsupported <Connect> noun(s) {nouns}", self)
                st = await self._open_stream(stream_verb, base)
                await st.closed.wait()
                if self.end_reason is not None:
                    return None
                red = await self._take_redirect(base)
                if red is not None:
                    return red
                action = verb.attrs.get("action")
                if action:
                    url = w.resolve_url(action, base)
                    method = verb.attrs.get("method", "POST").upper()
                    return await self._fetch(url, method, "in-progress"), url
            else:
                self._event("unsupported-verb", verb=tag)
        return await self._take_redirect(base)

    async def _finish(self, reason: str) -> None:
        """End the call once (idempotent)."""
        if self.end_reason is not None:
            return
        self.end_reason = reason
        self._interrupt.set()
        try:
            me = asyncio.current_task()
            driver = self._driver
            if driver is not None and driver is not me and not driver.done():
                driver.cancel()
            st = self._stream
            if st is not None and st.open:
                await self._terminate_stream(st, reason)
        finally:
            self._cancel_mark_timer()
            me = asyncio.current_task()
            for task in list(self._tasks):
                if task is not me and not task.done() and task is not self._driver:
                    task.cancel()
            self.ended_wall = time.time()
            self._event("ended", reason=reason)
            self._say_idle.set()
            self.ended.set()
            self._notify()

    def _request_redirect(self, kind: str, value: str, method: str = "POST") -> None:
        self._redirect = (kind, value, method)
        self._interrupt.set()

    def _status(self) -> str:
        if self.end_reason is None:
            return "in-progress" if self._started.is_set() else "ringing"
        return {"rejected": "busy", "error": "failed"}.get(self.end_reason, "completed")

    def _resource(self) -> dict[str, Any]:
        return w.call_resource(
            account_sid=self.account_sid,
            call_sid=self.call_sid,
            from_=self.from_,
            to=self.to,
            status=self._status(),
            created=self.created_wall,
            started=self.answered_wall,
            ended=self.ended_wall,
        )


def _segments(ulaw: bytes, threshold: int, min_silence_s: float) -> list[tuple[float, float]]:
    if not ulaw:
        return []
    pcm = np.frombuffer(audioop.ulaw2lin(ulaw, 2), dtype=np.int16).astype(np.int32)
    loud = np.flatnonzero(np.abs(pcm) > threshold)
    if loud.size == 0:
        return []
    gap = round(min_silence_s * w.SAMPLE_RATE)
    breaks = np.flatnonzero(np.diff(loud) > gap)
    starts = np.concatenate((loud[:1], loud[breaks + 1]))
    ends = np.concatenate((loud[breaks], loud[-1:])) + 1
    sr = float(w.SAMPLE_RATE)
    return [(int(s) / sr, int(e) / sr) for s, e in zip(starts, ends, strict=True)]


class _QuietServer(uvicorn.Server):
    """uvicorn in-process: never touch the host's signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class TwilioSim:
    """Simulated Twilio: places calls against the gateway and serves a REST stand-in.

    Args:
        gateway_url: where the gateway really listens, e.g. "http://127.0.0.1:8123".
        public_url: the base the gateway was configured with (PUBLIC_URL). Signatures are
            computed over public URLs; connections go to gateway_url.
        account_sid / auth_token: the account; REST Basic auth and all signatures use them.
        playout_model: True models Twilio's outbound buffer (marks echo at play time, clear
            drops audio). False: marks are echoed on arrival and clear has nothing to drop.
        voice_path: path of the voice webhook under public_url.
        max_call_duration: calls are ended ("time-limit") after this many seconds.
    """

    def __init__(
        self,
        *,
        gateway_url: str,
        public_url: str,
        account_sid: str,
        auth_token: str,
        playout_model: bool = True,
        voice_path: str = "/twilio/voice",
        max_call_duration: float = 4 * 3600.0,
    ) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.public_url = public_url.rstrip("/")
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.playout_model = playout_model
        self.voice_url = self.public_url + voice_path
        self.max_call_duration = max_call_duration
        self.calls: dict[str, SimCall] = {}
        self.rest_requests: list[tuple[float, str, str, dict[str, str]]] = []
        self._live: dict[_Stream, None] = {}
        self._epoch = _mono()
        self._ticker: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._server: _QuietServer | None = None
        self._server_task: asyncio.Task[None] | None = None
        self._rest_base: str | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._stopped = False

    async def __aenter__(self) -> TwilioSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start the REST API stand-in (uvicorn in-process) and the media ticker."""
        if self._server is not None:
            return
        self._stopped = False
        self._ensure_http()
        self._ensure_ticker()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: with proto 0, asyncio does not set TCP_NODELAY on accepted sockets
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        bound_port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._rest_app(),
            log_level="warning",
            lifespan="off",
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=1,
        )
        server = _QuietServer(config)
        self._server = server
        self._server_task = asyncio.create_task(server.serve(sockets=[sock]), name="twilio-sim-rest")
        for _ in range(500):  # ≤ 5 s
            if server.started:
                break
            if self._server_task.done():
                exc = self._server_task.exception()
                raise TwilioSimError(f"REST stand-in failed to start: {exc!r}")
            await asyncio.sleep(0.01)
        else:
            raise TwilioSimError("REST stand-in did not start within 5 s")
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        self._rest_base = f"http://{shown}:{bound_port}"

    async def stop(self) -> None:
        """End every live call (`stop` + close), cancel every task, stop the REST server."""
        self._stopped = True
        live = [c for c in self.calls.values() if c.end_reason is None]
        if live:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(c._finish("sim-stopped") for c in live), return_exceptions=True),
                    5.0,
                )
        tasks: list[asyncio.Task[Any]] = []
        for call in self.calls.values():
            if call._driver is not None:
                tasks.append(call._driver)
            tasks.extend(call._tasks)
            call._cancel_mark_timer()
        tasks.extend(self._bg)
        if self._ticker is not None:
            tasks.append(self._ticker)
            self._ticker = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._live.clear()
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            done, _ = await asyncio.wait({self._server_task}, timeout=5.0)
            if not done:
                self._server_task.cancel()
                await asyncio.wait({self._server_task}, timeout=1.0)
        self._server = None
        self._server_task = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @property
    def rest_base_url(self) -> str:
        """Base URL of the REST stand-in (give it to the gateway/worker as TWILIO_API_BASE_URL)."""
        if self._rest_base is None:
            raise RuntimeError("TwilioSim.start() has not been called")
        return self._rest_base

    # ------------------------------------------------------------------ calls

    async def place_call(
        self,
        *,
        from_: str = "+15550001111",
        to: str = "+15550002222",
        call_sid: str | None = None,
        timeout: float = 30.0,
    ) -> SimCall:
        """Place an inbound call: signed voice webhook, TwiML, Media Stream.

        Returns once `start` was sent on the socket. Raises TwilioSimError if the webhook did
        not answer 2xx, the TwiML has no `<Connect><Stream>`, or the socket was rejected.
        """
        if self._stopped:
            raise RuntimeError("TwilioSim was stopped")
        self._ensure_http()
        sid = call_sid or w.new_sid("CA")
        if sid in self.calls:
            raise ValueError(f"call {sid} already exists")
        call = SimCall(self, sid, from_, to)
        self.calls[sid] = call
        driver = asyncio.create_task(call._drive(), name=f"{sid}:driver")
        call._driver = driver
        started = asyncio.ensure_future(call._started.wait())
        try:
            await asyncio.wait({started, driver}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        if call._started.is_set():
            return call
        if call.end_reason is None:
            await call._finish("error")
            call.error = call.error or f"no Media Stream started within {timeout}s"
            raise TwilioSimError(call.error, call)
        if call.error:
            raise TwilioSimError(call.error, call)
        raise TwilioSimError(
            f"TwiML has no <Connect><Stream> (call ended: {call.end_reason}); "
            f"TwiML: {call.twiml_log[-1] if call.twiml_log else None!r}",
            call,
        )

    # ------------------------------------------------------------------ internals

    def _ensure_http(self) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(15.0, connect=5.0),  # Twilio's webhook defaults
                limits=httpx.Limits(max_connections=500, max_keepalive_connections=100),
                trust_env=False,
                follow_redirects=False,
            )

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick_loop(), name="twilio-sim-ticker")

    def _first_due(self, start: float) -> float:
        """Due time of a new stream's first frame: on the shared 20 ms grid, half a period
        before the tick that sends it, ≥ 20 ms after `start` (the frame's audio must exist)."""
        period = w.FRAME_S
        k = math.ceil((start + period - self._epoch) / period)
        return self._epoch + k * period - period / 2

    async def _tick_loop(self) -> None:
        period = w.FRAME_S
        epoch = self._epoch
        k = math.floor((_mono() - epoch) / period)
        idle = 0
        while True:
            k += 1
            delay = epoch + k * period - _mono()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
                if delay < -0.5:  # the loop stalled: re-sync the grid (streams catch up by due)
                    k = math.floor((_mono() - epoch) / period)
            if not self._live:
                idle += 1
                if idle >= 50:  # 1 s without streams: exit; _ensure_ticker restarts it
                    return
                continue
            idle = 0
            now = _mono()
            for st in list(self._live):
                try:
                    await st.pump(now)
                except ConnectionClosed:
                    self._live.pop(st, None)
                except Exception:
                    log.exception("media pump failed on %s", st.sid)
                    self._live.pop(st, None)

    async def _request(self, url: str, method: str, params: dict[str, str]) -> httpx.Response:
        assert self._http is not None
        url = w.strip_fragment(url)
        headers = {"User-Agent": w.TWILIO_WEBHOOK_USER_AGENT}
        if method == "GET":
            full = w.url_with_query(url, params)
            headers["X-Twilio-Signature"] = w.sign(self.auth_token, w.signing_url(full), {})
            target = w.map_to_gateway(full, self.public_url, self.gateway_url)
            return await self._http.get(target, headers=headers)
        headers["X-Twilio-Signature"] = w.sign(self.auth_token, w.signing_url(url), params)
        target = w.map_to_gateway(url, self.public_url, self.gateway_url)
        return await self._http.post(target, data=params, headers=headers)

    def _status_callback(self, call: SimCall, st: _Stream, event: str) -> None:
        """Fire-and-forget `<Stream statusCallback>` request (stream-started/stopped)."""
        if st.status_callback is None or self._http is None:
            return
        url, method = st.status_callback
        params = {
            "AccountSid": call.account_sid,
            "CallSid": call.call_sid,
            "StreamSid": st.sid,
            "StreamName": st.name or st.sid,
            "StreamEvent": event,
            "Timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }

        async def send() -> None:
            try:
                resp = await asyncio.wait_for(self._request(url, method, params), 15.0)
                call._event("status-callback", event=event, http=resp.status_code)
            except Exception as exc:
                call._event("status-callback", event=event, error=repr(exc))

        task = asyncio.ensure_future(send())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # ------------------------------------------------------------------ REST stand-in

    def _rest_app(self) -> Starlette:
        path = "/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"
        return Starlette(routes=[Route(path, self._rest_call, methods=["GET", "POST"])])

    def _auth_ok(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, b64 = header.partition(" ")
        if scheme.lower() != "basic" or not b64:
            return False
        try:
            user, _, password = binascii.a2b_base64(b64).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user, self.account_sid) and secrets.compare_digest(
            password, self.auth_token
        )

    async def _rest_call(self, request: Request) -> JSONResponse:
        account = request.path_params["account_sid"]
        call_sid = request.path_params["call_sid"]
        form: dict[str, str] = {}
        if request.method == "POST":
            form = {k: str(v) for k, v in (await request.form()).items()}
        self.rest_requests.append((_mono(), request.method, request.url.path, form))
        if not self._auth_ok(request):
            return JSONResponse(
                w.error_doc(20003, "Authenticate", 401),
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="Twilio API"'},
            )
        call = self.calls.get(call_sid)
        if account != self.account_sid or call is None or (
            request.method == "POST" and call.end_reason is not None
        ):
            msg = f"The requested resource {request.url.path} was not found"
            return JSONResponse(w.error_doc(20404, msg, 404), status_code=404)
        if request.method == "GET":
            return JSONResponse(call._resource())
        status = form.get("Status")
        twiml = form.get("Twiml")
        url = form.get("Url")
        if status not in (None, "completed", "canceled"):
            return JSONResponse(
                w.error_doc(21218, f"Invalid value for Status: {status}", 400), status_code=400
            )
        if twiml is not None and url is not None:
            return JSONResponse(
                w.error_doc(21205, "Twiml and Url are mutually exclusive", 400), status_code=400
            )
        call._event("rest-update", params=form)
        if status == "completed":
            await call._finish("rest-completed")
        elif status == "canceled":
            # `canceled` only affects queued/ringing calls; an in-progress call is unchanged.
            if not call._started.is_set():
                await call._finish("canceled")
        elif twiml is not None:
            try:
                w.parse_twiml(twiml)
            except w.TwimlError as exc:
                return JSONResponse(w.error_doc(12100, str(exc), 400), status_code=400)
            call.twiml_log.append(twiml)
            await self._redirect(call, "twiml", twiml, "POST")
        elif url is not None:
            method = form.get("Method", "POST").upper()
            await self._redirect(call, "url", url, method)
        return JSONResponse(call._resource())

    async def _redirect(self, call: SimCall, kind: str, value: str, method: str) -> None:
        """REST `update(twiml=…|url=…)`: Twilio switches to the new TwiML at once, which
        tears down the running `<Connect><Stream>` (`stop` + close)."""
        call._request_redirect(kind, value, method)
        st = call._stream
        if st is not None and st.open:
            await call._terminate_stream(st, "rest-update")
