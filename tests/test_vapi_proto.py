"""Vapi transport messages: the create-call body and parsing of control messages."""

from __future__ import annotations

import orjson

from shared import vapi_proto as V


def test_create_call_body_shape() -> None:
    body = V.create_call_body(assistant_id="asst-1", audio_format="mulaw", sample_rate=8000,
                              call_sid="CA1", from_="+1555", to="+1666")
    assert body["assistantId"] == "asst-1"
    assert body["transport"] == {"provider": "vapi.websocket",
                                 "audioFormat": {"format": "mulaw", "container": "raw", "sampleRate": 8000}}
    over = body["assistantOverrides"]
    assert over["variableValues"]["callerNumber"] == "+1555"
    assert over["variableValues"]["twilioCallSid"] == "CA1"
    assert over["metadata"] == {"twilioCallSid": "CA1", "from": "+1555", "to": "+1666"}
    assert "user-interrupted" in over["clientMessages"]
    assert set(body) == {"assistantId", "assistantOverrides", "transport"}  # no unknown properties


def test_parse_control_messages() -> None:
    assert V.parse('{"type":"status-update","status":"ended","endedReason":"assistant-ended-call"}') == \
        V.StatusUpdate("ended", "assistant-ended-call")
    assert V.parse('{"type":"user-interrupted","turnId":"t1"}') == V.UserInterrupted("t1")
    assert V.parse('{"type":"speech-update","status":"started","role":"user","turn":2}') == \
        V.SpeechUpdate("user", "started", 2)
    tr = V.parse('{"type":"transcript","role":"user","transcriptType":"final","transcript":"hi"}')
    assert tr == V.Transcript("user", True, "hi")
    tr2 = V.parse('{"type":"transcript[transcriptType=\\"final\\"]","role":"user","transcript":"x"}')
    assert isinstance(tr2, V.Transcript) and tr2.final
    other = V.parse('{"type":"hang"}')
    assert isinstance(other, V.Other) and other.type == "hang"


def test_tool_call_argument_encodings_and_transfer_target() -> None:
    spec = {"type": "tool-calls", "toolCallList": [
        {"id": "c1", "type": "function",
         "function": {"name": "transferCall", "arguments": '{"destination":"+14155550100"}'}}]}
    msg = V.parse(orjson.dumps(spec))
    assert isinstance(msg, V.ToolCalls)
    assert V.transfer_target(msg.calls[0]) == "+14155550100"
    events_style = {"type": "tool-calls", "toolCallList": [
        {"id": "c2", "name": "transfer_call", "parameters": {"destination": {"type": "sip",
                                                                              "sipUri": "sip:a@b"}}}]}
    msg2 = V.parse(orjson.dumps(events_style))
    assert isinstance(msg2, V.ToolCalls) and V.transfer_target(msg2.calls[0]) == "sip:a@b"
    not_transfer = V.ToolCall("c3", "lookupOrder", {"destination": "+1"})
    assert V.transfer_target(not_transfer) is None
    bad_args = V.parse(orjson.dumps({"type": "tool-calls", "toolCallList": [
        {"id": "c4", "function": {"name": "transferCall", "arguments": "{not json"}}]}))
    assert isinstance(bad_args, V.ToolCalls) and V.transfer_target(bad_args.calls[0]) is None


def test_keypad_entry_matches_vapi_text() -> None:
    msg = orjson.loads(V.keypad_entry("1234#"))
    assert msg["type"] == "add-message"
    assert msg["message"] == {"role": "user", "content": "User's Keypad Entry: 1234#"}


def test_garbage_raises_value_error() -> None:
    for text in ("nope", "[]", '{"type": 5}', "{}"):
        try:
            V.parse(text)
        except ValueError:
            continue
        raise AssertionError(text)


def test_resumed_call_body_and_history_message() -> None:
    body = V.create_call_body(assistant_id="a", audio_format="mulaw", sample_rate=8000,
                              call_sid="CA1", from_="+1", to="+2", resumed=True)
    assert body["assistantOverrides"]["firstMessageMode"] == "assistant-waits-for-user"
    assert V.conversation_so_far([]) is None
    msg = orjson.loads(V.conversation_so_far([("user", "I need a refund"), ("assistant", "Sure.")]) or "")
    assert msg["type"] == "add-message" and msg["triggerResponseEnabled"] is False
    assert msg["message"]["role"] == "system"
    assert msg["message"]["content"].endswith("Caller: I need a refund\nAssistant: Sure.")
    long = V.conversation_so_far([("user", "x" * 10_000)], limit=100)
    assert long is not None and len(orjson.loads(long)["message"]["content"]) < 400
