"""Which worker serves which call: new jobs from a consumer group, orphans from dead workers.

New calls arrive as jobs on the `calls` stream, read through the consumer group `workers`
(XREADGROUP: each job to one worker). The job only carries the call to a worker: ownership lives
in the call hash (`owner`, `epoch`, see worker/ownership.py), so the job is acknowledged and
deleted as soon as the call is claimed.

A worker whose lease lapsed is dead (or stalled: same thing for its calls). Every survivor
looks for lapsed leases every `lease/5` and takes over, up to its free slots, the dead worker's
calls (its `worker:{id}:calls` set) and any job it had read but not yet claimed (its pending
entries in the group). Each call moves by a script that checks the owner, so two survivors never
both take one. When nothing of the dead worker is left, its lease entry and its consumer name
are removed. A survivor judges others only once its own lease has been held for a whole lease:
after Redis (or the cluster node with the leases) was away that long, every deadline has passed,
and judging before the living could renew would move every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from shared import metrics
from shared.redisio import TRANSIENT
from shared.streams import WORKER_GROUP, Keys
from shared.tasks import stop_tasks
from worker import ownership

log = logging.getLogger("callbridge.worker.claims")

# (job id or None, fields: sid/from/to, previous owner: '' for a new call)
OnJob = Callable[[bytes | None, dict[bytes, bytes], str], None]

WATCH_STOP_S = 2.0  # the orphan watch, once cancelled, must end within this (shared/tasks.py)


async def ensure_group(redis: aioredis.Redis, stream: str) -> None:
    """Create the group at the stream's start, so calls queued before any worker ran are served."""
    try:
        await redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class Claimer:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        consumer: str,
        *,
        lease_s: float,
        free_slots: Callable[[], int],
        serving: Callable[[str], bool],
        on_job: OnJob,
        steady: Callable[[], bool] = lambda: True,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._stream = keys.calls
        self._consumer = consumer
        self._scan_s = max(0.05, lease_s / 5)
        self._free_slots = free_slots
        self._serving = serving
        self._on_job = on_job
        self._steady = steady  # our lease held for a whole lease: our view of others' is current
        self.paused = False
        # redis-py can swallow a cancellation that lands as a command is sent (asyncio.wait_for on
        # Python 3.11): the loops also stop on this flag, so a shutdown cannot hang on them.
        self._closing = False
        self._lapsed: list[str] = []

    def close(self) -> None:
        self._closing = True

    async def run(self) -> None:
        backoff = 0.2
        while not self._closing:  # Redis may not be up yet (orchestrators start everything at once)
            try:
                await ensure_group(self._redis, self._stream)
                break
            except TRANSIENT as exc:
                metrics.REDIS_ERRORS.labels("claim").inc()
                log.warning("cannot create the consumer group yet", extra={"error": type(exc).__name__})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        if self._closing:
            return
        watch = asyncio.create_task(self._watch(), name="orphan-watch")
        try:
            await self._claim_new()
        finally:
            await stop_tasks([watch], WATCH_STOP_S, what="orphan watch")

    async def _claim_new(self) -> None:
        backoff = 0.1
        while not self._closing:
            free = 0 if self.paused else self._free_slots()
            if free <= 0:
                await asyncio.sleep(0.2)
                continue
            try:
                resp: Any = await self._redis.xreadgroup(
                    WORKER_GROUP, self._consumer, {self._stream: ">"}, count=min(free, 10), block=1000
                )
                backoff = 0.1
            except TRANSIENT as exc:
                metrics.REDIS_ERRORS.labels("claim").inc()
                log.warning("claim read failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    with contextlib.suppress(RedisError, OSError):
                        await ensure_group(self._redis, self._stream)
                continue
            items = resp.items() if isinstance(resp, dict) else (resp or [])
            if self._closing:
                return  # a job read while closing stays pending: a live worker takes it
            for _key, entries in items:
                for job_id, fields in entries or []:
                    if fields:  # a job deleted after delivery comes back empty
                        metrics.CLAIMS.labels("new").inc()
                        self._on_job(job_id, fields, "")

    async def _watch(self) -> None:
        """Find workers whose lease lapsed and take over what they held."""
        earlier_self = True  # a restart with the same WORKER_ID: pick up what we left behind
        while not self._closing:
            await asyncio.sleep(self._scan_s)
            if self.paused:
                continue
            try:
                if earlier_self and self._free_slots() > 0:
                    await self._take_over(self._consumer, fair=False)
                    earlier_self = False
                if not self._steady():
                    continue  # the leases were unreachable: give everyone a lease to renew first
                self._lapsed = await ownership.lapsed_workers(self._redis, self._keys)
                for dead in self._lapsed:
                    if dead != self._consumer:
                        await self._take_over(dead)
            except TRANSIENT as exc:
                metrics.REDIS_ERRORS.labels("claim").inc()
                log.warning("orphan scan failed", extra={"error": type(exc).__name__})

    async def _take_over(self, dead: str, fair: bool = True) -> None:
        r = self._redis
        members: Any = await r.smembers(self._keys.worker_calls(dead))
        sids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
        pending: Any = await r.xpending_range(self._stream, WORKER_GROUP, min="-", max="+", count=100,
                                              consumername=dead)
        if not sids and not pending:
            # Everything it held has moved (each claim removes its call from the set).
            if await ownership.forget(r, self._keys, dead):
                with contextlib.suppress(ResponseError):
                    await r.xgroup_delconsumer(self._stream, WORKER_GROUP, dead)
                log.info("forgot a dead worker", extra={"dead": dead})
            return
        random.shuffle(sids)  # several survivors: spread the dead worker's calls between them
        # Take a fair share per scan, so the survivors split a dead worker's calls instead of the
        # first to notice taking them all (each takeover costs its new owner a Vapi setup).
        live = max(1, int(await r.zcard(self._keys.workers)) - len(self._lapsed))
        share = -(-len(sids) // live) if fair else len(sids)
        for sid in sids:
            if share <= 0:
                break  # the rest at the next scan, by whoever has room
            if self._serving(sid) or self._free_slots() <= 0:
                continue  # ours already (its claim is under way), or no room: next scan
            share -= 1
            log.warning("taking over a call from a dead worker", extra={"call_sid": sid, "dead": dead})
            metrics.CLAIMS.labels("takeover").inc()
            self._on_job(None, {b"sid": sid.encode()}, dead)
        ids = [p["message_id"] for p in pending]
        if ids and self._free_slots() > 0:
            claimed: Any = await r.xclaim(self._stream, WORKER_GROUP, self._consumer, 0, ids)
            for job_id, fields in claimed:
                if fields:
                    metrics.CLAIMS.labels("takeover").inc()
                    self._on_job(job_id, fields, dead)
                else:  # deleted after delivery: nothing to serve
                    await r.xack(self._stream, WORKER_GROUP, job_id)
