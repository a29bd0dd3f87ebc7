"""Delivers each call's `out` stream to the media socket that serves it.

One `LaneReader` per gateway process follows the `out` streams of every socket it holds, so a
gateway with 200 calls issues one blocked XREAD (on a Redis Cluster, one per lane), not 200.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import redis.asyncio as aioredis

from shared import metrics
from shared import streams as S
from shared.redisio import Entries, LaneReader, OnError

# 5 s of 20 ms frames. A healthy socket holds a few frames here: the worker releases audio on
# its playout clock, at most PLAYOUT_LEAD_MS ahead. A backlog of 5 s means Twilio has not taken
# our audio for seconds; older audio is no use in a conversation (the caller would hear it that
# late), and the bound caps a stuck socket at about 250 x 0.3 KB, so 200 of them stay under 20 MB.
MAX_OUT_MEDIA = 250


class OutQueue:
    """One socket's backlog of `out` entries, bounded: past MAX_OUT_MEDIA entries the oldest audio
    frames are dropped (counted as `out_overflow`). Marks, clears and hang-ups are kept, since
    losing one breaks the call's state while lost audio only costs audio; only a flood of them
    beyond twice the bound (a worker gone wrong) drops the oldest, and of hang-ups only the last
    is kept then."""

    def __init__(self, max_media: int = MAX_OUT_MEDIA) -> None:
        self._batches: deque[Entries] = deque()
        self._size = 0
        self._max = max_media
        self._ready = asyncio.Event()
        self._waiting = False  # the consumer waits in `get` (it has nothing to carry out)
        # The consumer's way to take entries at once while it waits (gateway/sender.py): None
        # when it took them all, else what is left to queue (and wake it for, even if empty).
        self.direct: Callable[[Entries], Entries | None] | None = None

    @property
    def size(self) -> int:
        return self._size

    def put(self, entries: Entries) -> None:
        if self._waiting and self.direct is not None and not self._batches:
            left = self.direct(entries)
            if left is None:
                return
            entries = left
        self._batches.append(entries)
        self._size += len(entries)
        if self._size > self._max:
            self._compact()
        self._ready.set()

    async def get(self) -> Entries:
        while not self._batches:
            self._ready.clear()
            self._waiting = True
            try:
                await self._ready.wait()
            finally:
                self._waiting = False
        batch = self._batches.popleft()
        self._size -= len(batch)
        return batch

    def _compact(self) -> None:
        """The rare path: a socket that stopped draining. O(backlog) per put while it stays so."""
        items = [item for batch in self._batches for item in batch]
        excess = sum(1 for _id, f in items if f.get(b"k") == S.OUT_MEDIA) - self._max
        kept: Entries = []
        for item in items:
            if excess > 0 and item[1].get(b"k") == S.OUT_MEDIA:
                excess -= 1
            else:
                kept.append(item)
        if len(kept) > 2 * self._max:  # no audio left to drop: control entries flood in
            hangups = [i for i, (_id, f) in enumerate(kept) if f.get(b"k") == S.OUT_HANGUP]
            others = [i for i, (_id, f) in enumerate(kept) if f.get(b"k") != S.OUT_HANGUP]
            keep = set(others[-2 * self._max:]) | set(hangups[-1:])
            kept = [item for i, item in enumerate(kept) if i in keep]
        metrics.DROPPED.labels("out_overflow").inc(len(items) - len(kept))
        self._batches = deque([kept]) if kept else deque()
        self._size = len(kept)


class OutboundHub:
    def __init__(self, redis: aioredis.Redis, keys: S.Keys, process_id: str,
                 on_error: OnError | None = None) -> None:
        self._queues: dict[bytes, OutQueue] = {}
        self._reader = LaneReader(redis, keys, process_id, self._dispatch, on_error=on_error,
                                  on_follow=metrics.streams_followed)

    def start(self) -> None:
        self._reader.start()

    def tasks(self) -> list[asyncio.Task[None]]:
        return self._reader.tasks()

    async def close(self) -> None:
        await self._reader.close()

    async def attach(self, out_key: str, from_id: str) -> OutQueue:
        queue = OutQueue()
        self._queues[out_key.encode()] = queue
        await self._reader.add(out_key, from_id)
        return queue

    def detach(self, out_key: str, queue: OutQueue) -> None:
        """Stop delivering to `queue`, unless the call's stream already re-attached here."""
        key = out_key.encode()
        if self._queues.get(key) is queue:
            del self._queues[key]
            self._reader.remove(out_key)

    def follows(self, out_key: str) -> bool:
        return out_key.encode() in self._queues

    def ring(self, out_key: str, rung: bool) -> None:
        """Whether `out_key`'s writer rings us (gateway/doorbell.py)."""
        self._reader.ring(out_key, rung)

    def _dispatch(self, key: bytes, entries: Entries) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            queue.put(entries)
