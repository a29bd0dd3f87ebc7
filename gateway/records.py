"""The Redis records the gateway writes: expiries, and re-assertion after Redis comes back.

A call whose every process died must not leave keys behind, so each gateway write that can create
a key is followed, in the same pipeline, by an expiry for it. A plain EXPIRE would stretch the
short ENDED_TTL_S a worker gave a finished call back to CALL_TTL_S (a late status callback, a
detach after the hang-up); EXPIRE … NX would not, but needs Redis 7. So a tiny script sets the
expiry only on a key that has none, which is exactly a key this write just created.

After Redis restarts empty, only the processes still know what is going on: each gateway writes
its part of the call record again for every socket it serves (`reassert`).
"""

from __future__ import annotations

from gateway.state import GatewayState
from shared.redisio import Writer

# KEYS: the keys just written; ARGV[1]: seconds. TTL -1 = exists without an expiry.
ENSURE_TTL = """
for _, key in ipairs(KEYS) do
  if redis.call('TTL', key) == -1 then redis.call('EXPIRE', key, ARGV[1]) end
end
return 0
"""


def ensure_ttl(writer: Writer, ttl_s: int, *keys: str) -> None:
    """Queue, behind the writes already queued, an expiry for any of `keys` that has none.
    Plain EVAL, not EVALSHA: a Redis that restarted empty has no script cache."""
    writer.command("eval", ENSURE_TTL, len(keys), *keys, ttl_s)


# KEYS: call hash, :in. ARGV: stream_sid, gateway id, "1" if the call went live, seconds.
# An ended call is left alone (its ending must win); `live` never goes back to `ringing`.
REASSERT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'ended' then return 0 end
redis.call('HSET', KEYS[1], 'stream_sid', ARGV[1], 'gateway', ARGV[2], 'gateway_rings', ARGV[2])
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'status', 'live')
elseif not status then
  redis.call('HSET', KEYS[1], 'status', 'ringing')
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""


def reassert(st: GatewayState) -> int:
    """Write again, for every socket this gateway serves, its part of the call record: the
    stream_sid, this gateway, `live` if the call had gone live (else `ringing` if the status is
    gone), and CALL_TTL_S on the hash and `:in`. Idempotent; queued together, so it leaves in one
    pipeline, behind writes already queued. Returns how many sockets it covered."""
    ttl = st.settings.call_ttl_s
    for info in st.sockets.values():
        sid = info.call_sid
        st.writer.command("eval", REASSERT, 2, st.keys.call(sid), st.keys.inbound(sid),
                          info.stream_sid, st.process_id, "1" if info.live else "0", ttl)
    return len(st.sockets)
