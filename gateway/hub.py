"""Delivers each call's `out` stream to the media socket that serves it.

One `MultiReader` per gateway process follows the `out` streams of every socket it holds, so a
gateway with 200 calls issues one blocked XREAD, not 200.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from shared.redisio import Entries, MultiReader, OnError


class OutboundHub:
    def __init__(self, redis: aioredis.Redis, wake_key: str, on_error: OnError | None = None) -> None:
        self._queues: dict[bytes, asyncio.Queue[Entries]] = {}
        self._reader = MultiReader(redis, wake_key, self._dispatch, on_error=on_error)

    def start(self) -> None:
        self._reader.start()

    async def close(self) -> None:
        await self._reader.close()

    async def attach(self, out_key: str, from_id: str) -> asyncio.Queue[Entries]:
        queue: asyncio.Queue[Entries] = asyncio.Queue()
        self._queues[out_key.encode()] = queue
        await self._reader.add(out_key, from_id)
        return queue

    def detach(self, out_key: str, queue: asyncio.Queue[Entries]) -> None:
        """Stop delivering to `queue`, unless the call's stream already re-attached here."""
        key = out_key.encode()
        if self._queues.get(key) is queue:
            del self._queues[key]
            self._reader.remove(out_key)

    def _dispatch(self, key: bytes, entries: Entries) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            queue.put_nowait(entries)
