"""Redis restarts under a live call: both tiers reconnect; no process dies, no Vapi session leaks."""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import redis.asyncio as aioredis

from callbridge.redis_server import free_port, start_redis
from tests.conftest import Proc
from tests.test_e2e import make_stack, wait_heard


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
        async for stack in make_stack(url, prefix, procs, client):
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

            deadline = time.monotonic() + 15
            while await _ready(stack.gateway.health_url) != 200 or \
                    await _ready(stack.worker.health_url) != 200:
                assert time.monotonic() < deadline, "tiers must become ready again"
                await asyncio.sleep(0.1)
            # The call in flight still ends cleanly; nothing crashed, nothing leaked.
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
