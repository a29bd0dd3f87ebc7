"""Twilio Media Streams message parsing and building, without sockets."""

from __future__ import annotations

import base64

import orjson
import pytest

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
