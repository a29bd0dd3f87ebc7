"""The console's live calls list: one Redis read per gateway, fanned out to every viewer.

Workers and gateways append a call's notable moments (`streams.FEED_KINDS`) to one stream,
`feed`. While anyone watches, a gateway's `FeedHub` tails it with one blocked XREAD, reads the
records of the calls that moved (one pipelined HGETALL per batch) and offers each viewer the rows
as they are now. What waits for a viewer is bounded: one that stops reading is cut off, never buffered.

The feed entry and the record update it reports may travel on different connections (on a
cluster the feed lives in `{ctl}`, the record in the call's lane), so the row read may lag the
entry by a moment: `merge` applies what the entry itself says on top of the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from gateway import calls as views
from shared import streams as S
from shared.redisio import MAX_BACKOFF_S, TRANSIENT
from shared.streams import Keys
from shared.tasks import stop_tasks

log = logging.getLogger("callbridge.gateway.feed")

SID_RE = re.compile(r"CA[0-9a-fA-F]{32}")
SNAPSHOT_MAX = 500  # calls not ended that a snapshot lists at most
BATCH = 500
KEEPALIVE = b": keepalive\n\n"
# What the console calls a feed kind (the rest keep their names).
CONSOLE_KIND = {"stream-start": "live", "call-ended": "ended", "twilio-ended": "ended"}


def sse(event: str, data: Any) -> bytes:
    """One server-sent event (the data is JSON: one line, no newline to escape)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@dataclass(frozen=True, slots=True)
class FeedEntry:
    sid: str
    kind: str
    data: dict[str, Any]


def parse_entry(fields: dict[bytes, bytes]) -> FeedEntry | None:
    """A feed entry, or None when malformed (written by anyone: every field is checked)."""
    sid, kind = fields.get(b"c", b""), fields.get(b"k", b"")
    if not isinstance(sid, bytes) or not isinstance(kind, bytes) or len(sid) > 64 or len(kind) > 64:
        return None
    sid_s, kind_s = sid.decode(errors="replace"), kind.decode(errors="replace")
    if not SID_RE.fullmatch(sid_s) or kind_s not in S.FEED_KINDS:
        return None
    data: Any = {}
    raw = fields.get(b"v")
    if isinstance(raw, bytes) and raw and len(raw) <= 64_000:
        with contextlib.suppress(orjson.JSONDecodeError):
            data = orjson.loads(raw)
    return FeedEntry(sid_s, kind_s, data if isinstance(data, dict) else {})


def _num(v: Any) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1e9
    return float(v) if ok else None


def _text(v: Any, limit: int) -> str | None:
    return v[:limit] if isinstance(v, str) and v else None


def merge(row: dict[str, Any], e: FeedEntry) -> dict[str, Any]:
    """The row with what the entry says applied (an ended call stays ended)."""
    out = dict(row)
    ended = out.get("status") == S.STATUS_ENDED
    if e.kind == "ringing" and out.get("status") == "queued":
        out["status"] = "ringing"
    elif e.kind == "stream-start" and not ended:
        out["status"] = S.STATUS_LIVE
    elif e.kind == "turn-latency" and (ms := _num(e.data.get("ms"))) is not None:
        out["last_turn_ms"] = ms
    elif e.kind == "barge-in" and (n := _num(e.data.get("count"))) is not None:
        out["barge_ins"] = max(int(n), out.get("barge_ins") or 0)
    elif e.kind == "takeover" and (worker := _text(e.data.get("worker"), 200)):
        out["worker"] = worker
    elif e.kind == "answered-by" and (value := _text(e.data.get("value"), 32)):
        out["answered_by"] = value
    elif e.kind in ("call-ended", "twilio-ended"):
        out["status"] = S.STATUS_ENDED
        if not out.get("end_reason"):
            out["end_reason"] = _text(e.data.get("reason") or e.data.get("status"), 64)
    return out


@dataclass(eq=False)
class Viewer:
    """One browser on the list. What waits for it is the newest row of each call that moved
    (a list shows state, so an older row of the same call is worth nothing): a burst of changes
    costs a slow reader one message per call, not per change. More than `limit` calls waiting,
    and it is cut off."""

    limit: int
    pending: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    cut: bool = False
    ended: set[str] = field(default_factory=set)  # calls shown ended: never shown live again

    def offer(self, kind: str, row: dict[str, Any]) -> None:
        if self.cut:
            return
        sid = row.get("call_sid", "")
        self.pending.pop(sid, None)  # re-inserted last: calls go out in the order they moved
        self.pending[sid] = (kind, row)
        if len(self.pending) > self.limit:
            self.cut = True  # it stopped reading: its stream ends at the next take
            self.pending.clear()
        self.wake.set()

    def take(self) -> tuple[str, dict[str, Any]] | None:
        """The next waiting row (None: nothing waits)."""
        if not self.pending:
            self.wake.clear()
            return None
        sid = next(iter(self.pending))
        return self.pending.pop(sid)

    def message(self, kind: str, row: dict[str, Any]) -> bytes | None:
        """The SSE message for the browser, or None for a stale row of a call it saw end."""
        sid = row.get("call_sid", "")
        if row.get("status") == S.STATUS_ENDED:
            if len(self.ended) > 10_000:
                self.ended.clear()
            self.ended.add(sid)
        elif sid in self.ended:
            return None
        return sse("call", {"kind": kind, "call": row})


class FeedHub:
    """Tails `feed` while anyone watches; `redis` is a client whose connections may block."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, limit: int,
                 on_error: Callable[[str], None] = lambda _op: None) -> None:
        self.redis = redis
        self.keys = keys
        self.limit = limit
        self.viewers: set[Viewer] = set()
        self._on_error = on_error
        self._task: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        self._last = "0-0"

    async def join(self) -> Viewer:
        """A new viewer. The tail starts where the feed ends now, before the viewer's snapshot
        is read, so nothing that happens after the snapshot is missed."""
        viewer = Viewer(self.limit)
        async with self._starting:  # two first viewers at once start one tail, not two
            if self._task is None or self._task.done():
                newest: Any = await self.redis.xrevrange(self.keys.feed, count=1)
                self._last = newest[0][0].decode() if newest else "0-0"
                self.viewers.add(viewer)
                self._task = asyncio.create_task(self._run(), name="console-feed")
            else:
                self.viewers.add(viewer)
        return viewer

    def wake_all(self) -> None:
        for viewer in self.viewers:
            viewer.wake.set()

    def leave(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)

    async def close(self) -> None:
        self.viewers.clear()  # the loop also ends at its next turn
        if self._task is not None:
            await stop_tasks([self._task], 2.0, what="console feed")

    async def snapshot(self) -> list[dict[str, Any]]:
        """Every call not ended, newest first (at most SNAPSHOT_MAX), as rows."""
        sids: Any = await self.redis.zrevrange(self.keys.index, 0, 4 * SNAPSHOT_MAX)
        if not sids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hgetall(self.keys.call(sid.decode(errors="replace")))
        rows = []
        for sid, record in zip(sids, await pipe.execute(), strict=True):
            if record and views.api_status(record) != S.STATUS_ENDED:
                rows.append(views.row(sid.decode(errors="replace"), record))
                if len(rows) >= SNAPSHOT_MAX:
                    break
        return rows

    async def _run(self) -> None:
        backoff = 0.01
        while self.viewers:
            try:
                got: Any = await self.redis.xread({self.keys.feed: self._last}, count=BATCH, block=1000)
                backoff = 0.01
            except TRANSIENT:
                self._on_error("console_feed")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S * 10)
                continue
            if not got:
                continue
            entries = got[0][1]
            self._last = entries[-1][0].decode()
            try:
                await self._publish([e for _id, f in entries if (e := parse_entry(f)) is not None])
            except TRANSIENT:
                self._on_error("console_feed")
            except Exception:  # never let one odd batch end the tail for every viewer
                log.exception("console feed batch failed")

    async def _publish(self, entries: list[FeedEntry]) -> None:
        """One row per call that moved, its record read once, every entry applied in order."""
        order: dict[str, list[FeedEntry]] = {}
        for e in entries:
            order.setdefault(e.sid, []).append(e)
        if not order:
            return
        pipe = self.redis.pipeline(transaction=False)
        for sid in order:
            pipe.hgetall(self.keys.call(sid))
        records = await pipe.execute()
        for (sid, moved), record in zip(order.items(), records, strict=True):
            if not record:
                continue  # expired, or never recorded: nothing to show
            row = views.row(sid, record)
            for e in moved:
                row = merge(row, e)
            kind = CONSOLE_KIND.get(moved[-1].kind, moved[-1].kind)
            for viewer in list(self.viewers):
                viewer.offer(kind, row)
