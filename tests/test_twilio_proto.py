"""Twilio Media Streams message parsing and building, without sockets."""

from __future__ import annotations

import base64
import dataclasses
import typing
from typing import Any

import orjson
import pytest

from shared import twilio_proto
from shared.twilio_proto import (
    Connected,
    Dtmf,
    Mark,
    Media,
    Outbound,
    ProtocolError,
    Start,
    Stop,
    Unknown,
    parse,
)

# Every cause parse() may report: they become metric labels, so the set is closed.
CAUSES = {"not_json", "not_object", "no_event", "bad_base64", "missing_field", "bad_field", "not_inbound"}

START = {
    "event": "start",
    "sequenceNumber": "1",
    "start": {
        "accountSid": "AC123",
        "streamSid": "MZabc",
        "callSid": "CA" + "0" * 32,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"token": "t0k", "FirstName": "Jane"},
    },
    "streamSid": "MZabc",
}


def test_connected_and_start() -> None:
    assert parse('{"event":"connected","protocol":"Call","version":"1.0.0"}') == Connected("Call", "1.0.0")
    start = parse(orjson.dumps(START))
    assert isinstance(start, Start)
    assert start.stream_sid == "MZabc"
    assert start.call_sid == "CA" + "0" * 32
    assert start.custom_parameters == {"token": "t0k", "FirstName": "Jane"}
    assert start.media_format["sampleRate"] == 8000
    assert start.sequence == 1


def test_media_with_string_counters() -> None:
    payload = bytes(range(160))
    msg = {
        "event": "media",
        "sequenceNumber": "4",
        "media": {"track": "inbound", "chunk": "2", "timestamp": "5",
                  "payload": base64.b64encode(payload).decode()},
        "streamSid": "MZabc",
    }
    media = parse(orjson.dumps(msg).decode())
    assert media == Media(payload=payload, chunk=2, timestamp_ms=5, sequence=4)


def test_dtmf_mark_stop() -> None:
    assert parse('{"event":"dtmf","streamSid":"MZ","sequenceNumber":"5",'
                 '"dtmf":{"track":"inbound_track","digit":"#"}}') == Dtmf("#", 5)
    assert parse('{"event":"mark","sequenceNumber":"7","streamSid":"MZ","mark":{"name":"3:400"}}') == Mark(
        "3:400", 7)
    stop = parse('{"event":"stop","sequenceNumber":"9","stop":{"accountSid":"AC","callSid":"CA1"},'
                 '"streamSid":"MZ"}')
    assert stop == Stop("CA1", 9)


def test_unknown_event_is_kept_not_raised() -> None:
    ev = parse('{"event":"future-thing","x":1}')
    assert isinstance(ev, Unknown) and ev.event == "future-thing"


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("not json at all", "not_json"),
        ("[1,2,3]", "not_object"),
        ('{"no":"event"}', "no_event"),
        ('{"event":"media","media":{"payload":"@@@not base64@@@"}}', "bad_base64"),
        ('{"event":"media","media":{"payload":"AAA"}}', "bad_base64"),  # wrong padding
        ('{"event":"media"}', "missing_field"),
        ('{"event":"mark","mark":{}}', "missing_field"),
        ('{"event":"dtmf","dtmf":{"digit":"x"}}', "bad_field"),
        ('{"event":"media","sequenceNumber":"abc","media":{"payload":""}}', "bad_field"),
        ('{"event":"start","start":{}}', "missing_field"),
    ],
)
def test_malformed_messages_have_bounded_causes(text: str, cause: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(text)
    assert info.value.cause == cause


def test_outbound_messages_are_valid_twilio_json() -> None:
    out = Outbound('MZ"odd\\sid')  # escaping must hold even for odd SIDs
    frame = bytes([0xFF]) * 160
    media = orjson.loads(out.media(frame))
    assert media == {"event": "media", "streamSid": 'MZ"odd\\sid',
                     "media": {"payload": base64.b64encode(frame).decode()}}
    assert orjson.loads(out.mark("2:300")) == {"event": "mark", "streamSid": 'MZ"odd\\sid',
                                               "mark": {"name": "2:300"}}
    assert orjson.loads(out.clear()) == {"event": "clear", "streamSid": 'MZ"odd\\sid'}


# Untrusted fields ----------------------------------------------------------------------------

HUGE = "9" * 100_000
WRONG: list[Any] = [0, 7, -1, 1.5, True, None, {}, {"a": "b"}, [], ["x"], "", HUGE]
GOOD_MEDIA: dict[str, Any] = {"event": "media", "sequenceNumber": "4", "streamSid": "MZabc",
              "media": {"track": "inbound", "chunk": "2", "timestamp": "5", "payload": "AAAA"}}
GOOD: dict[str, dict[str, Any]] = {
    "connected": {"event": "connected", "protocol": "Call", "version": "1.0.0"},
    "start": START,
    "media": GOOD_MEDIA,
    "mark": {"event": "mark", "sequenceNumber": "7", "streamSid": "MZ", "mark": {"name": "3:400"}},
    "dtmf": {"event": "dtmf", "sequenceNumber": "5", "dtmf": {"track": "inbound_track", "digit": "#"}},
    "stop": {"event": "stop", "sequenceNumber": "9", "stop": {"accountSid": "AC", "callSid": "CA1"}},
}


def _paths(obj: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in obj.items():
        out.append((*prefix, key))
        if isinstance(value, dict):
            out.extend(_paths(value, (*prefix, key)))
    return out


def _replaced(obj: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    copy = dict(obj)
    if len(path) == 1:
        if value is _MISSING:
            copy.pop(path[0])
        else:
            copy[path[0]] = value
    else:
        copy[path[0]] = _replaced(obj[path[0]], path[1:], value)
    return copy


_MISSING = object()


def _cases() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for kind, good in GOOD.items():
        for path in _paths(good):
            if path == ("event",):
                continue
            for bad in [*WRONG, _MISSING]:
                label = "missing" if bad is _MISSING else repr(bad)[:10]
                out.append((f"{kind}:{'.'.join(path)}={label}", _replaced(good, path, bad)))
    return out


def _typed(ev: Any) -> bool:
    """Every field has its declared type exactly (bool is not an int), strings are bounded."""
    hints = typing.get_type_hints(type(ev), globalns=vars(twilio_proto))
    for f in dataclasses.fields(ev):
        value, hint = getattr(ev, f.name), hints[f.name]
        origin = typing.get_origin(hint) or hint
        if type(value) is not origin:
            return False
        if isinstance(value, str | bytes) and len(value) > 4096:
            return False
        if origin is dict and f.name == "custom_parameters":
            if not all(type(k) is str and type(v) is str for k, v in value.items()):
                return False
    return True


@pytest.mark.parametrize(("name", "msg"), _cases(), ids=[n for n, _m in _cases()])
def test_every_field_is_untrusted(name: str, msg: dict[str, Any]) -> None:
    """Each field of each event replaced by a number, an object, null, a list, an empty or huge
    string, or left out: parse() raises ProtocolError with a bounded cause, or returns an event
    whose fields have their declared types and bounded sizes. Never another exception."""
    try:
        ev = parse(orjson.dumps(msg))
    except ProtocolError as exc:
        assert exc.cause in CAUSES, exc.cause
        return
    assert _typed(ev), ev


def test_only_the_inbound_track_is_audio_from_the_caller() -> None:
    outbound = {**GOOD_MEDIA, "media": {**GOOD_MEDIA["media"], "track": "outbound"}}
    with pytest.raises(ProtocolError) as info:
        parse(orjson.dumps(outbound))
    assert info.value.cause == "not_inbound"
    assert isinstance(parse(orjson.dumps(GOOD_MEDIA)), Media)
    no_track = {**GOOD_MEDIA, "media": {k: v for k, v in GOOD_MEDIA["media"].items() if k != "track"}}
    assert isinstance(parse(orjson.dumps(no_track)), Media)  # only bidirectional streams reach us


def test_a_start_that_is_not_an_object_is_a_protocol_error_naming_the_event() -> None:
    start: Any
    for start in ("x", 1, None, [], True):
        with pytest.raises(ProtocolError) as info:
            parse(orjson.dumps({"event": "start", "start": start}))
        assert info.value.event == "start"
