"""Ownership scripts and the lease thread against a real Redis: epochs, fencing, takeover,
re-assertion after Redis loses its data."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from shared.streams import Keys
from worker import ownership as O


async def _until(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _ringing(redis: aioredis.Redis, keys: Keys, sid: str) -> None:
    await redis.hset(keys.call(sid), mapping={"status": "ringing"})


async def test_claim_bumps_the_epoch_marks_out_and_only_the_expected_owner_wins(
        redis: aioredis.Redis, prefix: str) -> None:
    keys, sid = Keys(prefix), "CA1"
    await _ringing(redis, keys, sid)
    assert await O.claim(redis, keys, sid, "w1", "", maxlen=100, ttl_s=60) == 1
    assert await O.claim(redis, keys, sid, "w2", "", maxlen=100, ttl_s=60) == 0, "not unowned any more"
    assert await O.claim(redis, keys, sid, "w2", "w9", maxlen=100, ttl_s=60) == 0, "not w9's"
    assert await O.claim(redis, keys, sid, "w2", "w1", maxlen=100, ttl_s=60) == 2
    record = await redis.hgetall(keys.call(sid))
    assert record[b"owner"] == b"w2" and record[b"epoch"] == b"2"
    marks = [(f[b"k"], f[b"e"]) for _i, f in await redis.xrange(keys.outbound(sid))]
    assert marks == [(b"own", b"1"), (b"own", b"2")]
    assert 0 < await redis.ttl(keys.outbound(sid)) <= 60
    await redis.hset(keys.call(sid), "status", "ended")
    assert await O.claim(redis, keys, sid, "w3", "w2", maxlen=100, ttl_s=60) == -1
    assert await O.claim(redis, keys, "CA-unknown", "w3", "", maxlen=100, ttl_s=60) == -1


async def test_fenced_writes_refuse_a_replaced_owner(redis: aioredis.Redis, prefix: str) -> None:
    keys, sid = Keys(prefix), "CA2"
    await _ringing(redis, keys, sid)
    await O.claim(redis, keys, sid, "w1", "", maxlen=100, ttl_s=60)
    assert await redis.eval(*O.fenced_hset_args(keys, sid, 1, {"in_pos": "5-0"})) == 1
    await O.claim(redis, keys, sid, "w2", "w1", maxlen=100, ttl_s=60)
    assert await redis.eval(*O.fenced_hset_args(keys, sid, 1, {"status": "ended"})) == 0
    record = await redis.hgetall(keys.call(sid))
    assert record[b"status"] == b"ringing" and record[b"in_pos"] == b"5-0"


async def test_reassert_restores_a_lost_record_but_never_takes_a_call_back(
        redis: aioredis.Redis, prefix: str) -> None:
    keys, sid = Keys(prefix), "CA3"
    await _ringing(redis, keys, sid)
    epoch = await O.claim(redis, keys, sid, "w1", "", maxlen=100, ttl_s=60)
    assert await O.reassert(redis, keys, sid, "w1", epoch, 60, {"status": "live"}) == 2
    await redis.delete(keys.call(sid))  # Redis restarted without its data
    assert await O.reassert(redis, keys, sid, "w1", epoch, 60, {"status": "live"}) == 1
    record = await redis.hgetall(keys.call(sid))
    assert record == {b"owner": b"w1", b"owner_rings": b"w1", b"epoch": b"1", b"status": b"live"}
    assert 0 < await redis.ttl(keys.call(sid)) <= 60
    await redis.delete(keys.call(sid))  # lost again, and the caller hung up meanwhile:
    await redis.hset(keys.call(sid), mapping={"status": "ended", "end_reason": "caller-hangup"})
    assert await O.reassert(redis, keys, sid, "w1", epoch, 60, {"status": "live"}) == 0
    assert await redis.hget(keys.call(sid), "status") == b"ended", "an ending is never undone"
    await redis.delete(keys.call(sid))
    await O.reassert(redis, keys, sid, "w1", epoch, 60, {"status": "live"})
    await O.claim(redis, keys, sid, "w2", "w1", maxlen=100, ttl_s=60)  # taken over meanwhile
    assert await O.reassert(redis, keys, sid, "w1", epoch, 60, {"status": "live"}) == 0
    assert await redis.hget(keys.call(sid), "owner") == b"w2"


async def test_a_lapsed_lease_is_found_on_redis_clock_and_forgotten_unless_renewed(
        redis: aioredis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    assert await redis.eval(O.BEAT, 2, keys.worker("w1"), keys.workers, "w1", 150) == 0
    assert await redis.eval(O.BEAT, 2, keys.worker("w1"), keys.workers, "w1", 150) == 1
    assert await O.lapsed_workers(redis, keys) == []

    async def lapsed() -> bool:
        return await O.lapsed_workers(redis, keys) == ["w1"]

    await _until(lapsed)
    await redis.eval(O.BEAT, 2, keys.worker("w1"), keys.workers, "w1", 5000)  # came back
    assert not await O.forget(redis, keys, "w1")
    assert await redis.zscore(keys.workers, "w1")
    await redis.sadd(keys.worker_calls("w2"), "CA9")
    await redis.zadd(keys.workers, {"w2": 0})
    assert await O.forget(redis, keys, "w2")
    assert not await redis.exists(keys.worker_calls("w2")) and await redis.zscore(keys.workers, "w2") is None


async def test_the_lease_thread_renews_and_reports_a_lapse(redis_url: str, redis: aioredis.Redis,
                                                           prefix: str) -> None:
    keys = Keys(prefix)
    lapses: list[float] = []
    lease = O.Lease(redis_url, keys, "w1", lease_s=0.3, loop=asyncio.get_running_loop(),
                    on_lapsed=lambda: lapses.append(time.monotonic()))
    lease.start()
    try:
        async def held() -> bool:
            return bool(await redis.exists(keys.worker("w1"))) and lease.held

        await _until(held)
        assert lapses == []
        await redis.delete(keys.worker("w1"))  # what a stall past the lease or an empty Redis looks like

        async def reported() -> bool:
            return bool(lapses)

        await _until(reported)
        assert await redis.exists(keys.worker("w1")), "renewed again"
    finally:
        await asyncio.to_thread(lease.stop)
    assert not await redis.exists(keys.worker("w1")), "released on stop"
    assert await O.lapsed_workers(redis, keys) == ["w1"], "survivors act at once"
