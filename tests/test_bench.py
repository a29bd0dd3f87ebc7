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


def test_bench_failover_runs_and_reports_the_figures() -> None:
    """Two events (a kill, then a stall) on 4 calls and 2 workers: every hit call resumes, no call
    is lost, nothing is left open. Gap figures are reported, never judged: the machine is shared."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAPI_", "TWILIO_", "PUBLIC_URL"))}
    run = subprocess.run(
        [sys.executable, "-m", "callbridge.cli", "bench", "--scenario", "failover", "--calls", "4",
         "--workers", "2", "--events", "2", "--seconds", "4", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "failover gap (s)" in run.stdout and "targets:" in run.stdout
    report = orjson.loads(next(line for line in run.stdout.splitlines() if line.startswith("{")))
    assert report["context"]["calls_connected"] == 4
    assert [e["kind"] for e in report["events"]] == ["kill", "stall"]
    hit = sum(e["calls"] for e in report["events"])
    assert hit >= 2 and all(e["resumed"] == e["calls"] for e in report["events"]), report["events"]
    assert report["gap_s"]["all"]["n"] == hit and report["gap_s"]["all"]["p50"] is not None
    assert report["calls_lost"]["count"] == 0, report["calls_lost"]
    assert report["sessions"]["open_at_end"] == 0
    assert report["second_greetings"]["spoken_by_new_sessions"] == 0
    assert report["words_lost"]["frame_key_collisions"] == 0
    assert report["errors"]["protocol_errors"] == 0
    assert report["errors"]["calls_not_ended_after_hangup"] == 0
