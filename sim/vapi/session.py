"""Vapi stand-in: ``POST /call`` plus the ``vapi.websocket`` transport socket, with scripted assistants.

Behaves like Vapi as described in ``shared/design/vapi-protocol.md`` so the worker, the demo, the
end-to-end tests and the load generator can run without a Vapi account:

- ``POST /call`` checks ``Authorization: Bearer <api_key>`` and validates the body the way Vapi's
  NestJS validator does (400 ``{"message": [...], "error": "Bad Request", "statusCode": 400}``), then
  answers 201 with a ``vapi.websocketCall`` Call whose ``transport.websocketCallUrl`` is
  ``ws://HOST:PORT/<id>/transport``. ``GET /call/{id}`` returns the call's current state;
  ``POST /{id}/control`` is the Live Call Control endpoint (same messages as the socket).
- ``WS /{id}/transport``: binary frames are audio in the negotiated format both ways, text frames
  are JSON control messages both ways. Unknown ids are rejected during the handshake (404).
- Scripted assistants speak synthetic tones (:mod:`sim.voices`) so a listener can tell utterances
  apart, detect caller turns with an energy VAD on the received audio, barge-in on a real-time
  playout clock, and end calls the way Vapi does (``status-update`` ended, then close 1000).

Design for load (100 sessions on 2 cores): the transport socket is served by a small asyncio
protocol built on websockets' sans-I/O ``ServerProtocol`` (plugged into uvicorn as its WebSocket
protocol class, so REST and WebSocket share one port) instead of going through ASGI; every session
callback is synchronous; one shared ticker (10 ms) paces the downlink of all sessions; utterance
frames are precomputed and cached. The socket layer also gives the test hooks direct access to the
TCP transport (``drop()`` aborts it without a close handshake) and to ping handling
(``respond_to_pings=False`` suppresses the automatic pong).

Inferences about Vapi (marked [INF] in the protocol note) that this stand-in bakes in:

- The transport URL needs no auth; the ``Authorization`` header of the upgrade is recorded only.
- A call ended by the client's ``end-call`` (or legacy ``hangup``) ends with ``customer-ended-call``;
  the stand-in answers with ``status-update`` ended before closing with 1000.
- A client that closes the socket without ``end-call`` gets ``ended_reason`` =
  ``"transport-closed-by-client"``; a socket lost without a close frame ``"transport-lost"``
  (both stand-in names: Vapi's value is undocumented).
- ``clientMessages`` (in ``assistantOverrides`` or an inline ``assistant``) filters what is sent on
  the socket, as Vapi documents; without it every message type the stand-in produces is sent.
- The first message is not interruptible unless the script says so (Vapi's
  ``firstMessageInterruptionsEnabled`` defaults to false); later answers are.
- ``user-interrupted`` is preceded by ``speech-update`` role=user started and followed by
  ``speech-update`` role=assistant stopped for the cut utterance.
- Downlink frames are 20 ms (640 B pcm_s16le@16k, 160 B mulaw@8k), paced in real time by default.

Limits: no listenUrl, no server-URL webhooks (end-of-call-report, tool webhooks), no
conversation-update/model-output messages; transcripts are placeholders ("utterance N"); the VAD is
energy-only (anything above −40 dBFS is speech); ``maxDurationSeconds`` is honoured but not
range-checked; ``silenceTimeoutSeconds``, concurrency limits and server-side pings are not
modelled; ``assistantId`` is neither checked to be a UUID nor looked up (unknown ids get
``VapiSim.assistant``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, ClassVar, Literal, cast

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from websockets.frames import Frame, Opcode
from websockets.http11 import Request as WsRequest
from websockets.protocol import State
from websockets.server import ServerProtocol

from sim import voices

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = [
    "AssistantScript",
    "CallerTurn",
    "Spoken",
    "VapiSession",
    "VapiSim",
    "greeter",
    "interrupter",
    "silent",
    "validate_create_call",
]

log = logging.getLogger("sim.vapi")

TICK_S = 0.01
#: −40 dBFS RMS: a 20 ms window above this is "voiced".
VOICED_RMS = voices.VOICED_RMS
#: voiced audio needed before a caller turn starts (also Vapi's interruption voiceSeconds 0.2).
ONSET_MS = 200
#: unvoiced audio that ends a caller turn.
HANGOVER_MS = 400
#: an unvoiced gap this long during onset restarts the onset count.
ONSET_GAP_MS = 100
CLOSE_TIMEOUT_S = 2.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_AUDIO_FORMAT = ("pcm_s16le", 16000)

RUNNERS = ("assistantId", "assistant", "squadId", "squad", "workflowId", "workflow")
ALLOWED_PROPERTIES = frozenset(
    {
        *RUNNERS,
        "assistantOverrides",
        "assistantVersion",
        "squadOverrides",
        "workflowOverrides",
        "transport",
        "name",
        "customer",
        "customerId",
        "metadata",
    }
)
PHONE_PROPERTIES = ("phoneNumberId", "phoneNumber")
TRANSPORT_PROPERTIES = frozenset({"provider", "conversationType", "audioFormat"})
AUDIO_FORMAT_PROPERTIES = frozenset({"format", "container", "sampleRate"})
KEYPAD_PREFIX = "User's Keypad Entry:"
UNAUTHORIZED_MESSAGE = (
    "Invalid Key. Hot tip, you may be using the private key instead of the public key, "
    "or vice versa."
)

Downlink = Literal["paced", "burst"]


# ---------------------------------------------------------------------------------------------
# Scripts


@dataclass
class AssistantScript:
    """What a simulated assistant says and when. Copied per call at ``POST /call`` time.

    Attributes:
        greeting_s: length of the first message spoken on connect (None: wait for the caller).
        answers: how many answers it has; one is spoken per caller turn (or keypad entry).
        end_after: when the answers are used up, speak a goodbye and end the call
            (``assistant-ended-call``); otherwise stay silent until the client ends.
        first_message_interruptible / interruptible: may the caller barge in on the first
            message / on later utterances.
        reply_delay_s: pause between the end of a caller turn and the answer.
        greeting_delay_s: pause between the socket opening and the first message.
        tool_call_after: after answer number ``k`` (0-based) has been spoken, send a
            ``tool-calls`` message for ``tool_call_name(**tool_call_arguments)``.
    """

    name: str = "greeter"
    greeting_s: float | None = 1.0
    answers: int = 2
    answer_s: float = 1.2
    end_after: bool = False
    goodbye_s: float = 0.8
    say_s: float = 0.6
    first_message_interruptible: bool = False
    interruptible: bool = True
    reply_delay_s: float = 0.0
    greeting_delay_s: float = 0.0
    tool_call_after: int | None = None
    tool_call_name: str = "transfer_call"
    tool_call_arguments: dict[str, Any] = field(default_factory=dict)


def greeter(
    answers: int = 2,
    end_after: bool = False,
    greeting_s: float = 1.0,
    answer_s: float = 1.2,
    **kwargs: Any,
) -> AssistantScript:
    """Greets on connect, answers each caller turn, optionally says goodbye and hangs up."""
    return AssistantScript(
        name="greeter",
        greeting_s=greeting_s,
        answers=answers,
        answer_s=answer_s,
        end_after=end_after,
        **kwargs,
    )


def interrupter(
    long_s: float = 6.0,
    answers: int = 2,
    end_after: bool = False,
    answer_s: float = 1.2,
    **kwargs: Any,
) -> AssistantScript:
    """Starts with a long, interruptible utterance (the ``greeting`` tone) to provoke barge-in."""
    kwargs.setdefault("first_message_interruptible", True)
    return AssistantScript(
        name="interrupter",
        greeting_s=long_s,
        answers=answers,
        answer_s=answer_s,
        end_after=end_after,
        **kwargs,
    )


def silent() -> AssistantScript:
    """Never speaks (still records, detects caller turns and sends transcripts)."""
    return AssistantScript(name="silent", greeting_s=None, answers=0)


# ---------------------------------------------------------------------------------------------
# Records


@dataclass
class Spoken:
    """One assistant utterance as sent (times are ``time.monotonic()``)."""

    label: str
    turn: int
    turn_id: str
    started: float
    frames_total: int
    ended: float | None = None
    frames_sent: int = 0
    interrupted: bool = False


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
    kind: str
    index: int
    seconds: float
    interruptible: bool
    then_end: str | None = None


@dataclass(eq=False)
class _Utterance:
    plan: _Plan
    label: str
    frames: tuple[bytes, ...]
    frame_s: float
    burst: bool
    turn: int
    turn_id: str
    start: float
    end: float
    record: Spoken
    sent: int = 0


# ---------------------------------------------------------------------------------------------
# Session


class VapiSession:
    """One Vapi call: the REST body, the transport socket, the assistant and everything recorded.

    Times (``opened_at``, ``closed_at``, ``received_times``...) are ``time.monotonic()`` values.
    """

    def __init__(
        self,
        sim: VapiSim,
        call_id: str,
        body: dict[str, Any],
        script: AssistantScript,
        audio_format: str,
        sample_rate: int,
    ) -> None:
        self.sim = sim
        self.id = call_id
        self.body = body
        self.script = script
        self.audio_format = audio_format
        self.sample_rate = sample_rate
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
        self.sent_control: list[dict[str, Any]] = []
        #: text frames that were not a JSON object with a string "type" (and undecodable text).
        self.invalid: list[str | bytes] = []
        self.spoken: list[Spoken] = []
        self.caller_turns: list[CallerTurn] = []
        self.pings_received = 0
        self.sent_frames = 0
        self.sent_audio_bytes = 0

        self._proto: _TransportProtocol | None = None
        self._ending = False
        self._closed = False
        self._client_messages = _client_messages(body)
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
        self._customer_muted = False
        self._frame_s = voices.frame_samples(sample_rate) / sample_rate

        # caller VAD
        self._vad_buf = bytearray()
        self._vad_win = voices.frame_samples(sample_rate) * 2
        self._win_ms = 1000.0 * voices.frame_samples(sample_rate) / sample_rate
        self._audio_ms = 0.0
        self._in_user = False
        self._onset_ms = 0.0
        self._gap_ms = 0.0
        self._silence_ms = 0.0

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
    def speaking(self) -> bool:
        """The assistant is "playing" an utterance (real-time playout clock)."""
        return self._utt is not None

    @property
    def user_speaking(self) -> bool:
        return self._in_user

    def received_control(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.control if m.get("type") == type_]

    def sent_of(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.sent_control if m.get("type") == type_]

    def call_json(self) -> dict[str, Any]:
        """The Call object as ``POST /call`` / ``GET /call/{id}`` return it."""
        created = _iso(self.created_at)
        call: dict[str, Any] = {
            "id": self.id,
            "orgId": self.sim.org_id,
            "type": "vapi.websocketCall",
            "createdAt": created,
            "updatedAt": _iso(datetime.now(UTC)) if self.status != "queued" else created,
            "status": self.status,
            "cost": 0,
            "transport": {
                "provider": "vapi.websocket",
                "websocketCallUrl": f"{self.sim.ws_base_url}/{self.id}/transport",
                "audioFormat": {
                    "format": self.audio_format,
                    "container": "raw",
                    "sampleRate": self.sample_rate,
                },
            },
            "monitor": {"controlUrl": f"{self.sim.base_url}/{self.id}/control"},
        }
        for key in (*RUNNERS, "assistantOverrides", "name", "customer", "customerId", "metadata"):
            if key in self.body:
                call[key] = self.body[key]
        if self.ended_reason is not None:
            call["endedReason"] = self.ended_reason
        return call

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
        self._enqueue(
            _Plan(
                "say",
                0,
                self.script.say_s if seconds is None else seconds,
                False,
                "assistant-ended-call-after-message-spoken" if end_after else None,
            )
        )

    def send_tool_call(self, name: str, arguments: dict[str, Any] | None = None) -> str:
        """Send a client-side ``tool-calls`` message; return the tool call id."""
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        function = {"name": name, "arguments": orjson.dumps(arguments or {}).decode()}
        self._emit(
            {
                "type": "tool-calls",
                "toolCallList": [{"id": call_id, "type": "function", "function": function}],
                "toolWithToolCallList": [
                    {
                        "type": "function",
                        "function": {"name": name},
                        "toolCall": {"id": call_id, "type": "function", "function": function},
                    }
                ],
            }
        )
        return call_id

    # -- transport callbacks (synchronous) ---------------------------------------------------

    def _connectable(self) -> int | None:
        """None if a transport may attach now, else the HTTP status to reject with."""
        if self._proto is not None:
            return 409
        if self._ending or self._closed or self.status == "ended":
            return 410
        return None

    def _attach(self, proto: _TransportProtocol, headers: dict[str, str]) -> None:
        self._proto = proto
        self.ws_headers = headers
        now = time.monotonic()
        self.opened_at = now
        self.status = "in-progress"
        self._cancel_timers()
        overrides = self.body.get("assistantOverrides")
        if isinstance(overrides, dict):
            max_s = overrides.get("maxDurationSeconds")
            if isinstance(max_s, int | float) and not isinstance(max_s, bool) and max_s > 0:
                self._call_later(float(max_s), self._end, "exceeded-max-duration")
        self._emit({"type": "status-update", "status": "in-progress"})
        if self.script.greeting_s:
            self._enqueue(
                _Plan(
                    "greeting",
                    0,
                    self.script.greeting_s,
                    self.script.first_message_interruptible,
                ),
                delay=self.script.greeting_delay_s,
            )
        self._notify()

    def _on_binary(self, data: bytes) -> None:
        now = time.monotonic()
        if self.sim.record_audio:
            self.received_audio += data
        self.received_frames.append(len(data))
        self.received_times.append(now)
        if not self._ending and not self._customer_muted:
            pcm = audioop.ulaw2lin(data, 2) if self.audio_format == "mulaw" else data
            self._vad(pcm, now)
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
        self.control.append(msg)
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
            message = msg.get("message")
            content = message.get("content") if isinstance(message, dict) else None
            trigger = msg.get("triggerResponseEnabled", True) is not False
            if isinstance(content, str) and content.startswith(KEYPAD_PREFIX) and trigger:
                self._emit(
                    {
                        "type": "transcript",
                        "role": "user",
                        "transcriptType": "final",
                        "transcript": content,
                    }
                )
                self._respond()
        elif kind == "say":
            if msg.get("interruptAssistantEnabled") is True and self._utt is not None:
                self._finish(self._utt, time.monotonic(), interrupted=True)
            end_after = msg.get("endCallAfterSpoken") is True
            self._enqueue(
                _Plan(
                    "say",
                    0,
                    self.script.say_s,
                    msg.get("interruptionsEnabled") is True,
                    "assistant-ended-call-after-message-spoken" if end_after else None,
                )
            )
        elif kind == "control":
            control = msg.get("control")
            if control == "mute-assistant":
                self._assistant_muted = True
            elif control == "unmute-assistant":
                self._assistant_muted = False
            elif control == "mute-customer":
                self._customer_muted = True
            elif control == "unmute-customer":
                self._customer_muted = False
            elif control == "say-first-message" and self.script.greeting_s:
                self._enqueue(_Plan("greeting", 0, self.script.greeting_s, False))
        # anything else: recorded, ignored

    # -- speaking ----------------------------------------------------------------------------

    @property
    def _live(self) -> bool:
        return self._proto is not None and not self._ending and not self._closed

    def _enqueue(self, plan: _Plan, delay: float = 0.0) -> None:
        if not self._live:
            return
        now = time.monotonic()
        self._queue.append(plan)
        self._hold_until = max(self._hold_until, now + delay)
        self.sim._activate(self)
        if not self._in_tick:
            self._tick(now)

    def _tick(self, now: float) -> bool:
        """Send due frames, finish/start utterances. Returns True while ticking is needed."""
        if not self._live:
            return False
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
                    self._send_audio(u.frames[u.sent])
                    u.sent += 1
                if self._utt is u and u.sent >= total and now >= u.end - 1e-6:
                    self._finish(u, now, interrupted=False)
                    continue
                break
        finally:
            self._in_tick = False
        return self._live and (self._utt is not None or bool(self._queue))

    def _start(self, plan: _Plan, now: float) -> None:
        frames = voices.frames(
            plan.kind, plan.index, plan.seconds, self.sample_rate, self.audio_format
        )
        self._turn += 1
        label = voices.label(plan.kind, plan.index)
        record = Spoken(label, self._turn, str(uuid.uuid4()), now, len(frames))
        self._utt = _Utterance(
            plan=plan,
            label=label,
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
        self._emit(
            {"type": "speech-update", "status": "started", "role": "assistant", "turn": self._turn}
        )

    def _send_audio(self, frame: bytes) -> None:
        if self._assistant_muted or self._proto is None:
            return
        self._proto.send_binary(frame)
        self.sent_frames += 1
        self.sent_audio_bytes += len(frame)

    def _finish(self, u: _Utterance, now: float, *, interrupted: bool) -> None:
        self._utt = None
        u.record.ended = now
        u.record.frames_sent = u.sent
        u.record.interrupted = interrupted
        self._emit(
            {"type": "speech-update", "status": "stopped", "role": "assistant", "turn": u.turn}
        )
        if interrupted:
            return
        self._emit(
            {
                "type": "transcript",
                "role": "assistant",
                "transcriptType": "final",
                "transcript": u.label,
            }
        )
        if u.plan.then_end:
            self._end(u.plan.then_end)
            return
        script = self.script
        if u.plan.kind == "answer" and script.tool_call_after == u.plan.index:
            self.send_tool_call(script.tool_call_name, script.tool_call_arguments)
        if (
            u.plan.kind != "goodbye"
            and not self._queue
            and not self._in_user
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

    # -- caller VAD --------------------------------------------------------------------------

    def _vad(self, pcm: bytes, now: float) -> None:
        win = self._vad_win
        if not self._vad_buf and len(pcm) == win:
            self._vad_step(audioop.rms(pcm, 2) > VOICED_RMS, now)
            return
        buf = self._vad_buf
        buf += pcm
        pos = 0
        while len(buf) - pos >= win and not self._ending:
            self._vad_step(audioop.rms(buf[pos : pos + win], 2) > VOICED_RMS, now)
            pos += win
        del buf[:pos]

    def _vad_step(self, voiced: bool, now: float) -> None:
        ms = self._win_ms
        self._audio_ms += ms
        if not self._in_user:
            if voiced:
                self._onset_ms += ms
                self._gap_ms = 0.0
                if self._onset_ms >= ONSET_MS - 1e-6:
                    self._user_started(now)
            elif self._onset_ms:
                self._gap_ms += ms
                if self._gap_ms >= ONSET_GAP_MS - 1e-6:
                    self._onset_ms = 0.0
                    self._gap_ms = 0.0
        elif voiced:
            self._silence_ms = 0.0
        else:
            self._silence_ms += ms
            if self._silence_ms >= HANGOVER_MS - 1e-6:
                self._user_ended(now)

    def _user_started(self, now: float) -> None:
        onset = self._onset_ms + self._gap_ms
        self._in_user = True
        self._onset_ms = self._gap_ms = self._silence_ms = 0.0
        self._turn += 1
        turn = CallerTurn(
            index=len(self.caller_turns),
            turn=self._turn,
            started=now,
            audio_start_s=(self._audio_ms - onset) / 1000.0,
        )
        self.caller_turns.append(turn)
        self._emit({"type": "speech-update", "status": "started", "role": "user", "turn": turn.turn})
        u = self._utt
        if u is not None and u.plan.interruptible:
            self._emit({"type": "user-interrupted", "turnId": u.turn_id})
            self._finish(u, now, interrupted=True)

    def _user_ended(self, now: float) -> None:
        self._in_user = False
        turn = self.caller_turns[-1]
        turn.ended = now
        turn.audio_end_s = (self._audio_ms - self._silence_ms) / 1000.0
        self._silence_ms = 0.0
        self._emit({"type": "speech-update", "status": "stopped", "role": "user", "turn": turn.turn})
        self._emit(
            {
                "type": "transcript",
                "role": "user",
                "transcriptType": "final",
                "transcript": f"utterance {turn.index + 1}",
            }
        )
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
            self._emit({"type": "status-update", "status": "ended", "endedReason": reason})
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

    # -- plumbing ----------------------------------------------------------------------------

    def _emit(self, msg: dict[str, Any]) -> None:
        if self._proto is None or self._closed:
            return
        if not self._allowed(msg):
            return
        msg["timestamp"] = int(time.time() * 1000)
        self.sent_control.append(msg)
        self._proto.send_text(orjson.dumps(msg))
        if self._waiters:
            self._notify()

    def _allowed(self, msg: dict[str, Any]) -> bool:
        allowed = self._client_messages
        if allowed is None:
            return True
        kind = msg["type"]
        if kind in allowed:
            return True
        if kind == "transcript":
            return f'transcript[transcriptType="{msg.get("transcriptType")}"]' in allowed
        return False

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

    def _never_connected(self) -> None:
        if self._proto is None and not self._ending:
            self.ended_reason = "call.in-progress.error-vapifault-transport-never-connected"
            self.status = "ended"
            self._ending = True
            self._notify()

    def __repr__(self) -> str:
        return (
            f"<VapiSession {self.id} {self.audio_format}/{self.sample_rate} status={self.status} "
            f"ended_reason={self.ended_reason}>"
        )


def _client_messages(body: dict[str, Any]) -> frozenset[str] | None:
    for holder in (body.get("assistantOverrides"), body.get("assistant")):
        if isinstance(holder, dict) and isinstance(holder.get("clientMessages"), list):
            return frozenset(m for m in holder["clientMessages"] if isinstance(m, str))
    return None


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# Transport socket (websockets sans-I/O protocol, plugged into uvicorn as its WS protocol class)


class _ServerConn(ServerProtocol):
    """websockets' server protocol with switchable automatic pongs."""

    def __init__(self, owner: _TransportProtocol, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owner = owner

    def recv_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.PING and not self._owner.answer_pings():
            self.events.append(frame)  # seen, not answered
            return
        super().recv_frame(frame)


class _TransportProtocol(asyncio.Protocol):
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


class _Server(uvicorn.Server):
    """uvicorn without signal handling (it runs inside someone else's process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        return None


# ---------------------------------------------------------------------------------------------
# Server


def validate_create_call(body: Any) -> list[str]:
    """Vapi-style (NestJS class-validator) messages for a ``POST /call`` body; [] if valid."""
    if not isinstance(body, dict):
        return ["body must be an object"]
    errors: list[str] = []
    for key in body:
        if key not in ALLOWED_PROPERTIES and key not in PHONE_PROPERTIES:
            errors.append(f"property {key} should not exist")
    present = [key for key in RUNNERS if body.get(key) is not None]
    if not present:
        errors.append(
            "Exactly one of assistantId, assistant, squadId, squad, workflowId or workflow "
            "must be provided."
        )
    elif len(present) > 1:
        errors.append(
            "Only one of assistantId, assistant, squadId, squad, workflowId or workflow may be "
            f"provided (got {', '.join(present)})."
        )
    for key in ("assistantId", "squadId", "workflowId", "customerId"):
        if key in body and (not isinstance(body[key], str) or not body[key]):
            errors.append(f"{key} must be a string")
    for key in ("assistant", "squad", "workflow", "assistantOverrides", "customer", "metadata"):
        if key in body and not isinstance(body[key], dict):
            errors.append(f"{key} must be an object")
    if "name" in body:
        if not isinstance(body["name"], str):
            errors.append("name must be a string")
        elif len(body["name"]) > 40:
            errors.append("name must be shorter than or equal to 40 characters")
    overrides = body.get("assistantOverrides")
    if isinstance(overrides, dict):
        for key in ("variableValues", "metadata"):
            if key in overrides and not isinstance(overrides[key], dict):
                errors.append(f"assistantOverrides.{key} must be an object")
        cm = overrides.get("clientMessages")
        if cm is not None and not (isinstance(cm, list) and all(isinstance(m, str) for m in cm)):
            errors.append("assistantOverrides.clientMessages must be an array of strings")
    for key in PHONE_PROPERTIES:
        if key in body:
            errors.append(
                f"{key} is not allowed with the vapi.websocket transport "
                "(phoneNumberId/phoneNumber and websocket transport are mutually exclusive)"
            )
    errors.extend(_validate_transport(body.get("transport")))
    return errors


def _validate_transport(transport: Any) -> list[str]:
    if transport is None:
        return ["transport.provider must be one of the following values: vapi.websocket"]
    if not isinstance(transport, dict):
        return ["transport must be an object"]
    errors = [
        f"transport.property {key} should not exist"
        for key in transport
        if key not in TRANSPORT_PROPERTIES
    ]
    if transport.get("provider") != "vapi.websocket":
        errors.append("transport.provider must be one of the following values: vapi.websocket")
    if "conversationType" in transport and transport["conversationType"] != "voice":
        errors.append("transport.conversationType must be one of the following values: voice")
    audio = transport.get("audioFormat")
    if audio is None:
        return errors
    if not isinstance(audio, dict):
        errors.append("transport.audioFormat must be an object")
        return errors
    errors.extend(
        f"transport.audioFormat.property {key} should not exist"
        for key in audio
        if key not in AUDIO_FORMAT_PROPERTIES
    )
    if audio.get("format") not in voices.FORMATS:
        errors.append(
            "transport.audioFormat.format must be one of the following values: pcm_s16le, mulaw"
        )
    if "container" in audio and audio["container"] != "raw":
        errors.append("transport.audioFormat.container must be one of the following values: raw")
    rate = audio.get("sampleRate")
    if not isinstance(rate, int | float) or isinstance(rate, bool):
        errors.append(
            "transport.audioFormat.sampleRate must be a number conforming to the specified "
            "constraints"
        )
    elif rate > 192000:
        errors.append("transport.audioFormat.sampleRate must not be greater than 192000")
    elif rate < 1000 or rate != int(rate):
        # Vapi allows 0..192000 and resamples; the stand-in generates audio at the given rate.
        errors.append("transport.audioFormat.sampleRate must be an integer >= 1000 (stand-in)")
    return errors


def _audio_format(body: dict[str, Any]) -> tuple[str, int]:
    audio = body.get("transport", {}).get("audioFormat")
    if not isinstance(audio, dict):
        return DEFAULT_AUDIO_FORMAT
    return str(audio["format"]), int(audio["sampleRate"])


def _error(status: int, message: Any) -> JSONResponse:
    """NestJS-shaped error body (500 has no "error" field, as NestJS's default)."""
    if status == 500:
        return JSONResponse({"statusCode": 500, "message": "Internal server error"}, 500)
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body = {"message": phrase if message is None else message, "error": phrase, "statusCode": status}
    return JSONResponse(body, status)


class VapiSim:
    """The Vapi stand-in server (REST + transport sockets on one port), run in-process.

    Attributes settable at runtime: ``assistant`` (script for new calls), ``assistants``
    (assistantId -> script, takes precedence), ``create_delay``, ``fail_status``, ``downlink``
    (for utterances started afterwards), ``respond_to_pings``.
    """

    def __init__(
        self,
        *,
        api_key: str = "test-vapi-key",
        assistant: AssistantScript | None = None,
        create_delay: float = 0.0,
        fail_status: int | None = None,
        downlink: Downlink = "paced",
        respond_to_pings: bool = True,
        assistants: dict[str, AssistantScript] | None = None,
        connect_timeout: float | None = 20.0,
        record_audio: bool = True,
    ) -> None:
        if downlink not in ("paced", "burst"):
            raise ValueError("downlink must be 'paced' or 'burst'")
        self.api_key = api_key
        self.assistant: AssistantScript = assistant if assistant is not None else greeter()
        self.assistants: dict[str, AssistantScript] = dict(assistants or {})
        self.create_delay = create_delay
        self.fail_status = fail_status
        self.downlink: Downlink = downlink
        self.respond_to_pings = respond_to_pings
        #: seconds a created call waits for its transport before it ends (None: forever).
        self.connect_timeout = connect_timeout
        #: keep every received byte in ``VapiSession.received_audio`` (turn off for long loads;
        #: frame sizes and times are still recorded).
        self.record_audio = record_audio
        self.org_id = str(uuid.uuid4())

        self.sessions: dict[str, VapiSession] = {}
        #: every POST /call: {"status", "body", "at"}.
        self.create_log: list[dict[str, Any]] = []
        #: transport handshakes refused: (path, status).
        self.rejected_handshakes: list[tuple[str, int]] = []

        self._new_sessions: asyncio.Queue[VapiSession] = asyncio.Queue()
        self._active: set[VapiSession] = set()
        self._wake = asyncio.Event()
        self._server: _Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._ticker_task: asyncio.Task[None] | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self._protocol_class = cast(
            type[_TransportProtocol],
            type("_BoundTransportProtocol", (_TransportProtocol,), {"sim": self}),
        )
        self.app = Starlette(
            routes=[
                Route("/call", self._http_create_call, methods=["POST"]),
                Route("/call/{call_id}", self._http_get_call, methods=["GET"]),
                Route("/{call_id}/control", self._http_control, methods=["POST"]),
            ]
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._serve_task is not None:
            raise RuntimeError("VapiSim already started")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            ws=self._protocol_class,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
            ws_per_message_deflate=False,
        )
        server = _Server(config)
        self._server = server
        self._serve_task = asyncio.create_task(server.serve(sockets=[sock]), name="vapi-sim")
        self._ticker_task = asyncio.create_task(self._ticker(), name="vapi-sim-ticker")
        deadline = time.monotonic() + 10.0
        while not server.started:
            if self._serve_task.done():
                exc = self._serve_task.exception()
                raise RuntimeError(f"VapiSim failed to start: {exc!r}")
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError("VapiSim did not start within 10 s")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            try:
                session._shutdown()
            except Exception:
                log.exception("vapi sim: error stopping session %s", session.id)
        self._active.clear()
        ticker, self._ticker_task = self._ticker_task, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        server, task = self._server, self._serve_task
        self._server = self._serve_task = None
        if server is not None and task is not None:
            server.should_exit = True
            server.force_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            except Exception:
                log.exception("vapi sim: server task failed")

    async def __aenter__(self) -> VapiSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._url_host}:{self._port}"

    @property
    def ws_base_url(self) -> str:
        return f"ws://{self._url_host}:{self._port}"

    @property
    def _url_host(self) -> str:
        return f"[{self._host}]" if ":" in self._host else self._host

    def open_sessions(self) -> int:
        """Transport sockets currently open."""
        return sum(1 for s in self.sessions.values() if s.is_open)

    def prune(self) -> int:
        """Forget sessions whose socket has closed (long runs); returns how many."""
        gone = [k for k, s in self.sessions.items() if s.closed]
        for k in gone:
            del self.sessions[k]
        return len(gone)

    async def wait_session(self, timeout: float) -> VapiSession:
        """The next session created (the first call returns the first one ever created)."""
        return await asyncio.wait_for(self._new_sessions.get(), timeout)

    # -- ticker ------------------------------------------------------------------------------

    def _activate(self, session: VapiSession) -> None:
        self._active.add(session)
        self._wake.set()

    async def _ticker(self) -> None:
        """One clock for the downlink of every session: wakes every 10 ms while any speaks."""
        next_at = time.monotonic()
        while True:
            if not self._active:
                self._wake.clear()
                await self._wake.wait()
                next_at = time.monotonic()
            now = time.monotonic()
            for session in list(self._active):
                try:
                    keep = session._tick(now)
                except Exception:
                    log.exception("vapi sim: tick failed for call %s", session.id)
                    keep = False
                if not keep:
                    self._active.discard(session)
            next_at += TICK_S
            delay = next_at - time.monotonic()
            if delay < -0.2:  # fell far behind (loop stalled): resynchronise
                next_at = time.monotonic()
                delay = 0.0
            await asyncio.sleep(max(0.0, delay))

    # -- REST --------------------------------------------------------------------------------

    def _authorized(self, request: HttpRequest) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and token.strip() == self.api_key

    async def _http_create_call(self, request: HttpRequest) -> Response:
        raw = await request.body()
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        entry: dict[str, Any] = {"status": 0, "body": body, "at": time.monotonic()}
        self.create_log.append(entry)
        if not self._authorized(request):
            entry["status"] = 401
            return _error(401, UNAUTHORIZED_MESSAGE)
        if self.create_delay > 0:
            await asyncio.sleep(self.create_delay)
        fail = self.fail_status
        if fail is not None:
            entry["status"] = fail
            if fail == 400:
                return _error(400, ["Over Concurrency Limit."])
            if fail == 429:
                return _error(429, "Rate limit exceeded")
            return _error(fail, None)
        if isinstance(body, str):
            entry["status"] = 400
            return _error(400, f"Unexpected token in JSON: {body[:40]!r}")
        errors = validate_create_call(body)
        if errors:
            entry["status"] = 400
            return _error(400, errors)
        session = self._create_session(body)
        entry["status"] = 201
        entry["call_id"] = session.id
        return JSONResponse(session.call_json(), 201)

    def _create_session(self, body: dict[str, Any]) -> VapiSession:
        call_id = str(uuid.uuid4())
        script = self.assistants.get(str(body.get("assistantId")), self.assistant)
        fmt, rate = _audio_format(body)
        script = dataclasses.replace(script)
        overrides = body.get("assistantOverrides")
        if isinstance(overrides, dict) and overrides.get("firstMessageMode") == "assistant-waits-for-user":
            script.greeting_s = None  # as Vapi documents: no first message, wait for the caller
        session = VapiSession(self, call_id, body, script, fmt, rate)
        self.sessions[call_id] = session
        if self.connect_timeout is not None:
            session._call_later(self.connect_timeout, session._never_connected)
        self._new_sessions.put_nowait(session)
        return session

    async def _http_get_call(self, request: HttpRequest) -> Response:
        if not self._authorized(request):
            return _error(401, UNAUTHORIZED_MESSAGE)
        session = self.sessions.get(request.path_params["call_id"])
        if session is None:
            return _error(404, "Not Found")
        return JSONResponse(session.call_json())

    async def _http_control(self, request: HttpRequest) -> Response:
        session = self.sessions.get(request.path_params["call_id"])
        if session is None:
            return _error(404, "Not Found")
        try:
            msg = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, ["body must be a JSON object"])
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            return _error(400, ["type must be a string"])
        if not session._live:
            return _error(400, ["call is not active"])
        session.control.append(msg)
        session.handle_message(msg)
        session._notify()
        return JSONResponse({"status": "ok"})
