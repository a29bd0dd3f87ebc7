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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from array import array
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from callbridge.procs import ManagedProcess
from callbridge.redis_server import RedisServer, free_port, start_redis
from callbridge.stack_env import stand_in_env
from sim.twilio import SimCall, TwilioObserver
from sim.twilio.wire import SILENCE_FRAME
from sim.vapi import VapiObserver, VapiSession

RAMP_PER_S = 25.0
CONNECT_TIMEOUT_S = 30.0  # after the last call was placed
WARMUP_S = 2.0
GRACE_S = 1.0  # after the window, before hanging up: late frames of the window still count
TAIL_EXCLUDE_S = 0.5  # outbound frames sent this close to the window end are not counted as lost
END_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "bench-auth-token-" + "x" * 16
VAPI_KEY = "bench-vapi-key"
ASSISTANT_ID = "bench-assistant"
HOP_METRIC = "callbridge_hop_latency_seconds"
CLEAR_METRIC = "callbridge_barge_in_clear_seconds"
TURN_METRIC = "callbridge_turn_latency_seconds"
EXTRA_HISTOGRAMS = (CLEAR_METRIC, TURN_METRIC)

SCENARIOS = ("duplex", "conversation")
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


def _runqueue_wait_seconds(pid: int) -> float | None:
    """Time the process's threads were runnable but waiting for a CPU (/proc/PID/task/*/schedstat)."""
    total = 0.0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            continue
    return total


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
    host = urlsplit(redis_url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
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


@dataclass
class _Scrape:
    hops: Buckets = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)  # 'name{label}' -> value
    hists: Buckets = field(default_factory=dict)  # EXTRA_HISTOGRAMS name -> {le: cumulative count}


async def _scrape(urls: Iterable[str]) -> _Scrape:
    """Hop-latency and EXTRA_HISTOGRAMS buckets and problem counters, summed over all given
    /metrics URLs."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = _Scrape()
    async with httpx.AsyncClient(trust_env=False) as client:
        for url in urls:
            try:
                text = (await client.get(url, timeout=5)).text
            except httpx.HTTPError:
                continue
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name == HOP_METRIC + "_bucket":
                        b = out.hops.setdefault(s.labels.get("hop", ""), {})
                        le = float(s.labels["le"])
                        b[le] = b.get(le, 0.0) + float(s.value)
                    elif s.name.endswith("_bucket") and s.name[:-7] in EXTRA_HISTOGRAMS:
                        b = out.hists.setdefault(s.name[:-7], {})
                        le = float(s.labels["le"])
                        b[le] = b.get(le, 0.0) + float(s.value)
                    elif s.name in COUNTERS:
                        label = ",".join(s.labels.values())
                        name = s.name.removeprefix("callbridge_").removesuffix("_total")
                        key = f"{name}{{{label}}}" if label else name
                        out.counters[key] = out.counters.get(key, 0.0) + float(s.value)
    return out


def _delta(after: _Scrape, before: _Scrape) -> _Scrape:
    hops = {hop: {le: n - before.hops.get(hop, {}).get(le, 0.0) for le, n in b.items()}
            for hop, b in after.hops.items()}
    counters = {k: v - before.counters.get(k, 0.0) for k, v in after.counters.items()}
    hists = {name: {le: n - before.hists.get(name, {}).get(le, 0.0) for le, n in b.items()}
             for name, b in after.hists.items()}
    return _Scrape(hops, {k: v for k, v in counters.items() if v}, hists)


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


async def _bench(cfg: _Config, redis_url: str, redis_pid: int | None, procs: list[ManagedProcess]) -> int:
    from sim import voices
    from sim.twilio import TwilioSim
    from sim.vapi import AssistantScript, VapiSim, interrupter

    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            if me is not None:
                loop.add_signal_handler(sig, me.cancel)

    n = cfg.calls
    conversation = cfg.scenario == "conversation"
    ramp_s = n / RAMP_PER_S
    greeting_s = float(round(ramp_s + CONNECT_TIMEOUT_S + WARMUP_S + cfg.seconds + GRACE_S + 10))
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
                   observer=_VapiTap(rec, conversation))
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    twilio = TwilioSim(gateway_url=public, public_url=public, account_sid=ACCOUNT_SID,
                       auth_token=AUTH_TOKEN, observer=_TwilioTap(rec, tone, conversation),
                       idle_frame=tone if conversation else None)  # idle caller: a quiet line
    placed: list[SimCall] = []
    drivers: dict[str, asyncio.Task[None]] = {}
    actions: list[tuple[float, str]] = []
    try:
        await vapi.start()
        await twilio.start()
        prefix = f"bench{os.getpid()}-{int(time.time()) % 100000}:"
        common = {"PUBLIC_URL": public, "VAPI_BASE_URL": vapi.base_url,
                  "TWILIO_API_BASE_URL": twilio.rest_base_url, "VAPI_AUDIO_FORMAT": cfg.fmt,
                  "WORKER_MAX_CALLS": max(n, 1), "WORKER_HTTP_HOST": "127.0.0.1"}
        env = _child_env(redis_url, prefix, **common)
        gw = _proc("gateway", ["gateway", "--host", "127.0.0.1", "--port", str(port)], env, port)
        procs.append(gw)
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

        # Place the calls on a ramp.
        t_place = _mono()
        failures: list[str] = []

        async def place(i: int) -> None:
            await asyncio.sleep(max(0.0, t_place + i / RAMP_PER_S - _mono()))
            try:
                call = await twilio.place_call(from_=f"+1555{i:07d}", to="+15550000000")
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
        pids = {p.name: p.pid for p in procs}
        pids["redis-server"] = redis_pid
        pids["bench (sims)"] = os.getpid()
        win = _Window()
        win.busy0 = _machine_jiffies()
        win.wait0 = {k: _runqueue_wait_seconds(v) if v else None for k, v in pids.items()}
        win.cpu0 = {k: _cpu_seconds(v) if v else None for k, v in pids.items()}
        win.start = _mono()
        await asyncio.sleep(cfg.seconds)
        win.end = _mono()
        win.cpu1 = {k: _cpu_seconds(v) if v else None for k, v in pids.items()}
        win.wait1 = {k: _runqueue_wait_seconds(v) if v else None for k, v in pids.items()}
        win.busy1 = _machine_jiffies()
        early = [c for c, s in pairs if c.ended.is_set() or not s.is_open]
        scraped = _delta(await _scrape(metric_urls), scrape0)
        await asyncio.sleep(GRACE_S)

        # Tear the calls down (bounded), then compute.
        early_ids = {c.call_sid for c in early}
        early_ids |= {c.call_sid for c, s in pairs if c.ended.is_set() or not s.is_open}
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
        print(_render(result))
        if cfg.as_json:
            print(json.dumps(result))
        return 0 if len(pairs) == n else 1
    finally:
        for task in drivers.values():
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(twilio.stop(), 20)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(vapi.stop(), 10)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


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
        if a is None or b is None:
            cpu[name] = {"pid": pid, "cpu_s": None, "core_pct": None, "core_pct_per_call": None,
                         "cpu_s_per_call_min": None, "runqueue_wait_pct": wait_pct}
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
    return {hop: _hist_figures(scraped.hops.get(hop, {}), where)
            for hop, where in (("twilio_to_vapi", "worker"), ("worker_to_twilio", "gateway"))}


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
            **machine,
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


def _render(r: dict[str, Any]) -> str:
    c, lat, fr, err = r["context"], r["latency_ms"], r["frames"], r["errors"]
    lines = [
        f"callbridge bench: {c['calls_connected']}/{c['calls']} calls, {c['seconds']:g} s window, "
        f"{c['format']}, {c['workers']} worker(s), {c['cores']} cores "
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
                 "interpolation, as Prometheus histogram_quantile):")
    for hop, d in r["bridge_histograms"].items():
        lines.append(f"  {hop:<17} [{d['process']:<7}]  p50 {_f(d['p50_ms'], 6)}  "
                     f"p99 {_f(d['p99_ms'], 6)}  n={d['count']}")
    bc = r["bridge_counters"]
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
                 "  runq wait %")
    for name, d in r["cpu"].items():
        lines.append(f"  {name:<22} {_f(d['pid'], 7)} {_f(d['cpu_s'], 8)} {_f(d['core_pct'], 7, 1)} "
                     f"{_f(d['core_pct_per_call'], 12, 3)} {_f(d['cpu_s_per_call_min'], 15, 3)} "
                     f"{_f(d['runqueue_wait_pct'], 12, 1)}")
    lines.append("  (runq wait %: share of the window the process was runnable but waiting for a CPU)")
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
            "seconds": round(secs, 2), "format": cfg.fmt, "workers": cfg.workers, **machine,
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
        f"{c['seconds']:g} s window, {c['format']}, {c['workers']} worker(s), {c['cores']} cores "
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
# Entry point


def _run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    except ImportError:
        return asyncio.run(coro)


def run_bench(args: argparse.Namespace) -> int:
    cfg = _Config(
        calls=int(getattr(args, "calls", 100)),
        seconds=float(getattr(args, "seconds", 20.0)),
        fmt=str(getattr(args, "format", "pcm_s16le") or "pcm_s16le"),
        workers=int(getattr(args, "workers", 1) or 1),
        as_json=bool(getattr(args, "json", False)),
        scenario=str(getattr(args, "scenario", "duplex") or "duplex"),
    )
    if (cfg.calls < 1 or cfg.seconds <= 0 or cfg.workers < 1 or cfg.fmt not in ("pcm_s16le", "mulaw")
            or cfg.scenario not in SCENARIOS):
        print("callbridge bench: need --calls >= 1, --seconds > 0, --workers >= 1, "
              "--format pcm_s16le|mulaw, --scenario duplex|conversation", file=sys.stderr)
        return 2
    procs: list[ManagedProcess] = []
    private: RedisServer | None = None
    try:
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            try:
                private = start_redis()
            except RuntimeError as exc:
                print(f"callbridge bench: cannot start redis: {exc}", file=sys.stderr)
                return 1
            redis_url = private.url
        return _run(_bench(cfg, redis_url, _redis_pid(redis_url, private), procs))
    except KeyboardInterrupt:
        print("callbridge bench: interrupted", file=sys.stderr)
        return 130
    except asyncio.CancelledError:
        print("callbridge bench: terminated", file=sys.stderr)
        return 143
    finally:
        for p in procs:  # all at once, then wait for each (by its own pid)
            p.signal(signal.SIGTERM)
        deadline = _mono() + STOP_TIMEOUT_S
        for p in procs:
            p.stop(deadline - _mono())
            p.discard_log()
        if private is not None:
            private.stop()
