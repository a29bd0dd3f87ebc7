"""Vapi transport messages: the create-call body and parsing of control messages."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import types
import typing
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import serve

from shared import vapi_proto as V
from shared.settings import Settings
from worker.vapi_client import VapiCall, VapiClient, VapiError


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


def test_live_call_control_messages_match_vapis_wire_format() -> None:
    # docs.vapi.ai/calls/call-features; spec ClientInboundMessageSay / AddMessage / Control.
    assert orjson.loads(V.say("Hello")) == {"type": "say", "content": "Hello",
                                            "endCallAfterSpoken": False}
    assert orjson.loads(V.say("Bye", end_call_after=True, interrupt_assistant=True)) == {
        "type": "say", "content": "Bye", "endCallAfterSpoken": True, "interruptAssistantEnabled": True}
    assert orjson.loads(V.add_message("system", "VIP caller", respond=True)) == {
        "type": "add-message", "message": {"role": "system", "content": "VIP caller"},
        "triggerResponseEnabled": True}
    assert orjson.loads(V.MUTE_ASSISTANT) == {"type": "control", "control": "mute-assistant"}
    assert orjson.loads(V.UNMUTE_ASSISTANT) == {"type": "control", "control": "unmute-assistant"}


def test_a_calls_own_assistant_variables_and_metadata_go_into_the_body() -> None:
    opts = V.call_options({"assistant_id": "5b0a4a08-133c-4146-9315-0984f8c6be80",
                           "variables": '{"name": "Ada", "vip": true, "visits": 3, "score": 1.5}',
                           "metadata": '{"crm": {"id": 42}}'})
    assert opts == V.CallOptions("5b0a4a08-133c-4146-9315-0984f8c6be80",
                                 {"name": "Ada", "vip": True, "visits": 3, "score": 1.5},
                                 {"crm": {"id": 42}})
    spoofed = V.call_options({"variables": '{"callerNumber": "+1999", "twilioCallSid": "CAX"}',
                              "metadata": '{"twilioCallSid": "CAX", "note": "n"}'})
    body = V.create_call_body(assistant_id="a", audio_format="mulaw", sample_rate=8000,
                              call_sid="CA1", from_="+1555", to="+1666",
                              variables=spoofed.variables, metadata=spoofed.metadata)
    over = body["assistantOverrides"]
    assert over["variableValues"] == {"callerNumber": "+1555", "calledNumber": "+1666",
                                      "twilioCallSid": "CA1"}, "ours win"
    assert over["metadata"] == {"note": "n", "twilioCallSid": "CA1", "from": "+1555", "to": "+1666"}
    assert set(body) == {"assistantId", "assistantOverrides", "transport"}, "never a top-level metadata"


@pytest.mark.parametrize(("record", "ignored"), [
    ({}, ()),
    ({"assistant_id": ""}, ()),
    ({"assistant_id": "a" * 101}, ("assistant_id",)),
    ({"assistant_id": "asst/../x"}, ("assistant_id",)),
    ({"assistant_id": "a b"}, ("assistant_id",)),
    ({"variables": "not json"}, ("variables",)),
    ({"variables": "[1, 2]"}, ("variables",)),
    ({"variables": '{"a": "' + "x" * 5000 + '"}'}, ("variables",)),
    ({"variables": '{"a": [1], "b": {"c": 1}, "c": null, "ok": "y"}'},
     ("variables.a", "variables.b", "variables.c")),
    ({"metadata": "3"}, ("metadata",)),
    ({"metadata": '{"a": "' + "x" * 5000 + '"}'}, ("metadata",)),
])
def test_call_options_from_an_untrusted_record_keep_only_what_fits(
        record: dict[str, str], ignored: tuple[str, ...]) -> None:
    opts = V.call_options(record)
    assert opts.ignored == ignored
    assert opts.assistant_id is None
    assert all(isinstance(v, str | int | float | bool) for v in opts.variables.values())
    assert len(orjson.dumps(opts.metadata)) <= V.MAX_RECORD_JSON


def test_garbage_raises_value_error() -> None:
    for text in ("nope", "[]", '{"type": 5}', "{}"):
        try:
            V.parse(text)
        except ValueError:
            continue
        raise AssertionError(text)


def test_resumed_call_bodies_speak_from_the_history_or_wait() -> None:
    history = [{"role": "user", "content": "I need a refund"},
               {"role": "assistant", "content": "Sure, let me…"}]
    model = V.AssistantModel(provider="openai", model="gpt-4o-mini")
    speak = V.create_call_body(assistant_id="a", audio_format="mulaw", sample_rate=8000, call_sid="CA1",
                               from_="+1", to="+2", resume=V.Resume(V.RESUME_SPEAK, history, model))
    overrides = speak["assistantOverrides"]
    assert overrides["firstMessageMode"] == "assistant-speaks-first-with-model-generated-message"
    # Same provider and model as the saved assistant, so Vapi merges; no system message, which
    # would replace the saved prompt.
    assert overrides["model"] == {"provider": "openai", "model": "gpt-4o-mini", "messages": history}
    wait = V.create_call_body(assistant_id="a", audio_format="mulaw", sample_rate=8000, call_sid="CA1",
                              from_="+1", to="+2", resume=V.Resume(V.RESUME_WAIT, history))
    assert wait["assistantOverrides"]["firstMessageMode"] == "assistant-waits-for-user"
    assert "model" not in wait["assistantOverrides"]
    # Without the model (GET /assistant failed) a "speak" resume cannot name it: it waits instead.
    fallback = V.create_call_body(assistant_id="a", audio_format="mulaw", sample_rate=8000,
                                  call_sid="CA1", from_="+1", to="+2",
                                  resume=V.Resume(V.RESUME_SPEAK, history, None))
    assert fallback["assistantOverrides"]["firstMessageMode"] == "assistant-waits-for-user"
    fresh = V.create_call_body(assistant_id="a", audio_format="mulaw", sample_rate=8000,
                               call_sid="CA1", from_="+1", to="+2")
    assert "firstMessageMode" not in fresh["assistantOverrides"]
    assert "model-output" in fresh["assistantOverrides"]["clientMessages"]

    msg = orjson.loads(V.conversation_so_far(history))
    assert msg["type"] == "add-message" and msg["triggerResponseEnabled"] is False
    assert msg["message"]["role"] == "system"
    assert msg["message"]["content"].endswith("Caller: I need a refund\nAssistant: Sure, let me…")
    long = V.conversation_so_far([{"role": "user", "content": "x" * 10_000}], limit=100)
    assert len(orjson.loads(long)["message"]["content"]) < 400


def test_assistant_model_is_read_only_from_well_formed_fields() -> None:
    assert V.assistant_model({"model": {"provider": "openai", "model": "gpt-4o"}}) == \
        V.AssistantModel("openai", "gpt-4o")
    bad: Any
    for bad in (None, [], {"model": None}, {"model": {"provider": 1, "model": "x"}},
                {"model": {"provider": "openai"}}, {"model": {"provider": "", "model": "x"}}):
        assert V.assistant_model(bad) is None, bad


def test_model_output_text_is_a_string_or_empty() -> None:
    assert V.parse('{"type": "model-output", "output": "Sure, "}') == V.ModelOutput("Sure, ")
    assert V.parse('{"type": "model-output", "output": {"x": 1}}') == V.ModelOutput("")


# Untrusted fields --------------------------------------------------------------------------------

HUGE = "x" * 1_000_000
WRONG_TYPES: list[Any] = [0, 7, -1, 1.5, True, False, None, {}, {"a": 1}, [], ["ended"], HUGE]

# One well-formed message per kind parse() handles; every field of each is replaced in turn.
GOOD: dict[str, dict[str, Any]] = {
    "status-update": {"type": "status-update", "status": "ended", "endedReason": "assistant-ended-call"},
    "user-interrupted": {"type": "user-interrupted", "turnId": "t1"},
    "speech-update": {"type": "speech-update", "status": "started", "role": "user", "turn": 2},
    "transcript": {"type": "transcript", "role": "user", "transcriptType": "final", "transcript": "hi"},
    "tool-calls": {"type": "tool-calls", "toolCallList": [
        {"id": "c1", "type": "function",
         "function": {"name": "transferCall", "arguments": '{"destination":"+14155550100"}'}}]},
    "model-output": {"type": "model-output", "output": "Sure, one moment.", "turnId": "t1"},
    "hang": {"type": "hang"},
}


def _conforms(value: Any, hint: Any) -> bool:
    """`value` has the declared type `hint` exactly (bool is not an int here)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return type(value) is list and all(_conforms(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(hint)
        return type(value) is dict and all(_conforms(a, k) and _conforms(b, v) for a, b in value.items())
    if dataclasses.is_dataclass(hint):
        return type(value) is hint and _well_typed(value)
    return type(value) is hint


def _well_typed(msg: Any) -> bool:
    hints = typing.get_type_hints(type(msg), globalns=vars(V))
    return all(_conforms(getattr(msg, f.name), hints[f.name]) for f in dataclasses.fields(msg))


def _bounded(msg: Any, limit: int = 10_000) -> bool:
    """No string the parser hands on is huge (they end up in events, logs and Redis)."""
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, str) and len(value) > limit:
            return False
        if isinstance(value, list) and not all(_bounded(v, limit) for v in value
                                               if dataclasses.is_dataclass(v)):
            return False
    return True


def _variants() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for kind, good in GOOD.items():
        for field_name in good:
            for bad in WRONG_TYPES:
                if field_name == "type" and not isinstance(bad, str):
                    continue  # a non-string type is refused outright (test_garbage_raises_value_error)
                out.append((f"{kind}.{field_name}={str(bad)[:12]!r}", {**good, field_name: bad}))
            out.append((f"{kind}.{field_name} missing", {k: v for k, v in good.items() if k != field_name}))
    calls = GOOD["tool-calls"]["toolCallList"][0]
    for bad in WRONG_TYPES:
        out.append((f"tool.id={str(bad)[:12]!r}",
                    {"type": "tool-calls", "toolCallList": [{**calls, "id": bad}]}))
        out.append((f"tool.function={str(bad)[:12]!r}",
                    {"type": "tool-calls", "toolCallList": [{**calls, "function": bad}]}))
        out.append((f"tool.name={str(bad)[:12]!r}", {"type": "tool-calls", "toolCallList": [
            {"id": "c", "function": {"name": bad, "arguments": "{}"}}]}))
        out.append((f"tool.arguments={str(bad)[:12]!r}", {"type": "tool-calls", "toolCallList": [
            {"id": "c", "function": {"name": "transferCall", "arguments": bad}}]}))
        out.append((f"tool.destination={str(bad)[:12]!r}", {"type": "tool-calls", "toolCallList": [
            {"id": "c", "function": {"name": "transferCall", "arguments": {"destination": bad}}}]}))
        out.append((f"tool.destination.number={str(bad)[:12]!r}", {"type": "tool-calls", "toolCallList": [
            {"id": "c", "name": "transfer", "parameters": {"destination": {"number": bad}}}]}))
        out.append((f"toolCallList item={str(bad)[:12]!r}", {"type": "tool-calls", "toolCallList": [bad]}))
    out.append(("toolCallList huge", {"type": "tool-calls", "toolCallList": [calls] * 10_000}))
    out.append(("type huge", {"type": "y" * 100_000}))
    out.append(("transcript type huge", {"type": "transcript" + "z" * 100_000, "transcript": "a"}))
    return out


@pytest.mark.parametrize(("name", "msg"), _variants(), ids=[n for n, _m in _variants()])
def test_every_field_is_untrusted(name: str, msg: dict[str, Any]) -> None:
    """Each field of each message kind, replaced by a number, an object, null, a list or a huge
    string: parse() either refuses the message (ValueError) or returns fields of their declared
    types, bounded in size; transfer_target() then yields a bounded string or None."""
    try:
        parsed = V.parse(orjson.dumps(msg))
    except ValueError:
        return
    assert _well_typed(parsed), parsed
    assert _bounded(parsed), name
    if isinstance(parsed, V.ToolCalls):
        assert len(parsed.calls) <= 64
        for call in parsed.calls:
            target = V.transfer_target(call)
            assert target is None or (type(target) is str and 0 < len(target) <= 256), target


def test_status_update_with_a_bad_ended_reason_still_ends_the_call() -> None:
    """The fields the worker acts on survive a bad neighbour: `ended` still ends the call."""
    for bad in (5, {"code": 1}, ["x"], None, True):
        msg = V.parse(orjson.dumps({"type": "status-update", "status": "ended", "endedReason": bad}))
        assert msg == V.StatusUpdate("ended", None)
    assert V.parse(orjson.dumps({"type": "speech-update", "status": "started", "role": "user",
                                 "turn": True})) == V.SpeechUpdate("user", "started", None)


# Where the Vapi key may go (worker/vapi_client.py) --------------------------------------------

KEY = "vapi-private-key-do-not-leak"


@contextlib.asynccontextmanager
async def _ws_server(seen: list[dict[str, str]]) -> AsyncIterator[int]:
    """A loopback websocket server that records each upgrade's headers and stays open."""

    def record(_conn: Any, request: Any) -> None:
        seen.append({k.lower(): v for k, v in request.headers.raw_items()})

    async def handler(ws: Any) -> None:
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, process_request=record) as server:
        yield server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def _http_answer(body: bytes) -> AsyncIterator[int]:
    """A loopback HTTP server answering every request with 201 and `body` (a Vapi POST /call)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


def _client(base_url: str) -> VapiClient:
    return VapiClient(Settings(VAPI_API_KEY=KEY, VAPI_BASE_URL=base_url,  # type: ignore[call-arg]
                               VAPI_CONNECT_TIMEOUT_S=5))


async def test_the_vapi_key_goes_only_to_the_configured_vapi_host() -> None:
    """The transport URL comes from Vapi's response: a socket on the configured host (same
    scheme, host and port as VAPI_BASE_URL) gets the bearer key, a socket on any other host is
    opened without it."""
    vapi_seen: list[dict[str, str]] = []
    foreign_seen: list[dict[str, str]] = []
    async with _ws_server(vapi_seen) as vapi_port, _ws_server(foreign_seen) as foreign_port:
        client = _client(f"http://127.0.0.1:{vapi_port}")
        try:
            for seen, port in ((vapi_seen, vapi_port), (foreign_seen, foreign_port)):
                ws = await client.connect(VapiCall("c1", f"ws://127.0.0.1:{port}/c1/transport"))
                await ws.close()
                assert len(seen) == 1
        finally:
            await client.aclose()
    assert vapi_seen[0].get("authorization") == f"Bearer {KEY}"
    assert "authorization" not in foreign_seen[0], "the private key went to a foreign host"
    assert not any(KEY in value for value in foreign_seen[0].values())


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/c1/transport",  # not a websocket URL
    "ftp://api.vapi.test/c1",
    "ws://api.vapi.test/c1/transport",  # plain text although Vapi is https
    "wss:///c1/transport",  # no host
    "wss://api.vapi.test:99999/c1",  # no valid port
    "",
])
async def test_a_transport_url_we_may_not_open_is_a_clear_vapi_error(url: str) -> None:
    client = _client("https://api.vapi.test")
    try:
        with pytest.raises(VapiError) as info:
            await client.connect(VapiCall("c1", url))
    finally:
        await client.aclose()
    assert (info.value.reason, info.value.kind) == ("vapi-error", "bad_response")
    text = f"{info.value} {info.value!r} {info.value.detail}"
    assert "/c1" not in text and KEY not in text, "the URL (a credential) or the key leaked"


@pytest.mark.parametrize("body", [
    b'{"id":"c1","transport":{"websocketCallUrl":{"url":"wss://x"}}}',
    b'{"id":"c1","transport":{"websocketCallUrl":7}}',
    b'{"id":"c1","transport":{"websocketCallUrl":null}}',
    b'{"id":"c1","transport":"wss://x"}',
    b'{"id":{"a":1},"transport":{"websocketCallUrl":"wss://x/c1"}}',
    b'{"id":"c1","transport":{"websocketCallUrl":"wss://x/' + b"a" * 10_000 + b'"}}',
    b'["c1"]',
])
async def test_create_call_answer_with_bad_fields_is_a_clear_vapi_error(body: bytes) -> None:
    async with _http_answer(body) as port:
        client = _client(f"http://127.0.0.1:{port}")
        try:
            with pytest.raises(VapiError) as info:
                await client.create_call({"assistantId": "a"})
        finally:
            await client.aclose()
    assert (info.value.reason, info.value.kind) == ("vapi-error", "bad_response")
