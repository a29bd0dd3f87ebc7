"""The `callbridge` command itself: configuration errors and `dev` with an embedded Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from callbridge.redis_server import free_port
from tests.conftest import ROOT, Proc


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REDIS_", "VAPI_", "TWILIO_", "PUBLIC_URL"))}
    env.update(extra)
    return env


def test_missing_setting_is_one_line_naming_it() -> None:
    run = subprocess.run([sys.executable, "-m", "callbridge.cli", "gateway"], cwd=ROOT,
                         env=_clean_env(REDIS_URL="redis://127.0.0.1:1/0", TWILIO_AUTH_TOKEN="x"),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == "callbridge: missing required setting: PUBLIC_URL"
    run = subprocess.run([sys.executable, "-m", "callbridge.cli", "worker"], cwd=ROOT,
                         env=_clean_env(REDIS_URL="redis://127.0.0.1:1/0", VAPI_API_KEY="k"),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == "callbridge: missing required setting: VAPI_ASSISTANT_ID"


def test_invalid_setting_is_one_line_too() -> None:
    run = subprocess.run([sys.executable, "-m", "callbridge.cli", "gateway"], cwd=ROOT,
                         env=_clean_env(PUBLIC_URL="not a url", VAPI_AUDIO_FORMAT="mulaw"),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "PUBLIC_URL" in run.stderr


@pytest.mark.parametrize("phases", ["0", "11"])
def test_the_bench_refuses_phases_out_of_range(phases: str) -> None:
    run = subprocess.run([sys.executable, "-m", "callbridge.cli", "bench", "--calls", "1",
                          "--phases", phases],
                         cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--phases 1..10" in run.stderr, (run.returncode, run.stderr)


async def test_dev_runs_with_an_embedded_redis_and_stops_on_sigterm() -> None:
    port = free_port()
    env = _clean_env(TWILIO_AUTH_TOKEN="t", TWILIO_ACCOUNT_SID="AC" + "0" * 32, VAPI_API_KEY="k",
                     VAPI_ASSISTANT_ID="a", LOG_FORMAT="text")
    dev = Proc("dev", ["dev", "--port", str(port)], env, health_url=f"http://127.0.0.1:{port}/readyz")
    dev.start()
    try:
        await dev.wait_ready()
        assert "embedded redis" in dev.logs()
        dev.signal(signal.SIGTERM)
        assert dev.proc is not None
        assert dev.proc.wait(20) == 0
    finally:
        dev.stop()


async def test_a_worker_whose_health_port_is_taken_stops_before_claiming_anything(
        redis_url: str, prefix: str) -> None:
    import socket

    import redis.asyncio as aioredis

    from shared.streams import Keys

    keys = Keys(prefix)
    client = aioredis.Redis.from_url(redis_url)
    await client.xadd(keys.calls, {b"sid": b"CA-waiting", b"from": b"+1", b"to": b"+2"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "callbridge.cli", "worker"], cwd=ROOT, capture_output=True,
            text=True, timeout=60,
            env=_clean_env(REDIS_URL=redis_url, REDIS_PREFIX=prefix, VAPI_API_KEY="k",
                           VAPI_ASSISTANT_ID="a", WORKER_HTTP_HOST="127.0.0.1",
                           WORKER_HTTP_PORT=str(port), LOG_LEVEL="WARNING"))
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "WORKER_HTTP_PORT" in lines[0], lines
    groups = await client.xinfo_groups(keys.calls) if await client.exists(keys.calls) else []
    assert all(g["pending"] == 0 for g in groups), "nothing was claimed"
    assert not await client.exists(keys.workers), "it never took a lease"
    await client.aclose()


def test_a_free_port_is_never_handed_out_twice() -> None:
    """Tests and the bench pick ports before their processes bind them; the kernel offers a port
    it just offered again often enough (500 raw picks repeated 2-12 here) that a gateway and a
    worker picked one port now and then. `free_port` hands each out once."""
    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
