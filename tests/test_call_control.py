"""The call API's control entries end to end: real gateway and worker processes, the Twilio and
Vapi stand-ins, a real Redis. The gateway's API writes `ctl` entries to a call's `:in` and the
call-record fields an outbound call carries; here the test writes both itself with redis-py, so
what is under test is the worker's side of that contract (worker/call.py `parse_control`,
`CallCore.control`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aioredis

from shared import streams as S
from sim.twilio import SimCall
from tests.conftest import Proc, call_sid
from tests.test_e2e import (
    Stack,
    audible_s,
    caller_utterance,
    make_stack,
    until,
    utterances_heard,
    wait_heard,
)


async def ctl(stack: Stack, sid: str, op: dict[str, Any] | bytes | None) -> float:
    """Append a control entry as the gateway does; returns when (monotonic)."""
    value = op if isinstance(op, bytes | None) else orjson.dumps(op)
    await stack.redis.xadd(stack.keys.inbound(sid), S.entry(S.IN_CONTROL, value=value))
    return time.monotonic()


async def events(stack: Stack, sid: str, kind: str) -> list[dict[str, Any]]:
    return [orjson.loads(f.get(b"v", b"{}")) for _id, f in await stack.redis.xrange(stack.keys.events(sid))
            if f[b"k"] == kind.encode()]


async def record(stack: Stack, sid: str) -> dict[str, str]:
    raw = await stack.redis.hgetall(stack.keys.call(sid))
    return {k.decode(): v.decode() for k, v in raw.items()}


async def placed(stack: Stack, **fields: str) -> SimCall:
    """A call whose record carries `fields` before any worker reads it (what the gateway writes
    for an outbound call placed through the API)."""
    sid = call_sid()
    if fields:
        await stack.redis.hset(stack.keys.call(sid), mapping=fields)
    return await stack.twilio.place_call(call_sid=sid)


def labels(call: SimCall) -> list[str | None]:
    return [label for label, _ in utterances_heard(call)]


async def one_stack(redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis,
                    **env: object) -> AsyncIterator[Stack]:
    """One stack in μ-law: control entries take the same path in either audio format, and this
    one needs no resampler, so it is the lighter load next to other suites."""
    async for stack in make_stack(redis_url, prefix, procs, redis, fmt="mulaw", **env):
        yield stack


async def test_api_hangup_ends_the_call_within_two_seconds(redis_url: str, prefix: str,
                                                           procs: list[Proc],
                                                           redis: aioredis.Redis) -> None:
    async for stack in one_stack(redis_url, prefix, procs, redis):
        call = await stack.call()
        session = await stack.vapi.wait_session(10)
        await wait_heard(call, 1)
        asked = await ctl(stack, call.call_sid, {"op": "hangup"})
        assert await call.wait_ended(2) == "hangup"
        assert time.monotonic() - asked < 2.0
        await session.wait_closed(2)
        assert session.received_control("end-call"), "Vapi was told"
        rec = await record(stack, call.call_sid)
        assert rec["end_reason"] == "api-hangup" and "say" not in rec
        assert await events(stack, call.call_sid, "api-hangup") == [{}]


async def test_api_say_is_spoken_or_answered_with_the_calls_own_assistant(
        redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis) -> None:
    async for stack in one_stack(redis_url, prefix, procs, redis):
        call = await placed(stack, assistant_id="asst-own-0001",
                            variables='{"customer": "Ada", "callerNumber": "+19999999999"}',
                            metadata='{"crm_id": 42}')
        session = await stack.vapi.wait_session(10)
        overrides = session.body["assistantOverrides"]
        assert session.body["assistantId"] == "asst-own-0001"
        assert overrides["variableValues"]["customer"] == "Ada"
        assert overrides["variableValues"]["callerNumber"] == call.from_, "ours win"
        assert overrides["metadata"]["crm_id"] == 42
        await wait_heard(call, 1)
        await ctl(stack, call.call_sid, {"op": "say", "text": "Your order has shipped."})
        said = await session.wait_control("say", 5)
        assert said["content"] == "Your order has shipped." and said["endCallAfterSpoken"] is False
        await wait_heard(call, 2)
        assert labels(call) == ["greeting", "say"]
        assert session.spoken[-1].text == "Your order has shipped."

        await ctl(stack, call.call_sid, {"op": "say", "text": "Offer the caller a discount.",
                                         "respond": True})
        added = await session.wait_control("add-message", 5)
        assert added == {"type": "add-message", "triggerResponseEnabled": True,
                         "message": {"role": "system", "content": "Offer the caller a discount."}}
        await wait_heard(call, 3)
        assert labels(call) == ["greeting", "say", "answer:0"], "the assistant answered it"
        assert [e["respond"] for e in await events(stack, call.call_sid, "api-say")] == [False, True]
        await call.hangup()


async def test_api_transfer_is_refused_outside_the_allow_list_then_dials(
        redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis) -> None:
    async for stack in one_stack(redis_url, prefix, procs, redis, TRANSFER_ALLOW="+1415*"):
        call = await stack.call()
        session = await stack.vapi.wait_session(10)
        await wait_heard(call, 1)
        await ctl(stack, call.call_sid, {"op": "transfer", "to": "+19005550199"})
        call.say_pcm(caller_utterance(0))
        await wait_heard(call, 2)  # the call goes on
        refused = await events(stack, call.call_sid, "transfer-refused")
        assert refused == [{"target": "+19005550199"}] and not call.ended.is_set()

        asked = await ctl(stack, call.call_sid, {"op": "transfer", "to": "+14155550100"})
        assert await call.wait_ended(3) == "dial"
        assert call.dial_target == "+14155550100" and time.monotonic() - asked < 3.0
        await session.wait_closed(2)
        assert session.received_control("end-call")
        rec = await record(stack, call.call_sid)
        assert rec["end_reason"] == "transfer" and rec["transfer_to"] == "+14155550100"
        kinds = [e["target"] for e in await events(stack, call.call_sid, "api-transfer")]
        assert kinds == ["+19005550199", "+14155550100"]


async def test_a_machine_under_the_hangup_policy_is_hung_up_on(redis_url: str, prefix: str,
                                                               procs: list[Proc],
                                                               redis: aioredis.Redis) -> None:
    async for stack in one_stack(redis_url, prefix, procs, redis):
        call = await placed(stack, amd_pending="1", amd_policy="hangup")
        session = await stack.vapi.wait_session(10)
        await until(lambda c=call: bool(c.heard_segments()), 5, "the greeting (not muted: hangup policy)")
        asked = await ctl(stack, call.call_sid, {"op": "answered_by", "value": "machine_start",
                                                 "policy": "hangup"})
        assert await call.wait_ended(2) == "hangup" and time.monotonic() - asked < 2.0
        await session.wait_closed(2)
        assert session.received_control("end-call") and not session.received_control("say")
        assert (await record(stack, call.call_sid))["end_reason"] == "machine"
        assert await events(stack, call.call_sid, "answered-by") == [
            {"value": "machine_start", "policy": "hangup", "action": "hangup"}]


async def test_the_message_policy_mutes_then_leaves_the_voicemail_and_hangs_up(
        redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis) -> None:
    message = "Hello, this is Acme. Please call us back."
    async for stack in one_stack(redis_url, prefix, procs, redis):
        call = await placed(stack, amd_pending="1", amd_policy="message",
                            voicemail_message=message)
        session = await stack.vapi.wait_session(10)
        await session.wait_connected(5)
        first = await session.wait_control("control", 5)
        assert first == {"type": "control", "control": "mute-assistant"}
        assert session.control[0] == first, "the first thing Vapi hears"
        # Longer than the 1 s greeting: nothing of it reaches the line while the verdict is out.
        await until(lambda c=call: c.now() > 2.0, 5, "two seconds of the call")
        assert call.heard_segments() == []
        await ctl(stack, call.call_sid, {"op": "answered_by", "value": "machine_start",
                                         "policy": "message", "message": message})
        await until(lambda c=call: c.now() > 2.5, 5, "the machine's greeting")
        assert call.heard_segments() == []
        beep = await ctl(stack, call.call_sid, {"op": "answered_by", "value": "machine_end_beep",
                                                "policy": "message", "message": message})
        said = await session.wait_control("say", 5)
        assert said == {"type": "say", "content": message, "endCallAfterSpoken": True,
                        "interruptAssistantEnabled": True}
        unmute = await session.wait_control("control", 5, count=2)  # right behind the say
        assert unmute["control"] == "unmute-assistant"
        assert await call.wait_ended(10) == "hangup"
        assert time.monotonic() - beep < 0.6 + 3.0, "the message (0.6 s), then the hang-up"
        assert labels(call) == ["say"], "the message only: no greeting on the voicemail"
        assert abs(audible_s(call) - 0.6) < 0.03, "and all of it"
        assert session.ended_reason == "assistant-ended-call-after-message-spoken"
        assert (await record(stack, call.call_sid))["end_reason"] == "voicemail"
        actions = [e["action"] for e in await events(stack, call.call_sid, "answered-by")]
        assert actions == ["wait", "voicemail"]


async def test_a_human_under_the_message_policy_hears_the_whole_greeting_after_the_verdict(
        redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis) -> None:
    async for stack in one_stack(redis_url, prefix, procs, redis):
        call = await placed(stack, amd_pending="1", amd_policy="message",
                            voicemail_message="Please call us back.")
        session = await stack.vapi.wait_session(10)
        await session.wait_control("control", 5)
        await until(lambda c=call: c.now() > 1.5, 5, "a second and a half of the call")
        assert call.heard_segments() == [], "muted while the verdict is out"
        verdict_at = call.now()
        await ctl(stack, call.call_sid, {"op": "answered_by", "value": "human", "policy": "message"})
        await wait_heard(call, 1)
        (start, _end), *_ = call.heard_segments()
        assert start - verdict_at < 1.0, "right after the verdict"
        (label, seconds), = utterances_heard(call)
        assert label == "greeting" and abs(seconds - 1.0) < 0.03, "held, not lost"
        call.say_pcm(caller_utterance(0))
        await wait_heard(call, 2)
        assert labels(call) == ["greeting", "answer:0"]
        assert (await record(stack, call.call_sid))["answered_by"] == "human"
        await call.hangup()


async def test_malformed_control_entries_leave_the_call_alone(redis_url: str, prefix: str,
                                                              procs: list[Proc],
                                                              redis: aioredis.Redis) -> None:
    async for stack in one_stack(redis_url, prefix, procs, redis):
        call = await stack.call()
        session = await stack.vapi.wait_session(10)
        await wait_heard(call, 1)
        sid = call.call_sid
        for bad in (b"{not json", None, b"[]", b'{"op": 7}', b'{"op": "reboot"}',
                    b'{"op": "say", "text": 12}', b'{"op": "say", "text": "hi", "respond": "yes"}',
                    orjson.dumps({"op": "say", "text": "x" * 2001}),
                    orjson.dumps({"op": "say", "text": "x" * 100_000}),
                    b'{"op": "transfer", "to": {"number": "+14155550100"}}',
                    b'{"op": "answered_by", "value": "robot"}', b"\xff\xfe\x00"):
            await ctl(stack, sid, bad)
        call.say_pcm(caller_utterance(0))
        await wait_heard(call, 2)
        assert labels(call) == ["greeting", "answer:0"] and not call.ended.is_set()
        assert not session.received_control("say") and not session.received_control("add-message")
        kinds = {f[b"k"] for _id, f in await stack.redis.xrange(stack.keys.events(sid))}
        assert not {b"api-say", b"api-transfer", b"api-hangup", b"answered-by"} & kinds
        await call.hangup()
        assert await call.wait_ended(3) == "caller-hangup"
        assert stack.worker.proc is not None and stack.worker.proc.poll() is None
        logs = stack.worker.logs()
        assert logs.count("call control entry ignored") == 12
