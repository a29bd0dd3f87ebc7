"""Metrics stay right when the gateway app runs in several server processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx

from callbridge.redis_server import free_port
from tests.conftest import ROOT, Proc, base_env


async def test_metrics_add_up_across_uvicorn_worker_processes(
    redis_url: str, prefix: str, procs: list[Proc], tmp_path: Path
) -> None:
    port = free_port()
    env = base_env(redis_url, prefix, PUBLIC_URL=f"http://127.0.0.1:{port}",
                   PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    server = Proc("uvicorn-x2", [], env, health_url=f"http://127.0.0.1:{port}/readyz")
    server.proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "gateway.app:app_from_env", "--factory", "--workers", "2",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env, cwd=ROOT, stdout=server.log_path.open("wb"), stderr=subprocess.STDOUT)
    server._log = server.log_path.open("ab")
    procs.append(server)
    await server.wait_ready()
    sent = 24
    for _ in range(sent):  # a fresh connection each time, so both processes take some
        async with httpx.AsyncClient() as client:
            resp = await client.post(f"http://127.0.0.1:{port}/twilio/voice", data={"CallSid": "x"})
            assert resp.status_code == 403
    pids = {p.name for p in tmp_path.iterdir()}
    assert len({re.sub(r"\D", "", n) for n in pids}) >= 2, "both processes served requests"
    for _ in range(6):  # whichever process answers /metrics, it reports the sum
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        pattern = r'callbridge_gateway_webhooks_total\{outcome="forbidden",route="voice"\} ([0-9.]+)'
        m = re.search(pattern, text)
        assert m and float(m.group(1)) == sent, text[:500]
