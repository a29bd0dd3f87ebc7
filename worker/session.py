"""One call on the assistant side: the Vapi session, both audio directions, and the ending.

The session never touches a Twilio socket. Caller events arrive from `call:{sid}:in` (pushed by
the worker's shared reader), assistant audio leaves through the `Playout` pacer (driven by the
worker's shared ticker) into `call:{sid}:out`. Every way a call can end funnels into
`request_end()`, so each end is handled once and recorded with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from shared import metrics
from shared import streams as S
from shared import vapi_proto as V
from shared.audio import SILENCE_FRAME, Downlink, Uplink
from shared.logs import call_sid_var, error_fields, mask_number
from shared.redisio import BatchWriter, Entries
from shared.settings import Settings
from shared.streams import Keys
from worker import ownership
from worker.playback import Playout
from worker.resume import Response, history
from worker.turns import KeypadGather, SpeechEnd
from worker.twilio_rest import TwilioRest
from worker.vad import Action, FastBargeIn, VoiceDetector
from worker.vapi_client import VapiClient, VapiError


class SessionHost(Protocol):
    """What a call session needs from the process that runs it (worker/main.py's Worker).

    Named here so a session depends on this small surface, not on the worker module."""

    settings: Settings
    keys: Keys
    worker_id: str
    redis: aioredis.Redis
    writer: BatchWriter
    vapi: VapiClient
    twilio: TwilioRest

    def session_done(self, session: CallSession, completed: bool) -> None: ...
    def wake_ticker(self, session: CallSession) -> None: ...
    def emit_due(self, session: CallSession, now: float) -> None: ...

log = logging.getLogger("callbridge.worker.session")

CALLER, ASSISTANT = "caller", "assistant"
MAX_INBOUND_BATCHES = 1000  # reader batches queued for Vapi (each one or more 20 ms frames)
MAX_BACKLOG_FRAMES = 750  # caller audio held while Vapi sets up: 15 s


@dataclass(frozen=True)
class Ending:
    reason: str
    side: str  # who ended it: CALLER (Twilio side is already gone) or ASSISTANT
    say: str | None = None
    transfer_to: str | None = None
    detail: str = ""


class CallSession:
    def __init__(self, worker: SessionHost, sid: str, job: dict[bytes, bytes], *, epoch: int,
                 record: dict[str, str]) -> None:
        s = worker.settings
        self.w = worker
        self.sid = sid
        self.job = job
        # Ownership: every write for this call is fenced by the epoch our claim got (a takeover
        # is any claim after the first); `record` is the call hash as the claim found it.
        self.epoch = epoch
        self.epoch_b = str(epoch).encode()
        self.record = record
        self.takeover = epoch > 1
        self.in_pos = ""  # id of the last `in` entry handled (forwarded to Vapi, or acted on)
        self._saved_pos = ""
        self._response = Response()
        self._saved_turn = ""
        self._events_expire = True
        self.keys = worker.keys
        self.out_key = worker.keys.outbound(sid)
        self.playout = Playout(lead_s=s.playout_lead_ms / 1000, mark_every_ms=s.mark_every_ms,
                               prebuffer_s=s.playout_prebuffer_ms / 1000, mark_prefix=f"{epoch}.")
        self.uplink = Uplink(s.vapi_audio_format)
        self.downlink = Downlink(s.vapi_audio_format)
        self.stream_live = False
        self.ending: Ending | None = None
        self._inq: asyncio.Queue[Entries] = asyncio.Queue()
        self._end_requested = asyncio.Event()
        self._detached = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._backlog: list[bytes] = []
        self._reattach_timer: asyncio.TimerHandle | None = None
        self._completed = False  # ended for good (not released for a takeover)
        self._seen_start = False
        self.stream_sid = ""
        self.keypad = KeypadGather(timeout_s=s.keypad_timeout_s)
        self._keypad_timer: asyncio.TimerHandle | None = None
        self.speech = SpeechEnd()
        self._turn_measured_for: float | None = None  # last_voiced_at already paired with a turn
        # After a barge-in, audio Vapi had in flight for the cut turn must not play: drop Vapi
        # audio until it announces the next assistant turn (bounded, in case it never does).
        self._stale_until = 0.0
        self.last_media_at = time.monotonic()
        self._bg: set[asyncio.Task[None]] = set()
        self._children: set[asyncio.Task[object]] = set()
        self.silent_for = 0.0  # seconds of silence fill since the last real caller frame
        self.lost = False  # another worker took the call over: leave its state alone
        self._hold_timer: asyncio.TimerHandle | None = None
        self._setup_call: object | None = None
        self.fast: FastBargeIn | None = None
        if s.fast_barge_in:
            self.fast = FastBargeIn(VoiceDetector(aggressiveness=s.fast_barge_in_aggressiveness),
                                    confirm_window_s=s.fast_barge_in_confirm_ms / 1000)

    @property
    def vapi_connected(self) -> bool:
        return self._ws is not None

    # Called by the worker's shared reader: must not block.
    def on_inbound(self, entries: Entries) -> None:
        if self._inq.qsize() >= MAX_INBOUND_BATCHES:
            # Vapi is not taking the caller's audio (stalled socket): keep the call's control
            # entries, drop audio rather than grow without bound.
            kept = [e for e in entries if e[1].get(b"k") != S.IN_MEDIA]
            metrics.DROPPED.labels("inbound_overflow").inc(len(entries) - len(kept))
            if not kept:
                return
            entries = kept
        self._inq.put_nowait(entries)

    def request_end(self, ending: Ending) -> None:
        if self.ending is None:
            self.ending = ending
            self._end_requested.set()

    def event(self, kind: str, **data: object) -> None:
        """Append to call:{sid}:events (transcripts, barge-ins, timings, the end)."""
        value = orjson.dumps(data) if data else None
        key = self.keys.events(self.sid)
        self.w.writer.xadd(key, S.entry(kind.encode(), value=value, epoch=self.epoch_b), 2000)
        if self._events_expire:  # once it exists: a call whose every process died must expire
            self._events_expire = False
            self.w.writer.command("expire", key, self.w.settings.call_ttl_s)

    def out(self, kind: bytes, value: str | bytes | None = None) -> None:
        """Write to call:{sid}:out, stamped with our epoch (the gateway drops a replaced owner's)."""
        self.w.writer.xadd(self.out_key, S.entry(kind, value=value, epoch=self.epoch_b),
                           self.w.settings.stream_maxlen)

    def update_call(self, mapping: dict[str, str]) -> None:
        """HSET on the call record, only while we still own the call (our epoch is its epoch)."""
        self.w.writer.command("eval", *ownership.fenced_hset_args(self.keys, self.sid, self.epoch,
                                                                  mapping))

    def record_fields(self) -> dict[str, str]:
        """What we know of the call record, to put back if Redis lost it."""
        fields = {"status": S.STATUS_LIVE if self._seen_start else S.STATUS_RINGING}
        if self.stream_sid:
            fields["stream_sid"] = self.stream_sid
        for name in ("from", "to"):
            if value := self.job.get(name.encode()):
                fields[name] = value.decode(errors="replace")
        if self.ending is not None:
            fields.update({"status": S.STATUS_ENDED, "end_reason": self.ending.reason})
        if self.in_pos:
            fields["in_pos"] = self.in_pos
        return fields

    def on_reasserted(self) -> None:
        """Redis came back without our call: its streams start anew, expiries with them."""
        self._events_expire = True
        self._saved_pos = self._saved_turn = ""
        self.w.writer.command("expire", self.out_key, self.w.settings.call_ttl_s)
        self.persist_progress()

    def persist_progress(self) -> None:
        """Where a successor should resume (`in_pos`) and what the caller heard of the current
        assistant response (`turn`): one fenced write per call every few hundred ms, only when
        either changed."""
        mapping: dict[str, str] = {}
        if self.in_pos and self.in_pos != self._saved_pos:
            mapping["in_pos"] = self._saved_pos = self.in_pos
        turn = self._response.snapshot(self.playout)
        if turn and turn != self._saved_turn:
            mapping["turn"] = self._saved_turn = turn
        if mapping:
            self.update_call(mapping)

    # Lifecycle --------------------------------------------------------------------------------

    async def run(self) -> None:
        call_sid_var.set(self.sid)
        consumer = asyncio.create_task(self._consume_inbound(), name=f"in-{self.sid}")
        consumer.add_done_callback(self._inbound_done)
        try:
            if await self._already_over():
                self._completed = True
                return
            await self._serve()
            self._completed = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("call session failed", extra=error_fields(exc))
            self.request_end(Ending("error", ASSISTANT, say=self.w.settings.unavailable_message))
            with contextlib.suppress(Exception):
                await self._finish_assistant_side()
            self._completed = True
        finally:
            consumer.cancel()
            for child in self._children:  # released mid-setup: no Vapi call may outlive us
                child.cancel()
            await asyncio.gather(*self._children, return_exceptions=True)
            if self._setup_call is not None and self._ws is None and not self._completed:
                metrics.VAPI_ERRORS.labels("abandoned").inc()
            for timer in (self._reattach_timer, self._keypad_timer, self._hold_timer):
                if timer:
                    timer.cancel()
            for task in self._bg:
                task.cancel()
            if not self.lost:
                self.record_turns()
            await self._close_vapi(send_end=True)
            await asyncio.gather(consumer, return_exceptions=True)
            self.w.session_done(self, completed=self._completed)

    def _inbound_done(self, task: asyncio.Task[None]) -> None:
        """The caller-side loop must live as long as the call: if it fails, end the call."""
        if not task.cancelled() and task.exception() is not None:
            log.error("caller audio loop failed", extra=error_fields(task.exception()))
            self.request_end(Ending("error", ASSISTANT, say=self.w.settings.unavailable_message))

    async def _already_over(self) -> bool:
        status, stream_sid = self.record.get("status"), self.record.get("stream_sid")
        if status is None or status == S.STATUS_ENDED:
            log.info("job for a call that is already over; skipping")
            return True
        if self.takeover:
            self.event("takeover", worker=self.w.worker_id, epoch=self.epoch)
        if self.takeover and stream_sid:
            self.stream_sid = stream_sid
            # The gateway still holds Twilio's socket: play to it right away.
            self.stream_live = True
            self._seen_start = True
            self.playout.stream_reset(time.monotonic())
        return False

    async def _serve(self) -> None:
        settings = self.w.settings
        # `out` got its expiry with our claim, `events` gets it with its first entry.
        self.w.writer.command("expire", self.keys.inbound(self.sid), settings.call_ttl_s)
        t0 = time.monotonic()
        setup = asyncio.create_task(self._setup())
        ended = asyncio.create_task(self._end_requested.wait())
        self._children.update((setup, ended))
        await asyncio.wait({setup, ended}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        if not setup.done():  # the caller hung up while Vapi was being set up
            setup.cancel()
            await asyncio.gather(setup, return_exceptions=True)
        elif isinstance(setup.exception(), VapiError):
            err = setup.exception()
            assert isinstance(err, VapiError)
            metrics.VAPI_ERRORS.labels(err.kind).inc()
            log.warning("vapi setup failed", extra={"reason": err.reason, "detail": err.detail})
            self.request_end(Ending(err.reason, ASSISTANT, say=settings.unavailable_message,
                                    detail=err.detail))
        elif setup.exception() is not None:
            raise setup.exception()  # type: ignore[misc]
        else:
            self._ws = setup.result()
            metrics.VAPI_SOCKETS.inc()
            setup_s = time.monotonic() - t0
            metrics.VAPI_SETUP.observe(setup_s)
            self.event("vapi-connected", setup_ms=round(setup_s * 1000, 1), takeover=self.takeover)
            log.info("vapi connected", extra={"setup_ms": round(setup_s * 1000, 1)})
            self._inq.put_nowait([])  # flush caller audio that arrived during setup
            downlink = asyncio.create_task(self._downlink(self._ws), name=f"vapi-{self.sid}")
            self._children.add(downlink)
            await self._end_requested.wait()
            if self.ending and self.ending.side == ASSISTANT:
                await self._drain_playout()
            downlink.cancel()
            await asyncio.gather(downlink, return_exceptions=True)
        assert self.ending is not None
        if self.ending.side == CALLER:
            await self._close_vapi(send_end=True)
        else:
            await self._finish_assistant_side()

    async def _setup(self) -> ClientConnection:
        job = self.job
        resume = await self._resume_context() if self.takeover else None
        body = V.create_call_body(
            assistant_id=self.w.settings.vapi_assistant_id or "",
            audio_format=self.w.settings.vapi_audio_format,
            sample_rate=self.w.settings.audio_sample_rate,
            call_sid=self.sid,
            from_=job.get(b"from", b"").decode(),
            to=job.get(b"to", b"").decode(),
            resume=resume,
        )
        call = await self.w.vapi.create_call(body)
        self._setup_call = call
        self.update_call({"vapi_call_id": call.id})
        ws = await self.w.vapi.connect(call)
        try:
            await asyncio.sleep(0)  # a cancellation landing right here must not leak the socket
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.send(V.END_CALL), 0.5)
                await ws.close()
            raise
        if resume is not None and resume.mode == V.RESUME_WAIT and resume.messages:
            # The old way: the history as a system note; the caller speaks next.
            with contextlib.suppress(ConnectionClosed):
                await ws.send(V.conversation_so_far(resume.messages))
        if resume is not None:
            self.event("history-handed-over", turns=len(resume.messages), mode=resume.mode,
                       heard_ms=resume.heard_ms)
        return ws

    async def _resume_context(self) -> V.Resume:
        """What the new assistant session needs to go on: the conversation so far, ending with
        what the caller actually heard of the response that was cut (from the marks)."""
        try:
            entries: Any = await self.w.redis.xrange(self.keys.events(self.sid))
        except (RedisError, OSError):
            entries = []
        transcripts: list[tuple[str, str]] = []
        for _id, f in entries:
            if f.get(b"k") == b"transcript":
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                    data = orjson.loads(f.get(b"v", b"{}"))
                    if isinstance(data, dict):
                        transcripts.append((str(data.get("role", "")), str(data.get("text", ""))))
        messages, heard_ms = history(transcripts, self.record.get("turn", ""))
        model = None
        if self.w.settings.takeover_resume == V.RESUME_SPEAK:
            # Normally known since the worker started; if Vapi did not say then, ask briefly,
            # and resume the older way rather than keep the caller waiting.
            with contextlib.suppress(TimeoutError):
                model = await asyncio.wait_for(self.w.vapi.assistant_model(), 0.5)
        mode = V.RESUME_SPEAK if model is not None else V.RESUME_WAIT
        return V.Resume(mode=mode, messages=messages, model=model, heard_ms=heard_ms)

    # Caller -> assistant ---------------------------------------------------------------------

    async def _consume_inbound(self) -> None:
        latency = metrics.HOP_LATENCY.labels("twilio_to_vapi")
        frames = metrics.FRAMES.labels("in", "vapi")
        while True:
            entries = await self._inq.get()
            if self._ws is not None and self._backlog:
                backlog, self._backlog = self._backlog, []
                for audio in backlog:
                    await self._send_audio(audio)
            for entry_id, f in entries:
                kind = f.get(b"k")
                if entry_id != b"0-0":
                    self.in_pos = entry_id.decode()
                if kind == S.IN_MEDIA:
                    audio = f.get(b"a", b"")
                    self.last_media_at = now = time.monotonic()
                    self.silent_for = 0.0
                    self.speech.frame(audio, S.entry_time_s(f))
                    if self.fast is not None:
                        self._fast_barge_in(audio, now)
                    if self._ws is None:
                        self._backlog.append(audio)
                        if len(self._backlog) > MAX_BACKLOG_FRAMES:  # Vapi slow to answer
                            del self._backlog[0]
                            metrics.DROPPED.labels("inbound_overflow").inc()
                        continue
                    await self._send_audio(audio)
                    frames.inc()
                    latency.observe(S.entry_age_ms(f) / 1000)
                elif kind == S.IN_MARK:
                    self.playout.on_mark(f.get(b"v", b"").decode())
                elif kind == S.IN_START:
                    self._on_stream_start(f.get(b"v", b"{}"), f.get(b"s", b"").decode())
                elif kind == S.IN_DTMF:
                    self._on_dtmf(f.get(b"v", b"").decode())
                elif kind == S.IN_STOP:
                    if self._current_stream(f):
                        self.stream_live = False
                        self._detached.set()
                        self.request_end(Ending("caller-hangup", CALLER))
                elif kind == S.IN_DETACH:
                    if self._current_stream(f):
                        self._on_detach(f.get(b"v", b"").decode())
                elif kind == S.IN_SILENCE:
                    await self._send_audio(SILENCE_FRAME)

    async def _send_audio(self, ulaw: bytes) -> None:
        ws = self._ws
        if ws is None:
            return
        try:
            await ws.send(self.uplink.convert(ulaw))
        except ConnectionClosed:
            pass  # the downlink task sees the close and ends the call

    def _current_stream(self, f: dict[bytes, bytes]) -> bool:
        """A stop/detach of an older socket (a late close after Twilio re-attached) is stale."""
        sid = f.get(b"s", b"").decode()
        return not sid or not self.stream_sid or sid == self.stream_sid

    def _on_stream_start(self, raw: bytes, stream_sid: str) -> None:
        try:
            info = orjson.loads(raw)
        except orjson.JSONDecodeError:
            info = {}
        now = time.monotonic()
        self.stream_sid = stream_sid or info.get("stream_sid", "")
        if self.ending is not None and self.ending.side == ASSISTANT:
            # We already ended the call; the gateway attached after our hangup: say it again.
            self.out(S.OUT_HANGUP)
            self.stream_live = True
            self._seen_start = True
            self._detached.clear()
            return
        self.playout.stream_reset(now)
        self.stream_live = True
        self._seen_start = True
        self._detached.clear()
        if self._reattach_timer:
            self._reattach_timer.cancel()
            self._reattach_timer = None
        self.update_call({"status": S.STATUS_LIVE, "stream_sid": self.stream_sid})
        self.w.wake_ticker(self)
        self.event("stream-start", stream_sid=info.get("stream_sid", ""))

    def _on_detach(self, why: str) -> None:
        self.stream_live = False
        self._detached.set()
        if why == "hangup" or self.ending is not None:
            return
        # The socket was lost with the call still up: Twilio re-attaches via <Connect action>.
        self.event("stream-lost")
        loop = asyncio.get_running_loop()
        if self._reattach_timer:
            self._reattach_timer.cancel()
        self._reattach_timer = loop.call_later(
            self.w.settings.reattach_timeout_s,
            lambda: self.request_end(Ending("stream-lost", ASSISTANT)),
        )

    def _on_dtmf(self, digit: str) -> None:
        """Keypad: gathered like Vapi's keypadInputPlan (`#` or a pause ends the entry)."""
        self.event("dtmf", digit=digit)
        entry = self.keypad.press(digit, time.monotonic())
        if self._keypad_timer:
            self._keypad_timer.cancel()
            self._keypad_timer = None
        if entry:
            self._send_keypad(entry)
        elif self.keypad.pending:
            self._keypad_timer = asyncio.get_running_loop().call_later(
                self.keypad.timeout_s, self._keypad_timeout)

    def _keypad_timeout(self) -> None:
        self._keypad_timer = None
        if entry := self.keypad.due(time.monotonic() + 1e-3):
            self._send_keypad(entry)

    def _send_keypad(self, entry: str) -> None:
        self.event("keypad-entry", digits=entry)
        task = asyncio.create_task(self._send_text(V.keypad_entry(entry)))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _send_text(self, text: str) -> None:
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(text)

    # Assistant -> caller ---------------------------------------------------------------------

    async def _downlink(self, ws: ClientConnection) -> None:
        frames = metrics.FRAMES.labels("out", "vapi")
        nbytes = metrics.AUDIO_BYTES.labels("out", "vapi")
        try:
            async for msg in ws:
                if isinstance(msg, bytes):
                    frames.inc()
                    nbytes.inc(len(msg))
                    now = time.monotonic()
                    if now < self._stale_until:
                        metrics.DROPPED.labels("stale_after_barge_in").inc()
                        continue
                    if dropped := self.playout.push(self.downlink.convert(msg), now):
                        metrics.DROPPED.labels("playout_overflow").inc(dropped // 160 or 1)
                    self._response.audio(self.playout)
                    self.w.emit_due(self, now)
                    self.w.wake_ticker(self)
                else:
                    self._on_control(msg)
        except ConnectionClosed:
            pass
        except Exception as exc:  # a bug or a message we could not handle: end the call, say why
            log.error("vapi downlink failed", extra=error_fields(exc))
            self.request_end(Ending("error", ASSISTANT, say=self.w.settings.unavailable_message))
            return
        self.request_end(Ending("vapi-socket-closed", ASSISTANT,
                                say=self.w.settings.unavailable_message))

    def _on_control(self, text: str) -> None:
        try:
            msg = V.parse(text)
        except ValueError:
            metrics.DROPPED.labels("vapi_bad_json").inc()
            return
        if isinstance(msg, V.UserInterrupted):
            self.barge_in("user-interrupted")
        elif isinstance(msg, V.SpeechUpdate):
            if msg.role == "assistant" and msg.status == "started":
                self._stale_until = 0.0  # the next turn: its audio plays
            elif msg.role == "user" and msg.status == "started":
                self._hold_for_confirmation()
                self._response.user_spoke()
        elif isinstance(msg, V.StatusUpdate):
            if msg.status == "ended":
                self.event("vapi-ended", ended_reason=msg.ended_reason or "")
                self.request_end(Ending("assistant-ended", ASSISTANT, detail=msg.ended_reason or ""))
        elif isinstance(msg, V.Transcript):
            if msg.final:
                self.event("transcript", role=msg.role, text=msg.text[:2000])
                if msg.role == "assistant":
                    self._response.final(msg.text)
        elif isinstance(msg, V.ModelOutput):
            self._response.output(msg.text, self.playout)
        elif isinstance(msg, V.ToolCalls):
            for call in msg.calls:
                if target := V.transfer_target(call):
                    if not self.w.settings.transfer_allowed(target):
                        metrics.DROPPED.labels("transfer_refused").inc()
                        log.warning("transfer refused: target not in TRANSFER_ALLOW",
                                    extra={"target": mask_number(target)})
                        self.event("transfer-refused", target=target[:64])
                        continue
                    self.event("transfer-requested", target=target)
                    self.request_end(Ending("transfer", ASSISTANT, transfer_to=target))
                    break
        else:
            log.debug("vapi message", extra={"type": msg.type})

    def _fast_barge_in(self, audio: bytes, now: float) -> None:
        """Local voice detector: hold the assistant's audio the moment the caller talks over it,
        give it back if Vapi does not confirm an interruption in time."""
        assert self.fast is not None
        action = self.fast.frame(audio, now, self.playout.active(now)) or self.fast.tick(now)
        if action is Action.PAUSE:
            self.playout.pause(now)
            self.out(S.OUT_CLEAR)
            metrics.FAST_BARGE_INS.labels("pause").inc()
            self.event("fast-pause", turn=self.playout.turn)
        elif action is Action.RESUME:
            self.playout.resume(now)
            self.w.wake_ticker(self)
            metrics.FAST_BARGE_INS.labels("resume").inc()
            self.event("fast-resume", turn=self.playout.turn)

    def _hold_for_confirmation(self) -> None:
        """Vapi heard the caller start talking over the assistant. Whether that interrupts is
        Vapi's call (its stopSpeakingPlan; a backchannel does not), so stop the audio at once but
        only hold it: `user-interrupted` drops it, silence from Vapi plays it on."""
        now = time.monotonic()
        if not self.playout.active(now) or self.playout.paused:
            return
        self.playout.pause(now)
        self.out(S.OUT_CLEAR)
        self.event("hold", turn=self.playout.turn)
        if self._hold_timer:
            self._hold_timer.cancel()
        self._hold_timer = asyncio.get_running_loop().call_later(
            self.w.settings.interrupt_confirm_ms / 1000, self._release_hold)

    def _release_hold(self) -> None:
        self._hold_timer = None
        if self.playout.paused and not (self.fast is not None and self.fast.holding):
            self.playout.resume(time.monotonic())
            self.w.wake_ticker(self)
            self.event("hold-released", turn=self.playout.turn)

    def barge_in(self, source: str) -> None:
        """The caller talks over the assistant: drop what is unsent and flush Twilio's buffer."""
        now = time.monotonic()
        if self.fast is not None:
            self.fast.confirmed()
        if self._hold_timer:
            self._hold_timer.cancel()
            self._hold_timer = None
        if not self.playout.active(now) and not self.playout.paused:
            return
        turn = self.playout.turn
        already_cleared = self.playout.paused  # a hold sent `clear` and nothing since
        dropped_ms = self.playout.interrupt(now)
        self._stale_until = now + 2.0
        self.downlink.reset()
        if not already_cleared:
            self.out(S.OUT_CLEAR)
        metrics.BARGE_INS.inc()
        rec = self.playout.turns.get(turn)
        self.event("barge-in", source=source, turn=turn, dropped_ms=dropped_ms,
                   sent_ms=rec.sent_ms if rec else 0, heard_ms=rec.heard_ms if rec else 0)

    def on_turn_started(self) -> None:
        """The first frame of an assistant turn left for Twilio: measure the bridge's view of
        voice-to-voice latency (end of caller speech -> first assistant audio sent)."""
        ended = self.speech.last_voiced_at
        if ended is None or self.speech.speaking or ended == self._turn_measured_for:
            return
        self._turn_measured_for = ended
        latency = time.time() - ended
        if 0 <= latency < 30:
            metrics.TURN_LATENCY.observe(latency)
            self.event("turn-latency", turn=self.playout.turn, ms=round(latency * 1000, 1))

    def record_turns(self) -> None:
        turns = [{"turn": t, "sent_ms": r.sent_ms, "heard_ms": r.heard_ms, "interrupted": r.interrupted}
                 for t, r in sorted(self.playout.turns.items())]
        if turns:
            self.event("assistant-turns", turns=turns)

    # Ending ----------------------------------------------------------------------------------

    async def _drain_playout(self) -> None:
        """Let the caller hear the assistant's last words: bounded by what is queued + a margin."""
        if not self.stream_live:
            return
        deadline = time.monotonic() + self.playout.queued_s(time.monotonic()) + 2.0
        while self.stream_live and time.monotonic() < deadline:
            if not self.playout.active(time.monotonic()):
                return
            await asyncio.sleep(0.02)

    async def _finish_assistant_side(self) -> None:
        """Record the end, ask the gateway to close the stream, fall back to Twilio REST."""
        assert self.ending is not None
        e = self.ending
        mapping = {"status": S.STATUS_ENDED, "end_reason": e.reason, "ended_at": str(time.time())}
        if e.say:
            mapping["say"] = e.say
        if e.transfer_to:
            mapping["transfer_to"] = e.transfer_to
        self.update_call(mapping)
        self.out(S.OUT_HANGUP)
        await self._close_vapi(send_end=True)
        # A live socket (or one about to connect, which the gateway will refuse) is closed by the
        # gateway and Twilio then asks <Connect action>; a lost one leaves only REST.
        gone = self._seen_start and not self.stream_live
        try:
            if gone:
                raise TimeoutError
            await asyncio.wait_for(self._detached.wait(), self.w.settings.hangup_grace_s)
        except TimeoutError:
            outcome = await self.w.twilio.complete(self.sid)
            self.event("rest-hangup", outcome=outcome)
            log.info("ended the call over Twilio REST", extra={"outcome": outcome})

    async def _close_vapi(self, send_end: bool) -> None:
        ws, self._ws = self._ws, None
        if ws is None:
            return
        with contextlib.suppress(Exception):
            if send_end:
                await asyncio.wait_for(ws.send(V.END_CALL), 0.5)
            await ws.close()
        metrics.VAPI_SOCKETS.dec()
