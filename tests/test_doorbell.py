"""Ringing the reader (shared/redisio.py `MultiReader`, `BatchWriter.ring`; gateway/doorbell.py;
the worker's side in worker/session.py) against a real Redis: a rung stream is read without
being named in the blocked read, an entry written without a ring is late but never lost, and a
stream whose writer may not ring goes back to the blocked read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from shared import streams as S
from shared.redisio import BatchWriter, Entries, MultiReader, _resp, pack_batch

HOUR_MS = 3_600_000  # a sweep or a block that never comes within a test


class Reading:
    """A MultiReader and what it handed on, with a way to wait for an entry by its `v`."""

    def __init__(self, redis: aioredis.Redis, wake: str, **kwargs: int) -> None:
        self.got: list[tuple[bytes, bytes]] = []
        self._arrived = asyncio.Event()
        self.reader = MultiReader(redis, wake, self._on_entries, **kwargs)

    def _on_entries(self, key: bytes, entries: Entries) -> None:
        self.got += [(key, f.get(b"v", b"")) for _id, f in entries]
        self._arrived.set()

    async def wait_for(self, value: bytes, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while all(v != value for _k, v in self.got):
                self._arrived.clear()
                await self._arrived.wait()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


async def _pair(client: aioredis.Redis, prefix: str, **kwargs: int) -> tuple[Reading, BatchWriter, str]:
    wake = f"{prefix}wake:reader"
    reading = Reading(client, wake, **kwargs)
    reading.reader.start()
    writer = BatchWriter(client)
    writer.start()
    return reading, writer, wake


def test_a_ring_is_packed_as_an_xadd_that_creates_no_stream() -> None:
    packed = pack_batch([("ring", (b"cb:wake:gw-1",), {})])
    assert packed == _resp([b"XADD", b"cb:wake:gw-1", b"NOMKSTREAM", b"MAXLEN", b"1", b"*", b"r", b"1"])


async def test_the_blocked_read_names_only_the_streams_whose_writer_does_not_ring(
        client: aioredis.Redis, prefix: str) -> None:
    reading = Reading(client, f"{prefix}wake", count=7, block_ms=200, sweep_ms=50)
    r = reading.reader
    a, b = f"{prefix}a", f"{prefix}b"
    await r.add(a)
    await r.add(b)
    r.ring(a, True)
    command, replies = r._command(b"5-5")
    assert replies == 2
    assert command == b"".join((
        _resp([b"XREAD", b"COUNT", b"7", b"BLOCK", b"50", b"STREAMS", f"{prefix}wake".encode(),
               b.encode(), b"5-5", b"0-0"]),
        _resp([b"XREAD", b"COUNT", b"7", b"STREAMS", a.encode(), b"0-0"])))
    command, _ = r._command(b"5-5", now=True)  # a rung stream had COUNT waiting: no BLOCK
    assert command.startswith(_resp([b"XREAD", b"COUNT", b"7", b"STREAMS", f"{prefix}wake".encode(),
                                     b.encode(), b"5-5", b"0-0"]))
    r.ring(a, False)
    assert r._command(b"5-5") == (_resp([b"XREAD", b"COUNT", b"7", b"BLOCK", b"200", b"STREAMS",
                                         f"{prefix}wake".encode(), b.encode(), a.encode(), b"5-5",
                                         b"0-0", b"0-0"]), 1)
    assert (r.rung, r.following) == (0, 2)


async def test_a_rung_stream_is_read_when_its_writer_rings_with_no_sweep_needed(
        client: aioredis.Redis, prefix: str) -> None:
    """No sweep within the test: what arrives came through the ring."""
    reading, writer, wake = await _pair(client, prefix, block_ms=HOUR_MS, sweep_ms=HOUR_MS)
    key = f"{prefix}call:in"
    try:
        await reading.reader.add(key)
        reading.reader.ring(key, True)
        writer.ring(key, wake)
        for n in range(3):
            writer.xadd(key, {b"k": b"m", b"v": b"%d" % n})
            await reading.wait_for(b"%d" % n)
        assert [v for _k, v in reading.got] == [b"0", b"1", b"2"]
        writer.ring(key, None)  # the writer stops ringing: the next entry waits (no sweep here)
        writer.xadd(key, {b"k": b"m", b"v": b"late"})
        await writer.flush()
        reading.reader.ring(key, False)  # ... until the stream is back in the blocked read
        await reading.reader._poke()
        await reading.wait_for(b"late")
    finally:
        await reading.reader.close()
        await writer.close()
        await client.delete(key)


async def test_an_entry_written_without_a_ring_is_late_not_lost_and_a_lost_wake_stream_comes_back(
        client: aioredis.Redis, prefix: str) -> None:
    reading, writer, wake = await _pair(client, prefix, block_ms=HOUR_MS, sweep_ms=50)
    key = f"{prefix}call:out"
    try:
        await reading.reader.add(key)
        reading.reader.ring(key, True)
        await client.xadd(key, {b"k": b"own", b"v": b"claim"})  # as the claim script: no ring
        await reading.wait_for(b"claim")
        # Redis lost our wake stream: rings are dropped (NOMKSTREAM) and the sweep finds the
        # entry; the reader then makes the stream anew, and rings work again.
        await client.delete(wake)
        writer.ring(key, wake)
        writer.xadd(key, {b"k": b"m", b"v": b"dropped-ring"})
        await reading.wait_for(b"dropped-ring")
        async with asyncio.timeout(10):
            while not await client.exists(wake):
                await asyncio.sleep(0.01)
    finally:
        await reading.reader.close()
        await writer.close()
        await client.delete(key)


async def test_more_than_count_waiting_on_a_rung_stream_is_read_without_another_ring(
        client: aioredis.Redis, prefix: str) -> None:
    reading, writer, wake = await _pair(client, prefix, count=7, block_ms=HOUR_MS, sweep_ms=HOUR_MS)
    key = f"{prefix}call:in"
    try:
        await reading.reader.add(key)
        reading.reader.ring(key, True)
        writer.ring(key, wake)
        for n in range(30):  # one batch, one ring
            writer.xadd(key, {b"k": b"m", b"v": b"%d" % n})
        await reading.wait_for(b"29")
        assert [v for _k, v in reading.got] == [b"%d" % n for n in range(30)]
    finally:
        await reading.reader.close()
        await writer.close()
        await client.delete(key)


async def test_a_ring_for_a_process_that_is_gone_creates_nothing(client: aioredis.Redis, prefix: str) -> None:
    writer = BatchWriter(client)
    writer.start()
    key, wake = f"{prefix}call:in", f"{prefix}wake:gone"
    try:
        writer.ring(key, wake)
        writer.xadd(key, {b"k": b"m"})
        await writer.flush()
        assert await client.exists(key) == 1 and await client.exists(wake) == 0
    finally:
        await writer.close()
        await client.delete(key)


def test_a_ring_target_must_be_a_plausible_process_id() -> None:
    assert S.ring_target(b"worker-7.a:b_c") == "worker-7.a:b_c"
    assert S.ring_target("gw1") == "gw1"
    for bad in (b"", b"x" * 101, b"a b", b"wake\r\n", b"\xff", None, 7, ["w"]):
        assert S.ring_target(bad) is None, bad
    assert not S.Keys("cb:", lanes=4).rings and S.Keys("cb:").rings
