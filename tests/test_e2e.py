"""End to end: `callbridge gateway` and `callbridge worker` as separate processes on a real Redis,
with the Twilio simulator placing calls and the Vapi stand-in answering them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from callbridge.redis_server import free_port
from shared.audio import Uplink
from shared.streams import Keys
from sim import voices
from sim.twilio import SimCall, TwilioSim
from sim.vapi import AssistantScript, VapiSession, VapiSim, greeter
from tests.conftest import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    VAPI_KEY,
    Proc,
    base_env,
    gateway_proc,
    worker_proc,
)

UNAVAILABLE = "Sorry, the assistant is not available right now. Please try again later."


async def streams_followed(proc: Proc) -> dict[str, float]:
    """A process's `callbridge_redis_streams_followed` gauge, by mode (rung / blocked)."""
    assert proc.health_url
    async with httpx.AsyncClient() as client:
        text = (await client.get(proc.health_url.replace("/readyz", "/metrics"), timeout=5)).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("callbridge_redis_streams_followed{"):
            mode = line.split('mode="', 1)[1].split('"', 1)[0]
            out[mode] = float(line.rsplit(" ", 1)[1])
    return out


async def until_rung(*procs: Proc, rung: int = 1, timeout: float = 10.0) -> None:
    """Each process reads `rung` call streams rung by their writer, none in its blocked read."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        while (got := await streams_followed(proc)) != {"rung": rung, "blocked": 0}:
            assert time.monotonic() < deadline, f"{proc.name}: streams followed {got}"
            await asyncio.sleep(0.05)


async def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition on a deadline (for conditions that change with time alone)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Stack:
    twilio: TwilioSim
    vapi: VapiSim
    gateway: Proc
    worker: Proc
    keys: Keys
    redis: aioredis.Redis
    fmt: str
    workers: list[Proc]

    async def call(self) -> SimCall:
        return await self.twilio.place_call()

    async def owner(self, sid: str) -> Proc:
        """The worker process that owns the call now (WORKER_ID is `{prefix}w{n}`)."""
        owner = (await self.redis.hget(self.keys.call(sid), "owner") or b"").decode()
        matches = [w for w in self.workers if w.env.get("WORKER_ID") == owner]
        assert matches, f"no worker {owner!r}"
        return matches[0]


async def make_stack(redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis,
                     fmt: str = "pcm_s16le", assistant: AssistantScript | None = None,
                     workers: int = 1, **env_extra: object) -> AsyncIterator[Stack]:
    vapi = VapiSim(api_key=VAPI_KEY, assistant=assistant or greeter(answers=2))
    await vapi.start()
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    twilio = TwilioSim(gateway_url=public, public_url=public, account_sid=ACCOUNT_SID,
                       auth_token=AUTH_TOKEN)
    await twilio.start()
    env = base_env(redis_url, prefix, PUBLIC_URL=public, VAPI_BASE_URL=vapi.base_url,
                   TWILIO_API_BASE_URL=twilio.rest_base_url, VAPI_AUDIO_FORMAT=fmt,
                   ENDED_TTL_S=2, HANGUP_GRACE_S=2, **env_extra)
    gw = gateway_proc(env, port).start()
    wks = [worker_proc(dict(env, WORKER_ID=f"{prefix}w{i + 1}")).start() for i in range(workers)]
    procs += [gw, *wks]
    wk = wks[0] if wks else gw
    try:
        await gw.wait_ready()
        for w in wks:
            await w.wait_ready()
        cluster = str(env_extra.get("REDIS_CLUSTER", "")).lower() == "true"
        keys = Keys(prefix, int(str(env_extra.get("REDIS_LANES", 16))) if cluster else 0)
        yield Stack(twilio, vapi, gw, wk, keys, redis, fmt, wks)
    finally:
        await twilio.stop()
        await vapi.stop()


@pytest.fixture(params=["pcm_s16le", "mulaw"])
async def stack(request: pytest.FixtureRequest, redis_url: str, prefix: str, procs: list[Proc],
                redis: aioredis.Redis) -> AsyncIterator[Stack]:
    async for s in make_stack(redis_url, prefix, procs, redis, fmt=request.param):
        yield s


def labels_heard(call: SimCall) -> list[tuple[str | None, float]]:
    """(utterance label, audible seconds) for each utterance the caller heard (see
    utterances_heard: the runs of one utterance split by a late frame count once)."""
    return utterances_heard(call)


def audible_s(call: SimCall, start: float = 0.0, end: float = float("inf")) -> float:
    """Seconds of assistant audio the caller heard between `start` and `end` (call clock), gaps
    excluded: how much arrived, however late. Whether it arrived in time (no gap inside an
    utterance) depends on the machine having a free core, so that is a `callbridge bench`
    figure (underruns), not a test assertion."""
    return sum(min(e, end) - max(s, start)
               for s, e in call.heard_segments(min_silence_s=0.015) if s < end and e > start)


def utterances_heard(call: SimCall, late_s: float = 0.25) -> list[tuple[str | None, float]]:
    """(label, audible seconds) per utterance the caller heard. Runs of one utterance split by a
    late frame (a gap under `late_s`, as a loaded machine makes) are merged back; a longer pause
    (a hold, a turn) separates utterances even when they carry the same label."""
    pcm = call.heard_pcm16()
    out: list[tuple[str | None, float]] = []
    last_end = -1.0
    for start, end in call.heard_segments():
        label = voices.identify(pcm[int(start * 8000) * 2: int(end * 8000) * 2], 8000)
        seconds = audible_s(call, start, end)
        if out and start - last_end < late_s and (label is None or out[-1][0] == label):
            out[-1] = (out[-1][0], out[-1][1] + seconds)
        else:
            out.append((label, seconds))
        last_end = end
    return out


async def wait_heard(call: SimCall, n: int, timeout: float = 10.0) -> None:
    """Until the caller has heard n utterances in full (nothing more of the n-th for 0.3 s).
    Counted as utterances_heard counts them, so a late frame on a loaded machine, which splits
    an utterance into runs, does not pass for a second utterance."""
    def done() -> bool:
        segs = call.heard_segments()
        if len(segs) < n:
            return False
        heard = len(utterances_heard(call))
        return heard > n or (heard == n and call.now() - segs[-1][1] > 0.3)
    await until(done, timeout, f"{n} assistant utterances")


def caller_utterance(index: int, seconds: float = 0.8) -> bytes:
    return voices.utterance("caller", index, seconds, 8000)


def assert_every_frame_delivered(call: SimCall, session: VapiSession, fmt: str) -> None:
    """Vapi got each caller frame, in order, converted exactly as one-shot conversion would."""
    expected = Uplink(fmt).convert(call.sent)
    frame = 640 if fmt == "pcm_s16le" else 160
    assert session.received_frames == [frame] * (len(call.sent) // 160)
    assert bytes(session.received_audio) == expected


async def two_turns_then_hang_up(call: SimCall) -> None:
    """Greeting, two caller turns each answered, the caller hangs up: every utterance heard whole
    (a single lost or repeated 20 ms frame would show), no protocol error."""
    await wait_heard(call, 1)
    call.say_pcm(caller_utterance(0))
    await wait_heard(call, 2)
    call.say_pcm(caller_utterance(1))
    await wait_heard(call, 3)
    await call.hangup()
    assert await call.wait_ended(5) == "caller-hangup"
    heard = utterances_heard(call)
    assert [label for label, _ in heard] == ["greeting", "answer:0", "answer:1"]
    for (_, seconds), expected in zip(heard, (1.0, 1.2, 1.2), strict=True):
        assert abs(seconds - expected) < 0.015, heard
    assert not call.protocol_errors


async def assert_keys_expire(stack: Stack, sid: str) -> None:
    """The call's audio streams expire after ENDED_TTL_S; its record and events are kept for
    CALL_RECORD_TTL_S (the call API reads them), and not a second longer."""
    streams = (stack.keys.inbound(sid), stack.keys.outbound(sid))
    deadline = time.monotonic() + 10
    while await stack.redis.exists(*streams):
        assert time.monotonic() < deadline, "call streams did not expire"
        await asyncio.sleep(0.1)
    keep = int(stack.gateway.env.get("CALL_RECORD_TTL_S", "86400"))
    for key in (stack.keys.call(sid), stack.keys.events(sid)):
        assert 0 < await stack.redis.ttl(key) <= keep, key


async def test_call_with_greeting_two_turns_and_hangup(stack: Stack) -> None:
    call = await stack.call()
    session = await stack.vapi.wait_session(10)
    assert session.audio_format == stack.fmt
    overrides = session.body["assistantOverrides"]
    assert overrides["variableValues"]["twilioCallSid"] == call.call_sid
    assert overrides["metadata"]["from"] == call.from_
    # Each side's writer rings its reader: neither names the call's stream in its blocked read.
    await until_rung(stack.gateway, stack.worker)

    await two_turns_then_hang_up(call)
    await session.wait_closed(2)
    assert session.received_control("end-call"), "Vapi was told the caller hung up"
    assert_every_frame_delivered(call, session, stack.fmt)
    assert stack.vapi.open_sessions() == 0
    record = await stack.redis.hgetall(stack.keys.call(call.call_sid))
    assert record.get(b"end_reason") == b"caller-hangup"
    await assert_keys_expire(stack, call.call_sid)
    assert_logs_are_structured_and_secret_free(stack, call, session)


def assert_logs_are_structured_and_secret_free(stack: Stack, call: SimCall, session: VapiSession) -> None:
    secrets = [AUTH_TOKEN, VAPI_KEY, session.call_json()["transport"]["websocketCallUrl"], session.id]
    for proc in (stack.gateway, stack.worker):
        text = proc.logs()
        for secret in secrets[:3]:
            assert secret not in text, f"{proc.name} logged a secret"
        lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]
        about_call = [entry for entry in lines if entry.get("call_sid") == call.call_sid]
        assert about_call, f"{proc.name} logged nothing with the call's CallSid"
        if proc is stack.worker:
            assert all(entry.get("worker_id") for entry in lines)
        else:
            assert any(entry.get("stream_sid") == call.stream_sid for entry in about_call)


async def test_slow_vapi_loses_no_caller_audio(redis_url: str, prefix: str, procs: list[Proc],
                                               redis: aioredis.Redis) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis,
                                  assistant=greeter(answers=1, greeting_s=None)):
        stack.vapi.create_delay = 1.5
        call = await stack.call()
        call.say_pcm(caller_utterance(2, seconds=1.0))  # the caller talks before Vapi is ready
        session = await stack.vapi.wait_session(10)
        await session.wait_connected(5)
        await wait_heard(call, 1, timeout=10)
        assert [label for label, _ in labels_heard(call)] == ["answer:0"]
        await call.hangup()
        await session.wait_closed(3)
        assert_every_frame_delivered(call, session, stack.fmt)
        assert len(session.caller_turns) == 1


@pytest.mark.parametrize(("status", "reason"), [(400, "vapi-rejected"), (429, "vapi-rate-limited"),
                                                (500, "vapi-error")])
async def test_vapi_refusing_the_call_ends_it_cleanly(redis_url: str, prefix: str, procs: list[Proc],
                                                      redis: aioredis.Redis, status: int,
                                                      reason: str) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis):
        stack.vapi.fail_status = status
        call = await stack.call()
        assert await call.wait_ended(10) == "hangup"
        assert call.say_texts == [UNAVAILABLE], "the caller hears why, then a hang-up"
        record = await stack.redis.hgetall(stack.keys.call(call.call_sid))
        assert record[b"end_reason"] == reason.encode()
        events = [f[b"k"] for _i, f in await stack.redis.xrange(stack.keys.events(call.call_sid))]
        assert b"call-ended" in events
        assert stack.vapi.open_sessions() == 0
        assert stack.worker.proc is not None and stack.worker.proc.poll() is None


async def test_vapi_socket_dropping_mid_call_ends_the_call(redis_url: str, prefix: str,
                                                            procs: list[Proc],
                                                            redis: aioredis.Redis) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis):
        call = await stack.call()
        session = await stack.vapi.wait_session(10)
        await wait_heard(call, 1)
        await session.drop()
        assert await call.wait_ended(10) == "hangup"
        assert call.say_texts == [UNAVAILABLE]
        record = await stack.redis.hgetall(stack.keys.call(call.call_sid))
        assert record[b"end_reason"] == b"vapi-socket-closed"
        # The worker survived and serves the next call.
        second = await stack.call()
        await wait_heard(second, 1)
        await second.hangup()
        assert stack.worker.proc is not None and stack.worker.proc.poll() is None


async def test_assistant_ending_the_call_hangs_up_after_its_goodbye(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis
) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis,
                                  assistant=greeter(answers=1, end_after=True)):
        call = await stack.call()
        await wait_heard(call, 1)
        call.say_pcm(caller_utterance(0))
        assert await call.wait_ended(15) == "hangup"
        # The stand-in says its goodbye right after the answer, so the two form one run, and
        # both play to the end: 1.2 s + 0.8 s of audio, the last of it the goodbye.
        runs = utterances_heard(call)
        assert [label for label, _ in runs] == ["greeting", "answer:0"], runs
        assert abs(runs[-1][1] - 2.0) < 0.015, runs
        end = call.heard_segments()[-1][1]
        pcm = call.heard_pcm16()
        assert voices.identify(pcm[int((end - 0.7) * 8000) * 2: int(end * 8000) * 2], 8000) == "goodbye"
        assert call.say_texts == []
        record = await stack.redis.hgetall(stack.keys.call(call.call_sid))
        assert record[b"end_reason"] == b"assistant-ended"


async def test_with_no_worker_running_the_caller_hears_why(redis_url: str, prefix: str,
                                                           procs: list[Proc],
                                                           redis: aioredis.Redis) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis, workers=0, NO_WORKER_TIMEOUT_S=1):
        call = await stack.call()
        assert await call.wait_ended(10) == "hangup"
        assert call.say_texts == [UNAVAILABLE]
        record = await stack.redis.hgetall(stack.keys.call(call.call_sid))
        assert record[b"end_reason"] == b"no-worker"
