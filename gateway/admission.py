"""Admission control across the deployment: MAX_ACTIVE_CALLS and OUTBOUND_CPS, counted in Redis.

Both are small scripts on the `{ctl}` keys, so every gateway sees one count. A call admitted
holds a place in `active` until it ends (the gateway releases it when the call's socket closes
for good or Twilio reports a final status) or, should every release be missed, until its place
lapses after CALL_TTL_S: a crash can cost a place for at most that long, never forever.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from shared.streams import Keys

# KEYS: active. ARGV: sid, now s, lapse s, max (0: no limit). 1 admitted (or already in), 0 full.
ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
local limit = tonumber(ARGV[4])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""

# KEYS: bucket. ARGV: rate per s. A token bucket on Redis's clock holding up to max(1, rate)
# tokens. Returns {1, 0} when a call may be placed now, else {0, ms until one may}.
TAKE_TOKEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = math.max(1, rate)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(b[1]), tonumber(b[2])
if not tokens or not at then tokens, at = burst, now end
tokens = math.min(burst, tokens + (now - at) * rate / 1000)
local ok, wait = 0, 0
if tokens >= 1 then
  tokens, ok = tokens - 1, 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {ok, wait}
"""


async def admit(r: aioredis.Redis, keys: Keys, sid: str, *, now: float, ttl_s: int,
                limit: int) -> bool:
    return bool(await r.eval(ADMIT, 1, keys.active, sid, now, now + ttl_s, limit))


async def release(r: aioredis.Redis, keys: Keys, sid: str) -> None:
    await r.zrem(keys.active, sid)


async def active_count(r: aioredis.Redis, keys: Keys, now: float) -> int:
    pipe = r.pipeline(transaction=False)
    pipe.zremrangebyscore(keys.active, "-inf", now)
    pipe.zcard(keys.active)
    _, count = await pipe.execute()
    return int(count)


async def take_token(r: aioredis.Redis, keys: Keys, rate: float) -> float:
    """0 when an outbound call may be placed now, else the seconds to wait before one may."""
    got: Any = await r.eval(TAKE_TOKEN, 1, keys.outbound_bucket, rate)
    ok, wait_ms = (int(got[0]), int(got[1])) if isinstance(got, list) and len(got) == 2 else (1, 0)
    return 0.0 if ok else max(0.001, wait_ms / 1000)
