"""Twilio Media Streams wire messages: parse what Twilio sends, build what we send.

Pure functions and dataclasses, no I/O, so every rule of the protocol is testable without a
socket. Twilio sends JSON text frames with string counters (`sequenceNumber`, `chunk`,
`timestamp`); we parse with orjson and build outbound `media` with a string template, which is
~10x cheaper than a dict round trip on the hot path (docs/performance.md, "JSON and base64").
What we rely on from Twilio, and how sure we are of it: docs/protocols.md, "Twilio Media Streams".
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson


class ProtocolError(ValueError):
    """A message that is not a valid Media Streams message; `cause` is a bounded metric label and
    `event` the message's event name when it had one (so the gateway can tell a bad `start`)."""

    def __init__(self, cause: str, detail: str = "", event: str = "") -> None:
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.cause = cause
        self.event = event


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    custom_parameters: dict[str, str]
    media_format: dict[str, Any]
    sequence: int


@dataclass(slots=True)  # not frozen: built for every 20 ms frame (0.58 -> 0.24 µs); never changed
class Media:
    payload: bytes
    chunk: int
    timestamp_ms: int
    sequence: int


@dataclass(frozen=True, slots=True)
class Dtmf:
    digit: str
    sequence: int


@dataclass(frozen=True, slots=True)
class Mark:
    name: str
    sequence: int


@dataclass(frozen=True, slots=True)
class Stop:
    call_sid: str
    sequence: int


@dataclass(frozen=True, slots=True)
class Unknown:
    event: str
    raw: dict[str, Any] = field(repr=False)


TwilioEvent = Connected | Start | Media | Dtmf | Mark | Stop | Unknown

# Every field is untrusted: each parsed field has its declared type and a bounded size, or the
# message is refused with a ProtocolError. Twilio's own values are far inside these bounds.
_DTMF_DIGITS = frozenset("0123456789*#ABCD")
MAX_SID = 64  # CallSid / StreamSid / AccountSid are 34 characters
MAX_WORD = 64  # protocol, version, event names
MAX_MARK = 256  # we name marks `{epoch}.{turn}:{ms}`; Twilio echoes them
MAX_PARAMS = 32  # <Parameter>s per stream; name + value under 500 characters each (Twilio's rule)
MAX_PARAM = 500
MAX_COUNTER = 12  # digits of sequenceNumber / chunk / timestamp
MAX_PAYLOAD = 32 * 1024  # base64 characters (~3 s of audio; Twilio sends 20 ms)


def _int(value: Any, name: str) -> int:
    """Twilio sends counters as strings of digits; accept those and plain non-negative ints."""
    if type(value) is int and 0 <= value < 10**MAX_COUNTER:
        return value
    if isinstance(value, str) and 0 < len(value) <= MAX_COUNTER and value.isascii() and value.isdigit():
        return int(value)
    raise ProtocolError("bad_field", f"{name} is not a counter")


def _obj(msg: dict[str, Any], key: str) -> dict[str, Any]:
    value = msg.get(key, _ABSENT)
    if value is _ABSENT:
        raise ProtocolError("missing_field", key)
    if not isinstance(value, dict):
        raise ProtocolError("bad_field", f"{key} is not an object")
    return value


def _str(obj: dict[str, Any], key: str, limit: int, default: str | None = None) -> str:
    """A required string (or `default` when absent), non-empty when required, bounded."""
    value = obj.get(key, _ABSENT)
    if value is _ABSENT and default is not None:
        return default
    if value is _ABSENT:
        raise ProtocolError("missing_field", key)
    if not isinstance(value, str) or len(value) > limit or (default is None and not value):
        raise ProtocolError("bad_field", key)
    return value


_ABSENT: Any = object()


def _seq(msg: dict[str, Any]) -> int:
    return _int(msg.get("sequenceNumber", 0), "sequenceNumber")


def _media(msg: dict[str, Any]) -> Media:
    media = _obj(msg, "media")
    track = media.get("track", "inbound")
    if not isinstance(track, str):
        raise ProtocolError("bad_field", "media.track")
    if track != "inbound":  # what Twilio plays to the caller is not the caller speaking
        raise ProtocolError("not_inbound")
    encoded = media.get("payload", _ABSENT)
    if encoded is _ABSENT:
        raise ProtocolError("missing_field", "media.payload")
    if not isinstance(encoded, str) or len(encoded) > MAX_PAYLOAD:
        raise ProtocolError("bad_field", "media.payload")
    try:
        payload = binascii.a2b_base64(encoded, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("bad_base64") from None
    return Media(payload=payload, chunk=_int(media.get("chunk", 0), "chunk"),
                 timestamp_ms=_int(media.get("timestamp", 0), "timestamp"), sequence=_seq(msg))


def _start(msg: dict[str, Any]) -> Start:
    start = _obj(msg, "start")
    stream_sid = msg["streamSid"] if "streamSid" in msg else start.get("streamSid", _ABSENT)
    if stream_sid is _ABSENT:
        raise ProtocolError("missing_field", "streamSid")
    if not isinstance(stream_sid, str) or not stream_sid or len(stream_sid) > MAX_SID:
        raise ProtocolError("bad_field", "streamSid")
    params = start.get("customParameters", {})
    if (not isinstance(params, dict) or len(params) > MAX_PARAMS
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) + len(v) < MAX_PARAM
                       for k, v in params.items())):
        raise ProtocolError("bad_field", "customParameters")
    media_format = start.get("mediaFormat", {})
    if not isinstance(media_format, dict):
        raise ProtocolError("bad_field", "mediaFormat")
    return Start(stream_sid=stream_sid, call_sid=_str(start, "callSid", MAX_SID),
                 account_sid=_str(start, "accountSid", MAX_SID, default=""),
                 custom_parameters=dict(params), media_format=media_format, sequence=_seq(msg))


def _mark(msg: dict[str, Any]) -> Mark:
    return Mark(name=_str(_obj(msg, "mark"), "name", MAX_MARK), sequence=_seq(msg))


def _dtmf(msg: dict[str, Any]) -> Dtmf:
    digit = _str(_obj(msg, "dtmf"), "digit", 1)
    if digit not in _DTMF_DIGITS:
        raise ProtocolError("bad_field", "dtmf.digit")
    return Dtmf(digit=digit, sequence=_seq(msg))


def _stop(msg: dict[str, Any]) -> Stop:
    stop = _obj(msg, "stop") if "stop" in msg else {}
    return Stop(call_sid=_str(stop, "callSid", MAX_SID, default=""), sequence=_seq(msg))


def _connected(msg: dict[str, Any]) -> Connected:
    return Connected(protocol=_str(msg, "protocol", MAX_WORD, default=""),
                     version=_str(msg, "version", MAX_WORD, default=""))


_PARSERS: dict[str, Callable[[dict[str, Any]], TwilioEvent]] = {
    "media": _media, "start": _start, "mark": _mark, "dtmf": _dtmf, "stop": _stop,
    "connected": _connected,
}


def parse(text: str | bytes) -> TwilioEvent:
    """Parse one text frame from Twilio. Raises ProtocolError with a bounded `cause`, and no
    other exception whatever the frame holds."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError("not_json") from None
    if not isinstance(msg, dict):
        raise ProtocolError("not_object")
    event = msg.get("event")
    if not isinstance(event, str) or not event or len(event) > MAX_WORD:
        raise ProtocolError("no_event")
    parser = _PARSERS.get(event)
    if parser is None:
        return Unknown(event=event, raw=msg)
    try:
        return parser(msg)
    except ProtocolError as exc:
        exc.event = event
        raise


# Outbound ------------------------------------------------------------------------------------


def _sid(stream_sid: str) -> str:
    # Stream SIDs are opaque ASCII tokens from Twilio; orjson guarantees correct escaping.
    return orjson.dumps(stream_sid).decode()


class Outbound:
    """Builds the three messages we send on one stream; the streamSid is fixed per socket."""

    __slots__ = ("_clear", "_mark_prefix", "_media_prefix")

    def __init__(self, stream_sid: str) -> None:
        sid = _sid(stream_sid)
        self._media_prefix = f'{{"event":"media","streamSid":{sid},"media":{{"payload":"'
        self._mark_prefix = f'{{"event":"mark","streamSid":{sid},"mark":{{"name":'
        self._clear = f'{{"event":"clear","streamSid":{sid}}}'

    def media(self, ulaw: bytes) -> str:
        return self._media_prefix + binascii.b2a_base64(ulaw, newline=False).decode("ascii") + '"}}'

    def mark(self, name: str) -> str:
        return self._mark_prefix + orjson.dumps(name).decode() + "}}"

    def clear(self) -> str:
        return self._clear
