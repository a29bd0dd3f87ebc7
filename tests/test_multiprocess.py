"""Metrics stay right when the gateway app runs in several server processes."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx
import orjson
from prometheus_client.mmap_dict import MmapedDict

from callbridge.redis_server import free_port
from tests.conftest import Proc, base_env

FORBIDDEN = {"outcome": "forbidden", "route": "voice"}


def forbidden_by_pid(directory: Path) -> dict[str, float]:
    """What each process itself counted, read from its own multiprocess file (counter_<pid>.db)."""
    counts: dict[str, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = path.stem.removeprefix("counter_")
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _help = orjson.loads(key)
            if name == "callbridge_gateway_webhooks_total" and labels == FORBIDDEN:
                counts[pid] = counts.get(pid, 0.0) + value
    return counts


async def test_metrics_add_up_across_uvicorn_worker_processes(
    redis_url: str, prefix: str, procs: list[Proc], tmp_path: Path
) -> None:
    port = free_port()
    env = base_env(redis_url, prefix, PUBLIC_URL=f"http://127.0.0.1:{port}",
                   PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    server = Proc("uvicorn-x2", ["gateway.app:app_from_env", "--factory", "--workers", "2",
                                 "--ws", "gateway.twilio_socket:MediaProtocol",  # as the README says
                                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                  env, health_url=f"http://127.0.0.1:{port}/readyz",
                  program=[sys.executable, "-m", "uvicorn"]).start()
    procs.append(server)
    await server.wait_ready()
    sent = 0
    # The kernel spreads new connections over both processes, unevenly: send unsigned webhooks
    # (a fresh connection each) until each process has counted some itself, within a bound.
    while sent < 400:
        async with httpx.AsyncClient() as client:
            resp = await client.post(f"http://127.0.0.1:{port}/twilio/voice", data={"CallSid": "x"})
        assert resp.status_code == 403
        sent += 1
        if sent % 8 == 0 and sum(1 for v in forbidden_by_pid(tmp_path).values() if v > 0) >= 2:
            break
    per_process = forbidden_by_pid(tmp_path)
    served = {pid: n for pid, n in per_process.items() if n > 0}
    assert len(served) >= 2, f"one process took all {sent} requests: {per_process}"
    assert sum(served.values()) == sent
    pattern = r'callbridge_gateway_webhooks_total\{outcome="forbidden",route="voice"\} ([0-9.]+)'
    for _ in range(6):  # whichever process answers /metrics, it reports every process's share
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        m = re.search(pattern, text)
        assert m and float(m.group(1)) == sent, (served, text[:500])
