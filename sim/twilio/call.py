"""One simulated phone call: the caller's side, and Twilio's handling of the call.

A call fetches its voice webhook and runs the TwiML it gets; `<Connect><Stream>` opens a Media
Stream (stream.py) and waits for it to end, then follows `<Connect action>`, continues the
document, or ends. A REST redirect replaces the running document at once; the call ends once,
for one reason (`end_reason`), however many paths try to end it.

Meanwhile the caller talks (`say`, `send_dtmf`, `hangup`) and listens: what the gateway sends
goes through Twilio's playout buffer (playout.py) and is recorded on the call clock with what the
caller sent (recording.py). Call time 0 is the moment the first stream's `start` was sent;
earlier events have negative times.

An outbound call (placed through `POST /Calls.json`) is the same object driven by dialer.py
instead of a voice webhook: the remote party is the callee (`call.outbound.callee`), which talks
through the same `say` queue, so a test talks and listens on it exactly as on an inbound call.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httpx

from . import dialer
from . import twiml as tw
from . import wire as w
from .errors import TwilioSimError
from .playout import Playout
from .recording import SentTimeline, pcm16_to_ulaw, segments, ulaw_to_pcm16, write_wav
from .stream import MediaStream, connect, first_due

if TYPE_CHECKING:
    from .sim import TwilioSim

log = logging.getLogger("sim.twilio")

MAX_DOCUMENTS = 100  # TwiML documents per call (loop guard)
_b2a = binascii.b2a_base64
_mono = time.monotonic


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
        self.direction = "inbound"  # "outbound-api" for calls placed through the REST API
        self.answered_by: str | None = None  # AMD's AnsweredBy, once it decided
        self.outbound: dialer.Outbound | None = None  # request, callee and state of an outbound call

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

        self._stream: MediaStream | None = None
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
        self._idle = sim._idle_frame  # (frame, base64) sent while nothing is queued
        self._sent = SentTimeline()

        # gateway → caller
        self._playout = Playout(sim.playout_model)
        self._mark_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ public: state

    def __repr__(self) -> str:
        return f"<SimCall {self.call_sid} streams={len(self.streams)} end={self.end_reason}>"

    def now(self) -> float:
        """Current call time in seconds."""
        return _mono() - self._t0

    @property
    def t0(self) -> float:
        """`time.monotonic()` of call time 0 (until the first stream starts: of the call's
        creation). Add it to a call time to compare with monotonic times, e.g. an observer's."""
        return self._t0

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
        return self._playout.heard_until(self._pos(_mono()))

    @property
    def status(self) -> str:
        """The call resource's `status`. Inbound: ringing until the first stream started, then
        in-progress; once ended, Twilio's final status for how it ended. Outbound: queued,
        ringing, in-progress, then completed / busy / no-answer / failed / canceled."""
        if self.outbound is not None:
            return self.outbound.resource_status(self)
        if self.end_reason is None:
            return "in-progress" if self._started.is_set() else "ringing"
        return {"rejected": "busy", "error": "failed"}.get(self.end_reason, "completed")

    @property
    def answered(self) -> bool:
        """Whether the call was answered (inbound: its first stream started)."""
        if self.outbound is not None:
            return self.outbound.answered_mono is not None
        return self._started.is_set()

    @property
    def answered_at(self) -> float | None:
        """Call time at which the callee answered an outbound call (negative when the first
        stream started later)."""
        ob = self.outbound
        if ob is None or ob.answered_mono is None:
            return None
        return ob.answered_mono - self._t0

    @property
    def beep_at(self) -> float | None:
        """Call time at which a machine callee's beep started (None: no beep, not answered).
        On `sent`, the beep's first byte sits at `int(beep_at * 8000)` when it was streamed."""
        return self._script_time("beep_start")

    @property
    def beep_end(self) -> float | None:
        """Call time at which a machine callee's beep ended; it records from here."""
        return self._script_time("beep_end")

    @property
    def heard_after_beep(self) -> bytes:
        """μ-law 8 kHz of what a machine callee heard after its beep (what it recorded)."""
        end = self.beep_end
        if end is None:
            return b""
        return self.heard[max(0, int(end * w.SAMPLE_RATE)) :]

    @property
    def sent(self) -> bytes:
        """μ-law 8 kHz timeline of what the caller sent (silence frames included)."""
        return bytes(self._sent.audio)

    @property
    def sent_frames(self) -> list[tuple[float, int]]:
        """(send time, sample offset of the frame in `sent`) for every media frame sent.
        Within one stream, frame k sits at offset0 + 160·k."""
        return self._sent.frames()

    def sent_time_at(self, t: float) -> float | None:
        """When the media frame holding call time `t` of `sent` went out (None if it did not).

        Latency of a reply = (heard time of its first byte) - sent_time_at(end of the utterance).
        """
        return self._sent.time_at(t)

    def heard_pcm16(self) -> bytes:
        return ulaw_to_pcm16(self.heard)

    def sent_pcm16(self) -> bytes:
        return ulaw_to_pcm16(self.sent)

    def heard_segments(
        self, *, threshold: int = 64, min_silence_s: float = 0.06
    ) -> list[tuple[float, float]]:
        """(start_s, end_s) runs of non-silent heard audio; a run ends after ≥ min_silence_s of
        silence (|PCM| ≤ threshold; μ-law 0xFF/0x7F decode to 0)."""
        return segments(self.heard, threshold, min_silence_s)

    def sent_segments(
        self, *, threshold: int = 64, min_silence_s: float = 0.06
    ) -> list[tuple[float, float]]:
        return segments(self.sent, threshold, min_silence_s)

    def write_wav(self, path: str) -> None:
        """Stereo 16-bit 8 kHz WAV: left = caller (sent), right = assistant (heard)."""
        write_wav(path, self.sent, self.heard)

    # ------------------------------------------------------------------ public: caller actions

    def say(self, ulaw: bytes) -> None:
        """Queue μ-law 8 kHz audio for the caller to send (after what is already queued)."""
        if not ulaw:
            return
        fb = w.FRAME_BYTES
        rem = len(ulaw) % fb
        if rem:
            ulaw = bytes(ulaw) + w.SILENCE_FRAME[: fb - rem]
        q = self._say_q
        for i in range(0, len(ulaw), fb):
            q.append(bytes(ulaw[i : i + fb]))
        self._say_idle.clear()
        self._event("say", seconds=len(ulaw) / w.SAMPLE_RATE, queued_frames=len(q))

    def say_pcm(self, pcm16_8k: bytes) -> None:
        """Queue PCM16 (little-endian, mono, 8 kHz) audio; converted with audioop.lin2ulaw."""
        self.say(pcm16_to_ulaw(pcm16_8k))

    def say_silence(self, seconds: float) -> None:
        self.say(b"\xff" * int(seconds * w.SAMPLE_RATE))

    def send_dtmf(self, digit: str) -> None:
        """Press a key: a `dtmf` event goes out with the stream's next frame (just before it)."""
        if len(digit) != 1 or digit not in w.DTMF_DIGITS:
            raise ValueError(f"invalid DTMF digit {digit!r}")
        st = self._stream
        if st is None or not st.open:
            self._event("dtmf-dropped", digit=digit)
            return
        st.pending_dtmf.append(digit)

    async def hangup(self) -> None:
        """The caller (of an outbound call: the callee) hangs up: `stop` on the live socket,
        close it, end the call ("caller-hangup" / "callee-hangup")."""
        await self._finish("caller-hangup" if self.outbound is None else "callee-hangup")

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

    def _script_time(self, name: str) -> float | None:
        ob = self.outbound
        if ob is None or ob.answered_mono is None:
            return None
        offset: float | None = getattr(ob.script, name)
        return None if offset is None else ob.answered_mono + offset - self._t0

    def _say_first(self, ulaw: bytes) -> None:
        """Queue audio ahead of anything already queued (the callee's own script)."""
        fb = w.FRAME_BYTES
        rem = len(ulaw) % fb
        if rem:
            ulaw = bytes(ulaw) + w.SILENCE_FRAME[: fb - rem]
        frames = [bytes(ulaw[i : i + fb]) for i in range(0, len(ulaw), fb)]
        if not frames:
            return
        self._say_q.extendleft(reversed(frames))
        self._say_idle.clear()
        self._event("say", seconds=len(ulaw) / w.SAMPLE_RATE, queued_frames=len(self._say_q))

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
        if self.answered_wall is None:  # an outbound call was answered before it streamed
            self.answered_wall = time.time()

    def _next_caller_frame(self) -> tuple[bytes, str]:
        q = self._say_q
        if not q:
            return self._idle
        frame = q.popleft()
        if not q:
            self._say_idle.set()
        return frame, _b2a(frame, newline=False).decode("ascii")

    def _record_sent(self, now: float, pos: int, frame: bytes) -> None:
        self._sent.record(now - self._t0, pos, frame)

    def _protocol_error(self, stream: MediaStream, text: str) -> None:
        self.protocol_errors.append(text)
        self._event("protocol-error", error=text, stream=stream.sid)
        self._notify()

    # ------------------------------------------------------------------ internals: playout

    def _on_media(self, audio: bytes, now: float) -> None:
        self.received_media_times.append((now - self._t0, len(audio)))
        self._playout.media(audio, self._pos(now))
        observer = self._sim.observer
        if observer is not None:
            observer.assistant_media_received(self, audio, now)
        if self._waiters:
            self._notify()

    def _arm_mark_timer(self) -> None:
        due_pos = self._playout.next_due()
        if self._mark_timer is not None or due_pos is None:
            return
        due = self._t0 + due_pos / w.SAMPLE_RATE
        loop = asyncio.get_running_loop()
        self._mark_timer = loop.call_later(max(0.0, due - _mono()), self._on_mark_timer)

    def _cancel_mark_timer(self) -> None:
        if self._mark_timer is not None:
            self._mark_timer.cancel()
            self._mark_timer = None

    def _on_mark_timer(self) -> None:
        self._mark_timer = None
        st = self._stream
        names = self._playout.take_due(self._pos(_mono()))
        if names and st is not None:
            self._spawn(self._echo_marks(st, names, "played"), "mark-echo")
        self._arm_mark_timer()

    async def _echo_marks(self, st: MediaStream, names: list[str], cause: str) -> None:
        sid = st.sid
        observer = self._sim.observer
        for name in names:

            def build(seq: int, name: str = name) -> str:
                return w.mark_echo_msg(sid, seq, name)

            if await st.emit(build):
                now = _mono()
                self.marks_echoed.append((now - self._t0, name))
                self._event("mark-echoed", name=name, cause=cause, stream=sid)
                if observer is not None:
                    observer.mark_echoed(self, name, now, cause)
        self._notify()

    async def _on_mark(self, st: MediaStream, name: str, now: float) -> None:
        self.marks_sent_by_server.append((now - self._t0, name))
        names = self._playout.mark(name, self._pos(now))
        self._arm_mark_timer()
        if names:
            await self._echo_marks(st, names, "played")
        self._notify()

    async def _on_clear(self, st: MediaStream, now: float) -> None:
        self.clears.append(now - self._t0)
        dropped, names = self._playout.clear(self._pos(now))
        self._cancel_mark_timer()
        self._event("clear", dropped_s=dropped / w.SAMPLE_RATE, marks=len(names), stream=st.sid)
        observer = self._sim.observer
        if observer is not None:
            observer.clear_received(self, now, dropped)
        if names:
            await self._echo_marks(st, names, "clear")
        self._notify()

    # ------------------------------------------------------------------ internals: streams

    async def _open_stream(self, verb: tw.Verb, base: str) -> MediaStream:
        sim = self._sim
        try:
            where = tw.stream_url(verb, base)
            for code, detail in where.warnings:
                self._event("warning", code=code, detail=detail)
            tw.check_track(verb)
        except tw.TwimlError as exc:
            raise TwilioSimError(str(exc), self) from None
        url = where.url
        params = tw.stream_parameters(verb)
        signature = w.sign(sim.auth_token, url, {})
        target = w.map_to_gateway(url, sim.public_url, sim.gateway_url)
        self._event("stream-connecting", url=url, target=target)
        ws = await connect(self, target, signature, where.hint)
        sid = w.new_sid("MZ")
        st = MediaStream(
            self, ws, sid, url, verb.attrs.get("name"), tw.status_callback(verb, base)
        )
        await st.send_start(params)
        now = _mono()
        self._fix_t0(now)
        st.started_at = now
        st.pos0 = self._pos(now)
        st.first_due = first_due(now, sim._epoch, sim.phases)
        self._playout.stream_started(st.pos0)
        self.streams.append(sid)
        self.custom_parameters = params
        self._stream = st
        if self.outbound is not None:
            dialer.stream_started(self, now)
        self._event("stream-started", stream=sid, url=url, custom_parameters=params)
        st.reader = self._spawn(st.read(), f"read:{sid}")
        sim._live[st] = None
        sim._ensure_ticker()
        if st.status_callback is not None:
            sim._webhooks.stream_status(self, st, "stream-started")
        self._started.set()
        self._notify()
        return st

    def _stream_closed(self, st: MediaStream, code: int | None, reason: str = "") -> None:
        if not st.open:
            return
        st.open = False
        self._sim._live.pop(st, None)
        dropped = self._playout.drop_unplayed(self._pos(_mono()))
        if dropped:
            self._event("marks-dropped", names=dropped)
        self._cancel_mark_timer()
        by = st.initiator or "server"
        self._event("stream-closed", stream=st.sid, by=by, code=code, reason=reason)
        if st.status_callback is not None:
            self._sim._webhooks.stream_status(self, st, "stream-stopped")
        st.closed.set()
        self._notify()

    async def _terminate_stream(self, st: MediaStream, initiator: str) -> None:
        """Twilio ends the stream: `stop`, then close the socket (bounded)."""
        if not st.open:
            return
        if st.initiator is None:
            st.initiator = initiator
        self._sim._live.pop(st, None)  # no more media frames
        acc, csid = self.account_sid, self.call_sid
        if await st.emit(lambda seq: w.stop_msg(st.sid, seq, acc, csid)):
            self._event("stop-sent", stream=st.sid, by=initiator)
        await st.close()
        self._stream_closed(st, 1000)

    # ------------------------------------------------------------------ internals: TwiML driver

    async def _drive(self, body: Callable[[], Awaitable[None]] | None = None) -> None:
        """Run the call (`body`, by default: the voice webhook and its documents) within the
        sim's time limit, ending it on any failure."""
        limit = asyncio.timeout(self._sim.max_call_duration)
        try:
            async with limit:
                await (body() if body is not None else self._drive_documents())
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

    async def _drive_documents(self, first: tuple[str, str] | None = None) -> None:
        """Run TwiML documents from `first` (document, its URL), by default the voice webhook's,
        until the call ends or they run out."""
        doc = first
        if doc is None:
            voice_url = self._sim.voice_url
            doc = (await self._fetch(voice_url, "POST", "ringing"), voice_url)
        count = 0
        while doc is not None and self.end_reason is None:
            count += 1
            if count > MAX_DOCUMENTS:
                raise TwilioSimError(f"more than {MAX_DOCUMENTS} TwiML documents", self)
            doc = await self._execute(*doc)
        if self.end_reason is None:
            await self._finish("completed")

    async def _fetch(
        self, url: str, method: str, status: str, extra: dict[str, str] | None = None
    ) -> str:
        params = w.call_params(
            account_sid=self.account_sid,
            call_sid=self.call_sid,
            from_=self.from_,
            to=self.to,
            status=status,
            direction=self.direction,
        )
        if extra:
            params.update(extra)
        self._event("webhook", url=url, method=method, status=status)
        try:
            resp = await self._sim._webhooks.request(url, method, params)
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
        """Run one document; returns the next (document, its URL), or None when the call ends
        or the document runs out."""
        try:
            verbs = tw.parse_twiml(xml)
        except tw.TwimlError as exc:
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
                length = tw.pause_length(verb)
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
                self.dial_target = tw.dial_target(verb)
                self._event("dial", target=self.dial_target)
                await self._finish("dial")
                return None
            elif tag == "Redirect":
                url = w.resolve_url(verb.text, base)
                return await self._fetch(url, tw.method_of(verb), "in-progress"), url
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
                action = tw.action_url(verb, base)
                if action is not None:
                    return await self._fetch(action, tw.method_of(verb), "in-progress"), action
            else:
                self._event("unsupported-verb", verb=tag)
        return await self._take_redirect(base)

    async def _redirect_now(self, kind: str, value: str, method: str) -> None:
        """REST `update(twiml=…|url=…)`: Twilio switches to the new TwiML at once, which tears
        down the running `<Connect><Stream>` (`stop` + close)."""
        self._redirect = (kind, value, method)
        self._interrupt.set()
        st = self._stream
        if st is not None and st.open:
            await self._terminate_stream(st, "rest-update")

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
            if self.outbound is not None:
                dialer.call_ended(self)
            self._say_idle.set()
            self.ended.set()
            self._notify()
