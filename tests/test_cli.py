"""The `callbridge` command itself: configuration errors and `dev` with an embedded Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
