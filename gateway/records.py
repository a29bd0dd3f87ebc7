"""Expiry of the Redis keys the gateway writes.

A call whose every process died must not leave keys behind, so each gateway write that can create
a key is followed, in the same pipeline, by an expiry for it. A plain EXPIRE would stretch the
short ENDED_TTL_S a worker gave a finished call back to CALL_TTL_S (a late status callback, a
detach after the hang-up); EXPIRE … NX would not, but needs Redis 7. So a tiny script sets the
expiry only on a key that has none, which is exactly a key this write just created.
"""

from __future__ import annotations

from shared.redisio import BatchWriter

# KEYS: the keys just written; ARGV[1]: seconds. TTL -1 = exists without an expiry.
ENSURE_TTL = """
for _, key in ipairs(KEYS) do
  if redis.call('TTL', key) == -1 then redis.call('EXPIRE', key, ARGV[1]) end
end
return 0
"""


def ensure_ttl(writer: BatchWriter, ttl_s: int, *keys: str) -> None:
    """Queue, behind the writes already queued, an expiry for any of `keys` that has none.
    Plain EVAL, not EVALSHA: a Redis that restarted empty has no script cache."""
    writer.command("eval", ENSURE_TTL, len(keys), *keys, ttl_s)
