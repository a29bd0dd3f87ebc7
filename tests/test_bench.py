"""`callbridge bench` keeps working: a tiny run of each scenario, judged on correctness only.

Speed is for the benchmark's printed figures on a quiet machine, never asserted here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import orjson
import pytest

from callbridge.bench import BUDGET_CLEANUP_S, BUDGET_ENV
from callbridge.procs import Pid, descendants, in_session, kill_all, with_env
from tests.conftest import ROOT

MARK = "CALLBRIDGE_TEST_BENCH_RUN"  # in the bench's environment, so in its Python children's too
# Each bench run here takes 20-45 s. Past BUDGET_S the bench stops itself (stacks, clean-ups, at
# most BUDGET_CLEANUP_S more); the test gives up at TIMEOUT_S, which leaves _give_up its 16 s
# before pytest's own 180 s.
BUDGET_S = 100.0
TIMEOUT_S = 155.0
assert BUDGET_S + BUDGET_CLEANUP_S < TIMEOUT_S


def _why(run: subprocess.CompletedProcess[str]) -> str:
    return f"exit {run.returncode}; stdout ends:\n{run.stdout[-2000:]}\nstderr ends:\n{run.stderr[-12000:]}"


def _run_bench(*args: str, timeout: float, budget: float) -> subprocess.CompletedProcess[str]:
    """`callbridge bench *args` in a session of its own, with a hard budget of `budget` s (past
    it the bench prints every thread's and task's stack, stops its processes and exits 124).
    Still running after `timeout` s (keep it below pytest's 180 s): SIGUSR1 (the bench prints
    the stacks), SIGTERM, and the test fails with the bench's stderr. Either way no process of
    the run is left behind (_of_run): what is left is killed, and a leftover of a run that ended
    on its own fails the test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAPI_", "TWILIO_", "PUBLIC_URL"))}
    mark = uuid.uuid4().hex
    env.update({MARK: mark, BUDGET_ENV: str(budget)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "callbridge.cli", "bench", *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = _give_up(proc, mark)
            pytest.fail(f"`callbridge bench {' '.join(args)}` still running after {timeout:.0f} s "
                        f"(exit {proc.returncode} once stopped); stdout ends:\n{out[-2000:]}\n"
                        f"stderr ends:\n{err[-12000:]}")
    finally:
        if proc.poll() is None:
            kill_all([*descendants(proc.pid), *_of_run(proc.pid, mark)])
            proc.kill()
            proc.wait(10)
        leftovers = _of_run(proc.pid, mark)
        kill_all(leftovers)
    assert not leftovers, f"processes of the bench still running after it exited: {leftovers}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _of_run(pid: int, mark: str) -> list[Pid]:
    """The live processes of the bench run `pid`: its session (the bench, the redis-server nodes,
    orphaned or not) and whatever carries its marker in its environment (gateway and workers,
    in sessions of their own; redis-server overwrites its environment with its title)."""
    return [*in_session(pid), *with_env(MARK, mark)]


def _give_up(proc: subprocess.Popen[str], mark: str) -> tuple[str, str]:
    """Stacks, then an orderly stop, then SIGKILL to all of the run; returns its output."""
    seen: list[Pid] = descendants(proc.pid)  # gateway and workers too: sessions of their own
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(1.0)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)  # the bench stops its processes in order ...
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # ... or not
        kill_all([*seen, *descendants(proc.pid), *_of_run(proc.pid, mark)])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            return proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            return "", "(no output: the bench's pipes stayed open)"


@pytest.mark.parametrize("scenario", ["duplex", "conversation"])
def test_bench_runs_and_loses_no_frames(scenario: str) -> None:
    # The duplex run spreads the calls over phases of the 20 ms; the baseline test runs the default.
    phases = ["--phases", "4"] if scenario == "duplex" else []
    run = _run_bench("--calls", "3", "--seconds", "3", "--scenario", scenario, "--json", *phases,
                     timeout=TIMEOUT_S, budget=BUDGET_S)
    assert run.returncode == 0, _why(run)
    report = orjson.loads(next(line for line in run.stdout.splitlines() if line.startswith("{")))
    assert report["context"]["calls_connected"] == 3
    assert report["errors"]["protocol_errors"] == 0
    assert report["errors"]["calls_ended_early"] == 0
    if scenario == "duplex":
        assert report["frames"]["inbound_lost"] == 0 and report["frames"]["outbound_lost"] == 0
        unsent = report["playout_unsent_ms"]  # the worker's gauges, read from its /metrics
        assert unsent["max"] is not None and 0 <= unsent["mean_per_call"] <= unsent["max"], unsent
        assert "worker playout buffers at the window's end" in run.stdout
        # Read back from the stand-ins: the Twilio one ticked four times per 20 ms, the Vapi one 5 ms.
        assert report["context"]["phases"] == 4 and report["context"]["vapi_tick_ms"] == 5.0
        assert "frames spread over 4 phases" in run.stdout
        # Each hop and its write leg, from the processes' own histograms.
        hops = report["bridge_histograms"]
        for hop in ("twilio_to_vapi", "twilio_to_redis", "worker_to_twilio", "worker_to_redis"):
            assert hops[hop]["count"] > 0 and hops[hop]["p50_ms"] is not None, (hop, hops[hop])
        assert "  twilio_to_redis " in run.stdout and "  worker_to_redis " in run.stdout
    else:
        assert report["stale_frames_after_clear"]["stale"] == 0
        assert report["interruption_to_clear_ms"]["without_clear"] == 0
    assert report["cpu"]["gateway"]["cpu_s"] > 0 and report["cpu"]["worker-1"]["cpu_s"] > 0
    for name in ("gateway", "worker-1", "bench (sims)"):  # memory, as /proc says
        assert report["cpu"][name]["rss_mb"] > 10, report["cpu"][name]
        assert isinstance(report["cpu"][name]["rss_growth_kb_per_call"], float)


def test_bench_failover_runs_and_reports_the_figures() -> None:
    """Two events (a kill, then a stall) on 4 calls and 2 workers: every hit call resumes, no call
    is lost, nothing is left open. Gap figures are reported, never judged: the machine is shared."""
    run = _run_bench("--scenario", "failover", "--calls", "4", "--workers", "2", "--events", "2",
                     "--seconds", "4", "--json", timeout=TIMEOUT_S, budget=BUDGET_S)
    assert run.returncode == 0, _why(run)
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


def test_spread_sids_cover_every_lane_and_every_third_early() -> None:
    from callbridge.bench_cluster import spread_sids
    from shared.streams import lane_of

    sids = spread_sids(20, 16)
    lanes = [lane_of(s, 16) for s in sids]
    assert sorted(lanes[:16]) == list(range(16)) and lanes[16:] == lanes[:4]
    assert {lane * 3 // 16 for lane in lanes[:3]} == {0, 1, 2}  # one call per third of the slots
    assert len(set(sids)) == 20 and spread_sids(20, 16) == sids


def _assert_column_carried_the_load(name: str, col: dict[str, Any], calls: int) -> None:
    """Every call connected, latency figures both ways, nothing lost, no errors."""
    assert col["calls_connected"] == calls, name
    for way in ("inbound", "outbound"):
        assert col["latency_ms"][way]["p50"] is not None and col["latency_ms"][way]["p99"] is not None
        assert col["frames_lost"][way] == 0, (name, col["frames_lost"])
    assert col["errors"] == {"protocol": 0, "calls_ended_early": 0}, (name, col["errors"])


def test_bench_redis_cluster_side_by_side_with_a_primary_killed() -> None:
    """`--redis-cluster --kill-primary` on 4 calls: both columns carry figures, the cluster's six
    nodes each report commands and CPU, and the failover section names a victim that is not the
    {ctl} node, a promotion, and audio again on every hit call (bounded by the bench, 10 s).
    No speed is judged: the machine is shared."""
    from callbridge.redis_cluster import cluster_available

    if cluster_available() is not None:
        pytest.skip(str(cluster_available()))
    run = _run_bench("--redis-cluster", "--kill-primary", "--calls", "4", "--seconds", "3", "--json",
                     timeout=TIMEOUT_S, budget=BUDGET_S)
    assert run.returncode == 0, _why(run)
    for text in ("one Redis", "cluster", "Redis commands/s", "failover (--kill-primary)", "promotion:"):
        assert text in run.stdout, run.stdout
    report = orjson.loads(next(line for line in run.stdout.splitlines() if line.startswith("{")))
    cols = report["columns"]
    for name, n_nodes in (("one_redis", 1), ("cluster", 6)):
        col = cols[name]
        _assert_column_carried_the_load(name, col, 4)
        cpu = col["core_pct_per_call"]
        for tier in ("gateway", "workers", "redis_sum", "redis_busiest_node"):
            assert cpu[tier] is not None and cpu[tier] > 0, (name, tier, cpu)
        assert cpu["redis_sum"] >= cpu["redis_busiest_node"]
        rates = col["redis_commands_per_s"]
        assert rates["sum"] > 0 and rates["per_call_sum"] > 0 and rates["busiest_node"] <= rates["sum"]
        nodes = col["redis_nodes"]
        assert len(nodes) == n_nodes, nodes
        primaries = [v for v in nodes.values() if v["role"] == "primary"]
        assert len(primaries) == (1 if n_nodes == 1 else 3), nodes
        for v in primaries:
            assert v["commands_per_s"] > 0 and v["commands_per_s_per_call"] > 0, v
            assert "xadd" in v["commands"], v["commands"]
    assert sum(v["calls"] or 0 for v in cols["cluster"]["redis_nodes"].values()) == 4
    assert sum(v["lanes"] or 0 for v in cols["cluster"]["redis_nodes"].values()) == 16

    fo = report["failover"]
    assert fo is not None and "error" not in fo, fo
    assert fo["victim"] != fo["ctl_node"] and fo["new_primary"] not in (None, fo["victim"]), fo
    assert fo["calls_hit"] >= 1 and fo["calls_hit"] + fo["calls_spared"] == 4, fo
    assert fo["promotion_after_kill_s"] is not None and fo["promotion_after_kill_s"] > 0
    assert fo["calls_recovered"] == fo["calls_hit"], fo
    for way in ("caller_to_vapi", "assistant_to_caller"):
        assert fo["after_promotion_ms"][way]["n"] == fo["calls_hit"], fo["after_promotion_ms"]
        assert fo["after_promotion_ms"][way]["p50"] >= 0
        assert fo["spared_longest_gap_ms"][way]["n"] == fo["calls_spared"]
    assert fo["cluster_state_fail_after_kill_s"]["witness"] not in (fo["victim"], None)
    assert fo["standins_longest_send_gap_ms"]["twilio_sim_caller"] is not None
    assert fo["calls_ended_by_then"] == 0, fo


def test_bench_direct_baseline_and_the_bridge_side_by_side() -> None:
    """`--baseline direct` on 4 calls: 3 s of duplex audio through the direct bridge, the hop
    alone, then callbridge, in one run; both columns report CPU per call and latency both ways,
    nothing is lost, and the ratios are there. No speed is judged: the machine is shared."""
    run = _run_bench("--baseline", "direct", "--calls", "4", "--seconds", "3", "--json",
                     timeout=TIMEOUT_S, budget=BUDGET_S)
    assert run.returncode == 0, _why(run)
    for text in ("direct bridge", "callbridge", "bridge total / direct"):
        assert text in run.stdout, run.stdout
    report = orjson.loads(next(line for line in run.stdout.splitlines() if line.startswith("{")))
    cols = report["columns"]
    for name, tiers in (("direct", ("direct_bridge",)), ("bridge", ("gateway", "workers", "redis"))):
        col = cols[name]
        _assert_column_carried_the_load(name, col, 4)
        cpu = col["core_pct_per_call"]
        for tier in (*tiers, "total", "bench_sims"):
            assert cpu[tier] is not None and cpu[tier] > 0, (name, tier, cpu)
    assert "gateway" not in cols["direct"]["core_pct_per_call"]
    for name, tiers in (("direct", ("direct_bridge",)), ("bridge", ("gateway", "workers"))):
        for tier in tiers:  # RSS growth from no call to 4 calls, per call: a number, any sign
            assert isinstance(cols[name]["rss_growth_kb_per_call"][tier], float), (name, tier)
    assert report["runs"]["direct"]["cpu"].keys() == {"direct-bridge", "bench (sims)"}
    ratio = report["ratio"]["bridge_total_over_direct"]
    assert ratio is not None and ratio > 0, report["ratio"]
    assert isinstance(report["ratio"]["saturated"], bool), report["ratio"]
    normalised = report["ratio"]["normalised_by_load_generator"]
    assert normalised is not None and normalised > 0, report["ratio"]
    # The hop alone (bench_floor) ran between the two, on its own Redis: every frame of both
    # directions was written and read back, and the figures are there.
    hop = report["hop_alone"]
    assert "a lean reference" in run.stdout and "the hop alone" in run.stdout, run.stdout
    assert hop["kept_up"] is True, hop
    for way in ("inbound", "outbound"):
        moved = hop["with_redis"][way]
        assert moved["written"] >= 0.97 * 4 * 3 / 0.02, (way, moved)  # 4 calls, 3 s, 20 ms frames
        assert moved["read"] >= moved["written"] - 100, (way, moved)
        assert moved["hop_p50_ms"] is not None and moved["hop_p50_ms"] > 0, (way, moved)
    assert hop["with_redis"]["core_pct_per_call"]["redis"] > 0, hop
    assert isinstance(hop["hop_core_pct_per_call"], float), hop
    assert report["ratio"]["reference_over_direct"] is not None, report["ratio"]
    assert report["ratio"]["bridge_over_reference"] is not None, report["ratio"]


def test_the_hop_alone_with_readers_blocked_on_every_stream() -> None:
    """bench_floor on its own, in its other read design (no wake stream): every frame of both
    directions is written and read back through a real redis-server, and Redis's CPU over the
    sides' window is counted."""
    run = subprocess.run([sys.executable, "-m", "callbridge.bench_floor", "--calls", "3", "--seconds", "2",
                          "--no-wake", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    report = orjson.loads(run.stdout.splitlines()[-1])
    assert report["kept_up"] is True, report
    for way in ("inbound", "outbound"):
        moved = report[way]
        assert moved["written"] >= 0.97 * 3 * 2 / 0.02, (way, moved)  # 3 calls, 2 s, 20 ms frames
        assert moved["read"] >= moved["written"] - 75, (way, moved)
    assert report["core_pct_per_call"]["redis"] > 0, report


def test_a_side_of_the_hop_that_fails_fails_the_run() -> None:
    """A side whose Redis is not there exits non-zero, and `measure` says so instead of
    reporting figures."""
    from callbridge.bench_floor import measure
    from callbridge.redis_server import free_port

    port = free_port()  # nothing listens on it
    with pytest.raises(RuntimeError, match="a side of the hop failed"):
        measure(2, 1.0, redis_where=str(port))


def test_a_baseline_run_that_saturated_the_machine_a_process_or_lost_frames_is_flagged() -> None:
    """A process running behind batches more and costs less per call, so such a ratio flatters
    the bridge: the report says so rather than calling the target met."""
    from callbridge.bench_direct import _saturated

    calm = {"machine_busy_cores": 1.2, "busiest_process_core_pct": 60.0,
            "frames_lost": {"inbound": 0, "outbound": 0}}
    assert not _saturated(calm, 2) and not _saturated(None, 2)
    assert _saturated({**calm, "machine_busy_cores": 1.85}, 2)
    assert _saturated({**calm, "busiest_process_core_pct": 85.3}, 2), "one process near a core"
    assert _saturated({**calm, "frames_lost": {"inbound": 0, "outbound": 3}}, 2)


def test_bench_over_its_budget_prints_the_stacks_and_leaves_nothing_behind() -> None:
    """A bench that cannot finish in its budget says where it was (every thread's stack and
    every asyncio task's await chain), stops its processes and exits 124; _run_bench checks
    that nothing of it is left."""
    run = _run_bench("--calls", "1", "--seconds", "60", timeout=TIMEOUT_S, budget=4)
    assert run.returncode == 124, _why(run)
    assert "over its budget of 4 s" in run.stderr, _why(run)
    assert "--- threads ---" in run.stderr and "--- asyncio tasks" in run.stderr, _why(run)
    assert ", in _bench" in run.stderr, _why(run)  # the run's own await chain


def test_the_vapi_stand_ins_tick_follows_the_phases_within_its_bounds() -> None:
    from callbridge.bench import vapi_tick_s
    from sim.vapi import VapiSim

    assert [vapi_tick_s(n) for n in (1, 2, 4, 10)] == [0.01, 0.01, 0.005, 0.002]
    assert VapiSim(tick_s=vapi_tick_s(10)).tick_s == 0.002  # the most phases the bench takes
