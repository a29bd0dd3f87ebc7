"""`python -m callbridge.bench_floor [--calls N] [--seconds S]`: a lean reference for the hop the
two-tier shape adds, measured, to set beside the direct bridge (`callbridge bench --baseline
direct` runs it between its two runs).

Two processes stand in for the gateway and the worker with nothing but the hop: each writes one
direction's 20 ms frames for every call onto per-call streams (`fl:in:N`, `fl:out:N`) and reads
the other direction's, as the tiers do. They have no sockets to Twilio or Vapi, no audio
conversion, no call core, no fencing, no duplicate check and no retries. Each is as lean as Python
gets here:
- uvloop, and RESP packed from one template per stream;
- replies parsed by hiredis on an `asyncio.Protocol` and handed to callbacks (no task per round
  trip, no redis-py);
- a flush of whatever queued while the previous one was out, then one ring (`r 1`) on the
  reader's wake stream;
- a reader that blocks on its wake stream, with a read of every followed stream behind it in the
  same write. That is one round trip per wake, as `shared.redisio.MultiReader` makes.
The entries are the data path's: `k`, `t` (the stamp), `q` (writer and sequence), `a` (160
bytes), `MAXLEN ~ 3000`.

Frames are made by one ticker per side (`--tick-ms`, nominally 2 ms; the loop's own delay makes
it about 2.3). Each call has its own phase, so a flush carries what a gateway's carries at that
load. A frame is stamped with the time it was due, so the wait for the next tick counts in the
hop. The ticker's cost
(the wake-ups, the stamps) is measured again without Redis (`--dry`) and subtracted: the hop is
what Redis adds to the two processes, plus Redis itself. It is a reference at one point of the
latency-for-CPU trade (a hop of about 2 ms p50), not a proof of what any bridge of the shape
must cost: fewer, larger reads cost less CPU and more latency.

Prints each process's CPU and Redis's (a private `redis-server`, over TCP, or over a Unix socket
with `--unix`), in % of a core per call over the same window, each direction's counts and the
hop's latency (write stamp to read), and whether the tickers kept up. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from typing import Any

import hiredis

from callbridge.procs import SCHED_RUN, schedstat_seconds
from shared.redisio import _resp

FRAME_S = 0.020
PAYLOAD = bytes(range(160))
MAXLEN = 3000
WARMUP_S = 2.0
KEPT_UP = 0.97  # a direction that wrote or read less than this share of its frames fell behind


def resp(*parts: bytes) -> bytes:
    return _resp(list(parts))


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
        waiting = self.waiting
        while waiting:
            n, out, fut = waiting[0]
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:  # the waiters learn it from connection_lost
                assert self.transport is not None
                self.transport.abort()
                self._fail(exc)
                return
            if reply is False:
                return
            out.append(reply)
            if len(out) == n:
                waiting.popleft()
                if not fut.done():  # a reader cancelled at the end
                    fut.set_result(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("redis closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        while self.waiting:
            _n, _out, fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def call(self, packed: bytes, n: int) -> asyncio.Future[list[Any]]:
        assert self.transport is not None
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append((n, [], fut))
        self.transport.write(packed)
        return fut


async def connect(where: str) -> Conn:
    """`where`: a TCP port on loopback, or the path of a Unix socket."""
    loop = asyncio.get_running_loop()
    if where.isdigit():
        _t, conn = await loop.create_connection(Conn, "127.0.0.1", int(where))
    else:
        _t, conn = await loop.create_unix_connection(Conn, where)
    return conn


class Side:
    """One tier's half of the hop: writes `mine`'s frames, reads `theirs`'."""

    def __init__(self, calls: int, mine: bytes, theirs: bytes, dry: bool, ring: bool = True) -> None:
        self.calls, self.dry, self.ring = calls, dry, ring
        self.keys = [b"fl:%s:%d" % (mine, i) for i in range(calls)]
        self.read_keys = [b"fl:%s:%d" % (theirs, i) for i in range(calls)]
        self.wake, self.peer_wake = b"fl:wake:" + theirs, b"fl:wake:" + mine
        self.writer_id = b"floor-" + mine
        hole = b"$%d\r\n%s\r\n"
        # One template per stream: the stamp, the sequence and the audio are its holes.
        self.templates = [
            resp(b"XADD", k, b"MAXLEN", b"~", b"%d" % MAXLEN, b"*", b"k", b"m", b"t", b"@T", b"q", b"@Q",
                 b"a", b"@A").replace(b"%", b"%%")
            .replace(b"$2\r\n@T\r\n", hole).replace(b"$2\r\n@Q\r\n", hole).replace(b"$2\r\n@A\r\n", hole)
            for k in self.keys]
        self.ring_cmd = resp(b"XADD", self.peer_wake, b"MAXLEN", b"1", b"*", b"r", b"1")
        self.seq = 0
        self.pending: list[bytes] = []
        self.in_flight = False
        self.written = self.read = self.flushes = self.reads = 0
        self.ages: list[float] = []
        self.error: BaseException | None = None  # the first failure: the run is void
        self.w: Conn | None = None
        self.r: Conn | None = None

    async def start(self, where: str) -> None:
        if not self.dry:
            self.w, self.r = await connect(where), await connect(where)

    def tick(self, now: float, start: float) -> None:
        """Every call whose next frame is due by `now` gets one (phases spread over 20 ms),
        stamped with the time it was due (monotonic ns, which both processes share on Linux):
        a gateway gets frames as they come, so the wait for the next tick is part of the hop."""
        calls = self.calls
        step = FRAME_S / calls
        n_due = int((now - start) / step) + 1  # frames due in all, across calls, since start
        while self.seq < n_due:
            i = self.seq % calls
            stamp = b"%d" % int((start + self.seq * step) * 1e9)
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
        self.written += len(batch)
        if self.ring:
            batch.append(self.ring_cmd)
        self.in_flight = True
        self.flushes += 1
        self.w.call(b"".join(batch), len(batch)).add_done_callback(self.flushed)

    def flushed(self, fut: asyncio.Future[list[Any]]) -> None:
        self.in_flight = False
        try:
            replies = fut.result()
        except Exception as exc:
            self.error = self.error or exc
            return
        refused = [r for r in replies if isinstance(r, hiredis.ReplyError)]
        if refused:
            self.error = self.error or RuntimeError(f"redis refused a write: {refused[0]}")
        elif self.pending:
            self.flush()

    async def read_loop(self) -> None:
        try:
            await self._read_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = self.error or exc

    async def _read_loop(self) -> None:
        assert self.r is not None
        wake_id = b"0-0"
        keys = self.read_keys
        ids = [b"0-0"] * len(keys)
        index = {k: i for i, k in enumerate(keys)}
        while True:
            if self.ring:
                blocked = resp(b"XREAD", b"COUNT", b"1", b"BLOCK", b"200", b"STREAMS", self.wake, wake_id)
                read = resp(b"XREAD", b"COUNT", b"100", b"STREAMS", *keys, *ids)
                woke, reply = await self.r.call(blocked + read, 2)
                if isinstance(woke, hiredis.ReplyError):
                    raise RuntimeError(f"redis refused the read: {woke}")
                if woke:
                    wake_id = woke[0][1][-1][0]
            else:  # one blocked read naming every followed stream, no wake stream
                (reply,) = await self.r.call(
                    resp(b"XREAD", b"COUNT", b"100", b"BLOCK", b"200", b"STREAMS", *keys, *ids), 1)
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"redis refused the read: {reply}")
            self.reads += 1
            now = time.monotonic_ns()
            for key, entries in reply or ():
                for _entry_id, flat in entries:
                    self.read += 1
                    if self.read % 8 == 0:
                        self.ages.append((now - int(flat[3])) / 1e6)
                ids[index[key]] = entries[-1][0]


async def run_side(args: argparse.Namespace) -> dict[str, Any]:
    """One side's run. The `in` side also samples Redis's CPU (`--redis-pid`) at its own window's
    edges, so Redis is counted over the window the sides are."""
    side = Side(args.calls, args.mine.encode(), args.theirs.encode(), args.dry, not args.no_wake)
    await side.start(args.redis)
    reader = None if args.dry else asyncio.create_task(side.read_loop())
    redis_pid = args.redis_pid if args.role == "in" else 0
    start = time.monotonic() + 0.05
    end_warm = start + WARMUP_S
    end = end_warm + args.seconds
    cpu0, w0, r0, f0, n0, redis0 = 0.0, 0, 0, 0, 0, 0.0
    warm = False
    while side.error is None:
        now = time.monotonic()
        if not warm and now >= end_warm:
            warm, cpu0 = True, time.process_time()
            w0, r0, f0, n0 = side.written, side.read, side.flushes, side.reads
            redis0 = (schedstat_seconds(redis_pid, SCHED_RUN) or 0.0) if redis_pid else 0.0
            side.ages.clear()
        if now >= end:
            break
        side.tick(now, start)
        await asyncio.sleep(args.tick_ms / 1000)
    cpu = time.process_time() - cpu0
    redis_s = (schedstat_seconds(redis_pid, SCHED_RUN) or 0.0) - redis0 if redis_pid else 0.0
    if reader is not None:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    if side.error is not None:
        raise RuntimeError(f"the {args.role} side failed: {side.error!r}")
    ages = sorted(side.ages)
    return {"cpu_s": cpu, "redis_cpu_s": redis_s, "written": side.written - w0, "read": side.read - r0,
            "flushes": side.flushes - f0, "reads": side.reads - n0,
            "hop_p50_ms": statistics.median(ages) if ages else None,
            "hop_p99_ms": ages[int(len(ages) * 0.99)] if ages else None}


def measure(calls: int, seconds: float, *, tick_ms: float = 2.0, dry: bool = False,
            no_wake: bool = False, unix: bool = False, redis_where: str | None = None) -> dict[str, Any]:
    """One run of the two sides (and, unless `dry` or given `redis_where`, a port or a socket
    path, a private redis-server whose CPU is counted): CPU in % of a core per call for each over
    the same window, each direction's counts and hop latency, and whether every direction wrote
    and read its frames. Raises when a side failed."""
    from callbridge.redis_server import start_redis

    own = not dry and redis_where is None
    sockdir = tempfile.TemporaryDirectory(prefix="callbridge-floor-") if unix and own else None
    sock = os.path.join(sockdir.name, "redis.sock") if sockdir else None
    server = start_redis(unix_socket=sock) if own else None
    where = redis_where or sock or str(server.port if server else 0)
    kids: list[subprocess.Popen[bytes]] = []
    try:
        cmd = [sys.executable, "-m", "callbridge.bench_floor", "--redis", where,
               "--redis-pid", str(server.proc.pid if server else 0),
               "--calls", str(calls), "--seconds", str(seconds), "--tick-ms", str(tick_ms)]
        cmd += (["--dry"] if dry else []) + (["--no-wake"] if no_wake else [])
        for role in ("in", "out"):
            kids.append(subprocess.Popen([*cmd, "--role", role], stdout=subprocess.PIPE))
        outs = [k.communicate(timeout=seconds + WARMUP_S + 60)[0] for k in kids]
    finally:
        for k in kids:
            if k.poll() is None:
                k.kill()
                k.wait()
        if server is not None:
            server.stop()
        if sockdir is not None:
            sockdir.cleanup()
    if any(k.returncode for k in kids):
        raise RuntimeError(f"a side of the hop failed: exit codes {[k.returncode for k in kids]}")
    gw, wk = (json.loads(o) for o in outs)
    per_call = 100.0 / (seconds * calls)
    pct = {"gateway_side": gw["cpu_s"] * per_call, "worker_side": wk["cpu_s"] * per_call,
           "redis": gw["redis_cpu_s"] * per_call}
    pct["total"] = sum(pct.values())
    due = calls * seconds / FRAME_S
    ways = {"inbound": _direction(gw, wk, seconds), "outbound": _direction(wk, gw, seconds)}
    # The two sides' windows start within a few hundred ms of each other: allow half a second.
    kept_up = dry or all(w["written"] >= KEPT_UP * due and w["read"] >= w["written"] - max(
        (1 - KEPT_UP) * w["written"], calls * 25) for w in ways.values())
    return {"core_pct_per_call": {k: round(v, 3) for k, v in pct.items()}, **ways, "kept_up": kept_up}


def _direction(writer: dict[str, Any], reader: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {"written": writer["written"], "read": reader["read"],
            "entries_per_flush": round(writer["written"] / max(writer["flushes"], 1), 1),
            "flushes_per_s": round(writer["flushes"] / seconds),
            "reads_per_s": round(reader["reads"] / seconds),
            "hop_p50_ms": reader["hop_p50_ms"], "hop_p99_ms": reader["hop_p99_ms"]}


def floor(calls: int, seconds: float, tick_ms: float = 2.0, unix: bool = False) -> dict[str, Any]:
    """The hop through Redis, then the same tickers without it: `hop` is the difference (in %
    of a core per call), what Redis adds to the two processes plus Redis itself."""
    wet = measure(calls, seconds, tick_ms=tick_ms, unix=unix)
    dry = measure(calls, seconds, tick_ms=tick_ms, dry=True)
    hop = wet["core_pct_per_call"]["total"] - dry["core_pct_per_call"]["total"]
    return {"tick_ms": tick_ms, "over": "unix" if unix else "tcp", "with_redis": wet,
            "load_only": dry["core_pct_per_call"], "hop_core_pct_per_call": round(hop, 3),
            "kept_up": wet["kept_up"]}


def render(f: dict[str, Any] | None) -> str:
    if f is None:
        return "  the hop alone: n/a (its run failed; see above)"
    w = f["with_redis"]
    c = w["core_pct_per_call"]
    load = f["load_only"]
    lines = [f"  the hop alone (bench_floor, {f['tick_ms']:g} ms ticks, over {f.get('over', 'tcp')}): "
             f"{f['hop_core_pct_per_call']:.3f} % of a core per call "
             f"= gateway side {c['gateway_side']:.3f} + worker side {c['worker_side']:.3f} "
             f"+ Redis {c['redis']:.3f} - {load['total']:.3f} for making the load"
             + ("" if f["kept_up"] else "; FELL BEHIND (frames not all written or read): not comparable")]
    for name in ("inbound", "outbound"):
        d = w[name]
        lines.append(f"    {name}: {d['written']} written, {d['read']} read, "
                     f"{d['entries_per_flush']} per flush, "
                     f"{d['flushes_per_s']} flushes/s, {d['reads_per_s']} reads/s, "
                     f"hop p50 {d['hop_p50_ms'] or 0:.2f} ms p99 {d['hop_p99_ms'] or 0:.2f} ms")
    return "\n".join(lines)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be above 0")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--calls", type=lambda v: int(_positive(v)), default=50)
    p.add_argument("--seconds", type=_positive, default=10.0)
    p.add_argument("--tick-ms", type=_positive, default=2.0,
                   help="how often each side turns the frames due into one flush (write coalescing)")
    p.add_argument("--unix", action="store_true", help="to Redis over a Unix socket instead of TCP")
    p.add_argument("--dry", action="store_true",
                   help="one run of the tickers alone, no Redis: what making the load costs (gross figures)")
    p.add_argument("--no-wake", action="store_true",
                   help="one run with readers blocked on every followed stream, no wake stream "
                        "(gross figures)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--role", choices=["in", "out"], help=argparse.SUPPRESS)
    p.add_argument("--redis", default="0", help=argparse.SUPPRESS)
    p.add_argument("--redis-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:  # a child: one side, on uvloop as the tiers run (asyncio's loop without it)
        args.mine, args.theirs = ("in", "out") if args.role == "in" else ("out", "in")
        try:
            import uvloop

            result = uvloop.run(run_side(args))
        except (ImportError, AttributeError):
            result = asyncio.run(run_side(args))
        print(json.dumps(result))
        return
    print(f"bench_floor: {args.calls} calls, {args.seconds:g} s window")
    if args.dry or args.no_wake:  # one gross run: nothing subtracted
        fig = measure(args.calls, args.seconds, tick_ms=args.tick_ms, dry=args.dry, no_wake=args.no_wake,
                      unix=args.unix)
        c = fig["core_pct_per_call"]
        print(f"  one run, {'the tickers alone' if args.dry else 'readers blocked on every stream'} "
              f"(gross): {c['total']:.3f} % of a core per call = gateway side {c['gateway_side']:.3f} "
              f"+ worker side {c['worker_side']:.3f} + Redis {c['redis']:.3f}")
        out: dict[str, Any] = fig
    else:
        out = floor(args.calls, args.seconds, args.tick_ms, args.unix)
        print(render(out))
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
