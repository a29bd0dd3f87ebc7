"""The Redis layout both tiers share: key names, entry kinds and their field encoding.

Entries are tiny flat hashes of bytes: `k` (kind), `a` (raw audio, never base64), `v` (a small
value: digit, mark name, JSON), `t` (sender wall-clock ns, so each hop's latency is measurable
across processes). Keeping the encoding here means the gateway and the worker cannot drift apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# Entry kinds on call:{sid}:in (gateway -> worker).
IN_MEDIA = b"m"
IN_START = b"start"
IN_DTMF = b"dtmf"
IN_MARK = b"mark"
IN_STOP = b"stop"
IN_DETACH = b"detach"  # the Twilio socket closed without `stop` (gateway drain or network)
IN_SILENCE = b"silence"  # worker-local only: caller audio stalled, keep Vapi fed

# Entry kinds on call:{sid}:out (worker -> gateway).
OUT_MEDIA = b"m"
OUT_MARK = b"mark"
OUT_CLEAR = b"clear"
OUT_HANGUP = b"hangup"
OUT_OWN = b"own"  # a new owner (epoch `e`) took the call: older epochs' entries are stale

WORKER_GROUP = "workers"

# Call status values in the call hash.
STATUS_RINGING = "ringing"
STATUS_LIVE = "live"
STATUS_ENDED = "ended"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix (default `cb:`); `call_*` take a CallSid."""

    prefix: str = "cb:"

    @property
    def calls(self) -> str:
        return f"{self.prefix}calls"

    def call(self, sid: str) -> str:
        return f"{self.prefix}call:{sid}"

    def inbound(self, sid: str) -> str:
        return f"{self.prefix}call:{sid}:in"

    def outbound(self, sid: str) -> str:
        return f"{self.prefix}call:{sid}:out"

    def events(self, sid: str) -> str:
        return f"{self.prefix}call:{sid}:events"

    def wake(self, process_id: str) -> str:
        return f"{self.prefix}wake:{process_id}"

    @property
    def workers(self) -> str:
        """Sorted set: worker id -> its lease deadline (ms, Redis clock)."""
        return f"{self.prefix}workers"

    def worker(self, worker_id: str) -> str:
        """A worker's lease key (TTL = the lease)."""
        return f"{self.prefix}worker:{worker_id}"

    def worker_calls(self, worker_id: str) -> str:
        """Set of the CallSids a worker owns, for survivors to find when it dies."""
        return f"{self.prefix}worker:{worker_id}:calls"

    def all_call_keys(self, sid: str) -> tuple[str, str, str, str]:
        return (self.call(sid), self.inbound(sid), self.outbound(sid), self.events(sid))


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
