"""`python -m callbridge.bench_redisio [--url URL] [--rounds N]`: the Redis client's own CPU for
the data path's two calls, packed here against redis-py, measured in one run.

- write: a flush of 20 audio XADDs (the shape `BatchWriter` sends: 160 B of μ-law, `t`, `q`,
  `MAXLEN ~ 3000`) through `shared.redisio._pipeline` (packed RESP on a pooled connection, replies
  read raw) and through redis-py's pipeline;
- read: one XREAD naming 100 followed streams, 10 of which have an entry, through
  `shared.redisio.xread` and through redis-py's `xread`.

CPU is this process's (`time.process_time`), so Redis's own work is not in it. Rounds alternate
the two ways so a busy machine slows both alike; the minimum and the median over rounds are
printed. Uses database 15 of the URL's server and empties it; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from shared.redisio import Batch, _pipeline, connect, xread
from shared.streams import entry

STREAMS = 100
WRITES_PER_FLUSH = 20
READY = 10


async def _redis_py_pipeline(r: Any, batch: Batch) -> list[Any]:
    pipe = r.pipeline(transaction=False)
    for name, args, kwargs in batch:
        getattr(pipe, name)(*args, **kwargs)
    return list(await pipe.execute(raise_on_error=False))


async def run(url: str, rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    r = connect(url)
    await r.flushdb()
    keys = [f"bench:call:{i}:in".encode() for i in range(STREAMS)]

    def batch() -> Batch:
        return [("xadd", (k.decode(), {**entry(b"m", b"\xff" * 160), b"q": b"0123456789ab:1"}),
                 {"maxlen": 3000, "approximate": True}) for k in keys[:WRITES_PER_FLUSH]]

    writes: dict[str, list[float]] = {"packed": [], "redis-py": []}
    reads: dict[str, list[float]] = {"packed": [], "redis-py": []}
    try:
        for _ in range(rounds):
            for way, write in (("packed", _pipeline), ("redis-py", _redis_py_pipeline)):
                t0 = time.process_time()
                for _ in range(per_round):
                    await write(r, batch())
                writes[way].append((time.process_time() - t0) / (per_round * WRITES_PER_FLUSH) * 1e6)
        for k in keys:
            await r.xadd(k, {b"k": b"m"})
        last: dict[bytes, bytes] = {}
        for k in keys:
            newest: Any = await r.xrevrange(k, count=1)
            last[k] = newest[0][0]
        await _pipeline(r, batch()[:READY])  # READY streams have an entry past `last`
        for _ in range(rounds):
            for way in ("packed", "redis-py"):
                cpu = 0.0
                for _ in range(per_round):
                    t0 = time.process_time()
                    got: Any = (await xread(r, last, 100, 1) if way == "packed"
                                else await r.xread(dict(last), count=100, block=1))  # type: ignore[arg-type]
                    cpu += time.process_time() - t0
                    assert len(got) == READY
                reads[way].append(cpu / per_round * 1e6)
    finally:
        await r.flushdb()
        await r.aclose()
    return {f"{what} {way}": {"min_us": min(v), "median_us": statistics.median(v)}
            for what, table in (("write", writes), ("read", reads)) for way, v in table.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="redis://127.0.0.1:6379/15")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per-round", type=int, default=300)
    args = p.parse_args()
    figures = asyncio.run(run(args.url, args.rounds, args.per_round))
    print(f"client CPU, {args.rounds} alternating rounds of {args.per_round}: min / median µs")
    for name, f in figures.items():
        unit = "per XADD (flushes of 20)" if name.startswith("write") else "per XREAD (100 streams, 10 ready)"
        print(f"  {name:<16} {f['min_us']:8.1f} / {f['median_us']:8.1f}  {unit}")
    for what in ("write", "read"):
        ratio = figures[f"{what} redis-py"]["median_us"] / figures[f"{what} packed"]["median_us"]
        print(f"  {what}: redis-py / packed = {ratio:.2f}x (medians)")


if __name__ == "__main__":
    main()
