"""`callbridge bench` keeps working: a tiny run of each scenario, judged on correctness only.

Speed is for the benchmark's printed figures on a quiet machine, never asserted here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import orjson
import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("scenario", ["duplex", "conversation"])
def test_bench_runs_and_loses_no_frames(scenario: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAPI_", "TWILIO_", "PUBLIC_URL"))}
    run = subprocess.run(
        [sys.executable, "-m", "callbridge.cli", "bench", "--calls", "3", "--seconds", "3",
         "--scenario", scenario, "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = orjson.loads(next(line for line in run.stdout.splitlines() if line.startswith("{")))
    assert report["context"]["calls_connected"] == 3
    assert report["errors"]["protocol_errors"] == 0
    assert report["errors"]["calls_ended_early"] == 0
    if scenario == "duplex":
        assert report["frames"]["inbound_lost"] == 0 and report["frames"]["outbound_lost"] == 0
    else:
        assert report["stale_frames_after_clear"]["stale"] == 0
        assert report["interruption_to_clear_ms"]["without_clear"] == 0
    assert report["cpu"]["gateway"]["cpu_s"] > 0 and report["cpu"]["worker-1"]["cpu_s"] > 0
