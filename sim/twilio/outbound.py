"""Outbound calls as Twilio places them, as pure functions: the create request, the callee at
the other end, what answering machine detection (AMD) decides and when, and the parameters of
the status and AMD callbacks. No sockets, no tasks (the lifecycle that uses them: dialer.py).

Docs: docs/protocols.md, section "Twilio Media Streams", "Outbound calls and answering machine
detection".
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Literal
from urllib.parse import urlsplit

import numpy as np

from sim import voices

from .recording import pcm16_to_ulaw
from .wire import SAMPLE_RATE, call_params, resolve_url

# --- Twilio's error codes for POST /Calls.json --------------------------------------------

ERR_CALLS = 21200  # the Calls resource's catch-all (bad method values, bad parameters)
ERR_NO_TO = 21201
ERR_URL = 21205
ERR_FROM_NOT_VERIFIED = 21210
ERR_INVALID_TO = 21211
ERR_NO_FROM = 21213
ERR_STATUS_CALLBACK_EVENT = 21626

STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
MACHINE_DETECTION_MODES = ("Enable", "DetectMessageEnd")
ANSWERED_BY = (
    "human",
    "machine_start",
    "machine_end_beep",
    "machine_end_silence",
    "machine_end_other",
    "fax",
    "unknown",
)
#: Final call statuses; anything else is a live one.
FINAL_STATUSES = ("completed", "busy", "no-answer", "failed", "canceled")

_E164 = re.compile(r"\+[1-9][0-9]{1,14}")


class CreateCallError(ValueError):
    """A create request Twilio refuses: HTTP `status` with Twilio error `code`."""

    def __init__(self, code: int, message: str, status: int = 400) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class CreateCall:
    """A validated `POST /Calls.json` (form names in comments; unknown parameters are ignored)."""

    to: str  # To
    from_: str  # From
    url: str | None  # Url
    method: str  # Method (GET/POST, default POST)
    twiml: str | None  # Twiml
    status_callback: str | None  # StatusCallback
    status_callback_method: str  # StatusCallbackMethod
    status_callback_events: tuple[str, ...]  # StatusCallbackEvent (repeated); default completed
    machine_detection: str | None  # MachineDetection: Enable | DetectMessageEnd
    async_amd: bool  # AsyncAmd
    async_amd_status_callback: str | None  # AsyncAmdStatusCallback
    async_amd_status_callback_method: str  # AsyncAmdStatusCallbackMethod
    timeout_s: int  # Timeout (ring time, default 60, at most 600)
    amd_timeout_s: float  # MachineDetectionTimeout (s, default 30)
    speech_threshold_s: float  # MachineDetectionSpeechThreshold (ms, default 2400)
    speech_end_threshold_s: float  # MachineDetectionSpeechEndThreshold (ms, default 1200)
    silence_timeout_s: float  # MachineDetectionSilenceTimeout (ms, default 5000)
    params: tuple[tuple[str, str], ...] = ()  # every form field, in order, as sent

    def wants(self, event: str) -> bool:
        """Whether the status callback wants `event` (initiated/ringing/answered/completed)."""
        return self.status_callback is not None and event in self.status_callback_events


def valid_to(number: str, invalid: Iterable[str] = ()) -> bool:
    """`To` is E.164 (`+` and up to 15 digits), a `sip:` address or a `client:` identifier, and
    not one of the numbers the test declared invalid."""
    if number in set(invalid):
        return False
    if number.startswith(("sip:", "client:")):
        return len(number.partition(":")[2]) > 0
    return _E164.fullmatch(number) is not None


def _absolute_http(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _method(form: dict[str, str], name: str) -> str:
    value = form.get(name, "POST").upper() or "POST"
    if value not in ("GET", "POST"):
        raise CreateCallError(ERR_CALLS, f"{name} must be GET or POST, not {form[name]!r}")
    return value


def _number(form: dict[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = form.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise CreateCallError(ERR_CALLS, f"{name} must be a number, not {raw!r}") from None
    if not math.isfinite(value):
        raise CreateCallError(ERR_CALLS, f"{name} must be a number, not {raw!r}")
    return min(max(value, lo), hi)  # out of range: clamped to the documented range


def parse_create_call(
    pairs: Iterable[tuple[str, str]],
    *,
    invalid_numbers: Iterable[str] = (),
    verified_caller_ids: Iterable[str] | None = None,
    reject_url_with_twiml: bool = True,
) -> CreateCall:
    """Validate a create request (form fields in order; `StatusCallbackEvent` may repeat) the way
    Twilio answers it. Raises CreateCallError.

    `reject_url_with_twiml`: both `Url` and `Twiml` is refused (21205); False follows the
    library's create docstring instead ("If both twiml and url are provided then twiml parameter
    will be ignored").
    """
    items = [(k, v) for k, v in pairs]
    form: dict[str, str] = {}
    for k, v in items:
        form.setdefault(k, v)  # first value of a repeated single-valued field
    to = form.get("To", "").strip()
    from_ = form.get("From", "").strip()
    if not to:
        raise CreateCallError(ERR_NO_TO, "A 'To' phone number is required.")
    if not from_:
        raise CreateCallError(ERR_NO_FROM, "A 'From' phone number is required.")
    if not valid_to(to, invalid_numbers):
        raise CreateCallError(ERR_INVALID_TO, f"The 'To' number {to} is not a valid phone number.")
    if verified_caller_ids is not None and from_ not in set(verified_caller_ids):
        raise CreateCallError(
            ERR_FROM_NOT_VERIFIED,
            f"The source phone number provided, {from_}, is not yet verified for your account.",
        )
    url = form.get("Url") or None
    twiml = form.get("Twiml") or None
    if url is None and twiml is None:
        raise CreateCallError(ERR_URL, "Url parameter is required.")
    if url is not None and twiml is not None:
        if reject_url_with_twiml:
            raise CreateCallError(ERR_URL, "Twiml and Url are mutually exclusive")
        twiml = None
    if url is not None and not _absolute_http(url):
        raise CreateCallError(ERR_URL, f"Url is not a valid URL: {url}")
    status_callback = form.get("StatusCallback") or None
    if status_callback is not None and not _absolute_http(status_callback):
        raise CreateCallError(ERR_CALLS, f"StatusCallback is not a valid URL: {status_callback}")
    events: list[str] = []
    for k, v in items:
        if k != "StatusCallbackEvent":
            continue
        for event in v.split():  # one per field; space-separated values are accepted too
            if event not in STATUS_EVENTS:
                raise CreateCallError(ERR_STATUS_CALLBACK_EVENT, f"Invalid 'StatusCallbackEvent': {event}")
            if event not in events:
                events.append(event)
    machine_detection = form.get("MachineDetection") or None
    if machine_detection is not None and machine_detection not in MACHINE_DETECTION_MODES:
        raise CreateCallError(
            ERR_CALLS, f"MachineDetection must be Enable or DetectMessageEnd, not {machine_detection!r}"
        )
    if form.get("SendDigits"):
        machine_detection = None  # "If both SendDigits and MachineDetection ...: ignored"
    async_raw = form.get("AsyncAmd", "false").lower() or "false"
    if async_raw not in ("true", "false"):
        raise CreateCallError(ERR_CALLS, f"AsyncAmd must be true or false, not {form['AsyncAmd']!r}")
    amd_callback = form.get("AsyncAmdStatusCallback") or None
    if amd_callback is not None and url is not None:
        amd_callback = resolve_url(amd_callback, url)  # "Absolute or relative URL"
    return CreateCall(
        to=to,
        from_=from_,
        url=url,
        method=_method(form, "Method"),
        twiml=twiml,
        status_callback=status_callback,
        status_callback_method=_method(form, "StatusCallbackMethod"),
        status_callback_events=tuple(events) or ("completed",),
        machine_detection=machine_detection,
        async_amd=async_raw == "true",
        async_amd_status_callback=amd_callback,
        async_amd_status_callback_method=_method(form, "AsyncAmdStatusCallbackMethod"),
        timeout_s=int(_number(form, "Timeout", 60, 1, 600)),
        amd_timeout_s=_number(form, "MachineDetectionTimeout", 30, 3, 59),
        speech_threshold_s=_number(form, "MachineDetectionSpeechThreshold", 2400, 1000, 6000) / 1000,
        speech_end_threshold_s=_number(form, "MachineDetectionSpeechEndThreshold", 1200, 500, 5000)
        / 1000,
        silence_timeout_s=_number(form, "MachineDetectionSilenceTimeout", 5000, 2000, 10000) / 1000,
        params=tuple(items),
    )


# --- the callee ------------------------------------------------------------------------------

CalleeKind = Literal["human", "machine", "fax", "silent", "busy", "no-answer", "failed"]
BEEP_HZ = 850.0  # between the `answer` tones (800/900 Hz): sim.voices.identify gives None


@dataclass(frozen=True)
class Callee:
    """Who answers a number the stand-in dials (`TwilioSim.callees[number]`).

    kind: "human" says `hello_s` of speech on answer, then listens; "machine" plays a
    `greeting_s` greeting, then (if `beep`) a `beep_s` beep at `BEEP_HZ`, then records;
    "fax" and "silent" answer and say nothing (AMD: `fax` / `unknown`); "busy", "no-answer" and
    "failed" never answer (final status of that name).
    ring_s: ringing before the answer (or before the busy signal). A ring longer than the
        request's `Timeout` is a no-answer.
    detect_s: when AMD decides, in seconds after the answer (None: from the request's tuning
        parameters, see `amd_decision`).
    hangup_after_s: the callee hangs up this long after answering (None: never).
    Audio is sim.voices tones: the hello is `caller:hello_index`, the greeting
    `caller:greeting_index`.
    """

    kind: CalleeKind = "human"
    ring_s: float = 0.2
    hello_s: float = 0.6
    greeting_s: float = 3.0
    beep: bool = True
    beep_s: float = 0.4
    detect_s: float | None = None
    hangup_after_s: float | None = None
    hello_index: int = 0
    greeting_index: int = 5

    @property
    def answers(self) -> bool:
        return self.kind in ("human", "machine", "fax", "silent")


@dataclass(frozen=True)
class CalleeScript:
    """What the callee sends from the moment it answers: μ-law 8 kHz audio (index = seconds
    after the answer × 8000), the beep's span and the end of its speech (seconds after the
    answer; None without a beep)."""

    audio: bytes = b""
    beep_start: float | None = None
    beep_end: float | None = None
    speech_end: float = 0.0


def _tone(freq: float, seconds: float) -> bytes:
    n = max(0, round(seconds * SAMPLE_RATE))
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    x = voices.AMPLITUDE * 32767.0 * np.sin(2.0 * math.pi * freq * t)
    fade = min(round(voices.FADE_S * SAMPLE_RATE), n // 2)
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(math.pi * np.arange(fade, dtype=np.float64) / fade)
        x[:fade] *= ramp
        x[n - fade :] *= ramp[::-1]
    return pcm16_to_ulaw(np.rint(x).astype("<i2").tobytes())


def callee_script(callee: Callee) -> CalleeScript:
    """The audio a callee sends after answering (see `Callee`)."""
    if callee.kind == "human" and callee.hello_s > 0:
        pcm = voices.utterance("caller", callee.hello_index, callee.hello_s, SAMPLE_RATE)
        audio = pcm16_to_ulaw(pcm)
        return CalleeScript(audio=audio, speech_end=len(audio) / SAMPLE_RATE)
    if callee.kind == "machine":
        pcm = voices.utterance("caller", callee.greeting_index, callee.greeting_s, SAMPLE_RATE)
        audio = pcm16_to_ulaw(pcm)
        speech_end = len(audio) / SAMPLE_RATE
        if not callee.beep:
            return CalleeScript(audio=audio, speech_end=speech_end)
        gap = b"\xff" * round(0.1 * SAMPLE_RATE)  # the pause before the beep
        beep = _tone(BEEP_HZ, callee.beep_s)
        start = (len(audio) + len(gap)) / SAMPLE_RATE
        return CalleeScript(
            audio=audio + gap + beep,
            beep_start=start,
            beep_end=start + len(beep) / SAMPLE_RATE,
            speech_end=speech_end,
        )
    return CalleeScript()


# --- answering machine detection -------------------------------------------------------------


@dataclass(frozen=True)
class AmdDecision:
    answered_by: str
    delay_s: float  # after the answer

    @property
    def duration_ms(self) -> int:
        """`MachineDetectionDuration`: milliseconds from the answer to the decision."""
        return round(self.delay_s * 1000)


def amd_decision(callee: Callee, req: CreateCall, script: CalleeScript) -> AmdDecision:
    """What AMD answers for `callee`, and when (seconds after the answer).

    The callee's kind decides the answer; the request's tuning parameters the timing:
    human → `human` at the end of its hello + MachineDetectionSpeechEndThreshold;
    machine with `Enable` → `machine_start` once its greeting has lasted
    MachineDetectionSpeechThreshold (or at its end, if shorter);
    machine with `DetectMessageEnd` → `machine_end_beep` at the end of the beep, or without a
    beep `machine_end_silence` at the end of the greeting + the end threshold;
    fax → `fax` after 1 s; silent → `unknown` after MachineDetectionSilenceTimeout.
    `Callee.detect_s` overrides the timing. A decision later than MachineDetectionTimeout is
    `unknown` at that timeout.
    """
    if callee.kind == "human":
        answer, delay = "human", script.speech_end + req.speech_end_threshold_s
        if script.speech_end == 0:
            answer, delay = "unknown", req.silence_timeout_s
    elif callee.kind == "machine":
        if req.machine_detection == "Enable":
            answer, delay = "machine_start", min(req.speech_threshold_s, script.speech_end)
        elif script.beep_end is not None:
            answer, delay = "machine_end_beep", script.beep_end
        else:
            answer, delay = "machine_end_silence", script.speech_end + req.speech_end_threshold_s
    elif callee.kind == "fax":
        answer, delay = "fax", 1.0
    else:
        answer, delay = "unknown", req.silence_timeout_s
    if callee.detect_s is not None:
        delay = callee.detect_s
    if delay > req.amd_timeout_s:
        return AmdDecision("unknown", req.amd_timeout_s)
    return AmdDecision(answer, max(0.0, delay))


# --- statuses and callbacks ------------------------------------------------------------------


def final_status(end_reason: str, answered: bool) -> str:
    """The call's final status for how it ended: the callee's busy / no-answer / failed, a
    cancel before the answer; otherwise completed if it was answered, canceled if not (an error
    before the answer: failed)."""
    if end_reason in ("busy", "no-answer", "failed", "canceled"):
        return end_reason
    if answered:
        return "completed"
    return "failed" if end_reason == "error" else "canceled"


def resource_status(status: str) -> str:
    """The call resource's `status` for a lifecycle status: `initiated` is a callback status
    only; the resource stays `queued` until the phone rings."""
    return "queued" if status == "initiated" else status


def rfc2822_now(ts: float) -> str:
    return formatdate(ts, usegmt=True)


@dataclass
class CallbackCounter:
    """`SequenceNumber` of a call's status callbacks: 0, 1, 2, ... in the order sent."""

    next: int = 0
    sent: list[str] = field(default_factory=list)

    def take(self, event: str) -> int:
        n = self.next
        self.next += 1
        self.sent.append(event)
        return n


def status_callback_params(
    *,
    account_sid: str,
    call_sid: str,
    req: CreateCall,
    call_status: str,
    sequence: int,
    timestamp: float,
    duration_s: int | None = None,
    answered_by: str | None = None,
) -> dict[str, str]:
    """A `StatusCallback` request: the standard voice parameters (Direction `outbound-api`) plus
    `CallbackSource` call-progress-events, `Timestamp` (RFC 2822), `SequenceNumber`, and on a
    final status `CallDuration` (and `Duration`, whole minutes); `AnsweredBy` once AMD knows."""
    params = call_params(
        account_sid=account_sid,
        call_sid=call_sid,
        from_=req.from_,
        to=req.to,
        status=call_status,
        direction="outbound-api",
    )
    params["CallbackSource"] = "call-progress-events"
    params["Timestamp"] = rfc2822_now(timestamp)
    params["SequenceNumber"] = str(sequence)
    if duration_s is not None:
        params["CallDuration"] = str(duration_s)
        params["Duration"] = str(math.ceil(duration_s / 60)) if duration_s else "0"
    if answered_by is not None:
        params["AnsweredBy"] = answered_by
    return params


def amd_callback_params(
    *, account_sid: str, call_sid: str, decision: AmdDecision
) -> dict[str, str]:
    """An `AsyncAmdStatusCallback` request."""
    return {
        "AccountSid": account_sid,
        "AnsweredBy": decision.answered_by,
        "CallSid": call_sid,
        "MachineDetectionDuration": str(decision.duration_ms),
    }
