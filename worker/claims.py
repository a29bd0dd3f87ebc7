"""Which worker serves which call: a consumer group on the `calls` stream with leases.

A claimed job stays pending in the group for as long as the call lasts. Its owner refreshes the
claim (XCLAIM to itself, which resets the idle time) every lease/3; a job idle longer than the
lease belongs to a dead worker, and XAUTOCLAIM hands it to a live one. XACK + XDEL end the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from shared import metrics
from shared.streams import WORKER_GROUP

log = logging.getLogger("callbridge.worker.claims")

Job = tuple[bytes, dict[bytes, bytes]]
OnJob = Callable[[bytes, dict[bytes, bytes], bool], None]


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
        stream: str,
        consumer: str,
        *,
        lease_s: float,
        free_slots: Callable[[], int],
        owned: Callable[[], Iterable[bytes]],
        on_job: OnJob,
        on_lost: Callable[[bytes], None] | None = None,
    ) -> None:
        self._redis = redis
        self._stream = stream
        self._consumer = consumer
        self._lease_ms = int(lease_s * 1000)
        self._free_slots = free_slots
        self._owned = owned
        self._on_job = on_job
        self._on_lost = on_lost
        self.paused = False
        self._cursor = "0-0"  # XAUTOCLAIM scans count*10 entries per call: keep our place

    async def run(self) -> None:
        backoff = 0.2
        while True:  # Redis may not be up yet (orchestrators start everything at once)
            try:
                await ensure_group(self._redis, self._stream)
                break
            except (RedisError, OSError) as exc:
                metrics.REDIS_ERRORS.labels("claim").inc()
                log.warning("cannot create the consumer group yet", extra={"error": type(exc).__name__})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        maintain = asyncio.create_task(self._maintain())
        try:
            await self._claim_new()
        finally:
            maintain.cancel()
            await asyncio.gather(maintain, return_exceptions=True)

    async def _claim_new(self) -> None:
        backoff = 0.1
        while True:
            free = 0 if self.paused else self._free_slots()
            if free <= 0:
                await asyncio.sleep(0.2)
                continue
            try:
                resp: Any = await self._redis.xreadgroup(
                    WORKER_GROUP, self._consumer, {self._stream: ">"}, count=min(free, 10), block=1000
                )
                backoff = 0.1
            except (RedisError, OSError) as exc:
                metrics.REDIS_ERRORS.labels("claim").inc()
                log.warning("claim read failed", extra={"error": type(exc).__name__})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    with contextlib.suppress(RedisError, OSError):
                        await ensure_group(self._redis, self._stream)
                continue
            items = resp.items() if isinstance(resp, dict) else (resp or [])
            for _key, entries in items:
                for job_id, fields in entries or []:
                    if fields:  # a job deleted after delivery comes back empty
                        metrics.CLAIMS.labels("new").inc()
                        self._on_job(job_id, fields, False)

    async def _maintain(self) -> None:
        """Refresh our leases and take over jobs whose owner stopped refreshing."""
        interval = self._lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
                if not self.paused:
                    await self.take_over()
            except (RedisError, OSError) as exc:
                metrics.REDIS_ERRORS.labels("claim").inc()
                log.warning("lease maintenance failed", extra={"error": type(exc).__name__})

    async def refresh(self) -> None:
        """Renew the leases we still hold. A job another worker took over while we were stalled
        (GC pause, partition) is not ours any more: we let it go instead of taking it back, so a
        call never has two live assistants."""
        owned = set(self._owned())
        if not owned:
            return
        pending: Any = await self._redis.xpending_range(
            self._stream, WORKER_GROUP, min="-", max="+", count=len(owned) + 1000,
            consumername=self._consumer)
        mine = {p["message_id"] for p in pending} & owned
        for job_id in owned - mine:
            log.warning("lost the lease on a call to another worker; releasing it",
                        extra={"job": job_id.decode()})
            metrics.CLAIMS.labels("lost").inc()
            if self._on_lost:
                self._on_lost(job_id)
        if mine:
            ids: list[Any] = list(mine)
            await self._redis.xclaim(self._stream, WORKER_GROUP, self._consumer, 0, ids, justid=True)

    async def take_over(self) -> None:
        free = self._free_slots()
        if free <= 0:
            return
        resp: Any = await self._redis.xautoclaim(
            self._stream, WORKER_GROUP, self._consumer, self._lease_ms, self._cursor,
            count=min(free, 10),
        )
        cursor = resp[0]
        self._cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        entries = resp[1] if len(resp) > 1 else []
        for job_id, fields in entries:
            if fields:
                metrics.CLAIMS.labels("takeover").inc()
                log.info("took over a call from an idle worker", extra={"job": job_id.decode()})
                self._on_job(job_id, fields, True)
        deleted = resp[2] if len(resp) > 2 else []
        if deleted:  # jobs trimmed away: nothing to serve, just forget them
            await self._redis.xack(self._stream, WORKER_GROUP, *deleted)
