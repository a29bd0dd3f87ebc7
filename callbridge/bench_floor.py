"""`python -m callbridge.bench_floor [--calls N] [--seconds S] [--dry]`: the least the two-tier
shape's Redis hop can cost, measured, for comparison with the direct bridge (`callbridge bench
--baseline direct`).

Two processes stand in for the gateway and the worker with nothing but the hop: each writes one
direction's 20 ms frames for every call onto per-call streams (`fl:in:N`, `fl:out:N`) and reads
the other direction's, as the tiers do, and nothing else: no sockets to Twilio or Vapi, no audio
conversion, no call core, no fencing, no duplicate check, no retries. Each is as lean as Python
gets here: uvloop, RESP packed from one template per stream, replies parsed by hiredis on an
`asyncio.Protocol` and handed to callbacks (no task per round trip, no redis-py), a flush of
whatever queued while the previous one was out, one ring per flush naming the streams written,
and a reader that blocks on its wake stream and then reads the rung streams. The entries are the
data path's: `k`, `t` (the stamp), `q` (writer and sequence), `a` (160 bytes), `MAXLEN ~ 3000`.

Frames are made by one ticker (`--tick-ms`, 2 ms) per process (each call at its own phase, so a flush carries
what a gateway's carries at that load). `--dry` runs the tickers without Redis: what making the
load costs, to subtract. Prints each process's CPU, Redis's (a private `redis-server`), per call,
and the hop's latency (write stamp to read, wall clock). Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections import deque
from typing import Any

import hiredis

FRAME_S = 0.020
PAYLOAD = bytes(range(160))
MAXLEN = 3000
WARMUP_S = 2.0


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(bulk(p) for p in parts)


class Conn(asyncio.Protocol):
    """One Redis connection: `call(packed, n)` gives a future of the `n` replies."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[tuple[int, list[Any], asyncio.Future[list[Any]]]] = deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting, gets = self.waiting, self.reader.gets
        while waiting:
            n, out, fut = waiting[0]
            reply = gets()
            if reply is False:
                return
            out.append(reply)
            if len(out) == n:
                waiting.popleft()
                if not fut.done():  # a reader cancelled at the end
                    fut.set_result(out)

    def connection_lost(self, exc: Exception | None) -> None:
        for _n, _out, fut in self.waiting:
            if not fut.done():
                fut.set_exception(ConnectionError("redis closed the connection"))

    def call(self, packed: bytes, n: int) -> asyncio.Future[list[Any]]:
        assert self.transport is not None
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append((n, [], fut))
        self.transport.write(packed)
        return fut


async def connect(port: int) -> Conn:
    _t, conn = await asyncio.get_running_loop().create_connection(Conn, "127.0.0.1", port)
    return conn


class Side:
    """One tier's half of the hop: writes `mine`'s frames, reads `theirs`'."""

    def __init__(self, calls: int, mine: bytes, theirs: bytes, dry: bool, ring: bool = True) -> None:
        self.calls, self.dry, self.ring = calls, dry, ring
        self.keys = [b"fl:%s:%d" % (mine, i) for i in range(calls)]
        self.read_keys = [b"fl:%s:%d" % (theirs, i) for i in range(calls)]
        self.wake, self.peer_wake = b"fl:wake:" + theirs, b"fl:wake:" + mine
        writer_id = b"floor-" + mine
        # One template per stream: the stamp, the sequence and the audio are its holes.
        self.templates = [
            (resp(b"XADD", k, b"MAXLEN", b"~", b"%d" % MAXLEN, b"*", b"k", b"m", b"t", b"@T", b"q", b"@Q",
                  b"a", b"@A").replace(b"%", b"%%")
             .replace(b"$2\r\n@T\r\n", b"$%d\r\n%s\r\n")
             .replace(b"$2\r\n@Q\r\n", b"$%d\r\n%s\r\n")
             .replace(b"$2\r\n@A\r\n", b"$%d\r\n%s\r\n"))
            for k in self.keys]
        self.writer_id = writer_id
        self.seq = 0
        self.pending: list[bytes] = []
        self.in_flight = False
        self.written = self.read = self.flushes = self.reads = 0
        self.ages: list[float] = []
        self.w: Conn | None = None
        self.r: Conn | None = None

    async def start(self, port: int) -> None:
        if not self.dry:
            self.w, self.r = await connect(port), await connect(port)

    def tick(self, now: float, start: float, wall_offset_ns: int) -> None:
        """Every call whose next frame is due by `now` gets one (phases spread over 20 ms),
        stamped with the wall-clock time it was due: a gateway gets frames as they come, so
        the wait for the next tick is part of the hop."""
        calls = self.calls
        step = FRAME_S / calls
        n_due = int((now - start) / step) + 1  # frames due in all, across calls, since start
        while self.seq < n_due:
            i = self.seq % calls
            stamp = b"%d" % (wall_offset_ns + int((start + self.seq * step) * 1e9))
            self.seq += 1
            q = b"%s:%d" % (self.writer_id, self.seq)
            if self.dry:
                continue
            self.pending.append(self.templates[i] % (len(stamp), stamp, len(q), q, 160, PAYLOAD))
        if self.pending and not self.in_flight:
            self.flush()

    def flush(self) -> None:
        assert self.w is not None
        batch, self.pending = self.pending, []
        if self.ring:
            batch.append(resp(b"XADD", self.peer_wake, b"MAXLEN", b"1", b"*", b"r", b"1"))
        self.in_flight = True
        self.written += len(batch) - self.ring
        self.flushes += 1
        self.w.call(b"".join(batch), len(batch)).add_done_callback(self.flushed)

    def flushed(self, fut: asyncio.Future[list[Any]]) -> None:
        self.in_flight = False
        for reply in fut.result():
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"redis refused a write: {reply}")
        if self.pending:
            self.flush()

    async def read_loop(self, stop: asyncio.Event) -> None:
        """One round trip per wake: the blocked read of the wake stream and, behind it in the same
        write, a read of every followed stream (Redis runs it once the first returns)."""
        assert self.r is not None
        wake_id = b"0-0"
        keys = self.read_keys
        ids = [b"0-0"] * len(keys)
        index = {k: i for i, k in enumerate(keys)}
        while not stop.is_set():
            if self.ring:
                blocked = resp(b"XREAD", b"COUNT", b"1", b"BLOCK", b"200", b"STREAMS", self.wake, wake_id)
                read = resp(b"XREAD", b"COUNT", b"100", b"STREAMS", *keys, *ids)
                woke, reply = await self.r.call(blocked + read, 2)
                if woke:
                    wake_id = woke[0][1][-1][0]
            else:  # one blocked read naming every followed stream, no wake stream
                (reply,) = await self.r.call(
                    resp(b"XREAD", b"COUNT", b"100", b"BLOCK", b"200", b"STREAMS", *keys, *ids), 1)
            self.reads += 1
            now = time.time_ns()
            for key, entries in reply or ():
                for _entry_id, flat in entries:
                    self.read += 1
                    if self.read % 8 == 0:
                        self.ages.append((now - int(flat[3])) / 1e6)
                ids[index[key]] = entries[-1][0]


async def run_side(args: argparse.Namespace) -> dict[str, Any]:
    side = Side(args.calls, args.mine.encode(), args.theirs.encode(), args.dry, not args.no_wake)
    await side.start(args.port)
    stop = asyncio.Event()
    reader = None if args.dry else asyncio.create_task(side.read_loop(stop))
    start = time.monotonic() + 0.05
    wall_offset_ns = time.time_ns() - time.monotonic_ns()
    end_warm = start + WARMUP_S
    end = end_warm + args.seconds
    cpu0, w0, r0, f0, n0 = 0.0, 0, 0, 0, 0
    warm = False
    while True:
        now = time.monotonic()
        if not warm and now >= end_warm:
            warm, cpu0 = True, time.process_time()
            w0, r0, f0, n0 = side.written, side.read, side.flushes, side.reads
            side.ages.clear()
        if now >= end:
            break
        side.tick(now, start, wall_offset_ns)
        await asyncio.sleep(args.tick_ms / 1000)
    cpu = time.process_time() - cpu0
    stop.set()
    if reader is not None:
        reader.cancel()
    ages = sorted(side.ages)
    return {"cpu_s": cpu, "written": side.written - w0, "read": side.read - r0,
            "flushes": side.flushes - f0, "reads": side.reads - n0,
            "hop_p50_ms": statistics.median(ages) if ages else None,
            "hop_p99_ms": ages[int(len(ages) * 0.99)] if ages else None}


def _proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(calls: int, seconds: float, *, tick_ms: float = 2.0, dry: bool = False,
            no_wake: bool = False) -> dict[str, Any]:
    """One run of the two sides (and, unless `dry`, a private redis-server): CPU in % of a core
    per call for each, and each direction's counts and hop latency."""
    from callbridge.redis_server import start_redis

    server = None if dry else start_redis()
    try:
        cmd = [sys.executable, "-m", "callbridge.bench_floor", "--port", str(server.port if server else 0),
               "--calls", str(calls), "--seconds", str(seconds), "--tick-ms", str(tick_ms)]
        cmd += (["--dry"] if dry else []) + (["--no-wake"] if no_wake else [])
        kids = [subprocess.Popen([*cmd, "--role", role], stdout=subprocess.PIPE) for role in ("in", "out")]
        time.sleep(0.05 + WARMUP_S)  # the children's warm-up: Redis is counted from here
        redis0 = _proc_cpu_s(server.proc.pid) if server else 0.0
        outs = [k.communicate(timeout=seconds + 60)[0] for k in kids]
        redis_s = _proc_cpu_s(server.proc.pid) - redis0 if server else 0.0
    finally:
        if server is not None:
            server.stop()
    if any(k.returncode for k in kids):
        raise RuntimeError(f"a floor side failed: exit codes {[k.returncode for k in kids]}")
    gw, wk = (json.loads(o) for o in outs)
    per_call = 100.0 / (seconds * calls)
    pct = {"gateway_side": gw["cpu_s"] * per_call, "worker_side": wk["cpu_s"] * per_call,
           "redis": redis_s * per_call}
    pct["total"] = sum(pct.values())
    return {"core_pct_per_call": {k: round(v, 3) for k, v in pct.items()},
            "inbound": _direction(gw, wk, seconds), "outbound": _direction(wk, gw, seconds)}


def _direction(writer: dict[str, Any], reader: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {"written": writer["written"], "read": reader["read"],
            "entries_per_flush": round(writer["written"] / max(writer["flushes"], 1), 1),
            "flushes_per_s": round(writer["flushes"] / seconds),
            "reads_per_s": round(reader["reads"] / seconds),
            "hop_p50_ms": reader["hop_p50_ms"], "hop_p99_ms": reader["hop_p99_ms"]}


def floor(calls: int, seconds: float, tick_ms: float = 2.0) -> dict[str, Any]:
    """The hop through Redis, then the same tickers without it: `hop` is the difference, the
    least the two tiers and Redis add for moving the frames (in % of a core per call)."""
    wet = measure(calls, seconds, tick_ms=tick_ms)
    dry = measure(calls, seconds, tick_ms=tick_ms, dry=True)
    hop = wet["core_pct_per_call"]["total"] - dry["core_pct_per_call"]["total"]
    return {"tick_ms": tick_ms, "with_redis": wet, "load_only": dry["core_pct_per_call"],
            "hop_core_pct_per_call": round(hop, 3)}


def render(f: dict[str, Any]) -> str:
    w = f["with_redis"]
    c = w["core_pct_per_call"]
    lines = [f"  the hop alone (bench_floor, {f['tick_ms']:g} ms flushes): "
             f"{f['hop_core_pct_per_call']:.3f} % of a core per call "
             f"(gateway side {c['gateway_side']:.3f}, worker side {c['worker_side']:.3f}, "
             f"Redis {c['redis']:.3f}, "
             f"less {f['load_only']['total']:.3f} for making the load)"]
    for name, d in (("inbound", w["inbound"]), ("outbound", w["outbound"])):
        lines.append(f"    {name}: {d['written']} written, {d['read']} read, "
                     f"{d['entries_per_flush']} per flush, "
                     f"{d['flushes_per_s']} flushes/s, {d['reads_per_s']} reads/s, "
                     f"hop p50 {d['hop_p50_ms'] or 0:.2f} ms p99 {d['hop_p99_ms'] or 0:.2f} ms")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--tick-ms", type=float, default=2.0,
                   help="how often each side turns the frames due into one flush (write coalescing)")
    p.add_argument("--dry", action="store_true", help="the tickers only, no Redis: the load's own cost")
    p.add_argument("--no-wake", action="store_true",
                   help="readers block on every followed stream instead of a wake stream the writers ring")
    p.add_argument("--json", action="store_true")
    p.add_argument("--role", choices=["in", "out"], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:  # a child: one side
        import uvloop

        args.mine, args.theirs = ("in", "out") if args.role == "in" else ("out", "in")
        print(json.dumps(uvloop.run(run_side(args))))
        return
    if args.dry or args.no_wake:
        fig = measure(args.calls, args.seconds, tick_ms=args.tick_ms, dry=args.dry, no_wake=args.no_wake)
        out: dict[str, Any] = {"tick_ms": args.tick_ms, "with_redis": fig, "load_only": {"total": 0.0},
                               "hop_core_pct_per_call": fig["core_pct_per_call"]["total"]}
    else:
        out = floor(args.calls, args.seconds, args.tick_ms)
    dry = " (dry: no Redis)" if args.dry else ""
    print(f"bench_floor: {args.calls} calls, {args.seconds:g} s window{dry}")
    print(render(out))
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
