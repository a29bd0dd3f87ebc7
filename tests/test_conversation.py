"""Conversation quality end to end: barge-in, bursty Vapi, keypad, transfer, endings, dead peers."""

from __future__ import annotations

import asyncio
import contextlib
import time

import numpy as np
import orjson
import redis.asyncio as aioredis
import websockets

from shared.streams import Keys
from sim import voices
from sim.twilio import SimCall
from sim.vapi import greeter, interrupter
from tests.conftest import Proc, call_sid, sign
from tests.test_e2e import (
    audible_s,
    caller_utterance,
    labels_heard,
    make_stack,
    until,
    utterances_heard,
    wait_heard,
)


async def events(redis: aioredis.Redis, keys: Keys, sid: str, kind: bytes) -> list[dict[str, object]]:
    out = []
    for _id, f in await redis.xrange(keys.events(sid)):
        if f[b"k"] == kind:
            out.append(orjson.loads(f.get(b"v", b"{}")))
    return out


def heard_between(call: SimCall, start: float, end: float) -> bytes:
    pcm = call.heard_pcm16()
    return pcm[int(start * 8000) * 2: int(end * 8000) * 2]


async def _barge_in(stack_iter: object, redis: aioredis.Redis) -> None:
    async for stack in stack_iter:  # type: ignore[attr-defined]
        call: SimCall = await stack.call()

        def long_enough(c: SimCall = call) -> bool:
            segs = c.heard_segments()
            return bool(segs) and c.now() - segs[0][0] > 1.5

        await until(long_enough, 10, "1.5 s of the long utterance")
        call.say_pcm(caller_utterance(0))
        await until(lambda c=call: bool(c.clears), 5, "clear")
        clear_t = call.clears[0]
        await wait_heard(call, 2, timeout=10)
        runs = labels_heard(call)
        assert [label for label, _ in runs] == ["greeting", "answer:0"], runs
        cut = call.heard_segments()[0]
        assert cut[1] <= clear_t + 0.03, "not one frame of the interrupted turn after clear"
        # Between the clear and the answer the caller hears nothing of the old turn.
        gap = heard_between(call, clear_t + 0.02, call.heard_segments()[1][0])
        samples = np.frombuffer(gap, dtype=np.int16)
        assert samples.size == 0 or int(np.abs(samples).max()) <= 64
        # The next turn plays normally, whole.
        answer = utterances_heard(call)[-1]
        assert answer[0] == "answer:0" and abs(answer[1] - 1.2) < 0.015, answer
        # The barge-in record says what was heard, within one mark interval (100 ms).
        (barge,) = await events(redis, stack.keys, call.call_sid, b"barge-in")
        heard_s = cut[1] - cut[0]
        assert abs(int(barge["heard_ms"]) / 1000 - heard_s) <= 0.12, (barge, heard_s)  # type: ignore[call-overload]
        assert int(barge["sent_ms"]) >= int(barge["heard_ms"])  # type: ignore[call-overload]
        await call.hangup()
        # At the end the call records, per assistant turn, what was said and what was heard.
        found: list[dict[str, object]] = []
        for _ in range(100):
            found = await events(redis, stack.keys, call.call_sid, b"assistant-turns")
            if found:
                break
            await asyncio.sleep(0.05)
        said = found[0]["turns"]  # type: ignore[index]
        assert said[0]["interrupted"] and said[0]["heard_ms"] == barge["heard_ms"]
        assert not said[1]["interrupted"] and said[1]["sent_ms"] == 1200
        assert abs(said[1]["heard_ms"] - 1200) <= 100


async def test_barge_in_stops_the_assistant_at_once(redis_url: str, prefix: str, procs: list[Proc],
                                                    redis: aioredis.Redis) -> None:
    await _barge_in(make_stack(redis_url, prefix, procs, redis, assistant=interrupter(long_s=6.0)), redis)


async def test_barge_in_with_bursty_vapi(redis_url: str, prefix: str, procs: list[Proc],
                                         redis: aioredis.Redis) -> None:
    stack_iter = make_stack(redis_url, prefix, procs, redis, assistant=interrupter(long_s=6.0))

    async def burst() -> object:
        async for stack in stack_iter:
            stack.vapi.downlink = "burst"
            yield stack

    await _barge_in(burst(), redis)


async def test_bursty_vapi_is_paced_into_continuous_audio(redis_url: str, prefix: str,
                                                          procs: list[Proc],
                                                          redis: aioredis.Redis) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis,
                                  assistant=greeter(answers=0, greeting_s=5.0)):
        stack.vapi.downlink = "burst"  # 5 s of speech handed over in a few ms
        call = await stack.call()
        await wait_heard(call, 1, timeout=10)
        runs = utterances_heard(call)
        assert len(runs) == 1 and runs[0][0] == "greeting" and abs(runs[0][1] - 5.0) < 0.015, runs
        # Paced: no media arrives more than the lead (100 ms) + the prebuffer (40 ms) + scheduling
        # slack ahead of its play time, so Twilio's buffer never holds seconds of audio (unpaced,
        # all 5 s would arrive at once). The slack is 300 ms so the check holds on a loaded
        # machine, where a late first frame makes every later one look early; the tight figure
        # is the bench's.
        media = [(t, n) for t, n in call.received_media_times if n]
        first = media[0][0]
        played = 0.0
        for t, n in media:
            assert t >= first + played - 0.1 - 0.04 - 0.3, (t, first + played)
            played += n / 8000
        assert media[-1][0] - first > 4.5
        await call.hangup()


async def test_keypad_digits_reach_vapi_as_one_entry(redis_url: str, prefix: str, procs: list[Proc],
                                                     redis: aioredis.Redis) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis, assistant=greeter(answers=3),
                                  KEYPAD_TIMEOUT_S=0.6):
        call = await stack.call()
        session = await stack.vapi.wait_session(10)
        await wait_heard(call, 1)
        for d in "123#":
            call.send_dtmf(d)
        first = await session.wait_control("add-message", 5)
        assert first["message"] == {"role": "user", "content": "User's Keypad Entry: 123"}
        for d in "45":  # no terminator: the pause ends the entry
            call.send_dtmf(d)
        second = await session.wait_control("add-message", 5, count=2)
        assert second["message"]["content"] == "User's Keypad Entry: 45"
        assert len(session.received_control("add-message")) == 2
        await call.hangup()


async def test_transfer_dials_the_target_after_the_last_words(redis_url: str, prefix: str,
                                                              procs: list[Proc],
                                                              redis: aioredis.Redis) -> None:
    script = greeter(answers=1, tool_call_after=0, tool_call_name="transferCall",
                     tool_call_arguments={"destination": "+14155550100"})
    async for stack in make_stack(redis_url, prefix, procs, redis, assistant=script,
                                  TRANSFER_ALLOW="+1415*,sip:desk@pbx.example.com"):
        call = await stack.call()
        session = await stack.vapi.wait_session(10)
        await wait_heard(call, 1)
        call.say_pcm(caller_utterance(0))
        assert await call.wait_ended(15) == "dial"
        assert call.dial_target == "+14155550100"
        runs = utterances_heard(call)
        assert [r[0] for r in runs] == ["greeting", "answer:0"] and abs(runs[-1][1] - 1.2) < 0.015
        await session.wait_closed(3)
        assert session.received_control("end-call"), "Vapi is told the call ended"
        record = await redis.hgetall(stack.keys.call(call.call_sid))
        assert record[b"end_reason"] == b"transfer" and record[b"transfer_to"] == b"+14155550100"


async def test_caller_hangup_ends_the_vapi_session_within_a_second(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis
) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis):
        call = await stack.call()
        session = await stack.vapi.wait_session(10)
        await wait_heard(call, 1)
        t0 = time.monotonic()
        await call.hangup()
        await session.wait_closed(2)
        assert session.closed_at is not None and session.closed_at - t0 < 1.0
        assert session.received_control("end-call")


async def test_silent_vapi_socket_is_detected_and_the_call_ends(redis_url: str, prefix: str,
                                                                procs: list[Proc],
                                                                redis: aioredis.Redis) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis, VAPI_PING_INTERVAL_S=0.5,
                                  VAPI_PING_TIMEOUT_S=0.5):
        stack.vapi.respond_to_pings = False
        call = await stack.call()
        t0 = time.monotonic()
        assert await call.wait_ended(10) == "hangup"
        assert time.monotonic() - t0 < 4, "detected within a few seconds"
        record = await redis.hgetall(stack.keys.call(call.call_sid))
        assert record[b"end_reason"] == b"vapi-socket-closed"
        assert call.say_texts, "the caller hears why before the hang-up"
        assert stack.worker.proc is not None and stack.worker.proc.poll() is None


async def test_silent_twilio_socket_is_detected_and_the_call_ends(redis_url: str, prefix: str,
                                                                  procs: list[Proc],
                                                                  redis: aioredis.Redis) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis, MEDIA_IDLE_TIMEOUT_S=1,
                                  REATTACH_TIMEOUT_S=1):
        # A "Twilio" that answers, starts a stream, sends one second of audio, then goes silent.
        import xml.etree.ElementTree as ET

        import httpx

        from tests.test_gateway import _media_msg, _start_msg

        sid = call_sid()
        base = stack.twilio.gateway_url
        form = {"AccountSid": stack.twilio.account_sid, "CallSid": sid, "From": "+1555", "To": "+1666"}
        async with httpx.AsyncClient() as client:
            resp = await client.post(base + "/twilio/voice", data=form,
                                     headers={"X-Twilio-Signature": sign(base + "/twilio/voice", form)})
        token = ET.fromstring(resp.text).find("./Connect/Stream/Parameter").get("value")  # type: ignore[union-attr]
        url = base.replace("http", "ws", 1) + "/twilio/media"
        ws = await websockets.connect(url, additional_headers={"X-Twilio-Signature": sign(url)})
        await ws.send(_start_msg(sid, str(token)))
        for i in range(50):
            await ws.send(_media_msg(b"\xff" * 160, seq=i + 2))
        session = await stack.vapi.wait_session(10)
        t0 = time.monotonic()
        with_audio = len(session.received_frames)
        async def read_until_closed(ws: websockets.ClientConnection = ws) -> None:
            with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                async for _msg in ws:  # the assistant's greeting keeps arriving meanwhile
                    pass

        await asyncio.wait_for(read_until_closed(), 5)  # the gateway gives up on the socket
        assert time.monotonic() - t0 < 3
        await session.wait_closed(10)
        record = await redis.hgetall(stack.keys.call(sid))
        assert record[b"end_reason"] == b"stream-lost"
        # While the caller's audio was missing, Vapi was kept fed with silence.
        assert len(session.received_frames) > with_audio + 25
        assert stack.worker.proc is not None and stack.worker.proc.poll() is None


async def test_fast_barge_in_pauses_then_vapi_confirms(redis_url: str, prefix: str, procs: list[Proc],
                                                       redis: aioredis.Redis) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis, assistant=interrupter(long_s=6.0),
                                  FAST_BARGE_IN=1):
        call = await stack.call()
        await until(lambda c=call: bool(c.heard_segments()) and c.now() > 1.5, 10, "greeting")
        call.say_pcm(caller_utterance(0))
        await wait_heard(call, 2, timeout=10)
        assert [label for label, _ in labels_heard(call)] == ["greeting", "answer:0"]
        kinds = [f[b"k"] for _i, f in await redis.xrange(stack.keys.events(call.call_sid))]
        assert b"fast-pause" in kinds and b"barge-in" in kinds and b"fast-resume" not in kinds
        # The local detector acted before Vapi's confirmation arrived.
        assert kinds.index(b"fast-pause") < kinds.index(b"barge-in")
        await call.hangup()


async def test_fast_barge_in_resumes_when_vapi_does_not_confirm(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis
) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis,
                                  assistant=greeter(answers=1, greeting_s=4.0), FAST_BARGE_IN=1):
        call = await stack.call()
        await until(lambda c=call: bool(c.heard_segments()) and c.now() > 1.0, 10, "greeting")
        # A short sound: the local detector pauses, Vapi (200 ms minimum) never calls it a turn.
        call.say_pcm(voices.utterance("caller", 0, 0.16, 8000))
        await until(lambda c=call: audible_s(c) > 3.9 and c.now() - c.heard_segments()[-1][1] > 0.3,
                    15, "the whole greeting, in two parts")
        kinds = [f[b"k"] for _i, f in await redis.xrange(stack.keys.events(call.call_sid))]
        assert b"fast-pause" in kinds and b"fast-resume" in kinds and b"barge-in" not in kinds
        # Held, not dropped: the whole greeting reaches the caller, in two parts.
        runs = utterances_heard(call)
        assert [label for label, _ in runs] == ["greeting", "greeting"], "paused once, for a while"
        # The seam may lose what Twilio played between our clock and its own (under a frame each).
        assert abs(sum(seconds for _, seconds in runs) - 4.0) < 0.04, runs
        await call.hangup()


async def test_transfer_to_a_target_not_allowed_is_refused(redis_url: str, prefix: str,
                                                           procs: list[Proc],
                                                           redis: aioredis.Redis) -> None:
    script = greeter(answers=2, tool_call_after=0, tool_call_name="transferCall",
                     tool_call_arguments={"destination": "+19005550199"})
    async for stack in make_stack(redis_url, prefix, procs, redis, assistant=script,
                                  TRANSFER_ALLOW="+1415*"):
        call = await stack.call()
        await wait_heard(call, 1)
        call.say_pcm(caller_utterance(0))
        await wait_heard(call, 2)
        call.say_pcm(caller_utterance(1))
        await wait_heard(call, 3)  # the call goes on
        assert not call.ended.is_set() and call.dial_target is None
        refused = await events(redis, stack.keys, call.call_sid, b"transfer-refused")
        assert refused and refused[0]["target"] == "+19005550199"
        await call.hangup()


async def test_talking_over_a_message_vapi_does_not_interrupt_only_pauses_it(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis
) -> None:
    # The stand-in's greeting is not interruptible (Vapi's default for first messages): it
    # reports the caller's speech but never `user-interrupted`.
    async for stack in make_stack(redis_url, prefix, procs, redis,
                                  assistant=greeter(answers=1, greeting_s=4.0)):
        call = await stack.call()
        await until(lambda c=call: bool(c.heard_segments()) and c.now() > 1.0, 10, "greeting")
        call.say_pcm(caller_utterance(0, seconds=0.5))
        # The hold is a pause of a few hundred ms (a late frame on a busy machine is far shorter).
        await until(lambda c=call: len(c.heard_segments(min_silence_s=0.2)) >= 2, 10, "a pause")
        # The stand-in queued its answer right behind the greeting, so they play as one run.
        await until(lambda c=call: audible_s(c) > 5.15 and c.now() - c.heard_segments()[-1][1] > 0.3,
                    15, "the answer")
        kinds = [f[b"k"] for _i, f in await redis.xrange(stack.keys.events(call.call_sid))]
        assert b"hold" in kinds and b"hold-released" in kinds and b"barge-in" not in kinds
        (a0, a1), (_b0, b1) = call.heard_segments(min_silence_s=0.2)
        # Held, not lost: the whole 4 s greeting and the 1.2 s answer reach the caller.
        assert abs(audible_s(call) - 5.2) < 0.04, audible_s(call)  # a pause's seam: under a frame
        pcm = call.heard_pcm16()
        assert voices.identify(pcm[int(a0 * 8000) * 2:int(a1 * 8000) * 2], 8000) == "greeting"
        assert voices.identify(pcm[int((b1 - 1.1) * 8000) * 2:int(b1 * 8000) * 2], 8000) == "answer:0"
        await call.hangup()
