"""`callbridge bench`: N concurrent simulated calls through real gateway and worker processes.

A measurement tool, not a test: it asserts nothing and prints what it measured.

Set-up: a private redis-server (unless REDIS_URL is set), one `callbridge gateway` process and
W `callbridge worker` processes, with the Twilio simulator and the Vapi stand-in running in this
process (on uvloop when installed).

Scenario `--scenario duplex` (default; worst-case full duplex): every call's assistant talks for
the whole run (one long, non-interruptible first message, no answers) while the caller sends
Twilio's continuous 20 ms silence frames. Calls are placed at RAMP_PER_S; once all are connected
(Vapi socket open and Twilio stream live) the run warms up for WARMUP_S, measures a window of
`--seconds`, lets the audio of the window drain for GRACE_S, hangs every call up and waits for the
calls to end.

Scenario `--scenario conversation` (turn-taking and barge-ins, same timeline): the assistant speaks
an interruptible 4 s first message and 1.5 s answers (`interrupter`); each call's caller, driven by
the bench with its own seeded RNG, either talks over an utterance about 1 s into it (barge-in) or
waits until it was heard and then speaks (normal turn); either way 0.8 s of the caller tone, so the
stand-in answers after its 400 ms endpointing. Between utterances the caller sends the quiet
caller tone (below every voice gate). Figures, for the measurement window (see
_compute_conversation): interruption -> `clear` latency, stale assistant frames after the clear,
turn latency the bridge adds, underruns in the heard assistant audio, plus inbound latency, the
bridge's histograms and CPU as below.

Scenario `--scenario failover` (needs `--workers` >= 2): every caller converses (speaks 1.2 s once
it heard the assistant stop, the assistant answers for 3 s; see _fo_caller) while, `--events` times,
the worker owning the most calls is killed (SIGKILL; a replacement with a new WORKER_ID starts at
once, so capacity stays) or frozen (SIGSTOP for FO_STALL_S, then SIGCONT), alternating. Each event
waits for the previous to settle (see _bench_failover). Figures (see _compute_failover): per event
and hit call the failover gap, signal -> the first frame of the new Vapi session's `resume` at the
caller, split into lease, claim, setup and first audio; caller speech lost in the gap (every caller
speech frame is unique, so it is followed frame by frame into each session); audio heard twice or
from a replaced session; second greetings; calls lost; Vapi sessions left open.

`--redis-cluster [--kill-primary]` (callbridge/bench_cluster.py): the duplex scenario on a private
single redis-server and then on a private 3+3-node Redis Cluster, side by side, through RunHooks;
REDIS_URL is not used.

`--baseline direct` (callbridge/bench_direct.py): the duplex scenario through a direct bridge (one
process, Twilio socket to Vapi socket, no Redis; RunHooks.processes starts it instead of the
gateway and workers) and then through callbridge on a private redis-server, side by side, with
the ratio of their CPU per call, and between the two the hop through Redis alone
(callbridge/bench_floor.py), a lean reference for what the two-tier shape costs; REDIS_URL is
not used.

Figures of the duplex scenario (all for the measurement window):
1. One-way latency the bridge adds, seen from outside on one monotonic clock:
   inbound  = Twilio sim send of caller frame k -> Vapi stand-in receive of frame k;
   outbound = Vapi stand-in send of assistant frame k -> Twilio sim receive of media message k.
   Send times are taken right after the frame was written to the socket (the sims' own
   per-tick timestamps are earlier by the time the sim needs to serve all calls in one tick;
   that skew is reported separately as "sim send skew").
2. The bridge's own `callbridge_hop_latency_seconds` histograms (window delta of /metrics of the
   gateway and of every worker), quantiles estimated like Prometheus' histogram_quantile.
3. Frames lost per direction, protocol errors seen by the Twilio sim, calls that ended early.
4. CPU of the gateway, each worker, redis-server and this process, from /proc/PID/stat.

Every mode is bounded: past a hard budget computed from its configuration (_budget; the
environment variable CALLBRIDGE_BENCH_BUDGET_S sets another) the bench prints every thread's and
every asyncio task's stack to stderr, cancels the run so that its clean-ups stop the gateway, the
workers and the Redis nodes, and exits 124 (_Watchdog). SIGUSR1 prints the same stacks at any time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import gc
import json
import os
import random
import signal
import sys
import threading
import time
from array import array
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from callbridge.procs import SCHED_WAIT, ManagedProcess, descendants, kill_all, schedstat_seconds
from callbridge.redis_server import RedisServer, free_port, start_redis
from callbridge.stack_env import stand_in_env
from shared.serving import freeze_startup_heap
from sim.twilio import SimCall, TwilioObserver
from sim.twilio.sim import MAX_PHASES
from sim.twilio.wire import SILENCE_FRAME
from sim.vapi import VapiObserver, VapiSession
from sim.vapi.sim import TICK_S as VAPI_TICK_S

RAMP_PER_S = 25.0
CONNECT_TIMEOUT_S = 30.0  # after the last call was placed
WARMUP_S = 2.0
GRACE_S = 1.0  # after the window, before hanging up: late frames of the window still count
TAIL_EXCLUDE_S = 0.5  # outbound frames sent this close to the window end are not counted as lost
END_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# The bench's hard budget (_budget): past it, every thread's and task's stack goes to stderr, the
# run is cancelled (its clean-ups stop the processes) and the bench exits EXIT_OVER_BUDGET.
BUDGET_ENV = "CALLBRIDGE_BENCH_BUDGET_S"  # overrides the computed budget (seconds)
BUDGET_RUN_S = 90.0  # per run: stand-ins up, processes ready, calls placed, hang-ups, stops
BUDGET_PER_CALL_S = 0.5
BUDGET_PER_EVENT_S = 55.0  # failover: pause, signal, resumption, replacement ready, release
BUDGET_CLEANUP_S = 40.0  # over budget: this long for the clean-ups, then children SIGKILLed
EXIT_OVER_BUDGET = 124

ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "bench-auth-token-" + "x" * 16
VAPI_KEY = "bench-vapi-key"
ASSISTANT_ID = "bench-assistant"
HOP_METRIC = "callbridge_hop_latency_seconds"
CLEAR_METRIC = "callbridge_barge_in_clear_seconds"
TURN_METRIC = "callbridge_turn_latency_seconds"
EXTRA_HISTOGRAMS = (CLEAR_METRIC, TURN_METRIC)

SCENARIOS = ("duplex", "conversation", "failover")
# Conversation scenario: the assistant (Vapi stand-in `interrupter` script) ...
CONV_GREETING_S = 4.0  # interruptible first message
CONV_ANSWERS = 50
CONV_ANSWER_S = 1.5
# ... and the caller, per call with random.Random(CONV_SEED + call index):
CONV_SEED = 1
CONV_CALLER_S = 0.8  # every caller utterance (caller tone k, 0.3 of full scale)
CONV_BARGE_SHARE = 0.5  # share of the assistant's utterances the caller talks over
CONV_BARGE_AT_S = (0.8, 1.1)  # this far into the utterance (stand-in clock; its VAD needs 0.2 s more)
CONV_HEARD_S = 0.25  # otherwise: after the stand-in stopped, until the caller has heard it all ...
CONV_PAUSE_S = (0.2, 0.6)  # ... and then this long before speaking
CONV_GAP_S = 0.015  # silence inside a heard utterance that counts as an underrun
ARRIVAL_SEARCH_S = 2.0  # first frame of an utterance must reach the Twilio sim within this
TARGET_CLEAR_P99_MS = 20.0

TARGET_CALLS = 100
TARGET_P50_MS = 3.0
TARGET_P99_MS = 10.0
TARGET_CORE_PCT_PER_CALL = 0.6

_mono = time.monotonic


# ------------------------------------------------------------------------------------------
# Child processes


def _proc(name: str, args: list[str], env: dict[str, str], http_port: int) -> ManagedProcess:
    return ManagedProcess(name, args, env, health_url=f"http://127.0.0.1:{http_port}/readyz",
                          own_session=True)


def _base_url(p: ManagedProcess) -> str:
    assert p.health_url
    return p.health_url.removesuffix("/readyz")


def _child_env(redis_url: str, prefix: str, **extra: object) -> dict[str, str]:
    return stand_in_env(redis_url, prefix, account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN,
                        vapi_key=VAPI_KEY, assistant_id=ASSISTANT_ID, log_level="WARNING",
                        log_format="text", **extra)


async def _wait_ready(procs: list[ManagedProcess], timeout: float) -> str | None:
    """None when every process answers /readyz 200, else what went wrong."""
    deadline = _mono() + timeout
    for p in procs:
        try:
            await p.wait_ready(max(0.1, deadline - _mono()))
        except (RuntimeError, TimeoutError) as exc:
            return str(exc)
    return None


# ------------------------------------------------------------------------------------------
# CPU and metrics


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all threads) from /proc/PID/stat; None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat(5)


def _rss_kb(pid: int) -> int | None:
    """Resident memory of a process (VmRSS, KB); None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _runqueue_wait_seconds(pid: int) -> float | None:
    """Time the process's threads were runnable but waiting for a CPU."""
    return schedstat_seconds(pid, SCHED_WAIT)


def _machine_jiffies() -> tuple[int, int, int]:
    """(process time, irq+softirq time, steal) jiffies over all CPUs from /proc/stat. Loopback
    TCP is largely processed in softirq context, which is charged to no process."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0, 0, 0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return user + nice + system, irq + softirq, steal


def _redis_pid(redis_url: str, private: RedisServer | None) -> int | None:
    if private is not None:
        return private.proc.pid
    parts = urlsplit(redis_url)
    if parts.scheme.lower() != "unix" and (parts.hostname or "") not in ("127.0.0.1", "localhost", "::1"):
        return None
    try:
        import redis

        client = redis.Redis.from_url(redis_url, socket_timeout=2)
        try:
            pid = int(client.info("server").get("process_id", 0))
        finally:
            client.close()
        comm = Path(f"/proc/{pid}/comm").read_text()
    except Exception:
        return None
    return pid if "redis" in comm else None


Buckets = dict[str, dict[float, float]]  # hop -> {le: cumulative count}
COUNTERS = ("callbridge_messages_dropped_total", "callbridge_redis_errors_total",
            "callbridge_barge_ins_total")
# Gauges read at the window's end (summed over processes, or their largest for a `max`).
GAUGES = ("callbridge_worker_playout_unsent_seconds", "callbridge_worker_playout_unsent_max_seconds")


@dataclass
class _Scrape:
    hops: Buckets = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)  # 'name{label}' -> value
    hists: Buckets = field(default_factory=dict)  # EXTRA_HISTOGRAMS name -> {le: cumulative count}
    gauges: dict[str, float] = field(default_factory=dict)  # GAUGES name -> value


async def _scrape(urls: Iterable[str]) -> _Scrape:
    """Hop-latency and EXTRA_HISTOGRAMS buckets and problem counters, summed over all given
    /metrics URLs."""
    out = _Scrape()
    for s in await _samples(urls):
        if s.name == HOP_METRIC + "_bucket":
            b = out.hops.setdefault(s.labels.get("hop", ""), {})
            le = float(s.labels["le"])
            b[le] = b.get(le, 0.0) + float(s.value)
        elif s.name.endswith("_bucket") and s.name[:-7] in EXTRA_HISTOGRAMS:
            b = out.hists.setdefault(s.name[:-7], {})
            le = float(s.labels["le"])
            b[le] = b.get(le, 0.0) + float(s.value)
        elif s.name in GAUGES:
            v, was = float(s.value), out.gauges.get(s.name)
            out.gauges[s.name] = v if was is None else (max(was, v) if "_max_" in s.name else was + v)
        elif s.name in COUNTERS:
            label = ",".join(s.labels.values())
            name = s.name.removeprefix("callbridge_").removesuffix("_total")
            key = f"{name}{{{label}}}" if label else name
            out.counters[key] = out.counters.get(key, 0.0) + float(s.value)
    return out


async def _samples(urls: Iterable[str]) -> list[Any]:
    """Every sample the processes at these /metrics URLs report (a process that does not answer
    is left out)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    found: list[Any] = []
    async with httpx.AsyncClient(trust_env=False) as client:
        for url in urls:
            try:
                text = (await client.get(url, timeout=5)).text
            except httpx.HTTPError:
                continue
            for fam in text_string_to_metric_families(text):
                found.extend(fam.samples)
    return found


def _delta(after: _Scrape, before: _Scrape) -> _Scrape:
    hops = {hop: {le: n - before.hops.get(hop, {}).get(le, 0.0) for le, n in b.items()}
            for hop, b in after.hops.items()}
    counters = {k: v - before.counters.get(k, 0.0) for k, v in after.counters.items()}
    hists = {name: {le: n - before.hists.get(name, {}).get(le, 0.0) for le, n in b.items()}
             for name, b in after.hists.items()}
    return _Scrape(hops, {k: v for k, v in counters.items() if v}, hists, after.gauges)


def _unsent_figures(scraped: _Scrape, calls: int) -> dict[str, float | None]:
    """The workers' playout buffers at the window's end: what an assistant's audio waits there."""
    total = scraped.gauges.get(GAUGES[0])
    most = scraped.gauges.get(GAUGES[1])
    return {"mean_per_call": None if total is None or not calls else round(total / calls * 1000, 1),
            "max": None if most is None else round(most * 1000, 1)}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets {le: count} (linear interpolation
    inside the bucket; lowest bucket starts at 0; a rank in +Inf gives the highest finite le)."""
    les = sorted(buckets)
    if not les or les[-1] != float("inf"):
        return None
    total = buckets[les[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_n = 0.0, 0.0
    for le in les:
        n = buckets[le]
        if n >= rank:
            if le == float("inf"):
                return les[-2] if len(les) > 1 else None
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return None


# ------------------------------------------------------------------------------------------
# Recording through the stand-ins' observer hooks (bench process only)


def caller_tone_frame() -> bytes:
    """20 ms of a 1 kHz tone at about -53 dBFS RMS as μ-law: below every -40 dBFS voice gate
    (Vapi stand-in VAD, worker end-of-speech), so to the bridge the caller is silent, but never
    digital silence, so the Vapi stand-in can tell the caller's frames from silence the worker
    injects itself. 8 samples per period: every frame is the same."""
    import math
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop

    pcm = array("h", (round(100 * math.sin(2 * math.pi * (i + 0.5) / 8)) for i in range(160)))
    return audioop.lin2ulaw(pcm.tobytes(), 2)


def _is_caller_audio(data: bytes, fmt: str) -> bool:
    """True for a frame carrying the caller tone, False for digital silence (worker fill).
    Only the last quarter is looked at: the resampler's history bleeds into a frame's start."""
    q = len(data) // 4
    tail = data[-q:] if q else data
    if fmt == "mulaw":
        return tail.strip(b"\xff\x7f") != b""
    return tail.strip(b"\x00") != b""


@dataclass
class _Recorder:
    vapi_sent: dict[str, array[float]] = field(default_factory=dict)  # Vapi call id -> send times
    twilio_sent: dict[str, array[float]] = field(default_factory=dict)  # CallSid -> send times
    twilio_tone: dict[str, bytearray] = field(default_factory=dict)  # CallSid -> 1 per tone frame
    vapi_caller: dict[str, bytearray] = field(default_factory=dict)  # Vapi call id -> 1 per tone frame
    # Conversation scenario only:
    media: dict[str, list[bytes]] = field(default_factory=dict)  # CallSid -> payload per media msg
    first_frame: dict[str, tuple[float, int]] = field(default_factory=dict)  # Vapi turn id ->
    #   (send time of the utterance's frame 0, its index in vapi_sent[call id])
    interrupted: dict[str, list[tuple[float, int, str]]] = field(default_factory=dict)  # Vapi call
    #   id -> (monotonic, wall ns, turnId) right after each `user-interrupted` went out
    wake: dict[str, asyncio.Event] = field(default_factory=dict)  # Vapi call id -> set on every
    #   assistant speech-update sent (wakes the bench's caller of that call)

    def wake_for(self, session_id: str) -> asyncio.Event:
        ev = self.wake.get(session_id)
        if ev is None:
            ev = self.wake[session_id] = asyncio.Event()
        return ev


class _TwilioTap(TwilioObserver):
    """The Twilio stand-in's half of the recording, filled into `_Recorder`'s dicts: when each
    caller frame was written to its socket, whether it carried the caller tone (conversation:
    anything but digital silence, as the idle caller sends the quiet tone) and, in the
    conversation scenario, every assistant media payload."""

    def __init__(self, rec: _Recorder, tone: bytes, conversation: bool) -> None:
        self.rec = rec
        self.tone = tone
        self.conversation = conversation

    def caller_frame_sent(self, call: SimCall, frame: bytes, at: float, pos: int) -> None:
        sid = call.call_sid
        t = self.rec.twilio_sent.get(sid)
        if t is None:
            t = self.rec.twilio_sent[sid] = array("d")
            self.rec.twilio_tone[sid] = bytearray()
        t.append(at)
        if self.conversation:  # caller speech or the quiet line: everything but digital silence
            self.rec.twilio_tone[sid].append(frame != SILENCE_FRAME)
        else:
            self.rec.twilio_tone[sid].append(frame is self.tone or frame == self.tone)

    def assistant_media_received(self, call: SimCall, audio: bytes, at: float) -> None:
        if not self.conversation:
            return
        lst = self.rec.media.get(call.call_sid)
        if lst is None:
            lst = self.rec.media[call.call_sid] = []
        lst.append(audio)


class _VapiTap(VapiObserver):
    """The Vapi stand-in's half of the recording, filled into `_Recorder`'s dicts: send time of
    every assistant frame, which caller frames carried the caller tone and, in the conversation
    scenario, each utterance's first frame, each `user-interrupted` and the callers' wake-ups."""

    def __init__(self, rec: _Recorder, conversation: bool) -> None:
        self.rec = rec
        self.conversation = conversation

    def assistant_frame_sent(self, session: VapiSession, frame: bytes, at: float, turn_id: str,
                             index: int) -> None:
        sent = self.rec.vapi_sent
        t = sent.get(session.id)
        if t is None:
            t = sent[session.id] = array("d")
        t.append(at)
        if index == 0 and self.conversation:
            self.rec.first_frame[turn_id] = (at, len(t) - 1)

    def caller_audio_received(self, session: VapiSession, data: bytes, at: float) -> None:
        caller = self.rec.vapi_caller
        flags = caller.get(session.id)
        if flags is None:
            flags = caller[session.id] = bytearray()
        flags.append(_is_caller_audio(data, session.audio_format))

    def control_sent(self, session: VapiSession, msg: dict[str, Any], at: float) -> None:
        if not self.conversation:
            return
        kind = msg.get("type")
        if kind == "user-interrupted":
            lst = self.rec.interrupted.get(session.id)
            if lst is None:
                lst = self.rec.interrupted[session.id] = []
            lst.append((at, time.time_ns(), str(msg.get("turnId"))))
        elif kind == "speech-update" and msg.get("role") == "assistant":
            self.rec.wake_for(session.id).set()


# ------------------------------------------------------------------------------------------
# The run


@dataclass
class _Config:
    calls: int
    seconds: float
    fmt: str
    workers: int
    as_json: bool
    scenario: str = "duplex"
    events: int = 10  # failover: signals to workers
    redis_cluster: bool = False  # duplex on one Redis and on a cluster, side by side (bench_cluster)
    kill_primary: bool = False  # ... and then kill a primary (bench_cluster)
    baseline: str = ""  # "direct": duplex through the direct bridge, then callbridge (bench_direct)
    phases: int = 1  # the stand-ins' frames: 1 = every call on one 20 ms grid; N = N phases


@dataclass
class _Window:
    start: float = 0.0
    end: float = 0.0
    cpu0: dict[str, float | None] = field(default_factory=dict)
    cpu1: dict[str, float | None] = field(default_factory=dict)
    wait0: dict[str, float | None] = field(default_factory=dict)
    wait1: dict[str, float | None] = field(default_factory=dict)
    busy0: tuple[int, int, int] = (0, 0, 0)
    busy1: tuple[int, int, int] = (0, 0, 0)
    rss0: dict[str, int | None] = field(default_factory=dict)  # KB, before any call was placed
    rss1: dict[str, int | None] = field(default_factory=dict)  # KB, at the window's end


def _sim_phases(cfg: _Config, pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """The phases the stand-ins ran with, read back from them (the configured ones without calls)."""
    if not pairs:
        return {"phases": cfg.phases, "vapi_tick_ms": round(vapi_tick_s(cfg.phases) * 1000, 2)}
    call, session = pairs[0]
    return {"phases": call._sim.phases, "vapi_tick_ms": round(session.sim.tick_s * 1000, 2)}


def vapi_tick_s(phases: int) -> float:
    """The Vapi stand-in's downlink tick for `--phases`: its default 10 ms (two phases) unless
    more are asked for, so both directions' frames are spread alike."""
    return min(VAPI_TICK_S, 0.020 / phases)


def _pcts(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(values) * 1000.0
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": round(float(p50), 2), "p90": round(float(p90), 2), "p99": round(float(p99), 2),
            "max": round(float(a.max()), 2)}


async def _gather_bounded(aws: Iterable[Awaitable[Any]], timeout: float) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=2)
    for t in tasks:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: no "exception was never retrieved" noise


async def stop_task(task: asyncio.Task[Any], timeout: float) -> bool:
    """Cancel `task` and wait for it to end, at most `timeout` s; True when it ended.

    Unlike `task.cancel(); await task` this is bounded and leaves the caller's own cancellation
    alone: a cancel can be lost (on Python < 3.12, redis-py's `asyncio.wait_for` around a socket
    write returns normally when the write finished in the same loop turn as the cancel, CPython
    gh-86296), so it is repeated while waiting; the task's outcome is retrieved, never raised."""
    deadline = _mono() + timeout
    while not task.done():
        left = deadline - _mono()
        if left <= 0:
            break
        task.cancel()
        await asyncio.wait({task}, timeout=min(0.5, left))
    if task.done() and not task.cancelled():
        task.exception()
    return task.done()


async def _bounded(what: str, aw: Awaitable[Any], timeout: float) -> None:
    """Run `aw` for at most `timeout` s (then cancel it, bounded too); its errors are ignored.
    A cancel of the caller cancels it as well and propagates."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not task.done():
        print(f"callbridge bench: {what} did not finish within {timeout:g} s", file=sys.stderr)
    await stop_task(task, 2.0)


async def _converse(call: Any, session: Any, rng: random.Random, wake: asyncio.Event,
                    speech: list[bytes], actions: list[tuple[float, str]]) -> None:
    """The caller of one call in the conversation scenario: for every utterance the assistant
    starts, talk over it (barge-in) or wait until it has been heard, then speak. Runs until
    cancelled. `actions` gets (monotonic time, "barge" | "turn") per caller utterance."""

    async def until(predicate: Callable[[], bool]) -> None:
        while True:
            wake.clear()
            if predicate():
                return
            await wake.wait()

    handled = 0
    k = 0
    while not call.ended.is_set():

        def started(h: int = handled) -> bool:
            return len(session.spoken) > h

        await until(started)
        handled = len(session.spoken)
        u = session.spoken[-1]

        def stopped(u: Any = u) -> bool:
            return u.ended is not None

        kind = "turn"
        if rng.random() < CONV_BARGE_SHARE:
            await asyncio.sleep(max(0.0, u.started + rng.uniform(*CONV_BARGE_AT_S) - _mono()))
            if not stopped():
                kind = "barge"
        if kind == "turn":
            await until(stopped)
            await asyncio.sleep(CONV_HEARD_S + rng.uniform(*CONV_PAUSE_S))
        call.say(speech[k % len(speech)])
        k += 1
        actions.append((_mono(), kind))
        await call.wait_speaking_done()


async def _worker_barge_ins(redis_url: str, prefix: str, sids: list[str]) -> dict[str, list[float]]:
    """CallSid -> monotonic times of the worker's "barge-in" events (from the entries' wall-clock
    stamps in call:{sid}:events; same host, so one wall -> monotonic offset converts them)."""
    from redis.asyncio import Redis

    from shared.streams import Keys

    keys = Keys(prefix)
    offset = time.time() - _mono()
    out: dict[str, list[float]] = {}
    client = Redis.from_url(redis_url, socket_timeout=5)
    try:
        for sid in sids:
            entries: Any = await client.xrange(keys.events(sid))
            out[sid] = [int(f[b"t"]) / 1e9 - offset for _id, f in entries
                        if f.get(b"k") == b"barge-in" and f.get(b"t")]
    except Exception as exc:
        print(f"callbridge bench: cannot read worker events: {exc!r}", file=sys.stderr)
    finally:
        await client.aclose()
    return out


def _cancel_on_signals() -> Callable[[], None]:
    """SIGTERM/SIGHUP cancel the running bench, which then stops its processes in order.
    Returns what puts the signals back."""
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            if me is not None:
                loop.add_signal_handler(sig, me.cancel)

    def undo() -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

    return undo


@dataclass
class RunHooks:
    """What a wrapper of one duplex run adds to it (callbridge.bench_cluster runs two side by
    side); with none, `_bench` runs and prints as always. The methods are no-ops here."""

    env: dict[str, object] = field(default_factory=dict)  # more settings for gateway and workers
    call_sids: list[str] | None = None  # CallSid of call i (default: the Twilio sim's random one)
    extra_s: float = 0.0  # the assistant talks this much longer: room for after_window
    result: dict[str, Any] | None = None  # the run's figures, handed here instead of printed
    # The processes to start instead of the gateway and workers (bench_direct: the direct bridge),
    # given the port the Twilio stand-in calls and the environment the gateway would get.
    processes: Callable[[int, dict[str, str]], list[ManagedProcess]] | None = None

    async def window_start(self) -> None:
        """Right before the window's CPU readings."""

    async def window_end(self) -> None:
        """Right after the window's CPU readings."""

    async def after_window(self, prefix: str, pairs: list[tuple[SimCall, VapiSession]],
                           rec: _Recorder) -> None:
        """After the window's grace period, every call still live; the hang-ups follow."""


@contextlib.contextmanager
def _stand_ins_never_pause() -> Iterator[None]:
    """No garbage collection in the load generator during a run (its calls, warm-up, window and
    teardown); what was alive before is frozen out of reach first, while no call runs. The
    stand-ins play Twilio and Vapi, which do not stop for our collector; the bench's records grow
    with every run, and in the second run of `--baseline direct` at 100 calls a full collection of
    them stopped both stand-ins for 167 ms inside the window: audio they then sent in a bunch was
    measured as the bridge's latency (docs/performance.md, "Where it stands")."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _bench(cfg: _Config, redis_url: str, redis_pids: dict[str, int | None],
                 procs: list[ManagedProcess], hooks: RunHooks | None = None) -> int:
    with _stand_ins_never_pause():
        return await _bench_run(cfg, redis_url, redis_pids, procs, hooks)


async def _bench_run(cfg: _Config, redis_url: str, redis_pids: dict[str, int | None],
                     procs: list[ManagedProcess], hooks: RunHooks | None) -> int:
    from sim import voices
    from sim.twilio import TwilioSim
    from sim.vapi import AssistantScript, VapiSim, interrupter

    stop_cancelling = _cancel_on_signals()

    n = cfg.calls
    conversation = cfg.scenario == "conversation"
    ramp_s = n / RAMP_PER_S
    greeting_s = float(round(ramp_s + CONNECT_TIMEOUT_S + WARMUP_S + cfg.seconds + GRACE_S + 10
                             + (hooks.extra_s if hooks else 0.0)))
    rate = 16000 if cfg.fmt == "pcm_s16le" else 8000
    speech: list[bytes] = []
    if conversation:
        script = interrupter(long_s=CONV_GREETING_S, answers=CONV_ANSWERS, answer_s=CONV_ANSWER_S)
        voices.frames("greeting", 0, CONV_GREETING_S, rate, cfg.fmt)  # cache the utterances
        for k in range(5):
            voices.frames("answer", k, CONV_ANSWER_S, rate, cfg.fmt)
        speech = [voices.render("caller", k, CONV_CALLER_S, 8000, "mulaw") for k in range(6)]
    else:
        voices.frames("greeting", 0, greeting_s, rate, cfg.fmt)  # build the cached utterance up front
        script = AssistantScript(name="bench", greeting_s=greeting_s, answers=0, end_after=False,
                                 first_message_interruptible=False, interruptible=False)

    tone = caller_tone_frame()
    tone_run = tone * round((greeting_s + 5) * 50)  # the caller "talks" (quietly) all along
    rec = _Recorder()
    vapi = VapiSim(api_key=VAPI_KEY, assistant=script, record_audio=False,
                   observer=_VapiTap(rec, conversation), tick_s=vapi_tick_s(cfg.phases))
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    twilio = TwilioSim(gateway_url=public, public_url=public, account_sid=ACCOUNT_SID,
                       auth_token=AUTH_TOKEN, observer=_TwilioTap(rec, tone, conversation),
                       idle_frame=tone if conversation else None,  # idle caller: a quiet line
                       phases=cfg.phases)
    placed: list[SimCall] = []
    drivers: dict[str, asyncio.Task[None]] = {}
    actions: list[tuple[float, str]] = []
    try:
        await vapi.start()
        await twilio.start()
        prefix = f"bench{os.getpid()}-{int(time.time()) % 100000}:"
        common = {"PUBLIC_URL": public, "VAPI_BASE_URL": vapi.base_url,
                  "TWILIO_API_BASE_URL": twilio.rest_base_url, "VAPI_AUDIO_FORMAT": cfg.fmt,
                  "WORKER_MAX_CALLS": max(n, 1), "WORKER_HTTP_HOST": "127.0.0.1",
                  **(hooks.env if hooks else {})}
        env = _child_env(redis_url, prefix, **common)
        if hooks and hooks.processes:
            procs.extend(hooks.processes(port, env))
        else:
            procs.append(_proc("gateway", ["gateway", "--host", "127.0.0.1", "--port", str(port)],
                               env, port))
            for i in range(cfg.workers):
                hp = free_port()
                wenv = dict(env, WORKER_ID=f"bench-w{i + 1}")
                procs.append(_proc(f"worker-{i + 1}", ["worker", "--http-port", str(hp)], wenv, hp))
        for p in procs:
            p.start()
        problem = await _wait_ready(procs, READY_TIMEOUT_S)
        if problem:
            print(f"callbridge bench: {problem}", file=sys.stderr)
            return 1

        # Place the calls on a ramp, after noting each process's memory with none.
        pids = {p.name: p.pid for p in procs}
        pids.update(redis_pids)
        pids["bench (sims)"] = os.getpid()
        rss0 = {k: _rss_kb(v) if v else None for k, v in pids.items()}
        t_place = _mono()
        failures: list[str] = []

        async def place(i: int) -> None:
            await asyncio.sleep(max(0.0, t_place + i / RAMP_PER_S - _mono()))
            try:
                sid = hooks.call_sids[i] if hooks and hooks.call_sids else None
                call = await twilio.place_call(from_=f"+1555{i:07d}", to="+15550000000", call_sid=sid)
                if not conversation:
                    call.say(tone_run)
                placed.append(call)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}"[:200])

        placing = [asyncio.create_task(place(i)) for i in range(n)]
        await asyncio.gather(*placing)

        by_sid: dict[str, VapiSession] = {}

        def connected() -> list[tuple[SimCall, VapiSession]]:
            for s in vapi.sessions.values():
                sid = s.body.get("assistantOverrides", {}).get("variableValues", {}).get("twilioCallSid")
                if isinstance(sid, str):
                    by_sid[sid] = s
            out = []
            for c in placed:
                vs = by_sid.get(c.call_sid)
                if vs is not None and vs.is_open and c.stream_live:
                    out.append((c, vs))
                    if conversation and c.call_sid not in drivers:  # its caller starts now
                        rng = random.Random(CONV_SEED + int(c.from_[5:]))
                        drivers[c.call_sid] = asyncio.create_task(
                            _converse(c, vs, rng, rec.wake_for(vs.id), speech, actions))
            return out

        deadline = _mono() + CONNECT_TIMEOUT_S
        while True:  # polled: the condition spans two simulators
            if len(connected()) >= len(placed) or _mono() > deadline:
                break
            await asyncio.sleep(0.05)
        pairs = connected()
        t_connected = _mono() - t_place
        print(f"callbridge bench: {len(pairs)}/{n} calls connected after {t_connected:.1f} s; "
              f"warm-up {WARMUP_S:.0f} s, then measuring {cfg.seconds:g} s…", file=sys.stderr)
        if not pairs:
            print("callbridge bench: no call connected", file=sys.stderr)
            for p in procs:
                print(f"----- {p.name} log -----\n{p.log_tail()}", file=sys.stderr)
            return 1
        await asyncio.sleep(WARMUP_S)

        # Measure.
        metric_urls = [_base_url(p) + "/metrics" for p in procs]
        scrape0 = await _scrape(metric_urls)
        win = _Window(rss0=rss0)
        if hooks:
            await hooks.window_start()
        win.busy0 = _machine_jiffies()
        win.wait0 = {k: _runqueue_wait_seconds(v) if v else None for k, v in pids.items()}
        win.cpu0 = {k: _cpu_seconds(v) if v else None for k, v in pids.items()}
        win.start = _mono()
        await asyncio.sleep(cfg.seconds)
        win.end = _mono()
        win.cpu1 = {k: _cpu_seconds(v) if v else None for k, v in pids.items()}
        win.wait1 = {k: _runqueue_wait_seconds(v) if v else None for k, v in pids.items()}
        win.busy1 = _machine_jiffies()
        win.rss1 = {k: _rss_kb(v) if v else None for k, v in pids.items()}
        if hooks:
            await hooks.window_end()
        early = [c for c, s in pairs if c.ended.is_set() or not s.is_open]
        scraped = _delta(await _scrape(metric_urls), scrape0)
        await asyncio.sleep(GRACE_S)
        early_ids = {c.call_sid for c in early}
        early_ids |= {c.call_sid for c, s in pairs if c.ended.is_set() or not s.is_open}
        if hooks:
            await hooks.after_window(prefix, pairs, rec)

        # Tear the calls down (bounded), then compute.
        for task in drivers.values():
            task.cancel()
        await _gather_bounded(drivers.values(), 2.0)
        t_hangup = _mono()
        await _gather_bounded((c.hangup() for c in placed if not c.ended.is_set()), END_TIMEOUT_S)
        await _gather_bounded((c.ended.wait() for c in placed), END_TIMEOUT_S)
        not_ended = sum(1 for c in placed if not c.ended.is_set())

        if conversation:
            worker_bi = await _worker_barge_ins(redis_url, prefix, [c.call_sid for c, _ in pairs])
            result = _compute_conversation(cfg, pairs, rec, win, scraped, pids, failures,
                                           len(early_ids), not_ended, t_hangup, actions, worker_bi)
            print(_render_conversation(result))
            if cfg.as_json:
                print(json.dumps(result))
            return 0 if len(pairs) == n else 1
        result = _compute(cfg, pairs, rec, win, scraped, pids, failures, len(early_ids), not_ended)
        if hooks:
            hooks.result = result
        else:
            print(_render(result))
            if cfg.as_json:
                print(json.dumps(result))
        return 0 if len(pairs) == n else 1
    finally:
        for task in drivers.values():
            task.cancel()
        await _bounded("stopping the Twilio simulator", twilio.stop(), 20)
        await _bounded("stopping the Vapi stand-in", vapi.stop(), 10)
        stop_cancelling()


@dataclass
class _Inbound:
    """Caller -> assistant frames of the window, over all calls."""

    lat: list[float] = field(default_factory=list)
    at: list[float] = field(default_factory=list)  # send times of the frames in `lat`
    skew: list[float] = field(default_factory=list)
    sent: int = 0
    lost: int = 0
    fill: int = 0
    misaligned: int = 0


def _add_inbound(acc: _Inbound, call: Any, session: Any, rec: _Recorder, w0: float, w1: float) -> None:
    # inbound: caller (tone) frame k sent by the Twilio sim -> caller frame k at Vapi; frames
    # of digital silence at Vapi were not sent by the caller (worker silence fill)
    sent_all = np.frombuffer(rec.twilio_sent.get(call.call_sid, array("d")), dtype=np.float64)
    tone = np.frombuffer(bytes(rec.twilio_tone.get(call.call_sid, b"")), dtype=np.uint8)
    tick = np.array([call.t0 + t for t, _ in call.sent_frames], dtype=np.float64)
    got_all = np.asarray(session.received_times, dtype=np.float64)
    flags = np.frombuffer(bytes(rec.vapi_caller.get(session.id, b"")), dtype=np.uint8)
    n_flags = min(flags.size, got_all.size)
    got = got_all[:n_flags][flags[:n_flags] == 1]
    fill = got_all[:n_flags][flags[:n_flags] == 0]
    acc.fill += int(((fill >= w0) & (fill < w1)).sum())
    sent = sent_all[tone[: sent_all.size] == 1] if tone.size == sent_all.size else sent_all
    if got.size > sent.size:
        acc.misaligned += 1
    ks = np.flatnonzero((sent >= w0) & (sent < w1))
    acc.sent += ks.size
    ok = ks[ks < got.size]
    acc.lost += ks.size - ok.size
    acc.lat.extend((got[ok] - sent[ok]).tolist())
    acc.at.extend(sent[ok].tolist())
    if tick.size == sent_all.size:
        kw = (sent_all >= w0) & (sent_all < w1)
        acc.skew.extend((sent_all[kw] - tick[kw]).tolist())


def _cpu_figures(pids: dict[str, int | None], win: _Window, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(CPU per process, machine figures for the context) over the window."""
    secs = win.end - win.start
    cpu: dict[str, Any] = {}
    ours = 0.0
    for name, pid in pids.items():
        a, b = win.cpu0.get(name), win.cpu1.get(name)
        wa, wb = win.wait0.get(name), win.wait1.get(name)
        wait_pct = None if wa is None or wb is None else round(100 * (wb - wa) / secs, 1)
        ra, rb = win.rss0.get(name), win.rss1.get(name)
        memory = {"rss_mb": None if rb is None else round(rb / 1024, 1),
                  # the issue's measure: RSS growth from no call to n calls, per call
                  "rss_growth_kb_per_call": None if ra is None or rb is None or not n
                  else round((rb - ra) / n, 1)}
        if a is None or b is None:
            cpu[name] = {"pid": pid, "cpu_s": None, "core_pct": None, "core_pct_per_call": None,
                         "cpu_s_per_call_min": None, "runqueue_wait_pct": wait_pct, **memory}
            continue
        used = b - a
        ours += used
        cpu[name] = {
            "pid": pid,
            "cpu_s": round(used, 2),
            "core_pct": round(100 * used / secs, 1),
            "core_pct_per_call": round(100 * used / secs / n, 3),
            "cpu_s_per_call_min": round(used / (n * secs / 60), 3),
            "runqueue_wait_pct": wait_pct,
            **memory,
        }
    procs_s, irq_s, steal_s = ((b - a) / _CLK_TCK / secs for a, b in zip(win.busy0, win.busy1,
                                                                          strict=True))
    machine = {"cores": os.cpu_count(), "machine_busy_cores": round(procs_s + irq_s, 2),
               "other_processes_busy_cores": round(max(0.0, procs_s - ours / secs), 2),
               "irq_softirq_cores": round(irq_s, 2), "steal_cores": round(steal_s, 2)}
    return cpu, machine


def _hist_figures(buckets: dict[float, float], process: str) -> dict[str, Any]:
    p50 = histogram_quantile(0.5, buckets)
    p99 = histogram_quantile(0.99, buckets)
    return {"process": process, "count": int(buckets.get(float("inf"), 0)),
            "p50_ms": None if p50 is None else round(p50 * 1000, 2),
            "p99_ms": None if p99 is None else round(p99 * 1000, 2)}


def _hop_histograms(scraped: _Scrape) -> dict[str, Any]:
    """Each direction's whole hop through the bridge and, under it, its write leg (from the
    sender's stamp until Redis acknowledged the XADD, the wait for the batch included): where the
    hop's time goes."""
    return {hop: _hist_figures(scraped.hops.get(hop, {}), where)
            for hop, where in (("twilio_to_vapi", "worker"), ("twilio_to_redis", "gateway"),
                               ("worker_to_twilio", "gateway"), ("worker_to_redis", "worker"))}


def _trend(lat: list[float], at: list[float], w0: float, secs: float) -> list[float | None]:
    """p50 per quarter of the window, by send time: does the lag grow or recover?"""
    if not lat:
        return [None] * 4
    la, ta = np.asarray(lat), np.asarray(at)
    q = np.minimum(((ta - w0) / secs * 4).astype(int), 3)
    return [round(float(np.median(la[q == i])) * 1000, 1) if (q == i).any() else None
            for i in range(4)]


def _compute(cfg: _Config, pairs: list[tuple[Any, Any]], rec: _Recorder, win: _Window,
             scraped: _Scrape, pids: dict[str, int | None], failures: list[str], early: int,
             not_ended: int) -> dict[str, Any]:
    w0, w1 = win.start, win.end
    secs = w1 - w0
    inb = _Inbound()
    outbound: list[float] = []
    out_at: list[float] = []  # send times of the frames in `outbound`
    out_sent = out_lost = out_tail_missing = out_recv_window = 0
    protocol_errors = misaligned_out = 0
    for call, session in pairs:
        protocol_errors += len(call.protocol_errors)
        _add_inbound(inb, call, session, rec, w0, w1)
        # outbound: assistant frame k (Vapi stand-in) -> Twilio media message k
        vs = np.frombuffer(rec.vapi_sent.get(session.id, array("d")), dtype=np.float64)
        tr = np.array([call.t0 + t for t, _ in call.received_media_times], dtype=np.float64)
        if tr.size > vs.size:
            misaligned_out += 1
        ks = np.flatnonzero((vs >= w0) & (vs < w1))
        out_sent += ks.size
        ok = ks[ks < tr.size]
        missing = ks[ks >= tr.size]
        tail = vs[missing] >= w1 - TAIL_EXCLUDE_S
        out_lost += int((~tail).sum())
        out_tail_missing += int(tail.sum())
        outbound.extend((tr[ok] - vs[ok]).tolist())
        out_at.extend(vs[ok].tolist())
        out_recv_window += int(((tr >= w0) & (tr < w1)).sum())

    n = len(pairs)
    cpu, machine = _cpu_figures(pids, win, n)
    hist = _hop_histograms(scraped)
    inbound, in_at, skew = inb.lat, inb.at, inb.skew
    in_sent, in_lost = inb.sent, inb.lost
    lat_in, lat_out = _pcts(inbound), _pcts(outbound)

    gw = cpu.get("gateway", {}).get("core_pct_per_call")
    wk = [v.get("core_pct_per_call") for k, v in cpu.items() if k.startswith("worker-")]
    targets = {
        "ran_100_calls": n >= TARGET_CALLS,
        "zero_frames_lost": in_lost == 0 and out_lost == 0 and in_sent > 0 and out_sent > 0,
        "latency_p50_lt_3ms": all(d["p50"] is not None and d["p50"] < TARGET_P50_MS
                                  for d in (lat_in, lat_out)),
        "latency_p99_lt_10ms": all(d["p99"] is not None and d["p99"] < TARGET_P99_MS
                                   for d in (lat_in, lat_out)),
        "gateway_lt_0.6pct_core_per_call": gw is not None and gw < TARGET_CORE_PCT_PER_CALL,
        "workers_lt_0.6pct_core_per_call": bool(wk) and all(
            v is not None and v < TARGET_CORE_PCT_PER_CALL for v in wk),
    }
    return {
        "context": {
            "calls": cfg.calls, "calls_connected": n, "calls_failed_to_place": len(failures),
            "seconds": round(secs, 2), "format": cfg.fmt, "workers": cfg.workers,
            **_sim_phases(cfg, pairs), **machine,
            "media_msgs_per_s_in": round(in_sent / secs, 1),
            "media_msgs_per_s_out": round(out_recv_window / secs, 1),
        },
        "latency_ms": {
            "inbound": {**lat_in, "frames": len(inbound)},
            "outbound": {**lat_out, "frames": len(outbound)},
        },
        "latency_p50_by_quarter_ms": {"inbound": _trend(inbound, in_at, w0, secs),
                                      "outbound": _trend(outbound, out_at, w0, secs)},
        "sim_send_skew_ms": {k: v for k, v in _pcts(skew).items() if k in ("p50", "p99", "max")},
        "bridge_histograms": hist,
        "bridge_counters": {k: int(v) for k, v in sorted(scraped.counters.items())},
        "playout_unsent_ms": _unsent_figures(scraped, n),
        "frames": {
            "inbound_sent": in_sent, "inbound_lost": in_lost,
            "outbound_sent": out_sent, "outbound_lost": out_lost,
            "outbound_tail_not_received": out_tail_missing,
            "inbound_silence_injected_by_worker": inb.fill,
            "calls_misaligned_in": inb.misaligned, "calls_misaligned_out": misaligned_out,
        },
        "errors": {"protocol_errors": protocol_errors, "calls_ended_early": early,
                   "calls_not_ended_after_hangup": not_ended,
                   "placement_errors": failures[:3]},
        "cpu": cpu,
        "targets": targets,
    }


def _f(v: Any, width: int, prec: int = 2) -> str:
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float):
        return f"{v:{width}.{prec}f}"
    return f"{v!s:>{width}}"


def _phases(n: int) -> str:
    return ("callers' frames in one burst per 20 ms" if n == 1
            else f"frames spread over {n} phases of the 20 ms")


def _render(r: dict[str, Any]) -> str:
    c, lat, fr, err = r["context"], r["latency_ms"], r["frames"], r["errors"]
    lines = [
        f"callbridge bench: {c['calls_connected']}/{c['calls']} calls, {c['seconds']:g} s window, "
        f"{c['format']}, {c['workers']} worker(s), {_phases(c.get('phases', 1))}, {c['cores']} cores "
        f"(busy in the window: {_f(c['machine_busy_cores'], 0)} cores, of which irq/softirq "
        f"{_f(c['irq_softirq_cores'], 0)}, other processes {_f(c['other_processes_busy_cores'], 0)}; "
        f"steal {_f(c['steal_cores'], 0)})",
        f"media msgs/s: in {c['media_msgs_per_s_in']:.0f} (Twilio sim -> gateway), "
        f"out {c['media_msgs_per_s_out']:.0f} (gateway -> Twilio sim)",
        "",
        "added one-way latency, sims' clocks (ms)     p50     p90     p99     max   frames   lost¹",
    ]
    for key, label in (("inbound", "inbound  Twilio send -> Vapi recv   "),
                       ("outbound", "outbound Vapi send -> Twilio recv   ")):
        d = lat[key]
        lost = fr["inbound_lost"] if key == "inbound" else fr["outbound_lost"]
        lines.append(f"  {label}      {_f(d['p50'], 7)} {_f(d['p90'], 7)} {_f(d['p99'], 7)} "
                     f"{_f(d['max'], 7)} {_f(d['frames'], 8)} {_f(lost, 7)}")
    tq = r["latency_p50_by_quarter_ms"]
    lines.append("  p50 by quarter of the window (ms): inbound "
                 + " / ".join(_f(v, 0, 1) for v in tq["inbound"]) + ";  outbound "
                 + " / ".join(_f(v, 0, 1) for v in tq["outbound"]))
    sk = r["sim_send_skew_ms"]
    lines.append(f"  (sim send skew, tick -> socket write: p50 {_f(sk['p50'], 0)} "
                 f"p99 {_f(sk['p99'], 0)} max {_f(sk['max'], 0)} ms; not counted above)")
    lines.append("bridge hop histograms, window delta (ms, estimated from buckets with linear "
                 "interpolation, as Prometheus histogram_quantile; n = frames timed, one in 8):")
    for hop, d in r["bridge_histograms"].items():
        if hop.endswith("_redis") and not d["count"]:
            continue  # a bench from before the write legs were timed, or a run that timed none
        label = f"  {hop}" if hop.endswith("_redis") else hop  # a write leg, under its hop
        lines.append(f"  {label:<17} [{d['process']:<7}]  p50 {_f(d['p50_ms'], 6)}  "
                     f"p99 {_f(d['p99_ms'], 6)}  n={d['count']}")
    bc, pu = r["bridge_counters"], r.get("playout_unsent_ms")
    if pu and pu["max"] is not None:
        lines.append(f"  worker playout buffers at the window's end (assistant audio held unsent, "
                     f"waiting for its pacing slot): mean {_f(pu['mean_per_call'], 0, 1)} ms per call, "
                     f"max {_f(pu['max'], 0, 1)} ms")
    lines.append("  bridge counters in the window: "
                 + (", ".join(f"{k} {v}" for k, v in bc.items()) if bc else "no drops, no Redis errors"))
    lines.append(
        f"frames: inbound sent {fr['inbound_sent']} lost {fr['inbound_lost']}; outbound sent "
        f"{fr['outbound_sent']} lost {fr['outbound_lost']} (last {TAIL_EXCLUDE_S:g} s not received: "
        f"{fr['outbound_tail_not_received']})")
    lines.append(f"  ¹ lost = sent in the window, not received by hangup (window end + {GRACE_S:g} s)")
    lines.append(
        f"  extra silence frames Vapi got that the caller never sent (worker fill): "
        f"{fr['inbound_silence_injected_by_worker']}; calls with more frames received than sent: "
        f"in {fr['calls_misaligned_in']}, out {fr['calls_misaligned_out']}")
    lines.append(
        f"errors: protocol {err['protocol_errors']}, calls ended early {err['calls_ended_early']}, "
        f"failed to place {c['calls_failed_to_place']}, not ended after hangup "
        f"{err['calls_not_ended_after_hangup']}")
    for e in err["placement_errors"]:
        lines.append(f"  placement error: {e}")
    lines += _render_cpu_targets(r)
    return "\n".join(lines)


def _render_cpu_targets(r: dict[str, Any]) -> list[str]:
    lines = [""]
    lines.append("CPU over the window          pid     cpu s  % core  % core/call  cpu s/call-min"
                 "  runq wait %  RSS MB  RSS KB/call")
    for name, d in r["cpu"].items():
        lines.append(f"  {name:<22} {_f(d['pid'], 7)} {_f(d['cpu_s'], 8)} {_f(d['core_pct'], 7, 1)} "
                     f"{_f(d['core_pct_per_call'], 12, 3)} {_f(d['cpu_s_per_call_min'], 15, 3)} "
                     f"{_f(d['runqueue_wait_pct'], 12, 1)} {_f(d.get('rss_mb'), 7, 1)} "
                     f"{_f(d.get('rss_growth_kb_per_call'), 12, 1)}")
    lines.append("  (runq wait %: share of the window the process was runnable but waiting for a CPU;")
    lines.append("   RSS KB/call: resident memory at the window's end less before any call, per call)")
    t = r["targets"]
    lines.append("")
    lines.append("targets: " + ", ".join(f"{k} {'PASS' if v else 'MISS'}" for k, v in t.items()))
    return lines


# ------------------------------------------------------------------------------------------
# Conversation scenario: figures


class _Received:
    """The media messages one call's Twilio sim received: arrival (monotonic) and, on demand,
    which utterance each one is (voices.identify on the frame, cached)."""

    def __init__(self, call: Any, payloads: list[bytes]) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import audioop

        self._ulaw2lin = audioop.ulaw2lin
        t = np.array([call.t0 + t for t, _ in call.received_media_times], dtype=np.float64)
        self.n = min(t.size, len(payloads))
        self.t = t[: self.n]
        self._payloads = payloads
        self._labels: dict[int, str | None] = {}

    def label(self, j: int) -> str | None:
        from sim import voices

        if j not in self._labels:
            data = self._payloads[j]
            self._labels[j] = voices.identify(self._ulaw2lin(data, 2), 8000) if data else None
        return self._labels[j]

    def index_after(self, t: float) -> int:
        return int(np.searchsorted(self.t, t, side="right"))


def _compute_conversation(cfg: _Config, pairs: list[tuple[Any, Any]], rec: _Recorder, win: _Window,
                          scraped: _Scrape, pids: dict[str, int | None], failures: list[str],
                          early: int, not_ended: int, t_hangup: float,
                          actions: list[tuple[float, str]],
                          worker_bi: dict[str, list[float]]) -> dict[str, Any]:
    """Figures of the conversation scenario, for events whose start falls in the window:

    1. interruption -> clear: stand-in sends `user-interrupted` (monotonic, right after the write)
       -> the first `clear` the Twilio sim receives after it (before the next interruption); split
       at the worker's "barge-in" event stamp (call:{sid}:events) into stand-in -> worker and
       worker -> Twilio sim.
    2. stale frames: media the Twilio sim receives after that clear, before the first frame of
       the next utterance (or hangup), that identifies as the interrupted utterance.
    3. turn latency added: stand-in sends frame 0 of an answer -> the Twilio sim receives the
       first frame that identifies as that answer.
    4. underruns: runs of >= CONV_GAP_S silence between heard segments of one utterance (heard
       span: from its first frame's arrival to the next utterance's, or hangup).
    """
    w0, w1 = win.start, win.end
    secs = w1 - w0
    inf = float("inf")
    inb = _Inbound()
    protocol_errors = 0
    clear_lat: list[float] = []
    to_worker: list[float] = []  # user-interrupted sent -> worker barge-in
    worker_to_sim: list[float] = []  # worker barge-in -> clear received
    turn_lat: list[float] = []
    out_lat: list[float] = []
    interruptions = no_clear = no_worker_event = extra_clears = 0
    stale = gap_frames = 0
    stale_after: list[float] = []
    utterances = interrupted_utts = answers = no_arrival = not_first = 0
    checked = underruns = unheard = 0
    gaps_ms: list[float] = []
    late_sender: list[float] = []  # per underrun: how late the stand-in sent the late frame
    late_bridge: list[float] = []  # ... and how much longer the bridge took for it than frame 0
    slack: list[float] = []  # Twilio's buffer when a frame of an utterance arrived
    for call, session in pairs:
        protocol_errors += len(call.protocol_errors)
        _add_inbound(inb, call, session, rec, w0, w1)
        got = _Received(call, rec.media.get(call.call_sid, []))
        spoken = list(session.spoken)
        vs = np.frombuffer(rec.vapi_sent.get(session.id, array("d")), dtype=np.float64)
        first = [rec.first_frame.get(u.turn_id) for u in spoken]

        # Where each utterance's first frame reached the Twilio sim (index into `got`).
        arr: list[int | None] = []
        for u, ff in zip(spoken, first, strict=True):
            j_found = None
            if ff is not None:
                lo = got.index_after(ff[0])
                for j in range(lo, got.index_after(ff[0] + ARRIVAL_SEARCH_S)):
                    if got.label(j) == u.label:
                        j_found = j
                        break
                if j_found is not None and j_found != lo and w0 <= ff[0] < w1:
                    not_first += 1  # earlier frames after the send were not this utterance
            arr.append(j_found)

        def heard_end(i: int, arr: list[int | None] = arr, got: _Received = got,
                      first: list[tuple[float, int] | None] = first) -> float:
            """End of the span that belongs to utterance i: the next one's first frame arrives."""
            if i + 1 < len(first):
                j = arr[i + 1]
                if j is not None:
                    return float(got.t[j])
                ff = first[i + 1]
                return ff[0] + ARRIVAL_SEARCH_S if ff is not None else t_hangup
            return t_hangup

        # 3. turn latency added, and outbound per-frame latency of whole utterances
        for i, (u, ff, ja) in enumerate(zip(spoken, first, arr, strict=True)):
            if ff is None or not w0 <= ff[0] < w1:
                continue
            utterances += 1
            interrupted_utts += bool(u.interrupted)
            if ja is None:
                no_arrival += 1
                continue
            if u.label.startswith("answer"):
                answers += 1
                turn_lat.append(float(got.t[ja]) - ff[0])
            nfr, s0 = u.frames_total, ff[1]
            if not u.interrupted and u.ended is not None and s0 + nfr <= vs.size:
                end = got.index_after(heard_end(i) - 1e-6)
                if ja + nfr <= end:
                    out_lat.extend((got.t[ja:ja + nfr] - vs[s0:s0 + nfr]).tolist())

        # 1 + 2. interruptions: clear latency and stale frames
        clears = np.sort(np.array([call.t0 + c for c in call.clears], dtype=np.float64))
        used = np.zeros(clears.size, dtype=bool)
        wb = sorted(worker_bi.get(call.call_sid, []))
        idx_of = {u.turn_id: i for i, u in enumerate(spoken)}
        clear_of: dict[str, float] = {}  # turn id of an interrupted utterance -> its clear
        ints = rec.interrupted.get(session.id, [])
        for k, (t_ui, _wall, turn_id) in enumerate(ints):
            nxt = ints[k + 1][0] if k + 1 < len(ints) else inf
            c = int(np.searchsorted(clears, t_ui, side="right"))
            clear_t = None
            if c < clears.size and clears[c] < nxt:
                clear_t = clear_of[turn_id] = float(clears[c])
                used[c] = True
            if not w0 <= t_ui < w1:
                continue
            interruptions += 1
            if clear_t is None:
                no_clear += 1
                continue
            clear_lat.append(clear_t - t_ui)
            b = int(np.searchsorted(wb, t_ui - 0.005))  # its speech-update went out just before
            if b < len(wb) and wb[b] <= clear_t:
                to_worker.append(wb[b] - t_ui)
                worker_to_sim.append(clear_t - wb[b])
            else:
                no_worker_event += 1
            iu = idx_of.get(turn_id)
            if iu is None:
                continue
            label = spoken[iu].label
            for j in range(got.index_after(clear_t), got.index_after(heard_end(iu) - 1e-6)):
                gap_frames += 1
                if got.label(j) == label:
                    stale += 1
                    stale_after.append(float(got.t[j]) - clear_t)
        extra_clears += int((~used & (clears >= w0) & (clears < w1)).sum())

        # 4. underruns in what the caller heard; each one is put down to the frame that came too
        # late (the first of the segment after the gap): the stand-in sent it late (against
        # frame 0 + k * 20 ms) or the bridge took longer for it than for frame 0.
        segs = call.heard_segments(min_silence_s=CONV_GAP_S)
        ss = np.array([call.t0 + a for a, _ in segs], dtype=np.float64)
        se = np.array([call.t0 + e for _, e in segs], dtype=np.float64)
        for i, (u, ff, ja) in enumerate(zip(spoken, first, arr, strict=True)):
            if ff is None or ja is None or not w0 <= ff[0] < w1:
                continue
            if u.ended is None or u.ended > t_hangup - 0.3:
                continue  # still playing at hangup
            checked += 1
            t_first = float(got.t[ja])
            span_end = min(heard_end(i), clear_of.get(u.turn_id, inf) + 0.001)
            sel = np.flatnonzero((ss >= t_first - 0.005) & (ss < span_end - 0.005))
            if sel.size == 0:
                unheard += 1
                continue
            underruns += sel.size - 1
            gaps_ms.extend(((ss[sel[1:]] - se[sel[:-1]]) * 1000).tolist())
            s0 = ff[1]
            for start in ss[sel[1:]]:
                j = got.index_after(float(start) - 0.0005)
                k = j - ja
                if not 0 < k < u.frames_sent or s0 + k >= vs.size:
                    continue
                sender = float(vs[s0 + k] - vs[s0]) - k * 0.020
                bridge = float(got.t[j] - vs[s0 + k]) - (t_first - float(vs[s0]))
                late_sender.append(sender)
                late_bridge.append(bridge)
            # Twilio's buffer (ms of audio queued) when each frame of the utterance arrived
            frames = got.t[ja:got.index_after(span_end)][: u.frames_sent]
            play_end = t_first
            for t in frames[1:].tolist():
                play_end += 0.020
                slack.append(play_end - t)
                play_end = max(play_end, t)

    n = len(pairs)
    cpu, machine = _cpu_figures(pids, win, n)
    in_window = [kind for t, kind in actions if w0 <= t < w1]
    call_min = n * secs / 60
    lat_clear = _pcts(clear_lat)
    clear_hist = _hist_figures(scraped.hists.get(CLEAR_METRIC, {}), "gateway")
    targets = {
        "interruption_to_clear_p99_le_20ms": lat_clear["p99"] is not None
        and lat_clear["p99"] <= TARGET_CLEAR_P99_MS,
        "every_interruption_cleared": interruptions > 0 and no_clear == 0,
        "zero_stale_frames": interruptions > 0 and stale == 0,
        "zero_underruns": checked > 0 and underruns == 0,
        "zero_inbound_frames_lost": inb.sent > 0 and inb.lost == 0,
    }
    return {
        "scenario": "conversation",
        "context": {
            "calls": cfg.calls, "calls_connected": n, "calls_failed_to_place": len(failures),
            "seconds": round(secs, 2), "format": cfg.fmt, "workers": cfg.workers,
            **_sim_phases(cfg, pairs), **machine,
            "caller_barge_ins": in_window.count("barge"), "caller_turns": in_window.count("turn"),
            "assistant_utterances": utterances, "assistant_utterances_interrupted": interrupted_utts,
        },
        "interruption_to_clear_ms": {**lat_clear, "n": len(clear_lat),
                                     "interruptions": interruptions, "without_clear": no_clear,
                                     "clears_without_interruption": extra_clears},
        "interruption_split_ms": {"standin_to_worker": {**_pcts(to_worker), "n": len(to_worker)},
                                  "worker_to_twilio_sim": {**_pcts(worker_to_sim),
                                                           "n": len(worker_to_sim)},
                                  "no_worker_event": no_worker_event},
        "stale_frames_after_clear": {"stale": stale, "frames_between_clear_and_next_utterance":
                                     gap_frames, "latest_stale_after_clear_ms":
                                     round(max(stale_after) * 1000, 1) if stale_after else None},
        "turn_latency_added_ms": {**_pcts(turn_lat), "n": len(turn_lat), "answers": answers,
                                  "utterances_never_arrived": no_arrival,
                                  "first_frame_not_identified": not_first},
        "outbound_frame_latency_ms": {**_pcts(out_lat), "n": len(out_lat)},
        "inbound_frame_latency_ms": {**_pcts(inb.lat), "n": len(inb.lat), "sent": inb.sent,
                                     "lost": inb.lost},
        "underruns": {"count": underruns, "per_call_minute": round(underruns / call_min, 3)
                      if call_min else None, "utterances_checked": checked,
                      "utterances_not_heard": unheard,
                      "longest_gap_ms": round(max(gaps_ms), 1) if gaps_ms else None,
                      "stand_in_late": sum(1 for a, b in zip(late_sender, late_bridge, strict=True)
                                           if a >= b),
                      "bridge_late": sum(1 for a, b in zip(late_sender, late_bridge, strict=True)
                                         if b > a),
                      "late_frame_sender_ms": _pcts(late_sender),
                      "late_frame_bridge_ms": _pcts(late_bridge),
                      "twilio_buffer_at_arrival_ms": {
                          "p1": round(float(np.percentile(slack, 1)) * 1000, 2) if slack else None,
                          "p50": round(float(np.percentile(slack, 50)) * 1000, 2) if slack else None,
                          "min": round(min(slack) * 1000, 2) if slack else None,
                          "frames": len(slack),
                          "below_0": sum(1 for v in slack if v < 0)}},
        "bridge_histograms": {
            "barge_in_clear": clear_hist,
            "turn_latency": _hist_figures(scraped.hists.get(TURN_METRIC, {}), "worker"),
            **_hop_histograms(scraped),
        },
        "bridge_counters": {k: int(v) for k, v in sorted(scraped.counters.items())},
        "errors": {"protocol_errors": protocol_errors, "calls_ended_early": early,
                   "calls_not_ended_after_hangup": not_ended, "placement_errors": failures[:3]},
        "cpu": cpu,
        "targets": targets,
    }


def _render_conversation(r: dict[str, Any]) -> str:
    c, err = r["context"], r["errors"]
    ic, sp, st = r["interruption_to_clear_ms"], r["interruption_split_ms"], r["stale_frames_after_clear"]
    tl, ur, bh = r["turn_latency_added_ms"], r["underruns"], r["bridge_histograms"]
    tb = ur["twilio_buffer_at_arrival_ms"]

    def row(label: str, d: dict[str, Any]) -> str:
        return (f"  {label:<46}{_f(d['p50'], 7)} {_f(d['p90'], 7)} {_f(d['p99'], 7)} "
                f"{_f(d['max'], 7)} {_f(d['n'], 7)}")

    def hrow(label: str, d: dict[str, Any]) -> str:
        return (f"  {label:<46}{_f(d['p50_ms'], 7)}         {_f(d['p99_ms'], 7)}         "
                f"{_f(d['count'], 7)}")

    lines = [
        f"callbridge bench --scenario conversation: {c['calls_connected']}/{c['calls']} calls, "
        f"{c['seconds']:g} s window, {c['format']}, {c['workers']} worker(s), "
        f"{_phases(c.get('phases', 1))}, {c['cores']} cores "
        f"(busy in the window: {_f(c['machine_busy_cores'], 0)} cores, of which irq/softirq "
        f"{_f(c['irq_softirq_cores'], 0)}, other processes {_f(c['other_processes_busy_cores'], 0)}; "
        f"steal {_f(c['steal_cores'], 0)})",
        f"in the window: callers barged in {c['caller_barge_ins']}x and took {c['caller_turns']} normal "
        f"turns; the assistant started {c['assistant_utterances']} utterances, "
        f"{c['assistant_utterances_interrupted']} of them interrupted",
        "",
        "                                                  p50     p90     p99     max       n",
        "1 interruption -> clear (ms)",
        row("stand-in sends user-interrupted -> Twilio clear", ic),
        row("  stand-in sends -> worker barge-in event", sp["standin_to_worker"]),
        row("  worker barge-in event -> Twilio sim recv", sp["worker_to_twilio_sim"]),
        hrow("  bridge barge_in_clear [gateway], worker->send", bh["barge_in_clear"]),
        f"  interruptions {ic['interruptions']}, without a clear {ic['without_clear']}; clears with no "
        f"interruption {ic['clears_without_interruption']}; no worker event {sp['no_worker_event']} "
        f"(target p99 <= {TARGET_CLEAR_P99_MS:g} ms)",
        f"2 stale frames after clear: {st['stale']} (frames received between a clear and the next "
        f"utterance: {st['frames_between_clear_and_next_utterance']}"
        + (f"; latest stale {st['latest_stale_after_clear_ms']} ms after the clear)"
           if st["stale"] else ")"),
        "3 turn latency (ms)",
        row("added: stand-in sends answer frame 0 -> Twilio", tl),
        hrow("bridge turn_latency [worker], end of caller", bh["turn_latency"]),
        "    speech -> first frame sent (incl. the stand-in's 400 ms endpointing)",
        f"  answers {tl['answers']}, never arrived {tl['utterances_never_arrived']}, first frame "
        f"after the send not identified {tl['first_frame_not_identified']}",
        f"4 underruns (silence >= {CONV_GAP_S * 1000:g} ms inside a heard utterance): {ur['count']} in "
        f"{ur['utterances_checked']} utterances = {_f(ur['per_call_minute'], 0, 3)} per call-minute; "
        f"longest gap {_f(ur['longest_gap_ms'], 0, 1)} ms; utterances not heard "
        f"{ur['utterances_not_heard']}",
        f"  late frame after each gap: stand-in sent it late {ur['stand_in_late']}x (max "
        f"{_f(ur['late_frame_sender_ms']['max'], 0, 1)} ms), bridge slower than for frame 0 "
        f"{ur['bridge_late']}x (max {_f(ur['late_frame_bridge_ms']['max'], 0, 1)} ms)",
        f"  Twilio buffer when a frame arrives (ms): p50 {_f(tb['p50'], 0, 1)}, p1 {_f(tb['p1'], 0, 1)}, "
        f"min {_f(tb['min'], 0, 1)}; frames arriving to an empty buffer {tb['below_0']} of "
        f"{tb['frames']}",
        "",
        "per-frame latency (ms)",
        row("inbound  Twilio send -> Vapi recv", r["inbound_frame_latency_ms"]),
        row("outbound Vapi send -> Twilio recv (whole utts)", r["outbound_frame_latency_ms"]),
        f"  inbound frames sent {r['inbound_frame_latency_ms']['sent']} lost "
        f"{r['inbound_frame_latency_ms']['lost']}",
        hrow("bridge twilio_to_vapi [worker]", bh["twilio_to_vapi"]),
        hrow("bridge worker_to_twilio [gateway]", bh["worker_to_twilio"]),
    ]
    bc = r["bridge_counters"]
    lines.append("  bridge counters in the window: "
                 + (", ".join(f"{k} {v}" for k, v in bc.items()) if bc else "no drops, no Redis errors"))
    lines.append(
        f"errors: protocol {err['protocol_errors']}, calls ended early {err['calls_ended_early']}, "
        f"failed to place {c['calls_failed_to_place']}, not ended after hangup "
        f"{err['calls_not_ended_after_hangup']}")
    for e in err["placement_errors"]:
        lines.append(f"  placement error: {e}")
    lines += _render_cpu_targets(r)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Failover scenario


FO_WARMUP_S = 4.0  # after every call connected: the greeting has played, the first turns run
FO_GREETING_S = 2.0  # the assistant's first message (never interrupted)
FO_ANSWER_S = 3.0  # every answer: long enough that most signals land mid-answer
FO_RESUME_S = 1.0  # the new session's first utterance (the stand-in's `resume` tone)
FO_CALLER_S = 1.2  # every caller utterance
FO_CALLER_PAUSE_S = (0.5, 1.2)  # the caller speaks this long after it heard the assistant stop
FO_HEARD_LAG_S = 0.15  # an assistant frame reaches the caller's ear about this long after arrival
FO_NUDGE_S = 5.0  # no answer this long after speaking: the caller speaks again ("hello?")
FO_DITHER = 400  # ± noise on each caller sample, so that every caller speech frame is unique
FO_STALL_S = 6.0  # SIGSTOP … SIGCONT
FO_PAUSE_S = (2.0, 4.0)  # after an event settled, before the next signal
FO_LOST_AFTER_S = 10.0  # no resumption heard within this of the signal: the call is lost
FO_BEFORE_S = 0.2  # caller frames sent this long before a signal may still be on their way
FO_RELEASE_S = 10.0  # an event settles at the latest this long after the kill / SIGCONT
FO_SETTLE_POLL_S = 0.05
FO_TAIL_S = 3.0  # after the last event, before hanging up
FO_CLOSE_S = 10.0  # after the hang-ups: how long Vapi sessions may take to close
FO_SILENT_S = 10.0  # a call on which no assistant audio arrives this long is lost
FO_DELIVERY_TAIL_S = 1.0  # caller frames sent this close to the hang-up are not judged
FO_MIN_RUN = 3  # heard windows: a shorter run of one label is an edge between two utterances
FO_STEADY_RUN = 10  # heard windows (200 ms) of `resume` in a row: the resumption plays steadily
FO_SEED = 11
TARGET_FAILOVER_GAP_S = 3.0
TARGET_KILLS = 10


def _heard_windows(ulaw: bytes) -> tuple[list[str | None], Any]:
    """Per 20 ms of μ-law 8 kHz audio (a call's heard timeline): the utterance label (None:
    silent or no tone) by the rule of `sim.voices.identify` (dominant frequency ±20 Hz, −40 dBFS
    gate), vectorised because a whole run's audio is labelled at the end; and how many of its 160
    samples were audible (not inside a run of ≥ 4 μ-law zeros, which is where nothing played), so
    an underrun inside an utterance does not count as heard audio."""
    import warnings

    from sim import voices

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop

    n = len(ulaw) // 160
    out: list[str | None] = [None] * n
    if n == 0:
        return out, np.zeros(0, dtype=np.int64)
    raw = np.frombuffer(ulaw[: n * 160], dtype=np.uint8)
    zero = ((raw == 0xFF) | (raw == 0x7F)).astype(np.int8)
    gap = np.zeros(raw.size, dtype=bool)
    starts = np.flatnonzero(np.convolve(zero, np.ones(4, dtype=np.int8), "valid") == 4)
    for k in range(4):
        gap[starts + k] = True
    audible = (~gap).reshape(n, 160).sum(axis=1)
    freqs = np.asarray(sorted(voices.LABELS), dtype=np.float64)
    names = [voices.LABELS[float(f)] for f in freqs]
    pcm = np.frombuffer(audioop.ulaw2lin(ulaw[: n * 160], 2), dtype="<i2").astype(np.float64)
    pcm = pcm.reshape(n, 160)
    voiced = np.flatnonzero(np.sqrt((pcm * pcm).mean(axis=1)) >= voices.VOICED_RMS)
    nfft = 2048  # 3.9 Hz bins, interpolated: far finer than the 50 Hz between labels
    win = np.hanning(160)
    for chunk in np.array_split(voiced, voiced.size // 2048 + 1):
        if chunk.size == 0:
            continue
        spec = np.abs(np.fft.rfft(pcm[chunk] * win, nfft, axis=1))
        spec[:, 0] = 0.0
        k = spec.argmax(axis=1)
        kk = np.clip(k, 1, spec.shape[1] - 2)
        rows = np.arange(chunk.size)
        a, b, c = spec[rows, kk - 1], spec[rows, kk], spec[rows, kk + 1]
        den = a - 2.0 * b + c
        shift = np.where((den != 0.0) & (k == kk), 0.5 * (a - c) / np.where(den == 0.0, 1.0, den), 0.0)
        f = (k + shift) * 8000.0 / nfft
        j = np.abs(f[:, None] - freqs[None, :]).argmin(axis=1)
        ok = np.abs(freqs[j] - f) <= voices.IDENTIFY_TOLERANCE_HZ
        for row, idx in zip(chunk[ok].tolist(), j[ok].tolist(), strict=True):
            out[row] = names[idx]
    return out, audible


def _excess_frames(labels: list[str | None], audible: Any, budget: dict[str, int]) -> dict[str, int]:
    """Per label: whole 20 ms frames heard beyond `budget` (frames the stand-in sent of it). A
    window on the edge between two utterances carries the other one's samples, so one frame per
    heard run of the label is allowed."""
    heard: dict[str, int] = {}
    runs: dict[str, int] = {}
    prev: str | None = None
    for lab, aud in zip(labels, audible.tolist(), strict=True):
        if lab is not None:
            heard[lab] = heard.get(lab, 0) + aud
            if lab != prev:
                runs[lab] = runs.get(lab, 0) + 1
        prev = lab
    out: dict[str, int] = {}
    for lab, samples in heard.items():
        extra = samples - 160 * (budget.get(lab, 0) + runs[lab])
        if extra > 0:
            out[lab] = -(-extra // 160)
    return out


def _runs_of(labels: list[str | None], label: str, min_len: int) -> int:
    """How many runs of at least `min_len` consecutive windows carry `label`."""
    count = length = 0
    for lab in [*labels, None]:
        if lab == label:
            length += 1
            continue
        count += length >= min_len
        length = 0
    return count


def _run_start(labels: list[str | None], label: str, start: int, min_len: int) -> int | None:
    """Index of the first run of at least `min_len` windows of `label` at or after `start`."""
    length = 0
    for i in range(start, len(labels)):
        length = length + 1 if labels[i] == label else 0
        if length >= min_len:
            return i - min_len + 1
    return None


def _label_one(ulaw: bytes) -> str | None:
    import warnings

    from sim import voices

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop

    return voices.identify(audioop.ulaw2lin(ulaw, 2), 8000) if ulaw else None


def _session_sid(session: Any) -> str | None:
    """The CallSid a Vapi session serves (the worker puts it in the variable values)."""
    body = session.body if isinstance(session.body, dict) else {}
    sid = body.get("assistantOverrides", {}).get("variableValues", {}).get("twilioCallSid")
    return sid if isinstance(sid, str) else None


def _sessions_by_sid(vapi: Any) -> dict[str, list[Any]]:
    """CallSid -> its Vapi sessions, oldest first (the stand-in keeps them in creation order)."""
    out: dict[str, list[Any]] = {}
    for s in vapi.sessions.values():
        sid = _session_sid(s)
        if sid is not None:
            out.setdefault(sid, []).append(s)
    return out


@dataclass
class _FoCall:
    """One call as the failover bench follows it, on the bench process's monotonic clock (the
    stand-ins run in it)."""

    call: SimCall
    index: int
    rng: random.Random
    arrivals: array[float] = field(default_factory=lambda: array("d"))  # assistant media arrivals
    speech_sent: dict[int, float] = field(default_factory=dict)  # speech frame seq -> sent
    talking: list[tuple[float, float]] = field(default_factory=list)  # caller utterances
    watch: float | None = None  # waiting for the first `resume` frame arriving after this
    resume_at: float | None = None
    utterances: int = 0
    next_seq: int = 0


class _Failover:
    """What the failover scenario records through the stand-ins' observers.

    The caller's speech frames carry the caller tone plus a little noise, so every one of them is
    unique: a frame can then be followed from the Twilio stand-in (sent) to every Vapi session
    that received it, and gaps and re-sends across a takeover are counted frame by frame. The
    Vapi stand-in sees the frame after the worker's uplink (μ-law → PCM16 16 kHz); the last
    quarter of a converted frame depends on that frame alone (the resampler's history only
    reaches its first 3 ms, and its arithmetic is exact), so it is the frame's key there."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.calls: dict[str, _FoCall] = {}
        self.frame_key: dict[bytes, tuple[str, int]] = {}  # speech frame (μ-law) -> (sid, seq)
        self.tail_key: dict[bytes, tuple[str, int]] = {}  # last quarter as the Vapi side gets it
        self.tail = 160 if fmt == "pcm_s16le" else 40
        self.got: dict[str, list[tuple[int, float]]] = {}  # Vapi session id -> (seq, arrival)
        self.collisions = 0

    def speech(self, c: _FoCall) -> bytes:
        """The caller's next utterance (μ-law 8 kHz), every frame registered under its key."""
        import warnings

        from shared.audio import Uplink
        from sim import voices

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import audioop

        n = c.utterances
        c.utterances += 1
        rng = np.random.default_rng((FO_SEED, c.index, n))
        samples = round(FO_CALLER_S * 50) * 160
        t = np.arange(samples, dtype=np.float64) / 8000.0
        x = voices.AMPLITUDE * 32767.0 * np.sin(2 * np.pi * voices.frequency("caller", n) * t)
        x += rng.uniform(-FO_DITHER, FO_DITHER, samples)
        pcm = np.clip(np.rint(x), -32768, 32767).astype("<i2").tobytes()
        ulaw = audioop.lin2ulaw(pcm, 2)
        sid = c.call.call_sid
        for i in range(0, len(ulaw), 160):
            frame = ulaw[i:i + 160]
            key = (sid, c.next_seq)
            c.next_seq += 1
            tail = Uplink(self.fmt).convert(frame)[-self.tail:]
            self.collisions += (frame in self.frame_key) + (tail in self.tail_key)
            self.frame_key[frame] = key
            self.tail_key[tail] = key
        return ulaw


class _FoTwilioTap(TwilioObserver):
    """Twilio stand-in side: when each caller speech frame went out; when assistant media
    arrived; and, for calls hit by a signal, the first `resume` frame after it."""

    def __init__(self, fo: _Failover) -> None:
        self.fo = fo

    def caller_frame_sent(self, call: SimCall, frame: bytes, at: float, pos: int) -> None:
        key = self.fo.frame_key.get(frame)
        if key is not None:
            c = self.fo.calls.get(key[0])
            if c is not None:
                c.speech_sent.setdefault(key[1], at)

    def assistant_media_received(self, call: SimCall, audio: bytes, at: float) -> None:
        c = self.fo.calls.get(call.call_sid)
        if c is None:
            return
        c.arrivals.append(at)
        if c.watch is not None and c.resume_at is None and at >= c.watch \
                and _label_one(audio) == "resume":
            c.resume_at = at


class _FoVapiTap(VapiObserver):
    """Vapi stand-in side: which caller speech frames each session received, and when."""

    def __init__(self, fo: _Failover) -> None:
        self.fo = fo

    def caller_audio_received(self, session: VapiSession, data: bytes, at: float) -> None:
        key = self.fo.tail_key.get(data[-self.fo.tail:])
        if key is not None:
            lst = self.fo.got.get(session.id)
            if lst is None:
                lst = self.fo.got[session.id] = []
            lst.append((key[1], at))


async def _fo_caller(c: _FoCall, fo: _Failover) -> None:
    """One caller of the failover scenario, driven by what it hears only (so it knows nothing of
    sessions or takeovers): once the assistant has spoken since the caller's last utterance and
    has then been quiet for a short pause, speak; after FO_NUDGE_S without an answer, speak
    again. A failover gap is such a silence, so callers also talk into gaps."""
    last_end = _mono()
    while not c.call.ended.is_set():
        pause = c.rng.uniform(*FO_CALLER_PAUSE_S)
        while True:
            la = c.arrivals[-1] if c.arrivals else 0.0
            due = la + FO_HEARD_LAG_S + pause if la > last_end else last_end + FO_NUDGE_S
            now = _mono()
            if now >= due or c.call.ended.is_set():
                break
            await asyncio.sleep(min(due - now, 0.25))
        if c.call.ended.is_set():
            return
        audio = fo.speech(c)
        start = _mono()
        c.talking.append((start, start + len(audio) / 8000))
        c.call.say(audio)
        await c.call.wait_speaking_done()
        last_end = _mono()


@dataclass
class _FoWorker:
    wid: str
    proc: ManagedProcess
    stopped: bool = False


@dataclass
class _FoEvent:
    """One signal to one worker, and what became of the calls it owned. Times are monotonic."""

    index: int
    kind: str  # "kill" (SIGKILL, then a replacement worker) or "stall" (SIGSTOP … SIGCONT)
    victim: str
    at: float  # right after the signal
    affected: list[str]  # CallSids the victim owned at the signal
    before: dict[str, list[str]]  # CallSid -> ids of its Vapi sessions at the signal
    state: dict[str, str]  # CallSid -> "assistant" | "caller" | "both" | "pause" at the signal
    owners_before: dict[str, int]  # worker id -> calls owned at the signal
    lease_deadline: float | None = None  # when the victim's lease ran out
    cont_at: float | None = None
    replacement: str | None = None
    replacement_ready_s: float | None = None
    resume_at: dict[str, float | None] = field(default_factory=dict)
    claimed_at: dict[str, float] = field(default_factory=dict)  # CallSid -> the new owner's claim
    taken_by: dict[str, int] = field(default_factory=dict)  # worker id -> affected calls it owns now
    settled_at: float = 0.0


async def _fo_owners(r: Any, keys: Any, sids: list[str]) -> dict[str, str]:
    pipe = r.pipeline(transaction=False)
    for sid in sids:
        pipe.hget(keys.call(sid), "owner")
    vals = await pipe.execute()
    return {sid: v.decode() for sid, v in zip(sids, vals, strict=True) if isinstance(v, bytes)}


async def _fo_claims(r: Any, keys: Any, sids: list[str], since_wall: float) -> dict[str, float]:
    """CallSid -> monotonic time its new owner issued the claim: the `t` of the first `own` entry
    the claim script wrote to call:{sid}:out after `since_wall` (same host: one offset)."""
    offset = time.time() - _mono()
    out: dict[str, float] = {}
    for sid in sids:
        cursor = f"{int(since_wall * 1000)}-0"
        for _page in range(40):
            entries: Any = await r.xrange(keys.outbound(sid), min=cursor, max="+", count=500)
            for eid, f in entries:
                if f.get(b"k") == b"own" and f.get(b"t"):
                    out[sid] = int(f[b"t"]) / 1e9 - offset
                    break
                cursor = eid.decode()
            if sid in out or len(entries) < 500:
                break
            ms, seq = cursor.split("-")
            cursor = f"{ms}-{int(seq) + 1}"
    return out


async def _fo_worker_events(r: Any, keys: Any, sids: list[str]) -> dict[str, list[tuple[str, float]]]:
    """CallSid -> (kind, monotonic time) of the workers' `hold` events (call:{sid}:events, wall
    clock stamps; same host, so one offset converts)."""
    offset = time.time() - _mono()
    out: dict[str, list[tuple[str, float]]] = {}
    for sid in sids:
        try:
            entries: Any = await r.xrange(keys.events(sid))
        except Exception as exc:
            print(f"callbridge bench: cannot read worker events: {exc!r}", file=sys.stderr)
            return out
        out[sid] = [("hold", int(f[b"t"]) / 1e9 - offset) for _id, f in entries
                    if f.get(b"k") == b"hold" and f.get(b"t", b"").isdigit()]
    return out


async def _bench_failover(cfg: _Config, redis_url: str, procs: list[ManagedProcess]) -> int:
    with _stand_ins_never_pause():
        return await _bench_failover_run(cfg, redis_url, procs)


async def _bench_failover_run(cfg: _Config, redis_url: str, procs: list[ManagedProcess]) -> int:
    """The failover scenario: conversations on every call while, one event at a time, the worker
    owning the most calls is killed (and replaced by a new worker) or frozen for FO_STALL_S.
    An event settles when every call it hit has resumed (or FO_LOST_AFTER_S passed), the
    replacement is ready and the replaced Vapi sessions have closed (bounded); the next follows
    after a 2–4 s pause, and no sooner than --seconds / --events after the last."""
    from redis.asyncio import Redis

    from shared.streams import Keys
    from sim import voices
    from sim.twilio import TwilioSim
    from sim.vapi import AssistantScript, VapiSim

    stop_cancelling = _cancel_on_signals()

    n = cfg.calls
    rate = 16000 if cfg.fmt == "pcm_s16le" else 8000
    for kind, secs in (("greeting", FO_GREETING_S), ("resume", FO_RESUME_S)):
        voices.frames(kind, 0, secs, rate, cfg.fmt)  # build the cached utterances up front
    for k in range(5):
        voices.frames("answer", k, FO_ANSWER_S, rate, cfg.fmt)
    script = AssistantScript(name="failover", greeting_s=FO_GREETING_S, answers=1_000_000,
                             answer_s=FO_ANSWER_S, end_after=False, first_message_interruptible=False,
                             interruptible=False, resume_s=FO_RESUME_S)
    fo = _Failover(cfg.fmt)
    vapi = VapiSim(api_key=VAPI_KEY, assistant=script, record_audio=False, observer=_FoVapiTap(fo),
                   tick_s=vapi_tick_s(cfg.phases))
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    twilio = TwilioSim(gateway_url=public, public_url=public, account_sid=ACCOUNT_SID,
                       auth_token=AUTH_TOKEN, observer=_FoTwilioTap(fo), idle_frame=caller_tone_frame(),
                       phases=cfg.phases)
    rng = random.Random(FO_SEED)
    placed: list[SimCall] = []
    drivers: dict[str, asyncio.Task[None]] = {}
    workers: list[_FoWorker] = []
    r = Redis.from_url(redis_url, socket_timeout=5)
    try:
        await vapi.start()
        await twilio.start()
        prefix = f"bench{os.getpid()}-{int(time.time()) % 100000}:"
        keys = Keys(prefix)
        env = _child_env(redis_url, prefix, PUBLIC_URL=public, VAPI_BASE_URL=vapi.base_url,
                         TWILIO_API_BASE_URL=twilio.rest_base_url, VAPI_AUDIO_FORMAT=cfg.fmt,
                         WORKER_MAX_CALLS=max(n, 1), WORKER_HTTP_HOST="127.0.0.1")
        gw = _proc("gateway", ["gateway", "--host", "127.0.0.1", "--port", str(port)], env, port)
        procs.append(gw)

        def new_worker(wid: str) -> _FoWorker:
            hp = free_port()
            p = _proc(f"worker-{wid}", ["worker", "--http-port", str(hp)], dict(env, WORKER_ID=wid), hp)
            procs.append(p)
            w = _FoWorker(wid, p)
            workers.append(w)
            return w

        for i in range(cfg.workers):
            new_worker(f"bench-w{i + 1}")
        for p in procs:
            p.start()
        problem = await _wait_ready(procs, READY_TIMEOUT_S)
        if problem:
            print(f"callbridge bench: {problem}", file=sys.stderr)
            return 1
        scrape0 = await _scrape([_base_url(gw) + "/metrics"])

        t_place = _mono()
        failures: list[str] = []

        async def place(i: int) -> None:
            await asyncio.sleep(max(0.0, t_place + i / RAMP_PER_S - _mono()))
            try:
                call = await twilio.place_call(from_=f"+1555{i:07d}", to="+15550000000")
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            fo.calls[call.call_sid] = _FoCall(call, i, random.Random(FO_SEED * 1000 + i))
            placed.append(call)

        await asyncio.gather(*(place(i) for i in range(n)))

        def connected() -> int:
            by_sid = _sessions_by_sid(vapi)
            ok = 0
            for c in placed:
                ss = by_sid.get(c.call_sid, [])
                if ss and ss[-1].is_open and c.stream_live:
                    ok += 1
                    if c.call_sid not in drivers:  # its caller starts now
                        drivers[c.call_sid] = asyncio.create_task(_fo_caller(fo.calls[c.call_sid], fo))
            return ok

        deadline = _mono() + CONNECT_TIMEOUT_S
        while connected() < len(placed) and _mono() < deadline:
            await asyncio.sleep(0.05)
        n_conn = connected()
        print(f"callbridge bench: {n_conn}/{n} calls connected after {_mono() - t_place:.1f} s; "
              f"warm-up {FO_WARMUP_S:g} s, then {cfg.events} events…", file=sys.stderr)
        if n_conn == 0:
            print("callbridge bench: no call connected", file=sys.stderr)
            for p in procs:
                print(f"----- {p.name} log -----\n{p.log_tail()}", file=sys.stderr)
            return 1
        await asyncio.sleep(FO_WARMUP_S)

        events: list[_FoEvent] = []
        t_begin = _mono()
        spacing = cfg.seconds / cfg.events
        settled = t_begin
        for k in range(cfg.events):
            at = max(t_begin + k * spacing, settled + (rng.uniform(*FO_PAUSE_S) if k else 0.0))
            await asyncio.sleep(max(0.0, at - _mono()))
            ev = await _fo_event(k, "kill" if k % 2 == 0 else "stall", fo, vapi, r, keys, workers,
                                 new_worker)
            if ev is None:
                print("callbridge bench: no worker left to signal", file=sys.stderr)
                break
            events.append(ev)
            settled = ev.settled_at
            got = sorted(t - ev.at for t in ev.resume_at.values() if t is not None)
            print(f"callbridge bench: event {k + 1}/{cfg.events}: {ev.kind} {ev.victim} "
                  f"({len(ev.affected)} calls): resumed {len(got)}/{len(ev.affected)}"
                  + (f", gap {got[0]:.2f}–{got[-1]:.2f} s" if got else ""), file=sys.stderr)
        await asyncio.sleep(FO_TAIL_S)
        t_end = _mono()

        for task in drivers.values():
            task.cancel()
        await _gather_bounded(drivers.values(), 2.0)
        early = {c.call_sid for c in placed if c.ended.is_set()}
        t_hangup = _mono()
        await _gather_bounded((c.hangup() for c in placed if not c.ended.is_set()), END_TIMEOUT_S)
        await _gather_bounded((c.ended.wait() for c in placed), END_TIMEOUT_S)
        not_ended = sum(1 for c in placed if not c.ended.is_set())
        close_deadline = _mono() + FO_CLOSE_S
        while vapi.open_sessions() and _mono() < close_deadline:
            await asyncio.sleep(0.1)
        scraped = _delta(await _scrape([_base_url(gw) + "/metrics"]), scrape0)
        claims = await _scrape_claims([_base_url(w.proc) + "/metrics" for w in workers if w.proc.alive()])
        wev = await _fo_worker_events(r, keys, [c.call_sid for c in placed])
        result = _compute_failover(cfg, fo, vapi, placed, events, wev, early, not_ended, failures,
                                   scraped, claims, t_begin, t_end, t_hangup, n_conn)
        lost = result["calls_lost"]["calls"]
        if lost:
            _fo_print_logs(lost, procs)
        print(_render_failover(result))
        if cfg.as_json:
            print(json.dumps(result))
        return 0 if n_conn == n else 1
    finally:
        for w in workers:
            if w.stopped:  # never leave a frozen process behind
                w.proc.signal(signal.SIGCONT)
        for task in drivers.values():
            task.cancel()
        await _bounded("closing the Redis client", r.aclose(), 5)
        await _bounded("stopping the Twilio simulator", twilio.stop(), 20)
        await _bounded("stopping the Vapi stand-in", vapi.stop(), 10)
        stop_cancelling()


async def _fo_event(k: int, kind: str, fo: _Failover, vapi: Any, r: Any, keys: Any,
                    workers: list[_FoWorker], new_worker: Callable[[str], _FoWorker]) -> _FoEvent | None:
    """Signal the worker that owns the most live calls; return once the event settled."""
    live = [sid for sid, c in fo.calls.items() if not c.call.ended.is_set()]
    owners = await _fo_owners(r, keys, live)
    candidates = [w for w in workers if w.proc.alive() and not w.stopped]
    if len(candidates) < 2:
        return None
    counts = {w.wid: 0 for w in candidates}
    for o in owners.values():
        if o in counts:
            counts[o] += 1
    victim = max(candidates, key=lambda w: counts[w.wid])
    affected = sorted(sid for sid, o in owners.items() if o == victim.wid)
    by_sid = _sessions_by_sid(vapi)
    now = _mono()
    state: dict[str, str] = {}
    for sid in affected:
        c = fo.calls[sid]
        ss = by_sid.get(sid, [])
        assistant = bool(ss) and ss[-1].speaking
        caller = bool(c.talking) and c.talking[-1][0] <= now < c.talking[-1][1]
        state[sid] = {(True, True): "both", (True, False): "assistant", (False, True): "caller",
                      (False, False): "pause"}[(assistant, caller)]
        c.resume_at = None
        c.watch = now
    wall = time.time()
    victim.proc.signal(signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
    t_sig = _mono()
    ev = _FoEvent(k + 1, kind, victim.wid, t_sig, affected,
                  {sid: [s.id for s in by_sid.get(sid, [])] for sid in affected}, state, counts)
    with contextlib.suppress(Exception):
        score = await r.zscore(keys.workers, victim.wid)  # its lease deadline, ms on Redis's clock
        if score is not None:
            ev.lease_deadline = float(score) / 1000 - (time.time() - _mono())
    ready: asyncio.Task[None] | None = None
    if kind == "kill":
        assert victim.proc.proc is not None
        with contextlib.suppress(Exception):
            await asyncio.to_thread(victim.proc.proc.wait, 10)
        base = victim.wid.split("-r")[0]
        gen = sum(1 for w in workers if w.wid.split("-r")[0] == base)
        repl = new_worker(f"{base}-r{gen}")  # a new id, as a restarted container gets
        repl.proc.start()
        ev.replacement = repl.wid
        ready = asyncio.create_task(repl.proc.wait_ready(READY_TIMEOUT_S))
    else:
        victim.stopped = True

    def resumed() -> bool:
        return all(fo.calls[sid].resume_at is not None for sid in affected)

    if kind == "stall":
        while _mono() < t_sig + FO_STALL_S:
            await asyncio.sleep(FO_SETTLE_POLL_S)
        victim.proc.signal(signal.SIGCONT)
        victim.stopped = False
        ev.cont_at = _mono()
    while not resumed() and _mono() < t_sig + FO_LOST_AFTER_S:
        await asyncio.sleep(FO_SETTLE_POLL_S)
    if ready is not None:
        try:
            await ready
            ev.replacement_ready_s = round(_mono() - t_sig, 2)
        except (RuntimeError, TimeoutError) as exc:
            print(f"callbridge bench: replacement worker did not start: {exc}", file=sys.stderr)
    # The replaced sessions close: at once for a kill, once the frozen worker woke for a stall.
    old = [vapi.sessions[ids[-1]] for ids in ev.before.values() if ids and ids[-1] in vapi.sessions]
    release_by = (ev.cont_at or t_sig) + FO_RELEASE_S
    while any(s.is_open for s in old) and _mono() < release_by:
        await asyncio.sleep(FO_SETTLE_POLL_S)
    for sid in affected:
        c = fo.calls[sid]
        ev.resume_at[sid] = c.resume_at
        c.watch = None
    with contextlib.suppress(Exception):
        ev.claimed_at = await _fo_claims(r, keys, affected, wall - 0.1)
        after = await _fo_owners(r, keys, affected)
        for o in after.values():
            ev.taken_by[o] = ev.taken_by.get(o, 0) + 1
    ev.settled_at = _mono()
    return ev


async def _scrape_claims(urls: list[str]) -> dict[str, float]:
    """callbridge_worker_claims_total by kind, summed over the given workers (since they started)."""
    out: dict[str, float] = {}
    for s in await _samples(urls):
        if s.name == "callbridge_worker_claims_total":
            kind = s.labels.get("kind", "")
            out[kind] = out.get(kind, 0.0) + float(s.value)
    return out


def _fo_print_logs(sids: list[str], procs: list[ManagedProcess]) -> None:
    """For a lost call: the log lines of every process that name it (stderr), kept before the
    logs are discarded."""
    for p in procs:
        lines = [ln for ln in p.logs().splitlines() if any(s in ln for s in sids)]
        if lines:
            print(f"----- {p.name}: lines naming the lost calls -----", file=sys.stderr)
            print("\n".join(lines[-40:]), file=sys.stderr)


def _fo_pct(values: list[float]) -> dict[str, float | int | None]:
    """p50/p90/max (seconds, 2 decimals) and n."""
    if not values:
        return {"p50": None, "p90": None, "max": None, "n": 0}
    a = np.asarray(values, dtype=np.float64)
    p50, p90 = np.percentile(a, [50, 90])
    return {"p50": round(float(p50), 2), "p90": round(float(p90), 2), "max": round(float(a.max()), 2),
            "n": int(a.size)}


def _spoken_frames(u: Any, now: float) -> int:
    """Frames of an utterance the stand-in sent (for one still being spoken: so far)."""
    if u.ended is not None:
        return int(u.frames_sent)
    return min(int(u.frames_total), int((now - u.started) / 0.02) + 1)


SPLIT = {
    "lease": "  lease left at the signal (detection)",
    "scan_claim": "  lapse -> new owner claims (scan, claim)",
    "claim_to_post": "  claim -> POST /call (history, worker busy)",
    "vapi_setup": "  POST /call -> Vapi socket open",
    "first_audio": "  socket open -> resume frame at the caller",
}


def _compute_failover(cfg: _Config, fo: _Failover, vapi: Any, placed: list[SimCall],
                      events: list[_FoEvent], wev: dict[str, list[tuple[str, float]]],
                      early: set[str], not_ended: int, failures: list[str], scraped: _Scrape,
                      claims: dict[str, float], t_begin: float, t_end: float, t_hangup: float,
                      n_conn: int) -> dict[str, Any]:
    """Figures of the failover scenario.

    Per event and hit call: the gap (signal -> first frame of the new session's `resume` arriving
    at the Twilio stand-in), split into the lease the victim had left (its deadline in the
    `workers` set), lapse -> the new owner's claim (the `t` of its `own` entry), claim -> POST
    /call, Vapi setup and first audio; whether the worker held the resumption (a `hold` event:
    the caller's gap speech reached the new session as speech over its first words); words lost
    (caller speech frames sent from FO_BEFORE_S before the signal to the end of the gap that
    reached neither the old session before the signal nor the new one); frames heard from the
    gateway's flush for the new owner up to the next signal beyond what the new session sent,
    per label (old-session audio, or frames repeated); when the replaced Vapi session closed.
    Per call: frames heard twice (per label, beyond what all its sessions sent), second
    greetings heard (greeting runs after its first takeover), calls lost (no resumption within
    FO_LOST_AFTER_S, no assistant audio for FO_SILENT_S, or ended before the hang-up), caller
    speech frames never delivered to any session; and Vapi sessions left open at the end.
    Heard audio is judged by what played (SimCall.heard), not by what arrived: a `clear`
    legitimately makes the worker send audio again that never played.
    """
    now = _mono()
    by_sid = _sessions_by_sid(vapi)
    post_at = {id(e["body"]): e["at"] for e in vapi.create_log if isinstance(e.get("body"), dict)}
    got_sets = {sid: {seq for seq, _ in got} for sid, got in fo.got.items()}
    dup_in = sum(len(got) - len(got_sets[sid]) for sid, got in fo.got.items())
    heard: dict[str, tuple[list[str | None], Any]] = {c.call_sid: _heard_windows(c.heard) for c in placed}
    t0 = {c.call_sid: c.t0 for c in placed}

    ev_rows: list[dict[str, Any]] = []
    gaps: dict[str, list[float]] = {"all": [], "kill": [], "stall": [], "steady": [], "steady_kill": []}
    split: dict[str, list[float]] = {k: [] for k in SPLIT}
    closed_after: dict[str, list[float]] = {"kill": [], "stall": []}
    lost_calls: dict[str, str] = {}
    words_lost = words_sent = resent = old_frames = held = 0
    first_hit: dict[str, float] = {}
    for i, ev in enumerate(events):
        next_at = events[i + 1].at if i + 1 < len(events) else t_hangup
        calls: list[dict[str, Any]] = []
        for sid in ev.affected:
            first_hit.setdefault(sid, ev.at)
            c = fo.calls[sid]
            res = ev.resume_at.get(sid)
            sessions = by_sid.get(sid, [])
            old = next((s for s in sessions if ev.before[sid] and s.id == ev.before[sid][-1]), None)
            later = [s for s in sessions if s.id not in ev.before[sid]
                     and (s.opened_at is None or s.opened_at < next_at)]
            new = later[0] if later else None
            claim = ev.claimed_at.get(sid)
            post = post_at.get(id(new.body)) if new is not None else None
            opened = new.opened_at if new is not None else None
            row: dict[str, Any] = {"call": sid, "at_signal": ev.state.get(sid),
                                   "gap_s": None if res is None else round(res - ev.at, 3)}
            if res is None:
                lost_calls.setdefault(sid, f"no resumption within {FO_LOST_AFTER_S:g} s of event {ev.index}")
            else:
                gap = res - ev.at
                was_held = opened is not None and any(
                    kind == "hold" and opened <= t <= res + FO_RESUME_S for kind, t in wev.get(sid, []))
                held += was_held
                for key in ("all", ev.kind):
                    gaps[key].append(gap)
                labels = heard[sid][0]
                j = _run_start(labels, "resume", max(0, int((res - t0[sid]) / 0.02)), FO_STEADY_RUN)
                steady = None if j is None else t0[sid] + j * 0.02 - ev.at
                if steady is not None:
                    gaps["steady"].append(steady)
                    if ev.kind == "kill":
                        gaps["steady_kill"].append(steady)
                row["steady_gap_s"] = None if steady is None else round(steady, 3)
                lease = ev.lease_deadline
                parts = {
                    "lease": None if lease is None else lease - ev.at,
                    "scan_claim": None if lease is None or claim is None else claim - lease,
                    "claim_to_post": None if claim is None or post is None else post - claim,
                    "vapi_setup": None if post is None or opened is None else opened - post,
                    "first_audio": None if opened is None else res - opened,
                }
                for name, v in parts.items():
                    if v is not None:
                        split[name].append(v)
                row.update({f"{k}_s": None if v is None else round(v, 3) for k, v in parts.items()})
                row["resumption_held"] = was_held
            # words lost: caller speech frames of the gap that no session could act on
            gap_end = res if res is not None else ev.at + FO_LOST_AFTER_S
            old_got = {seq for seq, t in fo.got.get(old.id, [])
                       if t < ev.at + 0.05} if old is not None else set()
            new_got = got_sets.get(new.id, set()) if new is not None else set()
            in_gap = [seq for seq, t in c.speech_sent.items() if ev.at - FO_BEFORE_S <= t < gap_end]
            lost = [seq for seq in in_gap if seq not in old_got and seq not in new_got]
            words_sent += len(in_gap)
            words_lost += len(lost)
            resent += len(old_got & new_got)
            row.update({"speech_frames_in_gap": len(in_gap), "speech_frames_lost": len(lost)})
            # old-session audio heard after the gateway's flush for the new owner
            extra: dict[str, int] = {}
            if res is not None and new is not None:
                flush = [c.call.t0 + x for x in c.call.clears if (claim or res) <= c.call.t0 + x <= res]
                start = min(flush) if flush else res
                labels, audible = heard[sid]
                a = max(0, int((start - t0[sid]) / 0.02))
                b = max(a, int((next_at - t0[sid]) / 0.02))
                budget: dict[str, int] = {}
                for s in later:
                    for u in s.spoken:
                        budget[u.label] = budget.get(u.label, 0) + _spoken_frames(u, now)
                extra = _excess_frames(labels[a:b], audible[a:b], budget)
            old_frames += sum(extra.values())
            row["frames_heard_beyond_new_session"] = sum(extra.values())
            row["frames_heard_beyond_new_session_by_label"] = extra
            row["old_session_labels"] = sorted({u.label for u in old.spoken}) if old is not None else []
            if old is not None:
                since = ev.cont_at or ev.at
                after = None if old.closed_at is None else old.closed_at - since
                row["old_session_closed_after_s"] = None if after is None else round(after, 2)
                closed_after[ev.kind].append(after if after is not None else now - since)
            calls.append(row)
        got = [x["gap_s"] for x in calls if x["gap_s"] is not None]
        states = [ev.state.get(sid, "") for sid in ev.affected]
        ev_rows.append({
            "event": ev.index, "kind": ev.kind, "victim": ev.victim, "calls": len(ev.affected),
            "owners_at_signal": ev.owners_before, "taken_by": ev.taken_by,
            "at_signal": {s: states.count(s) for s in ("assistant", "caller", "both", "pause")},
            "resumed": len(got), "gap_s": _fo_pct(got),
            "speech_frames_lost": sum(x["speech_frames_lost"] for x in calls),
            "frames_heard_beyond_new_session": sum(x["frames_heard_beyond_new_session"] for x in calls),
            "replacement": ev.replacement, "replacement_ready_s": ev.replacement_ready_s,
            "settled_after_s": round(ev.settled_at - ev.at, 2), "per_call": calls,
        })

    # Per call, whole run: duplicates heard, second greetings, silences, delivery.
    dup_heard = greet_spoken = greet_heard = never_delivered = 0
    longest_silence: dict[str, float] = {}
    for call in placed:
        sid = call.call_sid
        c = fo.calls[sid]
        sessions = by_sid.get(sid, [])
        sent: dict[str, int] = {}
        for s in sessions:
            for u in s.spoken:
                sent[u.label] = sent.get(u.label, 0) + _spoken_frames(u, now)
        labels, audible = heard[sid]
        dup_heard += sum(_excess_frames(labels, audible, sent).values())
        greet_spoken += sum(1 for s in sessions[1:] for u in s.spoken if u.label == "greeting")
        hit = first_hit.get(sid)
        if hit is not None:
            greet_heard += _runs_of(labels[max(0, int((hit - call.t0) / 0.02)):], "greeting", FO_MIN_RUN)
        arr = np.frombuffer(c.arrivals, dtype=np.float64)
        arr = arr[(arr >= t_begin) & (arr < t_hangup)]
        edges = np.concatenate(([t_begin], arr, [t_hangup]))
        longest_silence[sid] = float(np.diff(edges).max())
        if longest_silence[sid] > FO_SILENT_S:
            lost_calls.setdefault(sid, f"no assistant audio for {longest_silence[sid]:.1f} s")
        if sid in early:
            lost_calls.setdefault(sid, f"ended early ({call.end_reason})")
        received: set[int] = set()
        for s in sessions:
            received |= got_sets.get(s.id, set())
        never_delivered += sum(1 for seq, t in c.speech_sent.items()
                               if t < t_hangup - FO_DELIVERY_TAIL_S and seq not in received)
    open_left = [s for s in vapi.sessions.values() if s.is_open]
    kills = [e for e in events if e.kind == "kill"]
    gk = _fo_pct(gaps["kill"])
    targets = {
        f"kill_gap_p50_le_{TARGET_FAILOVER_GAP_S:g}s": gk["p50"] is not None
        and float(gk["p50"]) <= TARGET_FAILOVER_GAP_S,
        f"kill_events_ge_{TARGET_KILLS}": len(kills) >= TARGET_KILLS,
        "zero_calls_lost": not lost_calls,
        "zero_words_lost": words_lost == 0 and never_delivered == 0,
        "zero_duplicates": dup_heard == 0 and old_frames == 0,
        "zero_second_greetings": greet_heard == 0 and greet_spoken == 0,
        "zero_sessions_left_open": not open_left,
    }
    return {
        "scenario": "failover",
        "context": {"calls": cfg.calls, "calls_connected": n_conn, "calls_failed_to_place": len(failures),
                    "workers": cfg.workers, "format": cfg.fmt, "phases": cfg.phases,
                    "events": len(events),
                    "kills": len(kills), "stalls": len(events) - len(kills),
                    "seconds": round(t_end - t_begin, 1), "cores": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2), "stall_s": FO_STALL_S,
                    "answer_s": FO_ANSWER_S, "caller_utterance_s": FO_CALLER_S},
        "events": ev_rows,
        "gap_s": {"all": _fo_pct(gaps["all"]), "kill": gk, "stall": _fo_pct(gaps["stall"]),
                  "split": {k: _fo_pct(v) for k, v in split.items()}, "resumptions_held": held,
                  "steady": _fo_pct(gaps["steady"]), "steady_kill": _fo_pct(gaps["steady_kill"])},
        "words_lost": {"speech_frames_lost": words_lost, "speech_frames_in_gaps": words_sent,
                       "ms_lost": words_lost * 20, "frames_resent_to_new_session": resent,
                       "speech_frames_never_delivered": never_delivered,
                       "caller_frames_twice_to_one_session": dup_in,
                       "frame_key_collisions": fo.collisions},
        "duplicates": {"frames_heard_twice": dup_heard, "frames_heard_beyond_new_session": old_frames},
        "second_greetings": {"heard": greet_heard, "spoken_by_new_sessions": greet_spoken},
        "calls_lost": {"count": len(lost_calls), "calls": sorted(lost_calls), "why": lost_calls,
                       "longest_silence_s": round(max(longest_silence.values(), default=0.0), 2)},
        "sessions": {"created": len(vapi.sessions), "open_at_end": len(open_left),
                     "open_at_end_ids": [s.id for s in open_left],
                     "replaced_closed_after_s": {k: _fo_pct(v) for k, v in closed_after.items()}},
        "bridge_counters": {k: int(v) for k, v in sorted(scraped.counters.items())},
        "worker_claims": {k: int(v) for k, v in sorted(claims.items())},
        "errors": {"protocol_errors": sum(len(c.protocol_errors) for c in placed),
                   "calls_ended_early": len(early), "calls_not_ended_after_hangup": not_ended,
                   "placement_errors": failures[:3]},
        "targets": targets,
    }


def _render_failover(r: dict[str, Any]) -> str:
    c, g, wl, d = r["context"], r["gap_s"], r["words_lost"], r["duplicates"]
    cl, ss, err = r["calls_lost"], r["sessions"], r["errors"]

    def prow(label: str, p: dict[str, Any]) -> str:
        return f"  {label:<50}{_f(p['p50'], 7)} {_f(p['p90'], 7)} {_f(p['max'], 7)} {_f(p['n'], 5)}"

    lines = [
        f"callbridge bench --scenario failover: {c['calls_connected']}/{c['calls']} calls, "
        f"{c['workers']} workers, {c['format']}, {_phases(c.get('phases', 1))}, "
        f"{c['events']} events ({c['kills']} kills, "
        f"{c['stalls']} stalls of {c['stall_s']:g} s) over {c['seconds']:g} s; {c['cores']} cores, "
        f"load average {c['load_avg_1m']}",
        "",
        "  #  kind   victim       calls  at signal  resumed  gap p50    max  words  extra  taken over by",
        "                                 a/c/b/p¹                         lost   frames²",
    ]
    for e in r["events"]:
        a = e["at_signal"]
        state = f"{a['assistant']}/{a['caller']}/{a['both']}/{a['pause']}"
        taken = " ".join(f"{w}:{k}" for w, k in sorted(e["taken_by"].items()))
        lines.append(
            f"{e['event']:>3}  {e['kind']:<6} {e['victim']:<12} {e['calls']:>5}  {state:<10} "
            f"{e['resumed']:>3}/{e['calls']:<4} {_f(e['gap_s']['p50'], 7)} {_f(e['gap_s']['max'], 6)} "
            f"{e['speech_frames_lost']:>6} {e['frames_heard_beyond_new_session']:>6}    {taken}")
    lines.append("  ¹ what the hit calls were doing at the signal: assistant speaking / caller speaking / "
                 "both / pause")
    lines.append("  ² heard after the takeover beyond the frames the new session sent: old-session audio "
                 "or repeats")
    lines.append("  gaps per call (s): " + "; ".join(
        f"{e['event']}: " + " ".join(_f(x["gap_s"], 0) for x in e["per_call"]) for e in r["events"]))
    sc = ss["replaced_closed_after_s"]
    lines += [
        "",
        "failover gap (s): signal -> first resume frame at the caller  p50     p90     max     n",
        prow("all events", g["all"]),
        prow("kills (SIGKILL)", g["kill"]),
        prow(f"stalls (SIGSTOP {c['stall_s']:g} s)", g["stall"]),
        *(prow(label, g["split"][k]) for k, label in SPLIT.items()),
        prow(f"signal -> resumption plays steadily (≥ {FO_STEADY_RUN * 20} ms on end)", g["steady"]),
        prow("  kills", g["steady_kill"]),
        prow("replaced Vapi session closed, after SIGKILL", sc["kill"]),
        prow("  … after SIGCONT", sc["stall"]),
        f"words lost: {wl['speech_frames_lost']} of {wl['speech_frames_in_gaps']} caller speech frames "
        f"sent in the gaps ({wl['ms_lost']} ms) reached neither session; re-sent to the new session "
        f"{wl['frames_resent_to_new_session']}; never delivered in the whole run "
        f"{wl['speech_frames_never_delivered']}; twice to one session "
        f"{wl['caller_frames_twice_to_one_session']}",
        f"resumptions held by the worker (the caller's gap speech reached the new session as speech "
        f"over its first words; INTERRUPT_CONFIRM_MS): {g['resumptions_held']} of {g['all']['n']}",
        f"duplicates heard: {d['frames_heard_twice']} frames heard twice in whole calls; after "
        f"takeovers, {d['frames_heard_beyond_new_session']} frames beyond what the new session sent "
        f"(old-session audio or repeats)",
        f"second greetings: heard {r['second_greetings']['heard']}, spoken by new sessions "
        f"{r['second_greetings']['spoken_by_new_sessions']}",
        f"calls lost: {cl['count']}" + (f" ({', '.join(f'{k}: {v}' for k, v in cl['why'].items())})"
                                        if cl["count"] else "")
        + f"; longest silence on a call {cl['longest_silence_s']:g} s",
        f"Vapi sessions: {ss['created']} created, {ss['open_at_end']} open at the end",
    ]
    bc, wc = r["bridge_counters"], r["worker_claims"]
    lines.append("bridge counters (gateway): "
                 + (", ".join(f"{k} {v}" for k, v in bc.items()) if bc else "no drops, no Redis errors")
                 + "; claims by the workers alive at the end: "
                 + ", ".join(f"{k} {v}" for k, v in wc.items()))
    lines.append(
        f"errors: protocol {err['protocol_errors']}, calls ended early {err['calls_ended_early']}, "
        f"failed to place {c['calls_failed_to_place']}, not ended after hangup "
        f"{err['calls_not_ended_after_hangup']}")
    for e in err["placement_errors"]:
        lines.append(f"  placement error: {e}")
    lines.append("")
    lines.append("targets: " + ", ".join(f"{k} {'PASS' if v else 'MISS'}" for k, v in r["targets"].items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Entry point


def _budget(cfg: _Config) -> float:
    """Seconds the whole bench may take: per run its fixed phases (BUDGET_RUN_S), the calls and
    the timeline of the scenario; the cluster mode adds its own (bench_cluster.cluster_budget).
    Generous: a run that gets near it is stuck, not slow. BUDGET_ENV overrides it."""
    env = os.environ.get(BUDGET_ENV, "").strip()
    if env:
        with contextlib.suppress(ValueError):
            if float(env) > 0:
                return float(env)
    run = BUDGET_RUN_S + cfg.calls * BUDGET_PER_CALL_S + cfg.calls / RAMP_PER_S
    if cfg.baseline:  # the direct bridge, the hop alone (a run with Redis, one without), callbridge
        from callbridge.bench_floor import WARMUP_S as FLOOR_WARMUP_S

        floor = 2 * (FLOOR_WARMUP_S + cfg.seconds + 30.0)  # 30 s: a redis-server, two children
        return 2 * (run + WARMUP_S + cfg.seconds + GRACE_S) + floor
    if cfg.redis_cluster:
        from callbridge.bench_cluster import cluster_budget

        return cluster_budget(cfg, run + WARMUP_S + cfg.seconds + GRACE_S)
    if cfg.scenario == "failover":
        spacing = cfg.seconds / cfg.events
        return (run + FO_WARMUP_S + cfg.events * (max(spacing, FO_PAUSE_S[1]) + BUDGET_PER_EVENT_S)
                + FO_TAIL_S + FO_CLOSE_S)
    return run + WARMUP_S + cfg.seconds + GRACE_S


def _frames_of(task: asyncio.Task[Any]) -> list[str]:
    """A task's whole await chain, outermost first (Task.print_stack shows only the outermost
    coroutine's frame), and what its innermost await waits for."""
    lines: list[str] = []
    obj: Any = task.get_coro()
    for _ in range(100):
        frame = (getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None)
                 or getattr(obj, "ag_frame", None))
        if frame is not None:
            lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, '
                         f"in {frame.f_code.co_name}")
        nxt = (getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
               or getattr(obj, "ag_await", None))
        if nxt is None:
            break
        obj = nxt
    waiting = getattr(task, "_fut_waiter", None)
    if waiting is not None:
        lines.append(f"  waiting for {waiting!r}")
    return lines


def _write_err(text: str) -> None:
    """Straight to fd 2: safe from a signal handler that interrupted a print."""
    data = text.encode(errors="replace")
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(2, data):]


def dump_stacks(reason: str, loop: asyncio.AbstractEventLoop | None, threads: bool = True) -> None:
    """Every thread's stack (faulthandler) and every asyncio task's await chain, to stderr."""
    _write_err(f"\ncallbridge bench: {reason}; stacks follow\n")
    if threads:
        _write_err("--- threads ---\n")
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    if loop is None or loop.is_closed():
        return
    try:
        tasks = list(asyncio.all_tasks(loop))
    except RuntimeError as exc:
        _write_err(f"--- asyncio tasks: not listed ({exc}) ---\n")
        return
    out = [f"--- asyncio tasks ({len(tasks)}) ---"]
    for task in sorted(tasks, key=lambda t: t.get_name()):
        out.append(repr(task))
        with contextlib.suppress(Exception):
            out.extend(_frames_of(task))
    _write_err("\n".join(out) + "\n--- end of stacks ---\n")


class _Watchdog:
    """The bench's hard budget, kept by a thread of its own (so a blocked event loop cannot stop
    it). Past `budget_s`: a note and every thread's stack, then (on the loop, once it answers)
    every task's stack and a cancel of the run, so its `finally` clean-ups stop the processes
    and the Redis nodes. Still running BUDGET_CLEANUP_S later: the stacks again, every child
    process (and the groups of those in sessions of their own) SIGKILLed, exit EXIT_OVER_BUDGET.

    Also, while armed, SIGUSR1 prints every thread's and task's stack (a test that gives up on
    the bench asks for them before it stops it)."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.expired = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[Any] | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bench-watchdog", daemon=True)
        self._usr1: Any = None

    def start(self) -> None:
        with contextlib.suppress(ValueError, AttributeError):  # main thread, POSIX only
            self._usr1 = signal.signal(signal.SIGUSR1, self._on_usr1)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._usr1 is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGUSR1, self._usr1)
            self._usr1 = None

    async def guard(self, coro: Coroutine[Any, Any, int]) -> int:
        """Run `coro` as the task the watchdog cancels."""
        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        try:
            return await coro
        finally:
            self._main = None

    def _on_usr1(self, signum: int, frame: Any) -> None:
        dump_stacks("SIGUSR1", self._loop)

    def _on_expired(self) -> None:  # on the loop
        dump_stacks("over its budget, the asyncio tasks", self._loop, threads=False)
        if self._main is not None:
            self._main.cancel()

    def _watch(self) -> None:
        if self._done.wait(self.budget_s):
            return
        self.expired = True
        dump_stacks(f"over its budget of {self.budget_s:.0f} s ({BUDGET_ENV} sets another): "
                    f"cancelling the run, its clean-ups stop the processes", None)
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(self._on_expired)
        if self._done.wait(BUDGET_CLEANUP_S):
            return
        dump_stacks(f"still running {BUDGET_CLEANUP_S:.0f} s after the cancel: killing its child "
                    f"processes and exiting {EXIT_OVER_BUDGET}", self._loop)
        killed = kill_all(descendants(os.getpid()))
        _write_err(f"callbridge bench: SIGKILL sent to {len(killed)} child process(es)\n")
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(EXIT_OVER_BUDGET)


def _run(coro: Coroutine[Any, Any, int], dog: _Watchdog) -> int:
    freeze_startup_heap()  # the stand-ins' own GC pauses would show up as the bridge's latency
    try:
        import uvloop
    except ImportError:
        return asyncio.run(dog.guard(coro))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(dog.guard(coro))


def run_bench(args: argparse.Namespace) -> int:
    cfg = _Config(
        calls=int(getattr(args, "calls", 100)),
        seconds=float(getattr(args, "seconds", 20.0)),
        fmt=str(getattr(args, "format", "pcm_s16le") or "pcm_s16le"),
        workers=int(getattr(args, "workers", 1) or 1),
        as_json=bool(getattr(args, "json", False)),
        scenario=str(getattr(args, "scenario", "duplex") or "duplex"),
        events=int(getattr(args, "events", 10) or 10),
        redis_cluster=bool(getattr(args, "redis_cluster", False)),
        kill_primary=bool(getattr(args, "kill_primary", False)),
        baseline=str(getattr(args, "baseline", "") or ""),
        phases=int(1 if getattr(args, "phases", None) is None else args.phases),
    )
    failover = cfg.scenario == "failover"
    if (cfg.calls < 1 or cfg.seconds <= 0 or cfg.workers < 1 or cfg.fmt not in ("pcm_s16le", "mulaw")
            or cfg.scenario not in SCENARIOS or (failover and (cfg.workers < 2 or cfg.events < 1))
            or (cfg.redis_cluster and cfg.scenario != "duplex")
            or (cfg.kill_primary and not cfg.redis_cluster)
            or not 1 <= cfg.phases <= MAX_PHASES
            or (cfg.baseline and (cfg.baseline != "direct" or cfg.scenario != "duplex"
                                  or cfg.redis_cluster))):
        print("callbridge bench: need --calls >= 1, --seconds > 0, --workers >= 1, "
              "--format pcm_s16le|mulaw, --scenario duplex|conversation|failover "
              "(failover: --workers >= 2, --events >= 1; --redis-cluster: duplex only; "
              "--kill-primary: with --redis-cluster; --baseline direct: duplex only, not with "
              f"--redis-cluster; --phases 1..{MAX_PHASES})", file=sys.stderr)
        return 2
    procs: list[ManagedProcess] = []
    private: RedisServer | None = None
    dog = _Watchdog(_budget(cfg))
    dog.start()
    try:
        try:
            if cfg.redis_cluster:  # its own two Redis deployments; REDIS_URL is not used
                from callbridge.bench_cluster import bench_cluster

                rc = _run(bench_cluster(cfg, procs), dog)
            else:
                # --baseline: always a private Redis, whose CPU is part of the bridge's sum
                redis_url = None if cfg.baseline else os.environ.get("REDIS_URL")
                if not redis_url:
                    try:
                        private = start_redis()
                    except RuntimeError as exc:
                        print(f"callbridge bench: cannot start redis: {exc}", file=sys.stderr)
                        return 1
                    redis_url = private.url
                if failover:
                    rc = _run(_bench_failover(cfg, redis_url, procs), dog)
                elif cfg.baseline:
                    from callbridge.bench_direct import bench_baseline

                    rc = _run(bench_baseline(cfg, redis_url, {"redis-server": _redis_pid(redis_url, private)},
                                             procs), dog)
                else:
                    rc = _run(_bench(cfg, redis_url, {"redis-server": _redis_pid(redis_url, private)},
                                     procs), dog)
        except KeyboardInterrupt:
            print("callbridge bench: interrupted", file=sys.stderr)
            rc = 130
        except asyncio.CancelledError:
            if not dog.expired:
                print("callbridge bench: terminated", file=sys.stderr)
            rc = 143
        finally:
            stop_procs(procs)
            if private is not None:
                private.stop()
    finally:
        dog.stop()
    if dog.expired:
        print(f"callbridge bench: stopped: over its budget of {dog.budget_s:.0f} s (the stacks "
              f"above show where it was)", file=sys.stderr)
        return EXIT_OVER_BUDGET
    return rc


def stop_procs(procs: list[ManagedProcess]) -> None:
    """Stop the bench's gateway and workers: SIGTERM to all at once, then wait for each (by its
    own pid); the list is emptied."""
    for p in procs:
        p.signal(signal.SIGCONT)  # failover: a frozen worker must be able to drain
        p.signal(signal.SIGTERM)
    deadline = _mono() + STOP_TIMEOUT_S
    for p in procs:
        p.stop(deadline - _mono())
        p.discard_log()
    procs.clear()
