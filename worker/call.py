"""One call's assistant side as a pure state machine: what happens goes in, what to do comes out.

Everything that decides how a call behaves lives here: forwarding the caller's audio (and holding
it while Vapi sets up), pacing the assistant's audio, the three barge-in policies, keypad
gathering, transfers, turn latency, what a successor needs to resume, what the call API asks
(`ctl` entries: hang up, say, transfer, the answering-machine verdict), and every way a call ends.
Nothing here waits, sleeps, reads a clock or touches Redis or a socket, the way `Playout` works:
each input is a method call with `now` (monotonic seconds) and returns the commands the adapter
(worker/session.py) carries out, in order; `next_deadline()` says when to call `tick()`. So every
path can be driven on a virtual clock (tests/test_call_core.py) and the adapter stays thin.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from shared import streams as S
from shared import vapi_proto as V
from shared.audio import SILENCE_FRAME, Downlink, Uplink
from shared.logs import mask_number
from shared.settings import Settings, transfer_allowed
from worker.playback import FRAME_S, Playout
from worker.resume import Response, history
from worker.turns import KeypadGather, SpeechEnd
from worker.vad import Action, FastBargeIn, VoiceDetector

log = logging.getLogger("callbridge.worker.session")

CALLER, ASSISTANT = "caller", "assistant"
MAX_BACKLOG_FRAMES = 750  # caller audio held while Vapi sets up: 15 s
# How often a call's resume point is saved: a takeover re-sends at most this much caller audio
# to the new session (harmless: it is a new session), for one fenced write per interval.
PROGRESS_EVERY_S = 0.25
STALE_AFTER_BARGE_IN_S = 2.0  # bound on dropping the cut turn's audio if no new turn is announced
DRAIN_MARGIN_S = 2.0  # an ending waits for what is queued plus this, then hangs up anyway
FILL_MAX_LAG_S = 0.1  # silence fill catches up at most this much after a stall of our own
# An ending the call API asked for stops Vapi at once and lets at most this much of what is
# already queued play (the caller's call is closed well within 2 s).
API_DRAIN_S = 1.0
# Answering-machine detection: Twilio's verdict comes within its MachineDetectionTimeout (at most
# 59 s); a call muted for it that hears nothing by then goes on as `unknown` (unmuted). After
# `machine_start` (MachineDetection=Enable never sends a `machine_end_*`) the message is left
# anyway after MESSAGE_END_WAIT_S.
AMD_VERDICT_WAIT_S = 60.0
MESSAGE_END_WAIT_S = 30.0
# A voicemail message is at most MAX_CONTROL_TEXT characters (about 2 min of speech); a Vapi that
# has not ended the call this long after it was asked to say it is ended by us.
VOICEMAIL_MAX_S = 180.0
MAX_PENDING_TEXT = 16  # control messages for Vapi held until its socket opens


# The call API's entries (`ctl` on call:{sid}:in) ----------------------------------------------
# Written by another process from API requests, so untrusted: `parse_control` checks every field
# and bounds every size, and never raises (a bad entry must not take the worker's shared reader
# down with it). The decision is CallCore.control's.

MAX_CONTROL_BYTES = 16 * 1024  # MAX_CONTROL_TEXT characters, each escaped at worst, and the rest
MAX_CONTROL_TEXT = 2000
MAX_OP = 32
# Twilio's AnsweredBy values (answering-machine detection; the `machine_end_*` ones only with
# MachineDetection=DetectMessageEnd).
ANSWERED_BY = frozenset({"human", "machine_start", "machine_end_beep", "machine_end_silence",
                         "machine_end_other", "fax", "unknown"})
# What to do when a machine answers (the call API's `machine_detection`): nothing, hang up, or
# leave the voicemail message.
AMD_OFF, AMD_HANGUP, AMD_MESSAGE = "off", "hangup", "message"
AMD_POLICIES = (AMD_OFF, AMD_HANGUP, AMD_MESSAGE)


@dataclass(frozen=True, slots=True)
class ApiHangup:
    """`{"op": "hangup"}`: end the call as the assistant would, `end_reason` api-hangup."""


@dataclass(frozen=True, slots=True)
class ApiSay:
    """`{"op": "say", "text": str, "respond": bool}`: the assistant speaks `text` as is (Vapi
    `say`), or with `respond` gets it as a system note and answers it (`add-message`)."""

    text: str
    respond: bool = False


@dataclass(frozen=True, slots=True)
class ApiTransfer:
    """`{"op": "transfer", "to": str}`: transfer as the assistant's transfer tool would."""

    to: str


@dataclass(frozen=True, slots=True)
class AnsweredBy:
    """`{"op": "answered_by", "value": AnsweredBy, "policy": "off"|"hangup"|"message",
    "message": str}`: Twilio's answering-machine verdict; `policy`/`message` None fall back to
    the call record's `amd_policy`/`voicemail_message` (and `off`, acting on nothing)."""

    value: str
    policy: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class BadControl:
    """An entry with nothing to act on; `cause` is a bounded label, `op` the op if it had one."""

    cause: str
    op: str = ""


Control = ApiHangup | ApiSay | ApiTransfer | AnsweredBy


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() and len(value) <= MAX_CONTROL_TEXT else None


def _parse_control(raw: bytes) -> Control | BadControl:
    if len(raw) > MAX_CONTROL_BYTES:
        return BadControl("oversized")
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return BadControl("not_json")
    if not isinstance(msg, dict):
        return BadControl("not_object")
    op = msg.get("op")
    if not isinstance(op, str):
        return BadControl("no_op")
    op = op[:MAX_OP]
    if op == "hangup":
        return ApiHangup()
    if op == "say":
        text, respond = _text(msg.get("text")), msg.get("respond", False)
        if text is None or not isinstance(respond, bool):
            return BadControl("bad_field", op)
        return ApiSay(text, respond)
    if op == "transfer":
        to = msg.get("to")
        if not isinstance(to, str) or not to.strip() or len(to) > V.MAX_TARGET:
            return BadControl("bad_field", op)
        return ApiTransfer(to.strip())
    if op == "answered_by":
        value, policy, message = msg.get("value"), msg.get("policy"), msg.get("message")
        if not isinstance(value, str) or value not in ANSWERED_BY:
            return BadControl("bad_field", op)
        if policy is not None and policy not in AMD_POLICIES:
            return BadControl("bad_field", op)
        if message is not None and message != "" and _text(message) is None:
            return BadControl("bad_field", op)
        return AnsweredBy(value, policy, message or None)
    return BadControl("unknown_op", op)


def parse_control(raw: bytes) -> Control | BadControl:
    """The op of a `ctl` entry's `v`, or why there is none. Total: never raises."""
    try:
        return _parse_control(raw)
    except Exception:  # a bug here must cost one entry, never the reader
        return BadControl("error")


# Outputs ------------------------------------------------------------------------------------


# The two commands made for every frame are not frozen: a frozen dataclass sets each field
# through object.__setattr__, 1.1 µs a construction against 0.4 (docs/performance.md). Nothing
# keeps or hashes a command; the adapter carries each out once, as it comes.
@dataclass(slots=True)
class SendVapiAudio:
    """Audio for Vapi, already in its format. `sent_at`: the caller frame's sender wall-clock
    seconds, for the hop latency (None for held-back, silence and backlog audio)."""

    audio: bytes
    sent_at: float | None = None


@dataclass(frozen=True, slots=True)
class SendVapiText:
    text: str


@dataclass(slots=True)
class WriteOut:
    """An entry on `call:{sid}:out` (kind from shared.streams); the adapter stamps the epoch."""

    kind: bytes
    audio: bytes | None = None
    value: str | None = None


@dataclass(frozen=True, slots=True)
class UpdateCall:
    """Fields for the call hash, written only while our epoch is the call's (fenced)."""

    fields: dict[str, str]


@dataclass(frozen=True, slots=True)
class Event:
    """An entry on `call:{sid}:events`."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CloseVapi:
    """Stop talking to Vapi: drop what is queued for it, (send end-call,) close the socket, and
    give up a setup still under way."""

    send_end: bool = True


@dataclass(frozen=True, slots=True)
class RestHangup:
    """No gateway will close the stream: end the call over Twilio REST, then report the
    outcome with `rest_hangup_done()`."""


@dataclass(frozen=True, slots=True)
class Done:
    """The session is over. `completed`: ended for good (False: released for a takeover)."""

    completed: bool


@dataclass(frozen=True, slots=True)
class Metric:
    """A count or an observation: `name` is one of METRICS, `label` its label if it has one."""

    name: str
    label: str = ""
    value: float = 1.0


METRICS = ("dropped", "barge_in", "fast_barge_in", "turn_latency", "vapi_error", "vapi_setup",
           "silence_fill")

Command = (SendVapiAudio | SendVapiText | WriteOut | UpdateCall | Event | CloseVapi | RestHangup
           | Done | Metric)


@dataclass(frozen=True, slots=True)
class Ending:
    reason: str
    side: str  # who ended it: CALLER (Twilio side is already gone) or ASSISTANT
    say: str | None = None
    transfer_to: str | None = None
    detail: str = ""
    # At most this much queued assistant audio plays before the hang-up (None: all of it, and
    # what Vapi still sends within DRAIN_MARGIN_S).
    drain_s: float | None = None


@dataclass(frozen=True, slots=True)
class CallConfig:
    """The settings a call's behaviour depends on (a plain value, so tests need no environment)."""

    worker_id: str = "w"
    audio_format: str = "pcm_s16le"
    playout_lead_s: float = 0.100
    playout_prebuffer_s: float = 0.040
    mark_every_ms: int = 100
    keypad_timeout_s: float = 2.0
    interrupt_confirm_s: float = 0.6
    fast_barge_in: bool = False
    fast_confirm_s: float = 0.6
    fast_aggressiveness: int = 2
    reattach_timeout_s: float = 10.0
    silence_fill_after_s: float = 1.0
    hangup_grace_s: float = 3.0
    transfer_allow: str = ""
    takeover_resume: str = V.RESUME_SPEAK
    unavailable_message: str = "Sorry, the assistant is not available right now."

    @classmethod
    def from_settings(cls, s: Settings, worker_id: str) -> CallConfig:
        return cls(worker_id=worker_id, audio_format=s.vapi_audio_format,
                   playout_lead_s=s.playout_lead_ms / 1000,
                   playout_prebuffer_s=s.playout_prebuffer_ms / 1000, mark_every_ms=s.mark_every_ms,
                   keypad_timeout_s=s.keypad_timeout_s, interrupt_confirm_s=s.interrupt_confirm_ms / 1000,
                   fast_barge_in=s.fast_barge_in, fast_confirm_s=s.fast_barge_in_confirm_ms / 1000,
                   fast_aggressiveness=s.fast_barge_in_aggressiveness,
                   reattach_timeout_s=s.reattach_timeout_s, silence_fill_after_s=s.silence_fill_after_s,
                   hangup_grace_s=s.hangup_grace_s, transfer_allow=s.transfer_allow,
                   takeover_resume=s.takeover_resume, unavailable_message=s.unavailable_message)


class Phase(enum.Enum):
    NEW = "new"  # constructed, start() not yet called
    SETUP = "setup"  # Vapi is being set up; caller audio is held
    CONNECTED = "connected"
    DRAINING = "draining"  # the assistant side ends it: the last words play out first
    HANGING_UP = "hanging-up"  # the end is recorded and `hangup` written: waiting for the close
    REST = "rest"  # waiting for the Twilio REST hang-up
    DONE = "done"


_TALKING = (Phase.SETUP, Phase.CONNECTED, Phase.DRAINING)  # audio may still reach the caller


class CallCore:
    """The state of one call on the assistant side, changed only by the input methods below.

    Every input takes `now` (monotonic seconds) and returns a list of commands for the adapter
    to carry out in order. `next_deadline()` is when `tick()` is next needed; `playing` says
    playout frames come due continuously (an adapter may drive those from a shared ticker).
    Once `ownership_lost()` is called no command writes to the call any more.
    """

    def __init__(self, cfg: CallConfig, sid: str, *, epoch: int, record: Mapping[str, str],
                 call_from: str = "", call_to: str = "", now: float, wall_offset: float = 0.0,
                 fast: FastBargeIn | None = None) -> None:
        self.cfg = cfg
        self.sid = sid
        self.epoch = epoch
        self.record = dict(record)  # the call hash as our claim found it
        self.takeover = epoch > 1  # any claim after the first takes the call over
        self.call_from, self.call_to = call_from, call_to
        self._wall_offset = wall_offset  # wall clock minus monotonic: sender stamps are wall time
        self.phase = Phase.NEW
        self.ending: Ending | None = None
        self.lost = False
        self.playout = Playout(lead_s=cfg.playout_lead_s, mark_every_ms=cfg.mark_every_ms,
                               prebuffer_s=cfg.playout_prebuffer_s, mark_prefix=f"{epoch}.")
        self._uplink = Uplink(cfg.audio_format)
        self._downlink = Downlink(cfg.audio_format)
        self.keypad = KeypadGather(timeout_s=cfg.keypad_timeout_s)
        self.speech = SpeechEnd()
        self.fast = fast
        if fast is None and cfg.fast_barge_in:
            self.fast = FastBargeIn(VoiceDetector(aggressiveness=cfg.fast_aggressiveness),
                                    confirm_window_s=cfg.fast_confirm_s)
        self._response = Response()
        self._resume: V.Resume | None = None
        self.stream_sid = ""
        self.stream_live = False
        self._seen_start = False
        self.vapi_up = False  # connected and not closed: caller audio goes to Vapi
        self._vapi_closed_by_us = False
        self._backlog: deque[bytes] = deque()
        self.in_pos = ""  # id of the last `in` entry handled: where a successor resumes
        self._saved_pos = self._saved_turn = ""
        self._next_progress = now
        self._stale_until = 0.0
        self._turn_measured_for: float | None = None
        self.last_media_at = now
        self.silent_for = 0.0  # seconds of silence fill since the last real caller frame
        self._hold_until: float | None = None
        self._keypad_at: float | None = None
        self._reattach_at: float | None = None
        self._drain_until: float | None = None
        self._grace_until: float | None = None
        # The call API and answering-machine detection (see `control`).
        policy = self.record.get("amd_policy")
        self._amd_policy = policy if policy in AMD_POLICIES else None
        self._voicemail_message = _text(self.record.get("voicemail_message")) or ""
        self._answered_by = self.record.get("answered_by", "")  # a verdict an owner acted on
        # Shown by the console; a successor counts on from its predecessor's figure.
        count = self.record.get("barge_ins", "")
        self.barge_ins = int(count) if count.isascii() and count.isdigit() and len(count) < 7 else 0
        # Waiting for the verdict (or, after `machine_start`, for the beep) with a message to
        # leave: the assistant starts muted, so a machine never records its greeting (a human
        # hears it once the verdict is in).
        self._muted = (self.record.get("amd_pending") == "1" and self._amd_policy == AMD_MESSAGE
                       and self._answered_by in ("", "machine_start"))
        self._vapi_muted = False  # Vapi was told mute-assistant (and not unmute since)
        self._amd_wait_until: float | None = None
        if self._muted:
            self._amd_wait_until = now + (MESSAGE_END_WAIT_S if self._answered_by else AMD_VERDICT_WAIT_S)
        self._voicemail = False  # the message is being left: Vapi ends the call after it
        self._voicemail_until: float | None = None
        self._pending_text: list[str] = []  # for Vapi, once its socket is open
        self._now = now
        self._out: list[Command] = []

    # Queries -----------------------------------------------------------------------------------

    @property
    def playing(self) -> bool:
        """Assistant audio is waiting to be paced out to a live stream."""
        return (self.phase in _TALKING and self.stream_live and not self._muted
                and not self.playout.idle and not self.playout.paused)

    def next_deadline(self) -> float | None:
        """The earliest time `tick()` has something to do (None: only an input can change
        anything). Never earlier than needed: ticking sooner is harmless, later is not.

        Asked after every input and by every timer (about 100 times a second per call while
        audio flows both ways), so it keeps a running minimum instead of building a list."""
        phase = self.phase
        if phase is Phase.DONE:
            return None
        at = self._next_progress
        for t in (self._hold_until, self._keypad_at, self._reattach_at, self._amd_wait_until,
                  self._voicemail_until):
            if t is not None and t < at:
                at = t
        if self.fast is not None and (fast := self.fast.deadline()) is not None and fast < at:
            at = fast
        if self.vapi_up and (fill := self.last_media_at + self.cfg.silence_fill_after_s + 1e-6) < at:
            at = fill
        if phase in _TALKING and self.stream_live and not self._muted:
            if (due := self.playout.next_due(self._now)) is not None and due < at:
                at = due
        if phase is Phase.DRAINING and self._drain_until is not None:
            at = min(at, self._drain_until)
            if self.playout.idle and not self.playout.awaiting_marks:
                at = min(at, self.playout.play_end)
        if phase is Phase.HANGING_UP and self._grace_until is not None:
            at = min(at, self._grace_until)
        return at

    def record_fields(self) -> dict[str, str]:
        """What we know of the call record, to put back if Redis lost it."""
        fields = {"status": S.STATUS_LIVE if self._seen_start else S.STATUS_RINGING}
        if self.stream_sid:
            fields["stream_sid"] = self.stream_sid
        if self.call_from:
            fields["from"] = self.call_from
        if self.call_to:
            fields["to"] = self.call_to
        if self.ending is not None:
            fields.update({"status": S.STATUS_ENDED, "end_reason": self.ending.reason})
        if self.in_pos:
            fields["in_pos"] = self.in_pos
        return fields

    # Lifecycle inputs --------------------------------------------------------------------------

    def start(self, now: float) -> list[Command]:
        """The session begins: skip a call that is already over; a takeover of a call whose
        stream is attached plays to it at once (the gateway still holds Twilio's socket)."""
        if self.phase is not Phase.NEW:
            return []
        self._now = now
        status, stream_sid = self.record.get("status"), self.record.get("stream_sid")
        if status is None or status == S.STATUS_ENDED:
            log.info("job for a call that is already over; skipping")
            self.phase = Phase.DONE
            return [Done(completed=True)]
        self.phase = Phase.SETUP
        if self.takeover:
            self._event("takeover", worker=self.cfg.worker_id, epoch=self.epoch)
        if self.takeover and stream_sid:
            self.stream_sid = stream_sid
            self.stream_live = self._seen_start = True
            self.playout.stream_reset(now)
        if (self.takeover and self._answered_by.startswith("machine_end")
                and self._amd_policy == AMD_MESSAGE and self._voicemail_message):
            self._leave_voicemail(self._voicemail_message, now)  # the old session was leaving it
        return self._flush(now)

    def takeover_context(self, transcripts: list[tuple[str, str]],
                         model: V.AssistantModel | None) -> V.Resume:
        """How the new Vapi session of a taken-over call begins: the final transcripts so far
        (oldest first) ending with what the caller heard of the cut response (the record's
        `turn`); with the assistant's model it speaks first, without it waits for the caller."""
        messages, heard_ms = history(transcripts, self.record.get("turn", ""))
        mode = V.RESUME_SPEAK if model is not None else V.RESUME_WAIT
        self._resume = V.Resume(mode=mode, messages=messages, model=model, heard_ms=heard_ms)
        return self._resume

    def vapi_call_created(self, call_id: str, now: float) -> list[Command]:
        self._update({"vapi_call_id": call_id})
        return self._flush(now)

    def vapi_connected(self, now: float, setup_s: float) -> list[Command]:
        """The transport socket is open: hand over the history (wait mode) and the held audio."""
        if self.phase is not Phase.SETUP:  # ended meanwhile: this socket is not wanted
            self._vapi_closed_by_us = True
            return [CloseVapi(send_end=True)]
        self.phase = Phase.CONNECTED
        self.vapi_up = True
        if self._muted:  # first, so as little of the greeting as possible is spoken
            self._out.append(SendVapiText(V.MUTE_ASSISTANT))
            self._vapi_muted = True
        r = self._resume
        if r is not None and r.mode == V.RESUME_WAIT and r.messages:
            self._out.append(SendVapiText(V.conversation_so_far(r.messages)))
        self._out.extend(SendVapiText(t) for t in self._pending_text)
        self._pending_text.clear()
        if r is not None:
            self._event("history-handed-over", turns=len(r.messages), mode=r.mode, heard_ms=r.heard_ms)
        setup_ms = round(setup_s * 1000, 1)
        self._out.append(Metric("vapi_setup", value=setup_s))
        self._event("vapi-connected", setup_ms=setup_ms, takeover=self.takeover)
        log.info("vapi connected", extra={"setup_ms": setup_ms})
        while self._backlog:
            self._out.append(SendVapiAudio(self._uplink.convert(self._backlog.popleft())))
        return self._flush(now)

    def vapi_setup_failed(self, now: float, reason: str, kind: str, detail: str = "") -> list[Command]:
        if self.phase is not Phase.SETUP:
            return []
        self._out.append(Metric("vapi_error", kind))
        log.warning("vapi setup failed", extra={"reason": reason, "detail": detail})
        self._end(Ending(reason, ASSISTANT, say=self.cfg.unavailable_message, detail=detail), now)
        return self._flush(now)

    def vapi_closed(self, now: float, error: bool = False) -> list[Command]:
        """Vapi's socket closed (or its reader failed: `error`) without us closing it."""
        self.vapi_up = False
        if not self._vapi_closed_by_us:
            reason = "error" if error else "vapi-socket-closed"
            if self._voicemail:  # most likely the end after the message: never apologise to a machine
                self._end(Ending("voicemail", ASSISTANT, detail=reason), now)
            else:
                self._end(Ending(reason, ASSISTANT, say=self.cfg.unavailable_message), now)
        return self._flush(now)

    def fail(self, now: float, detail: str = "") -> list[Command]:
        """Something around the call broke (a task of the adapter): end it, saying why."""
        self._end(Ending("error", ASSISTANT, say=self.cfg.unavailable_message, detail=detail), now)
        return self._flush(now)

    def rest_hangup_done(self, outcome: str, now: float) -> list[Command]:
        if self.phase is not Phase.REST:
            return []
        self._event("rest-hangup", outcome=outcome)
        log.info("ended the call over Twilio REST", extra={"outcome": outcome})
        self._complete()
        return self._flush(now)

    def release(self, now: float) -> list[Command]:
        """The session stops without ending the call (drain timeout, or another worker owns it
        now): close Vapi, write nothing about the ending."""
        if self.phase is Phase.DONE:
            return []
        self.phase = Phase.DONE
        self._record_turns()
        self._close_vapi()
        self._out.append(Done(completed=False))
        return self._flush(now)

    def ownership_lost(self) -> None:
        """Another worker took the call over: from now on nothing is written to it."""
        self.lost = True

    def reasserted(self, now: float) -> list[Command]:
        """Redis came back without our call: save the progress again, as if never saved."""
        self._saved_pos = self._saved_turn = ""
        self._persist()
        return self._flush(now)

    # Caller-side inputs (entries of call:{sid}:in; `entry_id` '' when not from the stream) -----

    def uplink_ahead(self) -> Uplink | None:
        """The converter the caller's next frames will go through, if they go to Vapi now: the
        worker converts a whole read's frames ahead in one pass (shared/audio.py)."""
        return self._uplink if self.vapi_up and self.phase is not Phase.DONE else None

    def caller_frame(self, entry_id: str, audio: bytes, sent_at: float, now: float) -> list[Command]:
        """20 ms of the caller's μ-law; `sent_at` is the gateway's wall-clock stamp."""
        if self.phase is Phase.DONE:
            return []
        self._seen(entry_id, now)
        self.last_media_at = now
        self.silent_for = 0.0
        self.speech.frame(audio, sent_at)
        if self.fast is not None:
            active = self.playout.active(now)
            self._fast(self.fast.frame(audio, now, active) or self.fast.tick(now), now)
        if self.vapi_up:
            self._out.append(SendVapiAudio(self._uplink.convert(audio), sent_at))
        elif self.phase in (Phase.NEW, Phase.SETUP):
            self._backlog.append(audio)
            if len(self._backlog) > MAX_BACKLOG_FRAMES:  # Vapi slow to answer
                self._backlog.popleft()
                self._out.append(Metric("dropped", "inbound_overflow"))
        return self._flush(now)

    def mark(self, entry_id: str, name: str, now: float) -> list[Command]:
        """Twilio played our audio up to this mark (or `clear` flushed it)."""
        if self.phase is Phase.DONE:
            return []
        self._seen(entry_id, now)
        self.playout.on_mark(name)
        return self._flush(now)

    def stream_start(self, entry_id: str, stream_sid: str, now: float, info_sid: str = "") -> list[Command]:
        """A Twilio socket attached (first, or again after a detach): held audio flows to it."""
        if self.phase is Phase.DONE:
            return []
        self._seen(entry_id, now)
        self.stream_sid = stream_sid or info_sid
        self.stream_live = self._seen_start = True
        if self.ending is not None and self.ending.side == ASSISTANT:
            # We already ended the call; the gateway attached after our hangup: say it again.
            self._write(WriteOut(S.OUT_HANGUP))
            return self._flush(now)
        self.playout.stream_reset(now)
        self._reattach_at = None
        self._update({"status": S.STATUS_LIVE, "stream_sid": self.stream_sid})
        self._event("stream-start", stream_sid=info_sid)
        return self._flush(now)

    def stream_stop(self, entry_id: str, stream_sid: str, now: float) -> list[Command]:
        """Twilio's `stop`: the caller hung up."""
        if self.phase is Phase.DONE:
            return []
        self._seen(entry_id, now)
        if self._current_stream(stream_sid):
            self._stream_gone(now)
            self._end(Ending("caller-hangup", CALLER), now)
        return self._flush(now)

    def stream_detach(self, entry_id: str, stream_sid: str, why: str, now: float) -> list[Command]:
        """The socket closed without `stop` (`why`: hangup, drain or lost). Unless we hung up,
        Twilio re-attaches through <Connect action>; the call ends if it has not in time."""
        if self.phase is Phase.DONE:
            return []
        self._seen(entry_id, now)
        if self._current_stream(stream_sid):
            self._detach(why, now)
        return self._flush(now)

    def dtmf(self, entry_id: str, digit: str, now: float) -> list[Command]:
        """Keypad: gathered like Vapi's keypadInputPlan (`#` or a pause ends the entry)."""
        if self.phase is Phase.DONE:
            return []
        self._seen(entry_id, now)
        self._event("dtmf", digit=digit)
        entry = self.keypad.press(digit, now)
        self._keypad_at = None
        if entry:
            self._send_keypad(entry)
        elif self.keypad.pending:
            self._keypad_at = self.keypad.deadline
        return self._flush(now)

    def control(self, entry_id: str, ctl: Control | BadControl, now: float) -> list[Command]:
        """The call API steers the call (a `ctl` entry, parsed by `parse_control`). Each op is
        written to `:events` (`api-hangup`, `api-say`, `api-transfer`, `answered-by`); a bad
        entry is counted and logged, and the call goes on untouched; once the call is ending
        nothing more is acted on."""
        if self.phase is Phase.DONE:
            return []
        self._seen(entry_id, now)
        if isinstance(ctl, BadControl):
            self._out.append(Metric("dropped", "bad_control"))
            log.warning("call control entry ignored", extra={"cause": ctl.cause, "op": ctl.op})
        elif self.ending is not None:
            log.info("call control entry ignored: the call is ending", extra={"op": type(ctl).__name__})
        elif isinstance(ctl, ApiHangup):
            self._event("api-hangup")
            self._end_now(Ending("api-hangup", ASSISTANT, drain_s=API_DRAIN_S), now)
        elif isinstance(ctl, ApiSay):
            self._event("api-say", text=ctl.text, respond=ctl.respond)
            self._send_text(V.add_message("system", ctl.text, respond=True) if ctl.respond
                            else V.say(ctl.text))
        elif isinstance(ctl, ApiTransfer):
            self._event("api-transfer", target=ctl.to[:64])
            self._transfer(ctl.to, now, api=True)
        else:
            self._on_answered_by(ctl, now)
        # Saved now rather than within PROGRESS_EVERY_S: a successor reads `:in` from `in_pos`,
        # and an op acted on twice (a second say) is not as harmless as caller audio sent twice.
        self._persist()
        return self._flush(now)

    # Vapi inputs -------------------------------------------------------------------------------

    def vapi_audio(self, data: bytes, now: float) -> list[Command]:
        """Assistant audio in Vapi's format, any size: paced out, what is due leaves at once."""
        if self.phase not in (Phase.CONNECTED, Phase.DRAINING):
            return []
        self._now = now
        if now < self._stale_until:
            self._out.append(Metric("dropped", "stale_after_barge_in"))
            return self._flush(now)
        if dropped := self.playout.push(self._downlink.convert(data), now):
            self._out.append(Metric("dropped", "playout_overflow", dropped // 160 or 1))
        self._response.audio(self.playout)
        self._emit_due(now)
        return self._flush(now)

    def vapi_message(self, msg: V.VapiMessage, now: float) -> list[Command]:
        if self.phase not in (Phase.CONNECTED, Phase.DRAINING):
            return []
        self._now = now
        if isinstance(msg, V.UserInterrupted):
            self._barge_in("user-interrupted", now)
        elif isinstance(msg, V.SpeechUpdate):
            if msg.role == "assistant" and msg.status == "started":
                self._stale_until = 0.0  # the next turn: its audio plays
            elif msg.role == "user" and msg.status == "started":
                self._hold(now)
                self._response.user_spoke()
        elif isinstance(msg, V.StatusUpdate):
            if msg.status == "ended":
                self._event("vapi-ended", ended_reason=msg.ended_reason or "")
                reason = "voicemail" if self._voicemail else "assistant-ended"
                self._end(Ending(reason, ASSISTANT, detail=msg.ended_reason or ""), now)
        elif isinstance(msg, V.Transcript):
            if msg.final:
                self._event("transcript", role=msg.role, text=msg.text[:2000])
                if msg.role == "assistant":
                    self._response.final(msg.text)
        elif isinstance(msg, V.ModelOutput):
            self._response.output(msg.text, self.playout)
        elif isinstance(msg, V.ToolCalls):
            self._tool_calls(msg, now)
        else:
            log.debug("vapi message", extra={"type": msg.type})
        return self._flush(now)

    # Timers ------------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Command]:
        """Run whatever has come due: playout frames, keypad timeout, hold release, fast
        barge-in resume, re-attach timeout, silence fill, progress, drain end, hang-up grace."""
        if self.phase is Phase.DONE:
            return []
        self._now = now
        if self._keypad_at is not None and now >= self._keypad_at:
            self._keypad_at = None
            if entry := self.keypad.due(now + 1e-3):
                self._send_keypad(entry)
        if self._hold_until is not None and now >= self._hold_until:
            self._hold_until = None
            self._release_hold(now)
        if self.fast is not None and self.fast.holding:
            self._fast(self.fast.tick(now), now)
        if self._reattach_at is not None and now >= self._reattach_at:
            self._reattach_at = None
            self._end(Ending("stream-lost", ASSISTANT), now)
        if self._amd_wait_until is not None and now >= self._amd_wait_until:
            self._amd_wait_until = None
            self._amd_timeout(now)
        if self._voicemail_until is not None and now >= self._voicemail_until:
            self._voicemail_until = None
            self._end_now(Ending("voicemail", ASSISTANT, detail="not ended after the message",
                                 drain_s=0.0), now)
        self._fill_silence(now)
        self._emit_due(now)
        if now >= self._next_progress:
            self._next_progress = now + PROGRESS_EVERY_S
            self._persist()
        if self.phase is Phase.HANGING_UP and self._grace_until is not None and now >= self._grace_until:
            self._grace_until = None
            self._rest_hangup()
        return self._flush(now)

    # Internals ---------------------------------------------------------------------------------

    def _flush(self, now: float) -> list[Command]:
        """Every input ends here: an ending that waits for playout may be done by now."""
        if self.phase is Phase.DRAINING and self._drain_until is not None and (
                not self.stream_live or now >= self._drain_until or not self.playout.active(now)):
            self._finish(now)
        out, self._out = self._out, []
        return out

    def _seen(self, entry_id: str, now: float) -> None:
        self._now = now
        if entry_id:
            self.in_pos = entry_id

    def _write(self, cmd: WriteOut | UpdateCall | Event) -> None:
        if not self.lost:
            self._out.append(cmd)

    def _event(self, kind: str, **data: Any) -> None:
        self._write(Event(kind, data))

    def _update(self, fields: dict[str, str]) -> None:
        self._write(UpdateCall(fields))

    def _current_stream(self, stream_sid: str) -> bool:
        """A stop/detach of an older socket (a late close after Twilio re-attached) is stale."""
        return not stream_sid or not self.stream_sid or stream_sid == self.stream_sid

    def _stream_gone(self, now: float) -> None:
        self.stream_live = False
        if self.phase is Phase.HANGING_UP:  # the gateway closed it after our hangup
            self._complete()

    def _detach(self, why: str, now: float) -> None:
        self._stream_gone(now)
        if why == "hangup" or self.ending is not None:
            return
        self._event("stream-lost")
        self._reattach_at = now + self.cfg.reattach_timeout_s

    def _fill_silence(self, now: float) -> None:
        """Keep Vapi fed while the caller's audio is missing (gateway restart, network), so its
        silence timeout reflects the caller, not our transport; after REATTACH_TIMEOUT_S of
        fill with the stream still up, the gateway holding it must be gone: treat as lost."""
        after = self.cfg.silence_fill_after_s
        if not self.vapi_up or now - self.last_media_at <= after:
            return
        self.last_media_at = max(self.last_media_at + FRAME_S, now - after - FILL_MAX_LAG_S)
        self.silent_for += FRAME_S
        self._out.append(SendVapiAudio(self._uplink.convert(SILENCE_FRAME)))
        self._out.append(Metric("silence_fill"))
        if self.stream_live and self.silent_for > self.cfg.reattach_timeout_s:
            self._detach("lost", now)  # no frame, no stop, no detach: the gateway died

    def _emit_due(self, now: float) -> None:
        if not self.stream_live or self.phase not in _TALKING or self._muted:
            return  # hold the audio until Twilio's socket is there (and the assistant unmuted)
        for frame in self.playout.due(now):
            if frame.first:
                self._turn_started(now)
            if frame.audio:  # else a mark alone: the end of an utterance
                self._write(WriteOut(S.OUT_MEDIA, audio=frame.audio))
            if frame.mark:
                self._write(WriteOut(S.OUT_MARK, value=frame.mark))

    def _turn_started(self, now: float) -> None:
        """The first frame of an assistant turn left for Twilio: the bridge's view of
        voice-to-voice latency (end of caller speech -> first assistant audio sent)."""
        ended = self.speech.last_voiced_at
        if ended is None or self.speech.speaking or ended == self._turn_measured_for:
            return
        self._turn_measured_for = ended
        latency = now + self._wall_offset - ended
        if 0 <= latency < 30:
            self._out.append(Metric("turn_latency", value=latency))
            ms = round(latency * 1000, 1)
            self._update({"last_turn_ms": str(ms)})
            self._event("turn-latency", turn=self.playout.turn, ms=ms)

    def _persist(self) -> None:
        """Where a successor should resume (`in_pos`) and what the caller heard of the current
        assistant response (`turn`): written only when either changed."""
        fields: dict[str, str] = {}
        if self.in_pos and self.in_pos != self._saved_pos:
            fields["in_pos"] = self._saved_pos = self.in_pos
        turn = self._response.snapshot(self.playout)
        if turn and turn != self._saved_turn:
            fields["turn"] = self._saved_turn = turn
        if fields:
            self._update(fields)

    def _send_text(self, text: str) -> None:
        """A control message for Vapi: now, or first thing once its socket opens (bounded)."""
        if self.vapi_up:
            self._out.append(SendVapiText(text))
        elif self.phase in (Phase.NEW, Phase.SETUP):
            if len(self._pending_text) < MAX_PENDING_TEXT:
                self._pending_text.append(text)
            else:
                log.warning("control message for vapi dropped: too many before it connected")
        # else Vapi is gone (the call is ending): there is no one to tell

    # Answering-machine detection. Outbound calls may carry `amd_pending: "1"` in their record until
    # Twilio's verdict comes as an `answered_by` entry. With the `message` policy the assistant
    # starts muted (Vapi `mute-assistant`, and what it sends anyway is held here), so a machine
    # never records a greeting; the cost is that a human hears the greeting only once the
    # verdict is in (a few seconds of silence after they answer), held audio first. Human or
    # unknown (or policy `off`): unmuted. Fax, or a machine under `hangup`: ended as `machine`,
    # no goodbye.
    # `machine_start` under `message`: muted until `machine_end_*` (the beep), then the message is
    # said with `endCallAfterSpoken` and Vapi ends the call, which we record as `voicemail`.

    def _on_answered_by(self, a: AnsweredBy, now: float) -> None:
        policy = a.policy or self._amd_policy or AMD_OFF
        message = self._voicemail_message = a.message or self._voicemail_message
        self._amd_wait_until = None
        self._answered_by = a.value
        if self._voicemail:
            action = "none"  # the message is being left: a late or repeated verdict changes nothing
        elif a.value in ("human", "unknown") or policy == AMD_OFF:
            action = "unmute" if self._muted else "none"
        elif a.value == "fax" or policy == AMD_HANGUP or not message:
            action = "hangup"
        elif a.value == "machine_start":
            action = "wait"
        else:
            action = "voicemail"
        self._event("answered-by", value=a.value, policy=policy, action=action)
        self._update({"answered_by": a.value})  # a successor must not wait for it again
        if action == "unmute":
            self._unmute(now)
        elif action == "hangup":
            self._end_now(Ending("machine", ASSISTANT, detail=a.value, drain_s=0.0), now)
        elif action == "wait":
            self._mute(now)
            self._amd_wait_until = now + MESSAGE_END_WAIT_S
        elif action == "voicemail":
            self._leave_voicemail(message, now)

    def _amd_timeout(self, now: float) -> None:
        """No verdict in time (go on as `unknown`), or no message end after `machine_start`
        (leave the message anyway: the greeting is most likely over)."""
        if self._answered_by == "machine_start":
            self._event("amd-timeout", waited="message-end")
            message = self._voicemail_message
            if message:
                self._leave_voicemail(message, now)
            else:
                self._end_now(Ending("machine", ASSISTANT, detail="machine_start", drain_s=0.0), now)
        else:
            self._event("amd-timeout", waited="verdict")
            self._unmute(now)

    def _leave_voicemail(self, message: str, now: float) -> None:
        """Say the message over whatever the assistant was saying, then let Vapi end the call.
        The say goes before the unmute, so a Vapi that held its greeting never plays it on; what
        was held here is dropped, and so is audio Vapi still sends until the message starts
        (its `speech-update` assistant started)."""
        self._voicemail = True
        self._voicemail_until = now + VOICEMAIL_MAX_S
        self._send_text(V.say(message, end_call_after=True, interrupt_assistant=True))
        self._discard_held(now)
        self._stale_until = now + STALE_AFTER_BARGE_IN_S
        self._unmute(now)

    def _mute(self, now: float) -> None:
        """Nothing of the assistant reaches the line: Vapi is told, and what it sends anyway is
        held here (taken back from Twilio's buffer if it was already playing)."""
        if not self._muted:
            self._muted = True
            if self.playout.active(now) and not self.playout.paused:
                self.playout.pause(now)
                self._write(WriteOut(S.OUT_CLEAR))
        if not self._vapi_muted and self.vapi_up:
            self._out.append(SendVapiText(V.MUTE_ASSISTANT))
            self._vapi_muted = True

    def _unmute(self, now: float) -> None:
        """The assistant may be heard again; what was held plays first."""
        if self._vapi_muted:
            self._send_text(V.UNMUTE_ASSISTANT)
            self._vapi_muted = False
        if not self._muted:
            return
        self._muted = False
        self._amd_wait_until = None
        if self.playout.paused and not (self.fast is not None and self.fast.holding):
            self.playout.resume(now)
        self._emit_due(now)

    def _discard_held(self, now: float) -> None:
        """Drop the assistant audio queued here (and in Twilio's buffer: `clear`)."""
        if not self.playout.active(now) and not self.playout.paused:
            return
        in_twilio = self.playout.play_end > now
        self.playout.interrupt(now)
        self._downlink.reset()
        if in_twilio:
            self._write(WriteOut(S.OUT_CLEAR))

    def _send_keypad(self, entry: str) -> None:
        self._event("keypad-entry", digits=entry)
        if self.vapi_up:
            self._out.append(SendVapiText(V.keypad_entry(entry)))

    def _tool_calls(self, msg: V.ToolCalls, now: float) -> None:
        for call in msg.calls:
            if (target := V.transfer_target(call)) and self._transfer(target, now):
                break

    def _transfer(self, target: str, now: float, *, api: bool = False) -> bool:
        """A transfer the assistant (or the call API) asked for: refused unless TRANSFER_ALLOW
        lets the target in (the call goes on), else the call ends with `transfer_to`, which
        `<Connect action>` turns into `<Dial>`."""
        if not transfer_allowed(self.cfg.transfer_allow, target):
            self._out.append(Metric("dropped", "transfer_refused"))
            log.warning("transfer refused: target not in TRANSFER_ALLOW",
                        extra={"target": mask_number(target)})
            self._event("transfer-refused", target=target[:64])
            return False
        self._event("transfer-requested", target=target)
        if api:
            self._end_now(Ending("transfer", ASSISTANT, transfer_to=target, drain_s=API_DRAIN_S), now)
        else:
            self._end(Ending("transfer", ASSISTANT, transfer_to=target), now)
        return True

    # Barge-in: three policies on one pacer.

    def _hold(self, now: float) -> None:
        """Vapi heard the caller start talking over the assistant. Whether that interrupts is
        Vapi's call (its stopSpeakingPlan; a backchannel does not), so stop the audio at once but
        only hold it: `user-interrupted` drops it, silence from Vapi plays it on."""
        if not self.playout.active(now) or self.playout.paused or self._muted or self._voicemail:
            return  # nothing playing, or nothing to hold for (a voicemail message plays whole)
        self.playout.pause(now)
        self._write(WriteOut(S.OUT_CLEAR))
        self._event("hold", turn=self.playout.turn)
        self._hold_until = now + self.cfg.interrupt_confirm_s

    def _release_hold(self, now: float) -> None:
        if self.playout.paused and not (self.fast is not None and self.fast.holding):
            self.playout.resume(now)
            self._event("hold-released", turn=self.playout.turn)

    def _barge_in(self, source: str, now: float) -> None:
        """The caller talks over the assistant: drop what is unsent and flush Twilio's buffer;
        audio Vapi still had in flight for the cut turn is dropped until the next turn starts."""
        if self.fast is not None:
            self.fast.confirmed()
        self._hold_until = None
        if not self.playout.active(now) and not self.playout.paused:
            return
        turn = self.playout.turn
        already_cleared = self.playout.paused  # a hold sent `clear` and nothing since
        dropped_ms = self.playout.interrupt(now)
        self._stale_until = now + STALE_AFTER_BARGE_IN_S
        self._downlink.reset()
        if not already_cleared:
            self._write(WriteOut(S.OUT_CLEAR))
        self._out.append(Metric("barge_in"))
        rec = self.playout.turns.get(turn)
        self.barge_ins += 1
        self._update({"barge_ins": str(self.barge_ins)})
        self._event("barge-in", source=source, turn=turn, dropped_ms=dropped_ms,
                    sent_ms=rec.sent_ms if rec else 0, heard_ms=rec.heard_ms if rec else 0,
                    count=self.barge_ins)

    def _fast(self, action: Action | None, now: float) -> None:
        """Local voice detector: hold the assistant's audio the moment the caller talks over it,
        give it back if Vapi does not confirm an interruption in time."""
        if action is Action.PAUSE:
            self.playout.pause(now)
            self._write(WriteOut(S.OUT_CLEAR))
            self._out.append(Metric("fast_barge_in", "pause"))
            self._event("fast-pause", turn=self.playout.turn)
        elif action is Action.RESUME:
            self.playout.resume(now)
            self._out.append(Metric("fast_barge_in", "resume"))
            self._event("fast-resume", turn=self.playout.turn)

    # Endings: every way a call ends funnels into _end(), so each is handled once.

    def _end(self, ending: Ending, now: float) -> None:
        if self.ending is not None or self.phase is Phase.DONE:
            return
        self.ending = ending
        self._amd_wait_until = self._voicemail_until = None
        if self._muted and ending.side == ASSISTANT:  # held for a verdict: meant for nobody now
            self._discard_held(now)
        if ending.side == CALLER:  # Twilio's side is gone: tell Vapi, nothing to play out
            self._close_vapi()
            self._complete()
        elif self.phase is Phase.CONNECTED:  # let the caller hear the assistant's last words
            self.phase = Phase.DRAINING
            queued = self.playout.queued_s(now)
            if ending.drain_s is None:
                self._drain_until = now + queued + DRAIN_MARGIN_S
            else:
                self._drain_until = now + min(queued, ending.drain_s)
        else:
            self._finish(now)

    def _end_now(self, ending: Ending, now: float) -> None:
        """An ending nobody on the call asked for (the call API, a machine): Vapi is told at once
        so it says nothing more; at most `drain_s` of what is queued still plays."""
        self._end(ending, now)
        if self.ending is ending and self.phase is not Phase.DONE:
            self._close_vapi()

    def _finish(self, now: float) -> None:
        """Record the end, ask the gateway to close the stream; REST if no gateway will."""
        e = self.ending
        assert e is not None
        self.phase = Phase.HANGING_UP
        fields = {"status": S.STATUS_ENDED, "end_reason": e.reason,
                  "ended_at": str(now + self._wall_offset)}
        if e.say:
            fields["say"] = e.say
        if e.transfer_to:
            fields["transfer_to"] = e.transfer_to
        self._update(fields)
        self._write(WriteOut(S.OUT_HANGUP))
        self._close_vapi()
        if self._seen_start and not self.stream_live:
            self._rest_hangup()  # the socket is gone: only REST can end the call
        else:  # a live socket (or one about to connect, which the gateway will refuse)
            self._grace_until = now + self.cfg.hangup_grace_s

    def _rest_hangup(self) -> None:
        self.phase = Phase.REST
        self._out.append(RestHangup())

    def _close_vapi(self) -> None:
        if not self._vapi_closed_by_us:
            self._vapi_closed_by_us = True
            self.vapi_up = False
            self._backlog.clear()
            self._out.append(CloseVapi(send_end=True))

    def _complete(self) -> None:
        self.phase = Phase.DONE
        self._record_turns()
        e = self.ending
        if e is not None:
            self._event("call-ended", reason=e.reason, side=e.side, detail=e.detail[:300])
            self._update({"status": S.STATUS_ENDED, "end_reason": e.reason})
        self._out.append(Done(completed=True))

    def _record_turns(self) -> None:
        turns = [{"turn": t, "sent_ms": r.sent_ms, "heard_ms": r.heard_ms, "interrupted": r.interrupted}
                 for t, r in sorted(self.playout.turns.items())]
        if turns:
            self._event("assistant-turns", turns=turns)
