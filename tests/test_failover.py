"""A live call survives the loss of any one process: a worker killed or frozen mid-answer, with
real processes and signals. What the caller heard and what the new assistant session was given
are checked; how fast it happened is a `callbridge bench --scenario failover` figure (the bounds
here only say "within a few seconds", so they hold on a busy machine)."""

from __future__ import annotations

import signal

import redis.asyncio as aioredis

from callbridge.redis_server import free_port
from sim import voices
from sim.twilio import SimCall, TwilioSim
from sim.vapi import VapiSession, VapiSim, greeter
from tests.conftest import (
    Proc,
    gateway_proc,
    worker_proc,
)
from tests.test_e2e import (
    Stack,
    caller_utterance,
    make_stack,
    until,
    until_rung,
    utterances_heard,
    wait_heard,
)
from tests.test_lifecycle import _env as lifecycle_env
from tests.test_lifecycle import sims  # noqa: F401 - the fixture: stand-ins behind one public name

MODEL_GENERATED = "assistant-speaks-first-with-model-generated-message"
ANSWER_S = 4.0


def heard_after(call: SimCall, t: float) -> list[tuple[str | None, float, float]]:
    """(label, start, audible seconds) of each utterance the caller heard that began after t."""
    pcm = call.heard_pcm16()
    out = []
    for start, end in call.heard_segments():
        if start > t:
            label = voices.identify(pcm[int(start * 8000) * 2: int(end * 8000) * 2], 8000)
            out.append((label, start, end - start))
    return out


async def second_session(vapi: VapiSim, first: VapiSession, timeout: float = 10.0) -> VapiSession:
    others: list[VapiSession] = []

    def created() -> bool:
        others[:] = [s for s in vapi.sessions.values() if s is not first]
        return bool(others)

    await until(created, timeout, "a new Vapi session for the call")
    return others[0]


async def resumption(stack: Stack, call: SimCall, first: VapiSession,
                     lost_at: float) -> tuple[VapiSession, float]:
    """The new Vapi session, and when (call clock) the caller began to hear its resumption."""
    second = await second_session(stack.vapi, first)
    await until(lambda: any(lbl == "resume" for lbl, _s, _d in heard_after(call, lost_at)), 10,
                "the resumption")
    return second, next(s for lbl, s, _d in heard_after(call, lost_at) if lbl == "resume")


async def _mid_answer(stack: Stack) -> tuple[SimCall, VapiSession]:
    """A call whose caller has heard the greeting, spoken, and heard 1.5 s of a 4 s answer."""
    call = await stack.call()
    first = await stack.vapi.wait_session(10)
    await wait_heard(call, 1)
    call.say_pcm(caller_utterance(0))

    def answer_playing(c: SimCall = call) -> bool:
        segs = c.heard_segments()
        return len(segs) >= 2 and c.now() - segs[1][0] > 1.5

    await until(answer_playing, 10, "1.5 s of the answer")
    return call, first


def _resume_checks(call: SimCall, second: VapiSession, lost_at: float) -> None:
    overrides = second.body["assistantOverrides"]
    assert overrides["firstMessageMode"] == MODEL_GENERATED, "the new session speaks first"
    messages = overrides["model"]["messages"]
    assert {m["role"] for m in messages} <= {"user", "assistant"}, "never a system message: it " \
        "would replace the saved prompt"
    roles = [m["role"] for m in messages]
    assert "user" in roles, messages
    # The cut answer, as far as the caller heard it (about 1.5 s of 4 s), marked as cut.
    cut = messages[-1]
    assert cut["role"] == "assistant", messages
    assert cut["content"].startswith("answer:0") and cut["content"].endswith("…"), cut
    full = second_text_words(ANSWER_S)
    said = len(cut["content"].rstrip("…").split())
    assert 0 < said < full, (cut, full)
    # The caller hears a resumption, not a second greeting.
    after = heard_after(call, lost_at)
    labels = [label for label, _start, _s in after]
    assert "greeting" not in labels, after
    assert labels and labels[0] == "resume", after


def second_text_words(seconds: float) -> int:
    """Words in the stand-in's text for an utterance of this length (label + 2.5 words/s)."""
    return 1 + round(seconds * 2.5)


async def test_worker_killed_mid_answer_the_call_resumes_on_another_worker(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis
) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis, workers=2,
                                  assistant=greeter(answers=3, answer_s=ANSWER_S)):
        await _killed(stack)


async def _killed(stack: Stack) -> None:
    call, first = await _mid_answer(stack)
    victim = await stack.owner(call.call_sid)
    killed_at = call.now()
    victim.signal(signal.SIGKILL)
    call.say_pcm(caller_utterance(1))  # the caller talks into the gap
    second, resumed_at = await resumption(stack, call, first, killed_at)
    assert resumed_at - killed_at < 6.0, "heard again within a few seconds"
    _resume_checks(call, second, killed_at)
    # What the caller said during the gap reached the new session.
    await until(lambda: len(second.caller_turns) >= 1, 10, "the gap's words at the new session")
    survivor = await stack.owner(call.call_sid)
    assert survivor is not victim
    # The new owner and the gateway ring each other again (gateway/doorbell.py).
    await until_rung(stack.gateway, survivor)
    await call.hangup()
    await second.wait_closed(5)
    assert stack.vapi.open_sessions() == 0


async def test_worker_frozen_past_its_lease_is_replaced_and_stays_silent_when_it_wakes(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis
) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis, workers=2,
                                  assistant=greeter(answers=3, answer_s=ANSWER_S)):
        await _frozen(stack)


async def _frozen(stack: Stack) -> None:
    call, first = await _mid_answer(stack)
    victim = await stack.owner(call.call_sid)
    stopped_at = call.now()
    victim.signal(signal.SIGSTOP)
    try:
        second, _resumed_at = await resumption(stack, call, first, stopped_at)
        await until(lambda: call.now() > stopped_at + 6.0, 10, "a 6 s stall")
    finally:
        victim.signal(signal.SIGCONT)
    woke_at = call.now()
    # The woken worker lets the call go: its Vapi session ends, it writes nothing audible.
    await first.wait_closed(10)
    _resume_checks(call, second, stopped_at)
    # Let the resumption play out; nothing of the old session's answer may reach the caller:
    # every utterance heard since the takeover is whole and from the new session alone.
    await until(lambda: call.now() > woke_at + 2.0, 10, "2 s after the wake-up")
    heard = utterances_heard(call)
    resumed = [u for u in heard if u[0] == "resume"]
    assert len(resumed) == 1 and abs(resumed[0][1] - 1.0) < 0.015, heard
    assert (await stack.owner(call.call_sid)) is not victim
    assert victim.proc is not None and victim.proc.poll() is None, "the woken worker lives on"
    await call.hangup()
    await second.wait_closed(5)
    assert stack.vapi.open_sessions() == 0


async def test_gateway_killed_mid_call_the_call_goes_on_through_another(
    redis_url: str, prefix: str, procs: list[Proc], sims: tuple[TwilioSim, VapiSim]  # noqa: F811 - the imported fixture
) -> None:
    twilio, vapi = sims
    env = lifecycle_env(redis_url, prefix, twilio, vapi)
    p1, p2 = free_port(), free_port()
    gw1, gw2 = gateway_proc(env, p1).start(), gateway_proc(env, p2).start()
    wk = worker_proc(env).start()
    procs += [gw1, gw2, wk]
    for p in (gw1, gw2, wk):
        await p.wait_ready()
    twilio.gateway_url = f"http://127.0.0.1:{p1}"
    call = await twilio.place_call()
    await wait_heard(call, 1)
    twilio.gateway_url = f"http://127.0.0.1:{p2}"  # the load balancer sees gateway 1 go
    killed_at = call.now()
    gw1.signal(signal.SIGKILL)
    await call.wait_streams(2, timeout=10)
    starts = [t for t, kind, _d in call.events if kind == "stream-started"]
    assert starts and starts[-1] - killed_at < 2.0, (starts, killed_at)
    call.say_pcm(caller_utterance(0))
    await wait_heard(call, 2)
    assert [label for label, _ in utterances_heard(call)] == ["greeting", "answer:0"]
    assert len(vapi.sessions) == 1, "the same assistant session all along"
    await call.hangup()
    assert await call.wait_ended(5) == "caller-hangup"


async def test_a_worker_restarted_with_the_same_id_picks_up_the_calls_it_left(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis
) -> None:
    """Stable WORKER_IDs (a StatefulSet, a fixed name per host): the process that comes back
    under the old name must serve what the old one held, not leave it to a lease that never
    lapses."""
    async for stack in make_stack(redis_url, prefix, procs, redis, workers=1,
                                  assistant=greeter(answers=3, answer_s=ANSWER_S)):
        await _restarted(stack, procs)


async def _restarted(stack: Stack, procs: list[Proc]) -> None:
    call, first = await _mid_answer(stack)
    old = stack.workers[0]
    killed_at = call.now()
    old.signal(signal.SIGKILL)
    again = worker_proc(dict(old.env)).start()  # same WORKER_ID, at once
    procs.append(again)
    await again.wait_ready()
    second, resumed_at = await resumption(stack, call, first, killed_at)
    assert resumed_at - killed_at < 8.0, "heard again within a few seconds"
    _resume_checks(call, second, killed_at)
    await call.hangup()
    await second.wait_closed(5)
    assert stack.vapi.open_sessions() == 0
