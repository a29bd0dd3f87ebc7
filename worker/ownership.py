"""Who owns which call, and how a dead or stalled worker's calls move in about a second.

Liveness is per worker, not per call: each worker renews one lease (a key with a TTL and its
deadline in the `workers` sorted set) every `lease/3`, from a thread of its own so a busy event
loop does not look like a dead process. Survivors find lapsed leases with one ZRANGEBYSCORE on
Redis's clock every `lease/5`, and take the dead worker's calls over one call at a time with a
script that checks the owner and bumps the call's `epoch`. So failure detection costs Redis a
few commands per second per worker, whatever the number of calls.

Every write a worker makes for a call is fenced by that epoch: hash writes go through a script
that refuses a stale epoch, and `out` entries carry it (`e`), so the gateway drops audio from an
owner that was replaced (the new owner's first entry, `own`, raises the gateway's bar). A worker
that stalled past its lease notices on waking (its lease key is gone), checks each call's epoch,
and lets go of the ones taken over without writing to them.

The scripts touch one call's keys (or one worker's) each, never several calls at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisError
from redis.retry import Retry

from shared.redisio import TRANSIENT
from shared.streams import Keys

log = logging.getLogger("callbridge.worker.ownership")

# Redis 6.x refuses writes after a non-deterministic command (TIME) unless the script asks for
# effects replication; 7.x always does that and keeps the call as a no-op.
_EFFECTS = "if redis.replicate_commands then redis.replicate_commands() end\n"
_NOW_MS = """local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: lease key, workers zset. ARGV: worker id, lease ms.
# Returns 1 when the lease was still held (renewed), 0 when it had lapsed or never existed.
BEAT = _EFFECTS + _NOW_MS + """
local had = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
return had
"""

# KEYS: workers zset. ARGV: max. Workers whose lease deadline has passed, on Redis's clock.
LAPSED = _NOW_MS + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
"""

# KEYS: call hash, out stream. ARGV: new owner, expected previous owner ('' = none), maxlen,
# timestamp ns, ttl s. Returns the new epoch, 0 when the call is not (any more) the expected
# owner's, -1 when the call is over or unknown.
CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'ended' then return -1 end
local owner = redis.call('HGET', KEYS[1], 'owner')
if (owner or '') ~= ARGV[2] then return 0 end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'owner_rings', ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'k', 'own', 'e', epoch, 't', ARGV[4],
           'w', ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return epoch
"""

# KEYS: call hash. ARGV: epoch, then field/value pairs. Writes only while `epoch` is the call's.
FENCED_HSET = """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

# KEYS: call hash. ARGV: owner, epoch, ttl s, then field/value pairs to restore.
# After Redis lost its data: put back what this owner knows, unless the call moved on meanwhile.
# Returns 1 restored, 2 still ours (nothing lost), 0 someone else owns it now or it has ended.
REASSERT = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch then
  if epoch == ARGV[2] and redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then return 2 end
  return 0
end
if redis.call('HGET', KEYS[1], 'status') == 'ended' then return 0 end  -- hung up meanwhile
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'owner_rings', ARGV[1], 'epoch', ARGV[2], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: workers zset, lease key, calls set. ARGV: worker id.
# Forget a dead worker once its calls are handed out, unless it came back meanwhile.
FORGET = _NOW_MS + """
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if deadline and tonumber(deadline) > now then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"""


class Lease:
    """This worker's lease, renewed from a thread with a blocking client of its own.

    The thread also probes the event loop: if the loop has not run a callback for
    `loop_stall_s`, the process is wedged, and the thread stops renewing so that the calls move
    to a worker that works. `on_lapsed` runs on the loop when a renewal finds the lease gone (a
    stall past the lease, or Redis restarted without its data)."""

    def __init__(self, url: str, keys: Keys, worker_id: str, *, lease_s: float,
                 on_lapsed: Callable[[], None], loop: asyncio.AbstractEventLoop,
                 loop_stall_s: float = 5.0, cluster: bool = False) -> None:
        timeouts = {"socket_timeout": max(0.5, lease_s / 3),
                    "socket_connect_timeout": max(0.5, lease_s / 3)}
        self._client: Any = (RedisCluster.from_url(url, retry=Retry(NoBackoff(), 1), **timeouts)
                             if cluster else redis.Redis.from_url(url, **timeouts))
        self._beat = self._client.register_script(BEAT)
        self._keys = keys
        self._worker_id = worker_id
        self._lease_ms = max(100, int(lease_s * 1000))
        self._interval = lease_s / 3
        self._on_lapsed = on_lapsed
        self._loop = loop
        self._loop_stall_s = loop_stall_s
        self._loop_seen = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self.held = False  # renewed within the lease
        self.renewed_at = 0.0
        self.held_since = 0.0  # when the current run of successful renewals began
        self.lapses = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        """Stop renewing; `release` drops the lease at once so survivors act without waiting."""
        self._stop.set()
        self._thread.join(timeout=2 * self._interval + 1)
        if release:
            with contextlib.suppress(RedisError, OSError):
                pipe = self._client.pipeline(transaction=False)
                pipe.delete(self._keys.worker(self._worker_id))
                pipe.zadd(self._keys.workers, {self._worker_id: 0})
                pipe.execute()
        with contextlib.suppress(Exception):
            self._client.close()

    def steady(self) -> bool:
        """Held for a whole lease without a gap. Until then our own view of the leases may be
        stale: when Redis (or, on a cluster, the node with the leases) was away for longer than a
        lease, every worker's deadline passed, and a survivor judging others before they could
        renew would take every call from live workers."""
        return self.held and time.monotonic() - self.held_since >= self._lease_ms / 1000

    def _mark_loop_alive(self) -> None:
        self._loop_seen = time.monotonic()

    def _run(self) -> None:
        try:
            self._loop_forever()
        except Exception:  # never silently: a worker without a lease must not look healthy
            self.held = False
            log.critical("lease thread died; calls will move to other workers", exc_info=True)

    def _loop_forever(self) -> None:
        first = True
        while not self._stop.is_set():
            with contextlib.suppress(RuntimeError):  # the loop closed: we are shutting down
                self._loop.call_soon_threadsafe(self._mark_loop_alive)
            now = time.monotonic()
            if now - self._loop_seen > self._loop_stall_s:
                if self.held:
                    log.critical("event loop stalled; not renewing the lease so calls move on",
                                 extra={"stalled_s": round(now - self._loop_seen, 1)})
                self.held = False
            else:
                self._renew(first, now)
                first = False
            self._stop.wait(self._interval)

    def _renew(self, first: bool, now: float) -> None:
        lapsed_locally = self.held and now - self.renewed_at > self._lease_ms / 1000
        try:
            had = self._beat(keys=[self._keys.worker(self._worker_id), self._keys.workers],
                             args=[self._worker_id, self._lease_ms])
        except TRANSIENT:
            self.held = False
            return
        was_held = self.held
        if not was_held:
            self.held_since = now
        self.held = True
        self.renewed_at = now
        if not first and (not had or lapsed_locally or not was_held):
            self.lapses += 1
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._on_lapsed)


async def lapsed_workers(r: Any, keys: Keys, limit: int = 10) -> list[str]:
    """Workers whose lease deadline passed (Redis's clock)."""
    ids = await r.eval(LAPSED, 1, keys.workers, limit)
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids or []]


async def claim(r: Any, keys: Keys, sid: str, me: str, previous: str, *, maxlen: int,
                ttl_s: int) -> int:
    """Take a call from `previous` ('' for a new call): the new epoch, 0 if the call is not
    `previous`'s any more, -1 if it is over."""
    return int(await r.eval(CLAIM, 2, keys.call(sid), keys.outbound(sid), me, previous, maxlen,
                            time.time_ns(), ttl_s))


async def forget(r: Any, keys: Keys, worker_id: str) -> bool:
    return bool(await r.eval(FORGET, 3, keys.workers, keys.worker(worker_id),
                             keys.worker_calls(worker_id), worker_id))


def fenced_hset_args(keys: Keys, sid: str, epoch: int, mapping: dict[str, Any]) -> tuple[Any, ...]:
    """Arguments for EVAL FENCED_HSET (queued on the batch writer: `command("eval", *args)`)."""
    flat: list[Any] = []
    for k, v in mapping.items():
        flat += [k, v]
    return (FENCED_HSET, 1, keys.call(sid), epoch, *flat)


async def reassert(r: Any, keys: Keys, sid: str, me: str, epoch: int, ttl_s: int,
                   mapping: dict[str, Any]) -> int:
    flat: list[Any] = []
    for k, v in mapping.items():
        flat += [k, v]
    return int(await r.eval(REASSERT, 1, keys.call(sid), me, epoch, ttl_s, *flat))
