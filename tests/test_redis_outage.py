"""Redis restarts empty under a live call: both tiers reconnect, the call's audio flows again both
ways, no process dies, no Vapi session leaks."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import redis.asyncio as aioredis

from callbridge.redis_server import free_port, start_redis
from tests.conftest import Proc
from tests.test_e2e import caller_utterance, labels_heard, make_stack, until, wait_heard


async def _ready(url: str) -> int:
    async with httpx.AsyncClient() as client:
        try:
            return (await client.get(url, timeout=2)).status_code
        except httpx.HTTPError:
            return 0


async def test_calls_survive_a_redis_restart(prefix: str, procs: list[Proc]) -> None:
    port = free_port()
    server = start_redis(port)
    url = f"redis://127.0.0.1:{port}/0"
    client = aioredis.Redis.from_url(url)
    try:
        async for stack in make_stack(url, prefix, procs, client, NO_WORKER_TIMEOUT_S=2):
            call = await stack.call()
            session = await stack.vapi.wait_session(10)
            await wait_heard(call, 1)
            assert stack.gateway.health_url and stack.worker.health_url

            server.stop()  # Redis goes away mid-call...
            deadline = time.monotonic() + 10
            while await _ready(stack.gateway.health_url) != 503:
                assert time.monotonic() < deadline, "gateway /readyz must say 503 without Redis"
                await asyncio.sleep(0.05)
            assert await _ready(stack.worker.health_url) == 503
            await asyncio.sleep(1.0)  # an outage of a second or so
            server = start_redis(port)  # ...and comes back empty
            restarted_at = call.now()

            deadline = time.monotonic() + 15
            while await _ready(stack.gateway.health_url) != 200 or \
                    await _ready(stack.worker.health_url) != 200:
                assert time.monotonic() < deadline, "tiers must become ready again"
                await asyncio.sleep(0.1)
            # The call in flight goes on, both ways: the caller's words reach Vapi, and the
            # assistant's answer to them reaches the caller.
            received = len(session.received_frames)
            call.say_pcm(caller_utterance(0))
            await until(lambda s=session, n=received: len(s.received_frames) >= n + 40, 10,
                        "the caller's audio to reach Vapi after the restart")
            await wait_heard(call, 2, timeout=10)
            # ...and keeps going past the gateway's no-worker deadline (2 s here): the restart
            # must not make the call look unowned.
            await until(lambda c=call, t=restarted_at: c.now() > t + 3, 10, "3 s after the restart")
            call.say_pcm(caller_utterance(1))
            await wait_heard(call, 3, timeout=10)
            assert [label for label, _ in labels_heard(call)] == ["greeting", "answer:0", "answer:1"]
            # It still ends cleanly; nothing crashed, nothing leaked.
            await call.hangup()
            await session.wait_closed(5)
            assert stack.vapi.open_sessions() == 0
            for p in (stack.gateway, stack.worker):
                assert p.proc is not None and p.proc.poll() is None, p.logs()[-2000:]
            async with httpx.AsyncClient() as http:
                text = (await http.get(stack.gateway.health_url.replace("readyz", "metrics"))).text
            m = re.search(r"^callbridge_redis_reconnects_total ([0-9.]+)", text, re.M)
            assert m and float(m.group(1)) >= 1
            # New calls work on the restarted Redis.
            second = await stack.call()
            await wait_heard(second, 1)
            await second.hangup()
    finally:
        await client.aclose()
        server.stop()
