"""Deploys without dropping calls: gateway and worker SIGTERM with real processes and signals."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from callbridge.redis_server import free_port
from shared.streams import Keys
from sim.twilio import SimCall, TwilioSim
from sim.vapi import VapiSession, VapiSim, greeter
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, VAPI_KEY, Proc, base_env, gateway_proc, worker_proc
from tests.test_e2e import caller_utterance, labels_heard, until, wait_heard

PUBLIC = "https://cb.example.test"  # one public name in front of several gateways


@pytest.fixture
async def sims() -> AsyncIterator[tuple[TwilioSim, VapiSim]]:
    vapi = VapiSim(api_key=VAPI_KEY, assistant=greeter(answers=3))
    await vapi.start()
    twilio = TwilioSim(gateway_url="http://127.0.0.1:1", public_url=PUBLIC, account_sid=ACCOUNT_SID,
                       auth_token=AUTH_TOKEN)
    await twilio.start()
    yield twilio, vapi
    await twilio.stop()
    await vapi.stop()


def _env(redis_url: str, prefix: str, twilio: TwilioSim, vapi: VapiSim, **extra: object) -> dict[str, str]:
    return base_env(redis_url, prefix, PUBLIC_URL=PUBLIC, VAPI_BASE_URL=vapi.base_url,
                    TWILIO_API_BASE_URL=twilio.rest_base_url, ENDED_TTL_S=5, **extra)


async def _wait_exit(proc: Proc, timeout: float) -> int:
    assert proc.proc is not None
    deadline = time.monotonic() + timeout
    while proc.proc.poll() is None:
        assert time.monotonic() < deadline, f"{proc.name} did not exit:\n{proc.logs()[-3000:]}"
        await asyncio.sleep(0.05)
    return proc.proc.returncode


async def _call_on_one_worker(
    env: dict[str, str], procs: list[Proc], twilio: TwilioSim, vapi: VapiSim
) -> tuple[Proc, Proc, SimCall, VapiSession]:
    """A gateway and one worker, and a call on them whose greeting the caller has heard."""
    port = free_port()
    gw = gateway_proc(env, port).start()
    wk = worker_proc(env).start()
    procs += [gw, wk]
    await gw.wait_ready()
    await wk.wait_ready()
    twilio.gateway_url = f"http://127.0.0.1:{port}"
    call = await twilio.place_call()
    session = await vapi.wait_session(10)
    await wait_heard(call, 1)
    return gw, wk, call, session


async def _start_worker(env: dict[str, str], procs: list[Proc]) -> Proc:
    wk = worker_proc(env).start()
    procs.append(wk)
    await wk.wait_ready()
    return wk


async def test_gateway_sigterm_hands_the_call_to_another_gateway(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis,
    sims: tuple[TwilioSim, VapiSim],
) -> None:
    twilio, vapi = sims
    env = _env(redis_url, prefix, twilio, vapi, GATEWAY_DRAIN_TIMEOUT_S=5)
    p1, p2 = free_port(), free_port()
    gw1, gw2 = gateway_proc(env, p1).start(), gateway_proc(env, p2).start()
    wk = worker_proc(env).start()
    procs += [gw1, gw2, wk]
    for p in (gw1, gw2, wk):
        await p.wait_ready()

    twilio.gateway_url = f"http://127.0.0.1:{p1}"
    call = await twilio.place_call()
    await wait_heard(call, 1)

    # The load balancer stops sending to gateway 1; then it gets SIGTERM.
    twilio.gateway_url = f"http://127.0.0.1:{p2}"
    gw1.signal(signal.SIGTERM)
    await call.wait_streams(2, timeout=10)
    assert await _wait_exit(gw1, 10) == 0

    call.say_pcm(caller_utterance(0))
    await wait_heard(call, 2)
    await call.hangup()
    assert await call.wait_ended(5) == "caller-hangup"
    assert [label for label, _ in labels_heard(call)] == ["greeting", "answer:0"]
    assert len(vapi.sessions) == 1, "the assistant session survived the gateway restart"
    events = [f[b"k"] for _i, f in await redis.xrange(Keys(prefix).events(call.call_sid))]
    assert events.count(b"stream-start") == 2 and b"stream-lost" in events


async def test_gateway_sigterm_with_nowhere_to_go_exits_cleanly(
    redis_url: str, prefix: str, procs: list[Proc], sims: tuple[TwilioSim, VapiSim],
) -> None:
    """The only gateway drains: its stream is handed back, Twilio's re-attach comes back to the
    same draining gateway and is refused, and the process exits 0 within the drain timeout.
    (Readiness and refusal during the drain are checked in-process in test_gateway.py, where the
    drain can be observed without racing the process's exit.)"""
    twilio, vapi = sims
    env = _env(redis_url, prefix, twilio, vapi, GATEWAY_DRAIN_TIMEOUT_S=3)
    gw, _wk, call, _session = await _call_on_one_worker(env, procs, twilio, vapi)
    gw.signal(signal.SIGTERM)
    assert await _wait_exit(gw, 10) == 0
    closes = [d for _t, kind, d in call.events if kind == "stream-closed"]
    assert closes and closes[0]["by"] == "server" and closes[0]["code"] == 1001, closes


async def test_worker_sigterm_releases_its_calls_to_another_worker(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis,
    sims: tuple[TwilioSim, VapiSim],
) -> None:
    twilio, vapi = sims
    # TAKEOVER_RESUME=wait: the older way of resuming, kept as a setting, is covered here.
    env = _env(redis_url, prefix, twilio, vapi, WORKER_DRAIN_TIMEOUT_S=0.5, CLAIM_LEASE_S=1.5,
               TAKEOVER_RESUME="wait")
    _gw, wk1, call, first = await _call_on_one_worker(env, procs, twilio, vapi)
    call.say_pcm(caller_utterance(0))
    await wait_heard(call, 2)

    await _start_worker(env, procs)
    wk1.signal(signal.SIGTERM)
    assert await _wait_exit(wk1, 10) == 0
    await first.wait_closed(2)
    assert first.received_control("end-call"), "the released Vapi session was ended, not leaked"

    second = await vapi.wait_session(10)  # worker 2 took the call over with a new session
    # ...which does not greet again and is told what was said before.
    assert second.body["assistantOverrides"]["firstMessageMode"] == "assistant-waits-for-user"
    history = await second.wait_control("add-message", 5)
    assert history["triggerResponseEnabled"] is False
    assert "utterance" in history["message"]["content"]  # the caller's transcribed turn
    call.say_pcm(caller_utterance(1))
    await wait_heard(call, 3)
    await call.hangup()
    assert await call.wait_ended(5) == "caller-hangup"
    await second.wait_closed(3)
    assert vapi.open_sessions() == 0
    assert [label for label, _ in labels_heard(call)] == ["greeting", "answer:0", "answer:0"]
    record = await redis.hgetall(Keys(prefix).call(call.call_sid))
    assert record[b"end_reason"] == b"caller-hangup"


async def test_a_killed_worker_s_call_is_taken_over_after_the_lease(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis,
    sims: tuple[TwilioSim, VapiSim],
) -> None:
    twilio, vapi = sims
    env = _env(redis_url, prefix, twilio, vapi, CLAIM_LEASE_S=1.5)
    _gw, wk1, call, first = await _call_on_one_worker(env, procs, twilio, vapi)
    await _start_worker(env, procs)

    wk1.signal(signal.SIGKILL)  # no drain, no goodbye: the lease must expire
    killed_at = time.monotonic()
    await first.wait_closed(5)  # the OS closed its socket; Vapi ends that session
    second = await vapi.wait_session(10)
    assert time.monotonic() - killed_at < 8, "taken over within the lease and a few rounds"
    await second.wait_connected(5)
    call.say_pcm(caller_utterance(0))
    await wait_heard(call, 2)  # the new session answers the caller
    await call.hangup()
    await second.wait_closed(3)
    assert vapi.open_sessions() == 0
    deadline = time.monotonic() + 5
    while (await redis.xpending(Keys(prefix).calls, "workers"))["pending"]:
        assert time.monotonic() < deadline, "the job was acknowledged by the new owner"
        await asyncio.sleep(0.05)


async def test_a_stalled_worker_lets_go_of_a_call_taken_over_meanwhile(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis,
    sims: tuple[TwilioSim, VapiSim],
) -> None:
    twilio, vapi = sims
    env = _env(redis_url, prefix, twilio, vapi, CLAIM_LEASE_S=1.5)
    _gw, wk1, call, first = await _call_on_one_worker(env, procs, twilio, vapi)
    await _start_worker(env, procs)

    wk1.signal(signal.SIGSTOP)  # a long GC pause, a partition: the lease runs out
    try:
        second = await vapi.wait_session(10)  # worker 2 took the call over
    finally:
        wk1.signal(signal.SIGCONT)
    # Worker 1 wakes up, sees the call is not its own any more and lets it go.
    await first.wait_closed(5)
    assert first.received_control("end-call")
    await second.wait_connected(5)
    assert second.is_open and vapi.open_sessions() == 1
    call.say_pcm(caller_utterance(0))
    await until(lambda: second.caller_turns != [], 10, "worker 2 carries the call")
    await call.hangup()
    await second.wait_closed(3)
    assert vapi.open_sessions() == 0
    assert wk1.proc is not None and wk1.proc.poll() is None, "the stalled worker lives on"
