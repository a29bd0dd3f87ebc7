"""One Vapi call as the stand-in plays it: the assistant's state machine and what it recorded.

``docs/protocols.md``, "Vapi websocket transport" / "Control messages", "Endings" and "Transfer and
keypad". Everything here is a synchronous callback on the event loop, driven by the transport
(caller audio, control messages, the socket going away), the sim's shared ticker (paced assistant
audio) and timers (greeting delay, ``maxDurationSeconds``, connect timeout). The assistant speaks
queued utterances on a real-time playout clock (whether their frames went out paced or in a
burst), hears caller turns through :class:`~sim.vapi.vad.TurnDetector`, lets the caller barge in
on interruptible utterances, and ends the way Vapi does: ``status-update`` ended, then close 1000.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from sim import voices
from sim.vapi import messages as M
from sim.vapi.callspec import CallSpec
from sim.vapi.rest import call_object
from sim.vapi.scripts import resume_text, utterance_text
from sim.vapi.vad import TurnDetector

if TYPE_CHECKING:
    from sim.vapi.sim import VapiSim
    from sim.vapi.transport import TransportProtocol

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

log = logging.getLogger("sim.vapi")


@dataclass
class Spoken:
    """One assistant utterance as sent (times are ``time.monotonic()``); ``text`` is the words
    sent as its ``model-output`` and final transcript."""

    label: str
    turn: int
    turn_id: str
    started: float
    frames_total: int
    ended: float | None = None
    frames_sent: int = 0
    interrupted: bool = False
    text: str = ""


@dataclass
class CallerTurn:
    """One caller utterance found by the VAD (``started``/``ended`` are ``time.monotonic()``
    when detected; ``audio_*_s`` are positions in the received audio)."""

    index: int
    turn: int
    started: float
    audio_start_s: float
    ended: float | None = None
    audio_end_s: float | None = None


@dataclass
class _Plan:
    """An utterance to speak: which tone (``kind``/``index``), how long, and what follows it."""

    kind: str
    index: int
    seconds: float
    interruptible: bool
    then_end: str | None = None
    text: str | None = None  # the words (a ``say``'s content); None: made up from the label


@dataclass(eq=False)
class _Utterance:
    """The utterance being spoken; ``sent`` frames of ``frames`` have gone out."""

    plan: _Plan
    label: str
    text: str
    frames: tuple[bytes, ...]
    frame_s: float
    burst: bool
    turn: int
    turn_id: str
    start: float
    end: float
    record: Spoken
    sent: int = 0


class VapiSession:
    """One Vapi call: the REST body, the transport socket, the assistant and everything recorded.

    Times (``opened_at``, ``closed_at``, ``received_times``...) are ``time.monotonic()`` values.
    """

    def __init__(self, sim: VapiSim, call_id: str, body: dict[str, Any], spec: CallSpec) -> None:
        self.sim = sim
        self.id = call_id
        self.body = body
        self.spec = spec
        self.script = spec.script
        self.audio_format = spec.audio_format
        self.sample_rate = spec.sample_rate
        self.status = "queued"
        self.created_at = datetime.now(UTC)
        self.opened_at: float | None = None
        self.closed_at: float | None = None
        self.ended_reason: str | None = None
        #: close code the client sent (None if it sent none).
        self.client_close_code: int | None = None
        #: close code the stand-in sent (None if it sent none).
        self.server_close_code: int | None = None
        self.ws_headers: dict[str, str] = {}

        self.received_audio = bytearray()
        self.received_frames: list[int] = []
        self.received_times: list[float] = []
        self.control: list[dict[str, Any]] = []
        #: (role, content) of every well-formed ``add-message``, in order.
        self.added_messages: list[tuple[str, str]] = []
        self.sent_control: list[dict[str, Any]] = []
        #: text frames that were not a JSON object with a string "type" (and undecodable text).
        self.invalid: list[str | bytes] = []
        self.spoken: list[Spoken] = []
        self.caller_turns: list[CallerTurn] = []
        self.pings_received = 0
        self.sent_frames = 0
        self.sent_audio_bytes = 0

        self._proto: TransportProtocol | None = None
        self._ending = False
        self._closed = False
        self._timers: list[asyncio.TimerHandle] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

        # assistant speech
        self._utt: _Utterance | None = None
        self._queue: deque[_Plan] = deque()
        self._hold_until = 0.0
        self._in_tick = False
        self._turn = -1
        self._answers_given = 0
        self._goodbye_planned = False
        self._assistant_muted = False
        self._muted_at = 0.0
        self._customer_muted = False
        self._frame_s = voices.frame_samples(self.sample_rate) / self.sample_rate

        # caller turns
        self._detector = TurnDetector(self.sample_rate)

    # -- public state ------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """The transport socket is connected and not yet closed."""
        return self._proto is not None and not self._closed

    @property
    def connected(self) -> bool:
        """The transport socket was accepted at some point."""
        return self.opened_at is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def live(self) -> bool:
        """Connected and not ending: control messages are acted on."""
        return self._proto is not None and not self._ending and not self._closed

    @property
    def speaking(self) -> bool:
        """The assistant is "playing" an utterance (real-time playout clock)."""
        return self._utt is not None

    @property
    def user_speaking(self) -> bool:
        return self._detector.in_turn

    def received_control(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.control if m.get("type") == type_]

    def sent_of(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.sent_control if m.get("type") == type_]

    def call_json(self) -> dict[str, Any]:
        """The Call object as ``POST /call`` / ``GET /call/{id}`` return it."""
        return call_object(self)

    # -- waiting (tests) ---------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds (re-checked on every recorded event)."""
        if predicate():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    async def wait_connected(self, timeout: float) -> None:
        await self.wait_for(lambda: self.connected, timeout)

    async def wait_closed(self, timeout: float) -> None:
        await self.wait_for(lambda: self._closed, timeout)

    async def wait_control(self, type_: str, timeout: float, count: int = 1) -> dict[str, Any]:
        """Wait for the ``count``-th received control message of ``type_``; return it."""
        await self.wait_for(lambda: len(self.received_control(type_)) >= count, timeout)
        return self.received_control(type_)[count - 1]

    async def wait_sent(self, type_: str, timeout: float, count: int = 1) -> dict[str, Any]:
        """Wait for the ``count``-th sent control message of ``type_``; return it."""
        await self.wait_for(lambda: len(self.sent_of(type_)) >= count, timeout)
        return self.sent_of(type_)[count - 1]

    # -- test hooks --------------------------------------------------------------------------

    async def send_json(self, obj: Any) -> None:
        """Send any JSON on the socket as is (not filtered by clientMessages)."""
        if self._proto is not None and not self._closed:
            if isinstance(obj, dict):
                self.sent_control.append(obj)
            self._proto.send_text(orjson.dumps(obj))
            observer = self.sim.observer
            if observer is not None and isinstance(obj, dict):
                observer.control_sent(self, obj, time.monotonic())
            self._notify()

    async def send_audio(self, data: bytes) -> None:
        """Send raw bytes as one binary frame."""
        if self._proto is not None and not self._closed:
            self._proto.send_binary(data)

    async def end(self, reason: str = "assistant-ended-call", timeout: float = 3.0) -> None:
        """End the call from Vapi's side: status-update ended, close 1000, wait for the close."""
        self._end(reason)
        if self._proto is not None:
            with contextlib.suppress(TimeoutError):
                await self.wait_closed(timeout)

    async def drop(self, timeout: float = 2.0) -> None:
        """Abort the TCP connection mid-call: no status-update, no close frame."""
        if self._proto is None or self._closed:
            return
        self._stop_speaking()
        self._ending = True
        self.status = "ended"
        if self.ended_reason is None:
            self.ended_reason = "sim-dropped"
        self._proto.abort()
        with contextlib.suppress(TimeoutError):
            await self.wait_closed(timeout)

    async def say(self, seconds: float | None = None, *, end_after: bool = False) -> None:
        """Make the assistant speak a ``say`` utterance now (queued after the current one)."""
        seconds = self.script.say_s if seconds is None else seconds
        then_end = "assistant-ended-call-after-message-spoken" if end_after else None
        self._enqueue(_Plan("say", 0, seconds, False, then_end))

    def send_tool_call(self, name: str, arguments: dict[str, Any] | None = None) -> str:
        """Send a client-side ``tool-calls`` message; return the tool call id."""
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        self._emit(M.tool_calls(call_id, name, arguments or {}))
        return call_id

    # -- transport callbacks (synchronous) ---------------------------------------------------

    def _connectable(self) -> int | None:
        """None if a transport may attach now, else the HTTP status to reject with."""
        if self._proto is not None:
            return 409
        if self._ending or self._closed or self.status == "ended":
            return 410
        return None

    def _attach(self, proto: TransportProtocol, headers: dict[str, str]) -> None:
        self._proto = proto
        self.ws_headers = headers
        self.opened_at = time.monotonic()
        self.status = "in-progress"
        self._cancel_timers()
        if self.spec.max_duration_s is not None:
            self._call_later(self.spec.max_duration_s, self._end, "exceeded-max-duration")
        self._emit(M.status_update("in-progress"))
        script = self.script
        first = self.spec.first_message
        seconds = script.resume_s if first == "resume" else script.greeting_s
        if first is not None and seconds:
            plan = _Plan(first, 0, seconds, script.first_message_interruptible)
            self._enqueue(plan, delay=script.greeting_delay_s)
        self._notify()

    def _on_binary(self, data: bytes) -> None:
        now = time.monotonic()
        if self.sim.record_audio:
            self.received_audio += data
        self.received_frames.append(len(data))
        self.received_times.append(now)
        observer = self.sim.observer
        if observer is not None:
            observer.caller_audio_received(self, data, now)
        if not self._ending and not self._customer_muted:
            pcm = audioop.ulaw2lin(data, 2) if self.audio_format == "mulaw" else data
            for edge in self._detector.feed(pcm):
                if edge.started:
                    self._user_started(edge.audio_s, now)
                else:
                    self._user_ended(edge.audio_s, now)
                if self._ending:
                    break
        if self._waiters:
            self._notify()

    def _on_text(self, data: bytes) -> None:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            self.invalid.append(bytes(data))
            self._notify()
            return
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            self.invalid.append(text)
            self._notify()
            return
        self._receive_control(msg)

    def _receive_control(self, msg: dict[str, Any]) -> None:
        """A control message from the socket or the control URL: record it, act on it."""
        self.control.append(msg)
        observer = self.sim.observer
        if observer is not None:
            observer.control_received(self, msg, time.monotonic())
        self.handle_message(msg)
        self._notify()

    def _on_ping(self) -> None:
        self.pings_received += 1
        self._notify()

    def _on_transport_lost(self, client_close_code: int | None, clean: bool) -> None:
        self._closed = True
        self.closed_at = time.monotonic()
        self.client_close_code = client_close_code
        self._stop_speaking()
        self._cancel_timers()
        self.sim._active.discard(self)
        if self.ended_reason is None:
            self.ended_reason = "transport-closed-by-client" if clean else "transport-lost"
        self.status = "ended"
        self._ending = True
        self._notify()

    # -- control messages --------------------------------------------------------------------

    def handle_message(self, msg: dict[str, Any]) -> None:
        """Act on one client message (socket or control URL)."""
        if self._ending:
            return
        kind = msg.get("type")
        if kind in ("end-call", "hangup"):
            self._end("customer-ended-call")
        elif kind == "add-message":
            added = M.added_message(msg)
            if added is not None:
                role, content, respond = added
                self.added_messages.append((role, content))
                if respond:
                    if role == "user":
                        self._emit(M.transcript("user", content))
                    self._respond()
        elif kind == "say":
            if msg.get("interruptAssistantEnabled") is True and self._utt is not None:
                self._finish(self._utt, time.monotonic(), interrupted=True)
            then_end = (
                "assistant-ended-call-after-message-spoken"
                if msg.get("endCallAfterSpoken") is True
                else None
            )
            interruptible = msg.get("interruptionsEnabled") is True
            said = msg.get("content")
            text = said if isinstance(said, str) and said else None
            self._enqueue(_Plan("say", 0, self.script.say_s, interruptible, then_end, text))
        elif kind == "control":
            control = msg.get("control")
            if control == "mute-assistant":
                self._mute_assistant(time.monotonic())
            elif control == "unmute-assistant":
                self._unmute_assistant(time.monotonic())
            elif control == "mute-customer":
                self._customer_muted = True
            elif control == "unmute-customer":
                self._customer_muted = False
            elif control == "say-first-message" and self.script.greeting_s:
                self._enqueue(_Plan("greeting", 0, self.script.greeting_s, False))
        # anything else: recorded, ignored

    # -- speaking ----------------------------------------------------------------------------

    def _mute_assistant(self, now: float) -> None:
        """``mute-assistant``: the assistant's speech stops where it is and is held, not
        skipped: its playout clock stands still (greeting delay included) until unmuted."""
        if not self._assistant_muted:
            self._assistant_muted = True
            self._muted_at = now

    def _unmute_assistant(self, now: float) -> None:
        """``unmute-assistant``: the held speech goes on from where it stopped."""
        if not self._assistant_muted:
            return
        self._assistant_muted = False
        held = now - self._muted_at
        if self._utt is not None:
            self._utt.start += held
            self._utt.end += held
        if self._hold_until > self._muted_at:
            self._hold_until += held
        if self._utt is not None or self._queue:
            self.sim._activate(self)

    def _enqueue(self, plan: _Plan, delay: float = 0.0) -> None:
        if not self.live:
            return
        now = time.monotonic()
        self._queue.append(plan)
        self._hold_until = max(self._hold_until, now + delay)
        self.sim._activate(self)
        if not self._in_tick:
            self._tick(now)

    def _tick(self, now: float) -> bool:
        """Send due frames, finish/start utterances. Returns True while ticking is needed."""
        if not self.live or self._assistant_muted:
            return False  # an unmute activates the session again
        self._in_tick = True
        try:
            for _ in range(8):  # bounded: finish -> start next within one tick
                u = self._utt
                if u is None:
                    if self._queue and now >= self._hold_until:
                        self._start(self._queue.popleft(), now)
                        continue
                    break
                total = len(u.frames)
                due = total if u.burst else min(total, int((now - u.start) / u.frame_s + 1e-6) + 1)
                while u.sent < due and self._utt is u:
                    self._send_frame(u, u.sent)
                    u.sent += 1
                if self._utt is u and u.sent >= total and now >= u.end - 1e-6:
                    self._finish(u, now, interrupted=False)
                    continue
                break
        finally:
            self._in_tick = False
        return self.live and (self._utt is not None or bool(self._queue))

    def _start(self, plan: _Plan, now: float) -> None:
        frames = voices.frames(
            plan.kind, plan.index, plan.seconds, self.sample_rate, self.audio_format
        )
        self._turn += 1
        label = voices.label(plan.kind, plan.index)
        if plan.text is not None:
            text = plan.text
        elif plan.kind == "resume":
            text = resume_text(self.spec.history)
        else:
            text = utterance_text(label, plan.seconds)
        record = Spoken(label, self._turn, str(uuid.uuid4()), now, len(frames), text=text)
        self._utt = _Utterance(
            plan=plan,
            label=label,
            text=text,
            frames=frames,
            frame_s=self._frame_s,
            burst=self.sim.downlink == "burst",
            turn=self._turn,
            turn_id=record.turn_id,
            start=now,
            end=now + len(frames) * self._frame_s,
            record=record,
        )
        self.spoken.append(record)
        # The model's text comes before its audio, as it would from a real model and TTS.
        self._emit(M.model_output(text, record.turn_id))
        self._emit(M.speech_update("started", "assistant", self._turn))

    def _send_frame(self, u: _Utterance, index: int) -> None:
        if self._assistant_muted or self._proto is None:
            return
        frame = u.frames[index]
        self._proto.send_binary(frame)
        self.sent_frames += 1
        self.sent_audio_bytes += len(frame)
        observer = self.sim.observer
        if observer is not None:
            observer.assistant_frame_sent(self, frame, time.monotonic(), u.turn_id, index)

    def _finish(self, u: _Utterance, now: float, *, interrupted: bool) -> None:
        self._utt = None
        u.record.ended = now
        u.record.frames_sent = u.sent
        u.record.interrupted = interrupted
        self._emit(M.speech_update("stopped", "assistant", u.turn))
        if interrupted:
            return
        self._emit(M.transcript("assistant", u.text))
        if u.plan.then_end:
            self._end(u.plan.then_end)
            return
        script = self.script
        if u.plan.kind == "answer" and script.tool_call_after == u.plan.index:
            self.send_tool_call(script.tool_call_name, script.tool_call_arguments)
        if (
            u.plan.kind != "goodbye"
            and not self._queue
            and not self._detector.in_turn
            and self._answers_given >= script.answers
            and script.end_after
        ):
            self._plan_goodbye()

    def _stop_speaking(self) -> None:
        if self._utt is not None:
            rec = self._utt.record
            rec.ended = time.monotonic()
            rec.frames_sent = self._utt.sent
            rec.interrupted = True
            self._utt = None
        self._queue.clear()

    def _respond(self) -> None:
        script = self.script
        if self._answers_given < script.answers:
            index = self._answers_given
            self._answers_given += 1
            self._enqueue(
                _Plan("answer", index, script.answer_s, script.interruptible),
                delay=script.reply_delay_s,
            )
        elif script.end_after:
            self._plan_goodbye()

    def _plan_goodbye(self) -> None:
        if self._goodbye_planned:
            return
        self._goodbye_planned = True
        self._enqueue(
            _Plan("goodbye", 0, self.script.goodbye_s, False, "assistant-ended-call"),
            delay=self.script.reply_delay_s,
        )

    # -- caller turns ------------------------------------------------------------------------

    def _user_started(self, audio_s: float, now: float) -> None:
        """A caller turn began: announce it, and barge in on an interruptible utterance."""
        self._turn += 1
        turn = CallerTurn(len(self.caller_turns), self._turn, now, audio_s)
        self.caller_turns.append(turn)
        self._emit(M.speech_update("started", "user", turn.turn))
        u = self._utt
        if u is not None and u.plan.interruptible:
            self._emit(M.user_interrupted(u.turn_id))
            self._finish(u, now, interrupted=True)

    def _user_ended(self, audio_s: float, now: float) -> None:
        turn = self.caller_turns[-1]
        turn.ended = now
        turn.audio_end_s = audio_s
        self._emit(M.speech_update("stopped", "user", turn.turn))
        self._emit(M.transcript("user", f"utterance {turn.index + 1}"))
        self._respond()

    # -- ending ------------------------------------------------------------------------------

    def _end(self, reason: str, code: int = 1000) -> None:
        if self._ending or self._closed:
            return
        self._stop_speaking()
        self.ended_reason = reason
        self.status = "ended"
        self._cancel_timers()
        if self._proto is not None:
            self._emit(M.status_update("ended", reason))
            self._ending = True
            self.server_close_code = code
            self._proto.close(code)
        else:
            self._ending = True
        self.sim._active.discard(self)
        self._notify()

    def _shutdown(self) -> None:
        """Server stop: close without ceremony."""
        self._cancel_timers()
        self._stop_speaking()
        if self.ended_reason is None:
            self.ended_reason = "sim-stopped"
        self.status = "ended"
        self._ending = True
        if self._proto is not None and not self._closed:
            self.server_close_code = 1001
            self._proto.close(1001, immediate=True)

    def _never_connected(self) -> None:
        if self._proto is None and not self._ending:
            self.ended_reason = "call.in-progress.error-vapifault-transport-never-connected"
            self.status = "ended"
            self._ending = True
            self._notify()

    # -- plumbing ----------------------------------------------------------------------------

    def _emit(self, msg: dict[str, Any]) -> None:
        """Send a control message unless the call's ``clientMessages`` leaves it out."""
        if self._proto is None or self._closed:
            return
        if not M.allowed(msg, self.spec.client_messages):
            return
        msg["timestamp"] = int(time.time() * 1000)
        self.sent_control.append(msg)
        self._proto.send_text(orjson.dumps(msg))
        observer = self.sim.observer
        if observer is not None:
            observer.control_sent(self, msg, time.monotonic())
        if self._waiters:
            self._notify()

    def _notify(self) -> None:
        if not self._waiters:
            return
        for predicate, fut in list(self._waiters):
            if fut.done():
                continue
            try:
                ok = predicate()
            except Exception as exc:  # a broken predicate fails its waiter, not the session
                fut.set_exception(exc)
                continue
            if ok:
                fut.set_result(None)

    def _call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("vapi sim: timer failed for call %s", self.id)

        self._timers.append(asyncio.get_running_loop().call_later(delay, run))

    def _cancel_timers(self) -> None:
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()

    def __repr__(self) -> str:
        return (
            f"<VapiSession {self.id} {self.audio_format}/{self.sample_rate} status={self.status} "
            f"ended_reason={self.ended_reason}>"
        )
