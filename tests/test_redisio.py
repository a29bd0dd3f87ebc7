"""The batch writer and the multi-key reader against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from shared.redisio import Entries, MultiReader

Delivered = list[tuple[bytes, Entries]]  # what the reader handed on: (stream, entries) per call


@contextlib.asynccontextmanager
async def _reader(redis_url: str, prefix: str) -> AsyncIterator[tuple[MultiReader, Delivered]]:
    client = aioredis.Redis.from_url(redis_url)
    got: Delivered = []
    reader = MultiReader(client, f"{prefix}wake:test", lambda key, entries: got.append((key, entries)))
    reader.start()
    try:
        yield reader, got
    finally:
        await reader.close()
        await client.aclose()


async def _until(cond: object, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


async def test_close_returns_even_if_a_read_swallows_the_cancellation(
    redis_url: str, prefix: str, redis: aioredis.Redis
) -> None:
    """redis-py can swallow a cancellation that lands while a command completes (the reader then
    reads on): close() must end the reader anyway, promptly, or a process cannot shut down."""
    for i in range(40):
        async with _reader(redis_url, f"{prefix}{i}:") as (reader, got):
            key = f"{prefix}c{i}"
            await reader.add(key)
            await redis.xadd(key, {b"v": b"x"})
            await _until(lambda: got, "nothing delivered")
            closing = asyncio.create_task(reader.close())
            done, _ = await asyncio.wait({closing}, timeout=5)
            assert done, f"close() hung in round {i}"
