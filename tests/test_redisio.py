"""The batch writer and the multi-key reader against a real Redis: entries carry their writer's
sequence, and a pipeline re-sent after a failure mid-reply is delivered once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from callbridge.redis_server import start_redis
from shared.redisio import (
    MAX_WRITERS_PER_KEY,
    BatchWriter,
    Entries,
    KeptConnection,
    MultiReader,
    connect,
    pack_batch,
)


class CutProxy:
    """A loopback TCP proxy in front of Redis that, once armed, lets Redis answer a whole
    pipeline of `replies` bulk-string replies and then hands the client only part of the
    answer before cutting its connection: every command ran, yet the client saw a failure."""

    def __init__(self, redis_host: str, redis_port: int) -> None:
        self._upstream = (redis_host, redis_port)
        self._armed = 0
        self.cuts = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    def arm(self, replies: int) -> None:
        self._armed = replies

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            if hasattr(self._server, "close_clients"):  # 3.13+: wait_closed waits for them
                self._server.close_clients()
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*self._upstream)

        async def requests() -> None:
            while data := await client_r.read(65536):
                up_w.write(data)
                await up_w.drain()
            up_w.close()

        async def replies() -> None:
            held = b""
            while data := await up_r.read(65536):
                if not self._armed:
                    client_w.write(data)
                    await client_w.drain()
                    continue
                held += data
                if held.count(b"\r\n") >= 2 * self._armed:  # `$n\r\n<id>\r\n` per XADD
                    self._armed = 0
                    self.cuts += 1
                    client_w.write(held[: len(held) // 2])
                    await client_w.drain()
                    client_w.transport.abort()
                    return
            client_w.close()

        tasks = [asyncio.create_task(requests()), asyncio.create_task(replies())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            up_w.close()
            client_w.close()


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


def _delivered(got: Delivered, key: str) -> list[bytes]:
    return [f[b"v"] for k, entries in got if k == key.encode() for _id, f in entries]


async def _until(cond: object, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


async def test_close_returns_even_if_a_read_swallows_the_cancellation(
    redis_url: str, prefix: str, redis: aioredis.Redis
) -> None:
    """A cancellation can be lost while redis-py sends a command (Python 3.11's wait_for returns
    normally if it lands as the send completes; the reader then reads on): close() must end the
    reader anyway, promptly, or a process cannot shut down. The loss is a race, so many rounds."""
    for i in range(60):
        async with _reader(redis_url, f"{prefix}{i}:") as (reader, got):
            key = f"{prefix}c{i}"
            await reader.add(key)
            await redis.xadd(key, {b"v": b"x"})
            await _until(lambda: got, "nothing delivered")
            closing = asyncio.create_task(reader.close())
            done, _ = await asyncio.wait({closing}, timeout=3)
            assert done, f"close() hung in round {i}"


async def test_every_entry_a_batch_writer_adds_names_its_writer_and_sequence(
    redis_url: str, prefix: str, redis: aioredis.Redis
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    writers = [BatchWriter(client), BatchWriter(client)]
    key = f"{prefix}s"
    try:
        for i in range(5):
            for w in writers:
                w.xadd(key, {b"v": str(i).encode()})
        for w in writers:
            await w.flush()
    finally:
        for w in writers:
            await w.close()
        await client.aclose()
    seqs: dict[bytes, list[int]] = {}
    for _id, f in await redis.xrange(key):
        writer, _, n = f[b"q"].rpartition(b":")
        seqs.setdefault(writer, []).append(int(n))
    assert len(seqs) == 2, "each writer has an id of its own"
    assert all(ns == sorted(set(ns)) and len(ns) == 5 for ns in seqs.values()), seqs


async def test_reader_drops_what_a_writer_already_delivered_on_that_key(
    redis_url: str, prefix: str, redis: aioredis.Redis
) -> None:
    """Per key and writer, an entry whose sequence is not above the last delivered one is a
    re-sent duplicate. Entries without a sequence, or with one that is malformed, pass."""
    a, b = f"{prefix}a", f"{prefix}b"
    rows = [(a, b"w1:1", b"1"), (a, b"w1:2", b"2"), (a, b"w1:1", b"dup"), (a, b"w1:3", b"3"),
            (a, b"w2:1", b"other writer"), (a, b"w1:2", b"dup"), (a, b"w1:3", b"dup"),
            (a, b"w1:x", b"malformed"), (a, b"w1:" + b"9" * 40, b"huge"), (a, None, b"no seq"),
            (b, b"w1:1", b"other key")]
    async with _reader(redis_url, prefix) as (reader, got):
        await reader.add(a)
        await reader.add(b)
        for key, q, v in [*rows, (a, b"w1:4", b"end")]:
            await redis.xadd(key, {b"v": v} if q is None else {b"q": q, b"v": v})
        await _until(lambda: b"end" in _delivered(got, a), "the reader never got to the end")
        await _until(lambda: _delivered(got, b), "nothing delivered on the second key")
        assert _delivered(got, a) == [b"1", b"2", b"3", b"other writer", b"malformed", b"huge",
                                      b"no seq", b"end"]
        assert _delivered(got, b) == [b"other key"]
        assert reader.duplicates == 3
        # Bounded memory: a few writers per key, forgotten when the key is.
        for n in range(MAX_WRITERS_PER_KEY + 10):
            await redis.xadd(a, {b"q": f"x{n}:1".encode(), b"v": b"many"})
        await redis.xadd(a, {b"v": b"last"})
        await _until(lambda: b"last" in _delivered(got, a), "the reader never got to the last")
        assert len(reader._seen[a.encode()]) <= MAX_WRITERS_PER_KEY
        reader.remove(a)
        assert a.encode() not in reader._seen


async def test_a_pipeline_resent_after_a_failure_mid_reply_is_delivered_once(
    redis_url: str, prefix: str, redis: aioredis.Redis
) -> None:
    """Redis ran every command of a pipeline but the connection broke while the reply came back:
    the client re-sends the whole batch (redis-py's retry or the writer's), so Redis holds each
    entry twice. The reader downstream delivers each entry once, in order."""
    where = redis.connection_pool.connection_kwargs
    proxy = CutProxy(where["host"], where["port"])
    await proxy.start()
    client = connect(f"redis://127.0.0.1:{proxy.port}/0", health_check_interval=0)
    writer = BatchWriter(client)
    key = f"{prefix}in"
    n = 50
    try:
        async with _reader(redis_url, prefix) as (reader, got):
            await reader.add(key)
            await client.ping()  # the connection (and its handshake) exists before the cut
            proxy.arm(n)
            for i in range(n):
                writer.xadd(key, {b"v": str(i).encode()}, maxlen=10_000)
            await writer.flush(timeout=15)
            assert proxy.cuts == 1
            assert await redis.xlen(key) > n, "the batch was written twice (the failure happened)"
            writer.xadd(key, {b"v": b"end"})
            await writer.flush(timeout=15)
            await _until(lambda: b"end" in _delivered(got, key), "the reader never got to the end")
            assert _delivered(got, key) == [str(i).encode() for i in range(n)] + [b"end"]
            assert reader.duplicates == await redis.xlen(key) - n - 1
    finally:
        await writer.close()
        await client.aclose()
        await proxy.close()


@pytest.mark.parametrize("bad", [b"", b":", b"w:", b":1", b"w:-1", b"w:1.5", b"w:\xff", b"\x00" * 200])
async def test_a_malformed_sequence_never_breaks_the_reader(
    redis_url: str, prefix: str, redis: aioredis.Redis, bad: bytes
) -> None:
    key = f"{prefix}m"
    async with _reader(redis_url, prefix) as (reader, got):
        await reader.add(key)
        await redis.xadd(key, {b"q": bad, b"v": b"odd"})
        await redis.xadd(key, {b"q": b"w:1", b"v": b"next"})
        await _until(lambda: b"next" in _delivered(got, key), "the reader stalled")
        assert _delivered(got, key) == [b"odd", b"next"]


def test_one_redis_keeps_plain_names_and_a_cluster_tags_each_call_by_lane() -> None:
    from redis.crc import key_slot

    from shared.streams import Keys, lane_tags

    plain = Keys("cb:")
    assert plain.call("CA1") == "cb:call:CA1" and plain.inbound("CA1") == "cb:call:CA1:in"
    assert plain.workers == "cb:workers" and plain.wake("p") == "cb:wake:p"
    assert plain.lane("CA1") == 0 and plain.lane_of_key(b"cb:call:CA1:in") == 0

    keys = Keys("cb:", 16)
    for sid in ("CA" + "0" * 32, "CA" + "f" * 32, "CAabc"):
        lane = keys.lane(sid)
        names = keys.all_call_keys(sid)
        assert len({key_slot(k.encode()) for k in names}) == 1, names
        assert all(keys.lane_of_key(k.encode()) == lane for k in names)
        assert key_slot(keys.wake("p", lane).encode()) == key_slot(names[0].encode())
    control = {keys.calls, keys.workers, keys.worker("w1"), keys.worker_calls("w1"), keys.layout}
    assert len({key_slot(k.encode()) for k in control}) == 1, control
    # Lane i's tag lands in the i-th equal slice of the slots.
    for lanes in (1, 3, 16, 64):
        for i, tag in enumerate(lane_tags(lanes)):
            assert i * 16384 // lanes <= key_slot(tag.encode()) < (i + 1) * 16384 // lanes
    # A key from elsewhere (another version, a bad tag) maps to lane 0, never out of range.
    for odd in (b"cb:{99.1}call:x", b"cb:{x}call:y", b"cb:{call", b"cb:}{"):
        assert keys.lane_of_key(odd) == 0


def test_generation_counts_a_restart_and_a_rising_cluster_epoch_once() -> None:
    from shared.redisio import Generation

    g = Generation()
    assert not g.changed("run-a")  # the first one seen is no change
    assert not g.changed(None) and not g.changed("run-a")
    assert g.changed("run-b") and not g.changed("run-b")
    c = Generation()
    assert not c.changed(6) and not c.changed(6)
    assert c.changed(7)
    assert not c.changed(6), "a node that has not heard of the new epoch yet is no change"
    assert not c.changed(7) and c.changed(9)


async def test_the_packed_pipeline_writes_and_answers_as_redis_pys_does(redis_url: str, prefix: str) -> None:
    """On one Redis the batch writer packs its commands itself: the same batch sent packed and
    through redis-py's pipeline leaves the same data and the same replies, an error reply in the
    middle stays in its place, and what the packer does not know goes to redis-py's pipeline."""

    from shared.redisio import _pipeline, pack_batch

    r = aioredis.Redis.from_url(redis_url)

    def batch(tag: str) -> list[tuple[str, tuple[object, ...], dict[str, object]]]:
        s, h = f"{prefix}{tag}:s", f"{prefix}{tag}:h"
        return [
            ("xadd", (s, {b"k": b"m", b"a": bytes(range(256)) * 2, b"t": b"1"}),
             {"maxlen": 5, "approximate": True}),
            ("xadd", (s, {b"k": "é".encode(), b"v": "text"}), {}),
            ("hset", (h,), {"mapping": {"status": "live", "n": 3, "f": 0.25}}),
            ("hset", (s,), {"mapping": {"x": "1"}}),  # WRONGTYPE: a stream is not a hash
            ("expire", (h, 60), {}),
            ("eval", ("return {KEYS[1], ARGV[1]}", 1, h, 42), {}),
            ("zrem", (f"{prefix}{tag}:z", "CA1"), {}),
        ]

    try:
        packed = await _pipeline(r, batch("a"))  # type: ignore[arg-type]
        pipe = r.pipeline(transaction=False)
        for name, args, kwargs in batch("b"):
            getattr(pipe, name)(*args, **kwargs)
        plain = await pipe.execute(raise_on_error=False)
        assert len(packed) == len(plain) == 7
        assert isinstance(packed[3], ResponseError) and isinstance(plain[3], ResponseError)
        assert "WRONGTYPE" in str(packed[3])
        assert packed[2] == plain[2] == 3 and packed[4] == 1 and plain[4] is True
        assert packed[5][0].endswith(b"a:h") and packed[5][1] == plain[5][1] == b"42"
        assert packed[6] == plain[6] == 0
        for tag in ("a", "b"):
            entries = await r.xrange(f"{prefix}{tag}:s")
            assert [f for _, f in entries] == [
                {b"k": b"m", b"a": bytes(range(256)) * 2, b"t": b"1"}, {b"k": "é".encode(), b"v": b"text"}]
            assert await r.hgetall(f"{prefix}{tag}:h") == {b"status": b"live", b"n": b"3", b"f": b"0.25"}
        # A keyword the packer does not know, or a value it cannot pack: redis-py's pipeline.
        assert pack_batch([("zadd", (f"{prefix}z",), {"mapping": {"a": 1}})]) is None
        assert pack_batch([("hset", (f"{prefix}h",), {"mapping": {"a": None}})]) is None
        assert await _pipeline(r, [("zadd", (f"{prefix}a:z",), {"mapping": {"CA1": 1.0}})]) == [1]  # type: ignore[arg-type]
        # The connection is back in the pool, clean: the next command answers normally.
        assert await r.ping()
    finally:
        keys = [k async for k in r.scan_iter(f"{prefix}*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


async def test_the_readers_kept_command_is_the_xread_of_what_it_follows(redis_url: str, prefix: str) -> None:
    """The reader keeps its XREAD packed and patches it as streams come, go and move on: after
    such a sequence it is byte for byte the command packed afresh, and reads go on."""
    from shared.redisio import _resp

    r = aioredis.Redis.from_url(redis_url)
    got: list[tuple[bytes, Entries]] = []
    arrived = asyncio.Event()

    def on_entries(key: bytes, entries: Entries) -> None:
        got.append((key, entries))
        arrived.set()

    reader = MultiReader(r, f"{prefix}wake", on_entries, count=7, block_ms=200)
    a, b, c = (f"{prefix}{n}" for n in "abc")

    def fresh(wake_id: bytes) -> bytes:
        names = list(reader._blocked[0])
        return _resp([b"XREAD", b"COUNT", b"7", b"BLOCK", b"200", b"STREAMS", f"{prefix}wake".encode(),
                      *names, wake_id, *(reader._ids[k] for k in names)])

    reader.start()
    try:
        for key in (a, b, c):
            await reader.add(key, "0-0")
        reader.remove(b)
        await reader.add(a, "0-0")  # following again keeps its place
        last = await r.xadd(c, {b"k": b"m"})
        await asyncio.wait_for(arrived.wait(), 10)
        assert got == [(c.encode(), [(last, {b"k": b"m"})])]
        assert reader._ids[c.encode()] == last
        assert reader._command(b"7-7") == (fresh(b"7-7"), 1)
        arrived.clear()
        await r.xadd(a, {b"k": b"m"})
        await asyncio.wait_for(arrived.wait(), 10)  # the moved-on command reads on
        assert [k for k, _ in got] == [c.encode(), a.encode()]
    finally:
        await reader.close()
        await r.delete(a, c)
        await r.aclose()


async def test_the_client_cpu_bench_runs_both_ways_and_reports(redis_url: str) -> None:
    """`python -m callbridge.bench_redisio` on a few rounds: every figure is there (no speed is
    judged: the machine is shared). Database 15 of the test server, which it empties."""
    from urllib.parse import urlsplit, urlunsplit

    from callbridge.bench_redisio import run

    url = urlunsplit(urlsplit(redis_url)._replace(path="/15"))
    figures = await run(url, rounds=1, per_round=5)
    assert set(figures) == {"write packed", "write redis-py", "read packed", "read redis-py"}
    assert all(f["min_us"] > 0 and f["median_us"] >= f["min_us"] for f in figures.values())


def test_an_xadd_packed_from_kept_parts_is_byte_for_byte_the_plain_packing() -> None:
    """`pack_batch` keeps each stream's XADD of a set of field names as a template; the result
    must be the RESP of the plain argument list, however often a key or a field name comes back,
    whatever the key, names and values hold."""
    from shared.redisio import _resp

    def plain(key: str, fields: dict, maxlen: int | None, approximate: bool) -> bytes:  # type: ignore[type-arg]
        parts = [b"XADD", key.encode()]
        if maxlen:
            parts += [b"MAXLEN", b"~" if approximate else b"=", b"%d" % maxlen]
        parts.append(b"*")
        for k, v in fields.items():
            k = k if isinstance(k, bytes) else k.encode()
            parts += [k, v if isinstance(v, bytes) else str(v).encode()]
        return _resp(parts)

    cases = [("cb:call:CA1:in", {b"k": b"m", b"a": b"\x00\xff" * 80, b"t": b"17"}, 2000, True),
             ("cb:call:CA1:in", {b"k": b"mark", b"v": "name", b"t": 18}, 2000, True),
             ("cb:call:CA1:in", {b"k": b"m"}, 2000, False),
             ("cb:call:CA2:out", {b"a-much-longer-field-name": b"", "e": b"3"}, None, False),
             ("cb:call:CA2:out", {b"k": b"\r\n$3\r\n"}, None, False),
             ("cb:%s:%d:in", {b"%d": b"%s%%", b"t": "%x"}, 100, True),  # '%' anywhere
             ("cb:call:CA1:in", {b"t": b"17", b"k": b"m", b"a": b"x"}, 2000, True)]  # another order
    for _ in range(2):  # the second time from the kept parts
        for key, fields, maxlen, approximate in cases:
            kw = {"maxlen": maxlen, "approximate": approximate} if maxlen else {}
            assert pack_batch([("xadd", (key, fields), kw)]) == plain(key, fields, maxlen, approximate)


async def test_the_writer_and_the_reader_keep_one_connection_each_and_survive_it_being_killed(
        redis_url: str, prefix: str) -> None:
    """Each holds one pooled connection across round trips (`KeptConnection`); when Redis drops it
    (CLIENT KILL, a restart), the next round trip reconnects, and nothing is lost."""
    r = aioredis.Redis.from_url(redis_url)
    admin = aioredis.Redis.from_url(redis_url)
    key = f"{prefix}kept"
    got: list[bytes] = []
    arrived = asyncio.Event()

    def on_entries(_key: bytes, entries: Entries) -> None:
        got.extend(f[b"v"] for _id, f in entries)
        arrived.set()

    reader = MultiReader(r, f"{prefix}wake:kept", on_entries, block_ms=200)
    writer = BatchWriter(r)
    reader.start()
    writer.start()
    try:
        await reader.add(key)

        async def write_and_see(v: bytes) -> None:
            writer.xadd(key, {b"v": v})
            await writer.flush()
            async with asyncio.timeout(10):
                while v not in got:
                    arrived.clear()
                    await arrived.wait()

        for n in range(5):
            await write_and_see(b"%d" % n)
        writer_conn, reader_conn = writer._conn._conn, reader._conn._conn
        assert writer_conn is not None and reader_conn is not None and writer_conn is not reader_conn
        await write_and_see(b"again")
        assert (writer._conn._conn, reader._conn._conn) == (writer_conn, reader_conn), "kept"
        before = [conn._writer.get_extra_info("sockname")[:2] for conn in (writer_conn, reader_conn)]
        for host, port in before:  # as Redis sees them: our side's address
            assert await admin.client_kill_filter(_id=None, addr=f"{host}:{port}") == 1
        for n in range(5, 10):
            await write_and_see(b"%d" % n)
        after = [conn._writer.get_extra_info("sockname")[:2] for conn in (writer_conn, reader_conn)]
        assert all(a != b for a, b in zip(after, before, strict=True)), "both reconnected"
        assert got == [b"0", b"1", b"2", b"3", b"4", b"again", *(b"%d" % n for n in range(5, 10))]
    finally:
        await reader.close()
        await writer.close()
        assert writer._conn._conn is None and reader._conn._conn is None, "given back at close"
        await admin.delete(key)
        await admin.aclose()
        await r.aclose()


async def test_a_redis_url_naming_a_unix_socket_carries_the_data_path(tmp_path: Path) -> None:
    """REDIS_URL=unix:///path (Redis on the same host): the batch writer and the reader work
    over it as over TCP. (redis-py's Unix connection refuses the TCP keepalive option `connect`
    gives TCP connections: every command failed with a TypeError before.)"""
    sock = str(tmp_path / "redis.sock")
    if len(sock) > 100:  # the kernel's bound on a socket path is 108 bytes
        sock = os.path.join(tempfile.mkdtemp(prefix="cb-"), "redis.sock")
    server = start_redis(unix_socket=sock)
    r = connect(f"UNIX://{sock}")  # the scheme in any case, as redis-py reads it
    got: list[bytes] = []
    arrived = asyncio.Event()

    def on_entries(_key: bytes, entries: Entries) -> None:
        got.extend(f[b"v"] for _id, f in entries)
        arrived.set()

    reader = MultiReader(r, "wake:unix", on_entries, block_ms=200)
    writer = BatchWriter(r)
    try:
        reader.start()
        writer.start()
        assert await r.ping()
        await reader.add("unix:stream")
        for n in range(5):
            writer.xadd("unix:stream", {b"v": b"%d" % n})
        await writer.flush()
        async with asyncio.timeout(10):
            while len(got) < 5:
                arrived.clear()
                await arrived.wait()
        assert got == [b"0", b"1", b"2", b"3", b"4"]
        assert writer._conn._conn is not None and "redis.sock" in str(writer._conn._conn.path)
    finally:
        await reader.close()
        await writer.close()
        await r.aclose()
        server.stop()


async def test_a_kept_connection_idle_past_its_bound_is_checked_before_use(
        redis_url: str, prefix: str) -> None:
    """A server or proxy may close an idle connection; the writer's next batch must not fail on
    it (a logged Redis error and a backoff), as it would if the kept connection were used as is."""
    r = aioredis.Redis.from_url(redis_url)
    admin = aioredis.Redis.from_url(redis_url)
    errors: list[str] = []
    writer = BatchWriter(r, on_error=errors.append)
    writer.start()
    key = f"{prefix}idle"
    try:
        writer.xadd(key, {b"v": b"1"})
        await writer.flush()
        conn = writer._conn._conn
        host, port = conn._writer.get_extra_info("sockname")[:2]
        assert await admin.client_kill_filter(_id=None, addr=f"{host}:{port}") == 1
        await _until(lambda: conn._reader.at_eof(), "the close to reach the client")  # idle time
        writer._conn.IDLE_S = 0.0  # as if it had been idle past the bound
        writer.xadd(key, {b"v": b"2"})
        await writer.flush()
        assert errors == [], "the dead connection was noticed before the batch, not by its failure"
        assert [f[b"v"] for _id, f in await admin.xrange(key)] == [b"1", b"2"]
    finally:
        await writer.close()
        await admin.delete(key)
        await admin.aclose()
        await r.aclose()


def test_the_flush_hook_and_the_hop_sample_time_one_audio_frame_in_every() -> None:
    """Hop histograms time one frame in HOP_SAMPLE (two observations a frame per tier cost ~2 %
    of a worker); other kinds of entry are not counted."""
    from shared import metrics
    from shared.redisio import media_latency_observer

    seen: list[float] = []
    hook = media_latency_observer(seen.append, every=3)
    no_kw: dict[str, object] = {}
    media = ("xadd", ("k", {b"k": b"m", b"t": b"1000000000"}), no_kw)
    mark = ("xadd", ("k", {b"k": b"mark", b"t": b"1000000000"}), no_kw)
    hook([media, mark, media, mark, media, media, media, media, media], 3_000_000_000)
    assert seen == [2.0, 2.0], "the 3rd and 6th audio entries, marks not counted"
    sample = metrics.Sample(every=metrics.HOP_SAMPLE)
    assert [sample.due() for _ in range(2 * metrics.HOP_SAMPLE)].count(True) == 2


async def test_the_read_hook_sees_a_whole_reads_fresh_entries_before_any_is_handed_out(
    redis_url: str, prefix: str, redis: aioredis.Redis
) -> None:
    """`on_read` (the worker converts a read's caller audio in one pass there) is called once per
    read with every stream's fresh entries, before `on_entries` gets the first of them; a hook
    that raises costs nothing but its own work."""
    client = aioredis.Redis.from_url(redis_url)
    seen: list[str] = []

    def on_read(batch: list[tuple[bytes, Entries]]) -> None:
        seen.append("read:" + ",".join(sorted(f"{k.decode()}={len(e)}" for k, e in batch)))
        if len(seen) == 1:
            raise RuntimeError("a broken hook")

    reader = MultiReader(client, f"{prefix}wake:hook",
                         lambda key, entries: seen.append(f"entries:{key.decode()}"), on_read=on_read)
    a, b = f"{prefix}a", f"{prefix}b"
    await redis.xadd(a, {b"v": b"1"})
    await redis.xadd(a, {b"v": b"2"})
    await redis.xadd(b, {b"v": b"3"})
    await reader.add(a)
    await reader.add(b)
    reader.start()
    try:
        await _until(lambda: len([s for s in seen if s.startswith("entries:")]) >= 2, "not delivered")
        first = seen.index(next(s for s in seen if s.startswith("entries:")))
        assert first > 0 and seen[first - 1].startswith("read:"), seen
        reads = [s for s in seen if s.startswith("read:")]
        assert f"read:{a}=2,{b}=1" in reads or reads == [f"read:{a}=2", f"read:{b}=1"], seen
        before = len(seen)
        await redis.xadd(b, {b"v": b"4"})
        await _until(lambda: len(seen) >= before + 2, "the reader stopped after the broken hook")
        assert seen[before:before + 2] == [f"read:{b}=1", f"entries:{b}"], seen
    finally:
        await reader.close()
        await client.aclose()


async def test_a_kept_round_trip_past_its_deadline_is_cut_and_the_next_one_reconnects(
        redis_url: str, prefix: str) -> None:
    """The kept connection's deadline is one loop timer, re-armed only when it fires: round trips
    that each end in time pass it however long they go on; one that gets no reply in time has
    its connection cut (a TimeoutError, which every caller treats as a transient failure), an
    error reply stays in its place, and the next round trip reconnects."""
    r = aioredis.Redis.from_url(redis_url)
    kept = KeptConnection(r)
    ping = b"*1\r\n$4\r\nPING\r\n"
    try:
        assert await kept.round_trip(ping, 1, 0.3) == [b"PONG"]  # connects (redis-py's path)
        loop = asyncio.get_running_loop()
        until = loop.time() + 0.8  # past the first deadline, with round trips in flight
        n = 0
        while loop.time() < until:
            assert await kept.round_trip(ping * 2, 2, 0.3) == [b"PONG", b"PONG"]
            n += 1
        assert n > 10, n
        key = f"{prefix}k"
        packed = pack_batch([("set", (key, "x"), {}), ("incr", (key,), {})])
        assert packed is not None
        got = await kept.round_trip(packed + ping, 3, 0.3)  # INCR of "x": an error reply
        assert got[0] == b"OK" and isinstance(got[1], ResponseError) and got[2] == b"PONG", got
        conn = kept._conn
        block = f"*3\r\n$5\r\nBLPOP\r\n${len(prefix) + 5}\r\n{prefix}empty\r\n$2\r\n10\r\n".encode()
        started = loop.time()
        with pytest.raises(RedisTimeoutError):
            await kept.round_trip(block, 1, 0.3)
        assert 0.25 < loop.time() - started < 3, "cut at its deadline, not at the server's"
        assert not conn.is_connected
        assert await kept.round_trip(ping, 1, 0.3) == [b"PONG"], "reconnected"
    finally:
        await kept.release()
        await r.aclose()


async def test_a_kept_connection_cut_by_a_stall_or_by_redis_is_made_anew_before_the_next_trip(
        redis_url: str, prefix: str) -> None:
    """Two ways a kept connection dies between round trips: the loop stalls past a deadline (the
    watchdog cuts the connection in the same turn as the replies come, so the trip may still
    succeed), or Redis closes it (CLIENT KILL). Either way the next round trip must not be the
    one that finds out: it connects anew and succeeds."""
    r = aioredis.Redis.from_url(redis_url)
    admin = aioredis.Redis.from_url(redis_url)
    kept = KeptConnection(r)
    ping = b"*1\r\n$4\r\nPING\r\n"
    loop = asyncio.get_running_loop()
    try:
        assert await kept.round_trip(ping, 1, 0.3) == [b"PONG"]
        trip = asyncio.create_task(kept.round_trip(ping, 1, 0.3))
        await asyncio.sleep(0)  # written; now the loop stalls past the deadline
        loop.call_soon(time.sleep, 0.5)
        try:
            assert await trip == [b"PONG"]
        except RedisTimeoutError:
            pass  # cut before the reply was read: as good
        assert await kept.round_trip(ping, 1, 0.3) == [b"PONG"], "the trip after a stall"

        conn = kept._conn
        host, port = conn._writer.get_extra_info("sockname")[:2]
        assert await admin.client_kill_filter(_id=None, addr=f"{host}:{port}") == 1
        await _until(lambda: conn._writer.transport.is_closing() or conn._reader.at_eof(),
                     "the close never arrived")
        assert await kept.round_trip(ping, 1, 0.3) == [b"PONG"], "the trip after CLIENT KILL"
    finally:
        await kept.release()
        await r.aclose()
        await admin.aclose()
