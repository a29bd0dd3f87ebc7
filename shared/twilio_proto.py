"""Twilio Media Streams wire messages: parse what Twilio sends, build what we send.

Pure functions and dataclasses, no I/O, so every rule of the protocol is testable without a
socket. Twilio sends JSON text frames with string counters (`sequenceNumber`, `chunk`,
`timestamp`); we parse with orjson and build outbound `media` with a string template, which is
~10x cheaper than a dict round trip on the hot path (docs/performance.md, "JSON and base64").
What we rely on from Twilio, and how sure we are of it: docs/protocols.md, "Twilio Media Streams".
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from typing import Any

import orjson


class ProtocolError(ValueError):
    """A message that is not a valid Media Streams message; `cause` is a bounded metric label."""

    def __init__(self, cause: str, detail: str = "") -> None:
        super().__init__(f"{cause}: {detail}" if detail else cause)
        self.cause = cause


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


@dataclass(frozen=True, slots=True)
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

_DTMF_DIGITS = frozenset("0123456789*#ABCD")


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ProtocolError("bad_field", f"{name} is not a number") from None


def parse(text: str | bytes) -> TwilioEvent:
    """Parse one text frame from Twilio. Raises ProtocolError with a bounded `cause`."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError("not_json") from None
    if not isinstance(msg, dict):
        raise ProtocolError("not_object")
    event = msg.get("event")
    try:
        if event == "media":
            media = msg["media"]
            try:
                payload = binascii.a2b_base64(media["payload"], strict_mode=True)
            except (binascii.Error, TypeError, ValueError):
                raise ProtocolError("bad_base64") from None
            return Media(
                payload=payload,
                chunk=_int(media.get("chunk", 0), "chunk"),
                timestamp_ms=_int(media.get("timestamp", 0), "timestamp"),
                sequence=_int(msg.get("sequenceNumber", 0), "sequenceNumber"),
            )
        if event == "mark":
            name = msg["mark"]["name"]
            if not isinstance(name, str):
                raise ProtocolError("bad_field", "mark.name")
            return Mark(name=name, sequence=_int(msg.get("sequenceNumber", 0), "sequenceNumber"))
        if event == "dtmf":
            digit = msg["dtmf"]["digit"]
            if not isinstance(digit, str) or digit not in _DTMF_DIGITS:
                raise ProtocolError("bad_field", "dtmf.digit")
            return Dtmf(digit=digit, sequence=_int(msg.get("sequenceNumber", 0), "sequenceNumber"))
        if event == "start":
            start = msg["start"]
            params = start.get("customParameters") or {}
            if not isinstance(params, dict):
                raise ProtocolError("bad_field", "customParameters")
            return Start(
                stream_sid=str(msg.get("streamSid") or start["streamSid"]),
                call_sid=str(start["callSid"]),
                account_sid=str(start.get("accountSid", "")),
                custom_parameters={str(k): str(v) for k, v in params.items()},
                media_format=dict(start.get("mediaFormat") or {}),
                sequence=_int(msg.get("sequenceNumber", 0), "sequenceNumber"),
            )
        if event == "stop":
            stop = msg.get("stop") or {}
            return Stop(
                call_sid=str(stop.get("callSid", "")),
                sequence=_int(msg.get("sequenceNumber", 0), "sequenceNumber"),
            )
        if event == "connected":
            return Connected(protocol=str(msg.get("protocol", "")), version=str(msg.get("version", "")))
    except (KeyError, TypeError):
        raise ProtocolError("missing_field", str(event)) from None
    if not isinstance(event, str):
        raise ProtocolError("no_event")
    return Unknown(event=event, raw=msg)


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
