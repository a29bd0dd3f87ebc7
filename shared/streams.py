"""The Redis layout both tiers share: key names, entry kinds and their field encoding.

Entries are tiny flat hashes of bytes: `k` (kind), `a` (raw audio, never base64), `v` (a small
value: digit, mark name, JSON), `t` (sender wall-clock ns, so each hop's latency is measurable
across processes). Keeping the encoding here means the gateway and the worker cannot drift apart.
"""

from __future__ import annotations

import re
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache

from redis.crc import key_slot

# Entry kinds on call:{sid}:in (gateway -> worker).
IN_MEDIA = b"m"
IN_START = b"start"
IN_DTMF = b"dtmf"
IN_MARK = b"mark"
IN_STOP = b"stop"
IN_DETACH = b"detach"  # the Twilio socket closed without `stop` (gateway drain or network)
IN_SILENCE = b"silence"  # worker-local only: caller audio stalled, keep Vapi fed
# The writer of a stream says it rings its reader's wake stream after every batch from now on:
# `v` = the reader's process id (shared/redisio.py, `MultiReader`; docs/architecture.md).
IN_RING = b"ring"
# The call API steers a live call: `v` = JSON {"op": "hangup" | "say" | "transfer" |
# "answered_by", ...}; untrusted, parsed by worker/call.py `parse_control`.
IN_CONTROL = b"ctl"

# Entry kinds on call:{sid}:out (worker -> gateway).
OUT_MEDIA = b"m"
OUT_MARK = b"mark"
OUT_CLEAR = b"clear"
OUT_HANGUP = b"hangup"
OUT_OWN = b"own"  # a new owner (epoch `e`, worker id `w`) took the call: older epochs' are stale
OUT_RING = b"ring"  # as IN_RING, from the owner to the gateway holding the Twilio socket

WORKER_GROUP = "workers"

# The console's live list tails one stream of the calls' notable moments (`feed`): these kinds,
# each entry `k` (kind), `c` (CallSid), `t`, and `v` (the event's JSON, as on call:{sid}:events).
FEED_KINDS = frozenset({"created", "ringing", "stream-start", "vapi-connected", "takeover",
                        "turn-latency", "barge-in", "transfer-requested", "answered-by",
                        "call-ended", "twilio-ended"})
FEED_MAXLEN = 10_000

# Call status values in the call hash.
STATUS_RINGING = "ringing"
STATUS_LIVE = "live"
STATUS_ENDED = "ended"


CONTROL_TAG = "ctl"  # the hash tag of the cluster-wide keys: job queue, leases, worker sets


@lru_cache(maxsize=16)
def lane_tags(lanes: int) -> tuple[str, ...]:
    """One hash tag per lane, lane i's chosen to land in the i-th of `lanes` equal slices of the
    16384 slots, so the lanes spread over the primaries as evenly as the slots do (a cluster made
    by `redis-cli --cluster create` gives each primary one contiguous slice)."""
    tags: list[str] = []
    for i in range(lanes):
        lo, hi = i * 16384 // lanes, (i + 1) * 16384 // lanes
        n = 0
        while not lo <= key_slot(f"{i}.{n}".encode()) < hi:
            n += 1
        tags.append(f"{i}.{n}")
    return tuple(tags)


def lane_of(sid: str, lanes: int) -> int:
    """The lane a call lives in: fixed by its CallSid, so every process finds its keys alone."""
    return zlib.crc32(sid.encode()) % lanes


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix (default `cb:`); `call_*` take a CallSid.

    `lanes` = 0 (one Redis): the names carry no hash tag. On a Redis Cluster (`lanes` >= 1) every
    key of a call carries its lane's tag, so the call's multi-key scripts and one XREAD per lane
    are legal there; the cluster-wide keys share the `{ctl}` tag, so the lease scripts are too."""

    prefix: str = "cb:"
    lanes: int = 0

    def lane(self, sid: str) -> int:
        return lane_of(sid, self.lanes) if self.lanes else 0

    def lane_tag(self, lane: int) -> str:
        return "{" + lane_tags(self.lanes)[lane] + "}" if self.lanes else ""

    def lane_of_key(self, key: bytes) -> int:
        """Which lane a key (as written by these Keys) is in; 0 for an untagged name."""
        if not self.lanes:
            return 0
        lane = self.lane_in_key(key)
        return 0 if lane is None else lane

    def lane_in_key(self, key: bytes) -> int | None:
        """The lane of a key written by these Keys, None for a key outside the lanes."""
        start = key.find(b"{")
        end = key.find(b"}", start + 1)
        if start < 0 or end < 0:
            return None
        lane, dot, _ = key[start + 1:end].partition(b".")
        return int(lane) if dot and lane.isdigit() and int(lane) < max(1, self.lanes) else None

    def _c(self) -> str:
        return f"{self.prefix}{{{CONTROL_TAG}}}" if self.lanes else self.prefix

    def _call(self, sid: str) -> str:
        return f"{self.prefix}{self.lane_tag(self.lane(sid))}call:{sid}"

    @property
    def calls(self) -> str:
        return f"{self._c()}calls"

    def call(self, sid: str) -> str:
        return self._call(sid)

    def inbound(self, sid: str) -> str:
        return f"{self._call(sid)}:in"

    def outbound(self, sid: str) -> str:
        return f"{self._call(sid)}:out"

    def events(self, sid: str) -> str:
        return f"{self._call(sid)}:events"

    def wake(self, process_id: str, lane: int = 0) -> str:
        """A process's own wake stream for one lane's blocked read (same slot as the lane)."""
        return f"{self.prefix}{self.lane_tag(lane)}wake:{process_id}"

    @property
    def rings(self) -> bool:
        """Whether writers ring their readers (one Redis; on a cluster every stream is named in
        its lane's blocked read, as the wake stream would have to share the stream's slot)."""
        return not self.lanes

    @property
    def layout(self) -> str:
        """The lane count the deployment was started with: every process must agree."""
        return f"{self._c()}layout"

    @property
    def workers(self) -> str:
        """Sorted set: worker id -> its lease deadline (ms, Redis clock)."""
        return f"{self._c()}workers"

    def worker(self, worker_id: str) -> str:
        """A worker's lease key (TTL = the lease)."""
        return f"{self._c()}worker:{worker_id}"

    def worker_calls(self, worker_id: str) -> str:
        """Set of the CallSids a worker owns, for survivors to find when it dies."""
        return f"{self._c()}worker:{worker_id}:calls"

    @property
    def active(self) -> str:
        """Sorted set: CallSid -> when its admission lapses (s); MAX_ACTIVE_CALLS counts it."""
        return f"{self._c()}active"

    @property
    def index(self) -> str:
        """Sorted set: CallSid -> created (s), for listing calls newest first."""
        return f"{self._c()}index"

    def dial(self, request_id: str) -> str:
        """An outbound call's parameters, from the API request until Twilio fetches its TwiML."""
        return f"{self._c()}dial:{request_id}"

    @property
    def feed(self) -> str:
        """Stream: every call's notable moments (FEED_KINDS), for the console's live list."""
        return f"{self._c()}feed"

    @property
    def outbound_bucket(self) -> str:
        """The token bucket that paces outbound calls (OUTBOUND_CPS)."""
        return f"{self._c()}outbound-bucket"

    def all_call_keys(self, sid: str) -> tuple[str, str, str, str]:
        return (self.call(sid), self.inbound(sid), self.outbound(sid), self.events(sid))


def gateway_reader(gateway_id: str) -> str:
    """The reader id (its wake stream's name, `Keys.wake`) of the gateway `gateway_id`."""
    return f"gw-{gateway_id}"


def worker_reader(worker_id: str) -> str:
    """The reader id (its wake stream's name, `Keys.wake`) of the worker `worker_id`."""
    return f"wk-{worker_id}"


_RING_TARGET = re.compile(rb"[A-Za-z0-9._:-]{1,100}")


def ring_target(raw: object) -> str | None:
    """A process id named by an entry or a record (untrusted: another version, a bad writer) as
    the reader to ring, or None when it is not a plausible one."""
    if isinstance(raw, str):
        raw = raw.encode()
    if isinstance(raw, bytes) and _RING_TARGET.fullmatch(raw):
        return raw.decode()
    return None


def entry(kind: bytes, audio: bytes | None = None, value: str | bytes | None = None,
          stream: str | None = None, epoch: bytes | None = None) -> dict[bytes, bytes]:
    """Build one stream entry with the sender timestamp (and, for stream lifecycle entries, the
    Twilio streamSid, so a late `detach` of an old socket cannot end its successor; for a
    worker's `out` entries, its ownership epoch, so a replaced owner's audio is dropped)."""
    fields: dict[bytes, bytes] = {b"k": kind, b"t": str(time.time_ns()).encode()}
    if epoch is not None:
        fields[b"e"] = epoch
    if stream is not None:
        fields[b"s"] = stream.encode()
    if audio is not None:
        fields[b"a"] = audio
    if value is not None:
        fields[b"v"] = value.encode() if isinstance(value, str) else value
    return fields


def feed_entry(kind: str, sid: str, value: bytes | None = None) -> dict[bytes, bytes]:
    """One entry of the `feed` stream: what happened (a FEED_KINDS kind) to which call."""
    fields: dict[bytes, bytes] = {b"k": kind.encode(), b"c": sid.encode(),
                                  b"t": str(time.time_ns()).encode()}
    if value:
        fields[b"v"] = value
    return fields


def _stamp_ns(fields: dict[bytes, bytes]) -> int | None:
    """The sender's stamp, if it is one (entries are untrusted: another version, a bad writer)."""
    t = fields.get(b"t")
    if not t or not t.isdigit() or len(t) > 20:
        return None
    return int(t)


def entry_age_ms(fields: dict[bytes, bytes], now: int | None = None) -> float:
    """Milliseconds since the sender stamped the entry (0 when unstamped or malformed)."""
    t = _stamp_ns(fields)
    if t is None:
        return 0.0
    return ((time.time_ns() if now is None else now) - t) / 1e6


def entry_time_s(fields: dict[bytes, bytes]) -> float:
    """The sender's wall-clock stamp in seconds (now when unstamped or malformed)."""
    t = _stamp_ns(fields)
    return time.time() if t is None else t / 1e9
