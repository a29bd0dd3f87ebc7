"""Redis access that scales past one call per connection.

Measured here (docs/performance.md, "Redis writes" and "Redis reads"): an awaited redis-py
command costs 60-75 µs of client CPU, and one blocked XREAD per call both costs 2-3x more per
message and runs into redis-py's 100-connection pool limit. So each process owns exactly two
data-path connections:

- `BatchWriter`: every XADD due in this loop iteration goes out in one pipeline, flushed as soon
  as the loop is free (no timer, so batching adds no delay). One flusher keeps per-key order.
- `MultiReader`: one multi-key `XREAD BLOCK` over every stream this process follows. Adding a
  stream wakes the blocked read through a per-process wake stream instead of waiting it out.

On a Redis Cluster a multi-key read must stay in one slot, so each of these exists once per lane
(`LaneReader`, `LaneWriter`; docs/architecture.md section 9); on one Redis there is one lane.

A pipeline that fails while its reply comes back has run in Redis, in part or in full, and is
sent again (by redis-py's retry or by the writer's), so an entry can be written twice. Writes
cannot be made exactly-once cheaply, so duplicates are made harmless instead: every entry a
writer adds carries `q` = `<writer id>:<n>` (n increasing per writer), and the reader delivers,
per stream and writer, only entries whose n is above the last it delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.streams import Keys
from shared.tasks import stop_tasks

try:  # hiredis's "no whole reply yet", as redis-py configures its reader
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # another redis-py: every reply through `read_response`
    _NOT_ENOUGH_DATA = None

log = logging.getLogger("callbridge.redis")


# Retries back off up to this: a cluster's replica takes over ~2.5 s after its primary died, and
# the call's audio must flow again within 1 s of that through four retrying loops (gateway
# writer, worker reader, worker writer, gateway reader), so each may sleep only briefly.
# (Only the first failure of a run is logged; every one is counted.)
MAX_BACKOFF_S = 0.1
# A rung stream (MultiReader) is read at least this often even when nothing rings.
RING_SWEEP_MS = 100
WAKE_TTL_S = 60  # a process's wake stream outlives it by at most this


class _PartialWrite(Exception):
    """Part of a pipeline failed for a reason worth retrying (a cluster node away, a slot moving)."""

    def __init__(self, batch: Batch) -> None:
        super().__init__(f"{len(batch)} commands to retry")
        self.batch = batch


def _retryable(result: Any) -> bool:
    return isinstance(result, (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError,
                               TryAgainError, MovedError, AskError, RedisClusterException))


def _name(exc: BaseException) -> str:
    return type(exc).__name__


# What a Redis call on the data path may raise that is worth retrying: Redis's and the OS's errors,
# and what redis-py's cluster client raises when a topology refresh (at start, or after a node
# died) closes a connection under a command in flight: AttributeError or RuntimeError from the
# closed transport (seen with redis-py 8.1), or RedisClusterException when no node it knows
# answers. Each must cost a retry, never the process.
TRANSIENT: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError,
                                          AttributeError, RuntimeError)

T = TypeVar("T")
Fields = dict[bytes, bytes]
Entries = list[tuple[bytes, Fields]]
OnEntries = Callable[[bytes, Entries], None]
OnError = Callable[[str], None]
OnRead = Callable[[list[tuple[bytes, Entries]]], None]
Batch = list[tuple[str, tuple[Any, ...], dict[str, Any]]]
OnFlushed = Callable[[Batch, int], None]

SEQ_FIELD = b"q"
# Writers the reader remembers per stream: a stream has one writer at a time (a gateway socket,
# an owning worker) and a few over its life (re-attaches, takeovers); past this the one first
# seen is forgotten, so a flood of odd ids in Redis cannot grow the reader's memory.
MAX_WRITERS_PER_KEY = 16


def media_latency_observer(observe: Callable[[float], None], kind: bytes = b"m",
                           every: int = 1) -> OnFlushed:
    """A flush hook timing audio entries (one in `every`) from their sender stamp to Redis
    acknowledging them."""
    n = 0

    def on_flushed(batch: Batch, now_ns: int) -> None:
        nonlocal n
        for name, args, _kw in batch:
            if name == "xadd":
                fields = args[1]
                if fields.get(b"k") == kind:
                    n += 1
                    if n >= every:
                        n = 0
                        t = fields.get(b"t")
                        if t is not None:
                            observe((now_ns - int(t)) / 1e9)

    return on_flushed


class _Cluster(RedisCluster):
    """RedisCluster that finds the slot of XREAD and XREADGROUP itself. redis-py asks the server
    (COMMAND GETKEYS, a round trip) for every command whose keys can move, so each blocked read
    of a lane would cost two round trips; those keys are simply what follows STREAMS."""

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if str(command).upper() in ("XREAD", "XREADGROUP"):
            words = [a.upper() if isinstance(a, str) else a for a in args]
            at = next((i for i, a in enumerate(words) if a in ("STREAMS", b"STREAMS")), None)
            if at is not None:
                rest = args[at + 1:]
                slots = {self.keyslot(k) for k in rest[:len(rest) // 2]}
                if len(slots) != 1:
                    raise RedisClusterException(f"{command} - all keys must map to the same key slot")
                return slots.pop()
        return await super()._determine_slot(command, *args)


async def retry_for(seconds: float, op: Callable[[], Awaitable[T]]) -> T:
    """`op()` until it succeeds or `seconds` have passed, then its last error: for a request that
    can wait out a cluster's failover. `seconds` = 0 tries once."""
    deadline = time.monotonic() + seconds
    backoff = 0.05
    while True:
        try:
            return await op()
        except TRANSIENT:
            if time.monotonic() + backoff > deadline:
                raise
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)


class Generation:
    """What changes when Redis may have lost acknowledged writes, so a process re-asserts what it
    knows: one Redis's run_id (a restart, perhaps empty), or a cluster's current epoch, which a
    replica's promotion raises (it may lack the dead primary's last writes). A cluster's nodes
    learn a new epoch by gossip, one after another, so only a rise counts there: asking a node
    that has not heard yet must not look like a second change."""

    def __init__(self) -> None:
        self.value: str | int | None = None

    @staticmethod
    async def read(redis: aioredis.Redis) -> str | int | None:
        """The current value (None when Redis cannot say; the answer is untrusted)."""
        try:
            if isinstance(redis, RedisCluster):
                info: Any = await redis.cluster_info()
                epoch = info.get("cluster_current_epoch") if isinstance(info, dict) else None
                return int(epoch) if isinstance(epoch, (int, str)) and str(epoch).isdigit() else None
            server: Any = await redis.info("server")
        except TRANSIENT:
            return None
        run_id = server.get("run_id") if isinstance(server, dict) else None
        return run_id if isinstance(run_id, str) and run_id else None

    def changed(self, value: str | int | None) -> bool:
        """Whether `value` is a change from the last one seen (the first one seen is not)."""
        if value is None:
            return False
        known = self.value
        if isinstance(value, int) and isinstance(known, int):
            if value <= known:
                return False
        elif known == value:
            return False
        self.value = value
        return known is not None


async def warm(*clients: aioredis.Redis) -> None:
    """Let each cluster client learn the topology before loops share it: redis-py's cluster client
    races when many commands start at once on a fresh client (each fails with a ConnectionError).
    A cluster that cannot be reached yet is left to the loops, which retry; a node that is not in
    cluster mode is a configuration error."""
    for client in clients:
        if isinstance(client, RedisCluster):
            try:
                await client.initialize()
            except TRANSIENT as exc:
                if "cluster mode is not enabled" in str(exc).lower():
                    from shared.settings import ConfigError

                    raise ConfigError("invalid setting REDIS_CLUSTER: true, but the Redis at "
                                      "REDIS_URL is not in cluster mode") from None


async def check_layout(redis: aioredis.Redis, keys: Keys) -> None:
    """Refuse to run with a lane count other than the one the deployment's first process wrote:
    with two counts, the tiers would name a call's keys differently and no call would be served.
    A Redis that cannot be reached is not an error here (the loops wait for it). Without lanes,
    a cluster node at REDIS_URL is refused too: its MOVED answers would fail every call."""
    from shared.settings import ConfigError

    if not keys.lanes:
        try:
            info: Any = await redis.info("cluster")
        except TRANSIENT:
            return
        if isinstance(info, dict) and str(info.get("cluster_enabled")) == "1":
            raise ConfigError("invalid setting REDIS_CLUSTER: false, but the Redis at REDIS_URL "
                              "is a cluster node (set REDIS_CLUSTER=true)")
        return
    want = f"lanes={keys.lanes}".encode()
    try:
        await redis.set(keys.layout, want, nx=True)
        have = await redis.get(keys.layout)
    except TRANSIENT:
        return
    if have is not None and have != want:
        raise ConfigError(f"invalid setting REDIS_LANES: {keys.lanes}, but this deployment runs "
                          f"with {have!r} (key {keys.layout})")


def connect(url: str, *, cluster: bool = False, **kwargs: Any) -> aioredis.Redis:
    """A client with TCP keepalives (but over a Unix socket) and a pool that waits instead of
    failing when busy.

    With `cluster`, a Redis Cluster client that found the cluster from the one node `url` names.
    It is typed as `Redis` because it offers every command, pipeline and script call this code
    makes with the same signatures, so one code path serves both (the cluster tests prove it)."""
    if cluster:
        return cast(aioredis.Redis, _Cluster.from_url(
            url,
            max_connections=kwargs.pop("max_connections", 64),
            socket_timeout=kwargs.pop("socket_timeout", 5),
            socket_keepalive=True,
            socket_connect_timeout=kwargs.pop("socket_connect_timeout", 3),
            # A primary that died is retried by our loops (short backoff), not in redis-py:
            # its retries would hold the whole batch while the replica is promoted.
            retry=Retry(NoBackoff(), 1),
            **kwargs,
        ))
    if urlsplit(url).scheme.lower() != "unix":  # redis-py's Unix socket connection refuses keepalives
        kwargs.setdefault("socket_keepalive", True)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=kwargs.pop("max_connections", 64),
        timeout=kwargs.pop("pool_timeout", 5),
        # A black-holed connection must fail in seconds, not after the OS keepalive (~2 h);
        # blocked reads here block for at most 1 s.
        socket_timeout=kwargs.pop("socket_timeout", 5),
        socket_connect_timeout=kwargs.pop("socket_connect_timeout", 3),
        health_check_interval=kwargs.pop("health_check_interval", 15),
        **kwargs,
    )
    return aioredis.Redis(connection_pool=pool)


class BatchWriter:
    """Pipelines commands issued in the same loop iteration; order preserved per process."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        max_pending: int = 200_000,
        on_error: OnError | None = None,
        on_flushed: OnFlushed | None = None,
    ) -> None:
        self._redis = redis
        self._on_flushed = on_flushed
        self._pending: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self._wake = asyncio.Event()
        self._max_pending = max_pending
        self._on_error = on_error
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.dropped = 0
        self.batches = 0
        self._writer_id = uuid.uuid4().hex[:12].encode()
        self._seq = 0
        self._conn = KeptConnection(redis)
        self._rings: dict[str, str] = {}  # stream -> the wake stream of the process reading it
        self._ring_due: set[str] = set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="redis-batch-writer")

    def tasks(self) -> list[asyncio.Task[None]]:
        """The background task, for the process to supervise (it must never end)."""
        return [self._task] if self._task is not None else []

    @property
    def clients(self) -> list[aioredis.Redis]:
        """Clients of its own to warm up: none (it writes through the one it was given)."""
        return []

    def xadd(self, key: str, fields: Fields, maxlen: int | None = None) -> None:
        """Queue an XADD. Takes `fields` over: it gains the `q` field (writer id and sequence),
        which a re-sent copy of the entry keeps, so a reader can tell it is one."""
        kw: dict[str, Any] = {}
        if maxlen:
            kw = {"maxlen": maxlen, "approximate": True}
        self._seq += 1
        fields[SEQ_FIELD] = b"%s:%d" % (self._writer_id, self._seq)
        self._push("xadd", (key, fields), kw)
        if self._rings:
            wake = self._rings.get(key)
            if wake is not None:
                self._ring_due.add(wake)

    def ring(self, key: str, wake_key: str | None) -> None:
        """After each batch that wrote to `key`, ring `wake_key` (the reader's wake stream: see
        `MultiReader`); None stops ringing for `key`."""
        if wake_key is None:
            self._rings.pop(key, None)
        else:
            self._rings[key] = wake_key

    def command(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Queue any pipeline-able command (hset, expire, xack…) behind the pending XADDs."""
        self._push(name, args, kwargs)

    def _push(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(self._pending) >= self._max_pending:
            self.dropped += 1
            return
        self._pending.append((name, args, kwargs))
        self._idle.clear()
        self._wake.set()

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far has been written (or failed)."""
        if self._task is None:
            self.start()
        elif self._task.done():
            return  # the writer is gone (the process is failing): nothing more will be written
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def close(self) -> None:
        try:
            await self.flush(timeout=2.0)
        except TimeoutError:
            pass
        if self._task:  # one cancel can be lost (shared/tasks.py): stop_tasks cancels again
            task, self._task = self._task, None
            ended = await stop_tasks([task], 5.0, every=1.0, what="redis writer")
            await self._conn.release(usable=ended)

    async def _run(self) -> None:
        backoff = 0.05
        failing = False
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if self._ring_due:  # after the entries they announce, in the same pipeline
                batch.extend(("ring", (wake,), _NO_KW) for wake in self._ring_due)
                self._ring_due.clear()
            if not batch:
                self._idle.set()
                continue
            try:
                results = await _pipeline(self._redis, batch, self._conn)
                # Nearly every reply is an entry id: look closer only at the errors (0.07 µs a
                # reply instead of 0.38 for the full check).
                errors = [r for r in results if isinstance(r, Exception)]
                if errors and (retry := [cmd for cmd, r in zip(batch, results, strict=False)
                                         if _retryable(r)]):
                    raise _PartialWrite(retry)  # on a cluster, one node went away: the rest landed
                backoff = 0.05
                if errors:  # e.g. OOM under noeviction: those writes are lost, say so
                    if self._on_error:
                        for _ in errors:
                            self._on_error("write")
                    log.error("redis refused writes", extra={"count": len(errors),
                                                              "error": str(errors[0])[:200]})
                if failing:
                    failing = False
                    if self._on_error:
                        self._on_error("reconnect")
            except (RedisError, OSError, AttributeError, RuntimeError, _PartialWrite) as exc:
                if isinstance(exc, _PartialWrite):
                    batch = exc.batch
                # Redis is away: keep the batch (bounded) and retry, so an outage costs latency
                # rather than audio, up to max_pending entries.
                if self._on_error:
                    self._on_error("write")
                if not failing:
                    log.warning("redis write failed, retrying", extra={"error": _name(exc)})
                failing = True
                keep = self._max_pending - len(self._pending)
                self.dropped += max(0, len(batch) - keep)
                self._pending = batch[:keep] + self._pending
                self._wake.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            self.batches += 1
            if self._on_flushed is not None:
                self._on_flushed(batch, time.time_ns())
            if not self._pending:
                self._idle.set()


async def _pipeline(redis: aioredis.Redis, batch: Batch, kept: KeptConnection | None = None) -> list[Any]:
    """Send the batch as one pipeline; each command's reply or error, in order.

    On one Redis the commands are packed here and written on a pooled connection in one go, and
    the replies read back raw (redis-py's pipeline objects, argument builders and reply callbacks
    cost about as much as everything else a frame takes in this process: docs/performance.md,
    "Redis writes"). A cluster client, or a command this packer does not know, takes redis-py's
    pipeline."""
    packed = None if isinstance(redis, RedisCluster) else pack_batch(batch)
    if packed is None:
        pipe = redis.pipeline(transaction=False)
        for name, args, kwargs in batch:
            if name == "ring":
                pipe.execute_command(*_ring_parts(args[0]))
            else:
                getattr(pipe, name)(*args, **kwargs)
        return list(await pipe.execute(raise_on_error=False))
    return await _raw(redis, packed, len(batch), _socket_timeout(redis), kept)


RAW_TIMEOUT_S = 5.0


def _closed(conn: Any) -> bool:
    """Whether the peer closed a connected, idle connection (or our watchdog cut it): the
    transport is closing, or the reader has seen the end of the stream (asyncio keeps a
    transport half-open on EOF)."""
    writer, reader = getattr(conn, "_writer", None), getattr(conn, "_reader", None)
    return bool((writer is not None and writer.transport.is_closing())
                or (reader is not None and reader.at_eof()))


_DRAIN_ABOVE = 1 << 20  # bytes waiting in the transport before a round trip awaits the drain


def _socket_timeout(redis: aioredis.Redis) -> float:
    return float(redis.connection_pool.connection_kwargs.get("socket_timeout") or RAW_TIMEOUT_S)


async def _raw(redis: aioredis.Redis, packed: bytes, replies: int, timeout: float,
               kept: KeptConnection | None = None) -> list[Any]:
    """Write `packed` on a pooled connection (or the one `kept`) and read `replies` raw replies
    (an error reply is returned in its place); any failure drops the connection, whose replies
    are then unknown (a kept one reconnects at its next use)."""
    if kept is not None:
        return await kept.round_trip(packed, replies, timeout)
    pool = redis.connection_pool
    conn = await pool.get_connection()
    try:
        return await _round_trip(conn, packed, replies, timeout)
    finally:
        await pool.release(conn)


async def _round_trip(conn: Any, packed: bytes, replies: int, timeout: float) -> list[Any]:
    """One round trip through redis-py's own calls on `conn` (which they connect if need be)."""
    try:
        async with asyncio.timeout(timeout):  # one deadline for the batch, not one per reply
            await conn.send_packed_command(packed, check_health=False)
            out: list[Any] = []
            for _ in range(replies):
                try:
                    out.append(await conn.read_response(timeout=math.inf))
                except ResponseError as exc:  # this command's error; the next reply follows
                    out.append(exc)
        return out
    except BaseException:
        await conn.disconnect(nowait=True)
        raise


async def _replies(parser: Any, n: int) -> list[Any]:
    """`n` replies off `parser` (an error reply in its place), taken from hiredis's reader in one
    loop: redis-py's `read_response` is a coroutine per reply, and a round trip of the data path
    carries several (docs/performance.md, "What the 3 December evening round changed"). It is
    `read_response`'s loop, inlined: a reply that says the connection is broken is raised, a
    push message (RESP3 only; these connections speak RESP2) handed to redis-py. Without
    hiredis, `read_response` each."""
    reader = getattr(parser, "_reader", None)
    if _NOT_ENOUGH_DATA is None or reader is None or not hasattr(parser, "read_from_socket"):
        return [await parser.read_response() for _ in range(n)]
    gets, push = reader.gets, getattr(parser, "_hiredis_PushNotificationType", None) or ()
    out: list[Any] = []
    while len(out) < n:
        reply = gets()
        if reply is _NOT_ENOUGH_DATA:
            await parser.read_from_socket()
        elif isinstance(reply, RedisConnectionError):
            raise reply
        elif isinstance(reply, list) and reply and isinstance(reply[0], RedisConnectionError):
            raise reply[0]
        elif push and isinstance(reply, push):
            await parser.handle_push_response(reply)
        else:
            out.append(reply)
    return out


class KeptConnection:
    """One pooled connection held by a user that issues one command at a time (a writer's
    flusher, a reader's loop). Taking and giving back a pooled connection for every round trip
    cost about 3 % of a worker (redis-py's pool lock, its deprecation wrapper, the release).

    Its round trips write on the connection's stream and read through its reply parser directly,
    under a deadline kept by one loop timer that is re-armed only when it fires: redis-py's
    `send_packed_command` and `read_response` set a timeout each (two timer handles per round
    trip, with ours) and format the host name for an error that rarely comes
    (docs/performance.md, "Against a direct bridge")."""

    IDLE_S = 5.0  # idle longer, it is checked before use

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis  # a cluster client has no pool of its own, and is never asked here
        self._conn: Any = None
        self._used_at = 0.0
        self._deadline: float | None = None  # of the round trip in flight (loop time)
        self._watchdog: asyncio.TimerHandle | None = None
        self._expired: Any = None  # the connection the watchdog cut

    async def round_trip(self, packed: bytes, replies: int, timeout: float) -> list[Any]:
        """Write `packed`, read `replies` raw replies (an error reply in its place); a failure or
        the deadline drops the connection, whose replies are then unknown (it reconnects at its
        next use)."""
        conn = await self.get()
        writer, parser = getattr(conn, "_writer", None), getattr(conn, "_parser", None)
        if writer is None or parser is None or not conn.is_connected or _closed(conn):
            if conn.is_connected:
                await conn.disconnect(nowait=True)  # closed by Redis, or cut: connect anew
            return await _round_trip(conn, packed, replies, timeout)  # connects; any redis-py
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + timeout
        if self._watchdog is None:
            self._watchdog = loop.call_at(self._deadline, self._expire)
        try:
            writer.write(packed)
            if writer.transport.get_write_buffer_size() > _DRAIN_ABOVE:
                await writer.drain()
            out = await _replies(parser, replies)
        except asyncio.CancelledError:
            await conn.disconnect(nowait=True)
            raise
        except BaseException as exc:
            await conn.disconnect(nowait=True)
            if self._expired is conn:
                raise RedisTimeoutError(f"no reply within {timeout:.1f} s") from exc
            raise
        finally:
            self._deadline = None
            expired, self._expired = self._expired, None
        if expired is conn:  # the replies came, but in the loop turn the watchdog cut them off
            await conn.disconnect(nowait=True)
        return out

    def _expire(self) -> None:
        """The watchdog: a round trip past its deadline has its connection cut, which ends its
        read at once; one still within it re-arms the timer for its own deadline. (A trip with a
        shorter timeout than the one that armed the timer is cut when that timer fires: at most
        the difference late, under a second for the reader's block times.)"""
        self._watchdog = None
        if self._deadline is None:
            return  # idle: the next round trip arms it again
        loop = asyncio.get_running_loop()
        if loop.time() < self._deadline:
            self._watchdog = loop.call_at(self._deadline, self._expire)
            return
        conn = self._conn
        transport = getattr(getattr(conn, "_writer", None), "transport", None)
        if transport is not None:
            self._expired = conn
            transport.abort()

    async def get(self) -> Any:
        now = time.monotonic()
        if self._conn is not None and now - self._used_at > self.IDLE_S:
            # A server or proxy may have closed an idle connection: used as is, the next batch
            # would fail, be logged and counted as a Redis error, and wait a backoff. (redis-py's
            # pool skips its own check while its maintenance notifications are on, the default.)
            try:
                stale = await self._conn.can_read()  # the close, or a reply nobody read
            except (RedisError, OSError):
                stale = True
            if stale:
                await self._conn.disconnect(nowait=True)  # the next send reconnects
        if self._conn is None:
            self._conn = await self._redis.connection_pool.get_connection()
        self._used_at = now
        return self._conn

    async def release(self, usable: bool = True) -> None:
        """Give the connection back; one a task may still be using (`usable` False) is closed
        first, so no one else reads its replies."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if not usable:
                await conn.disconnect(nowait=True)
            await self._redis.connection_pool.release(conn)


async def xread(redis: aioredis.Redis, streams: dict[bytes, bytes], count: int,
                block_ms: int) -> list[tuple[bytes, Entries]]:
    """XREAD COUNT … BLOCK … STREAMS: [(key, [(id, fields)])] (empty when the block ran out).
    On one Redis packed and parsed here, without redis-py's per-call argument building and reply
    callbacks (a read at load returns a few entries, but names every stream the process follows)."""
    if isinstance(redis, RedisCluster):
        resp: Any = await redis.xread(cast(Any, streams), count=count, block=block_ms)
        items = resp.items() if isinstance(resp, dict) else (resp or [])
        return [(k, list(e)) for k, e in items]
    parts = [b"XREAD", b"COUNT", b"%d" % count, b"BLOCK", b"%d" % block_ms, b"STREAMS",
             *streams.keys(), *streams.values()]
    return (await xread_packed(redis, _resp(parts), block_ms))[0]


async def xread_packed(redis: aioredis.Redis, command: bytes, block_ms: int, replies: int = 1,
                       kept: KeptConnection | None = None) -> list[list[tuple[bytes, Entries]]]:
    """`xread` for `replies` XREADs (the first with BLOCK `block_ms`) the caller packed as RESP
    itself (on one Redis): each one's streams and entries."""
    got = await _raw(redis, command, replies, block_ms / 1000 + _socket_timeout(redis), kept)
    return [_xread_reply(reply) for reply in got]


def _xread_reply(reply: Any) -> list[tuple[bytes, Entries]]:
    if isinstance(reply, ResponseError):
        raise reply
    out: list[tuple[bytes, Entries]] = []
    items = reply.items() if isinstance(reply, dict) else (reply or ())  # RESP3: a map
    for key, entries in items:
        got: Entries = []
        for entry_id, flat in entries:
            if flat is None:  # an entry deleted after the read found it
                continue
            it = iter(flat)
            got.append((entry_id, dict(zip(it, it, strict=True))))
        out.append((key, got))
    return out


def _arg(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, int) and not isinstance(v, bool):
        return b"%d" % v
    if isinstance(v, float):
        return repr(v).encode()
    raise TypeError(f"cannot pack {type(v).__name__}")


def _resp(parts: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def _bulk(p: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(p), p)


_NO_KW: dict[str, Any] = {}


def _ring_parts(wake_key: Any) -> list[bytes]:
    """A ring: one entry on the reader's wake stream, which its blocked read names. NOMKSTREAM:
    a ring for a process that is gone (its stream deleted or expired) creates nothing."""
    return [b"XADD", _arg(wake_key), b"NOMKSTREAM", b"MAXLEN", b"1", b"*", b"r", b"1"]


def pack_batch(batch: Batch) -> bytes | None:
    """The batch as RESP, or None when a command is not one this knows: XADD (with an
    approximate MAXLEN), a ring, HSET with a mapping, and commands of plain positional arguments."""
    out = []
    try:
        for name, args, kwargs in batch:
            if name == "xadd":
                out.append(_pack_xadd(args[0], args[1], kwargs.get("maxlen"), kwargs.get("approximate")))
                continue
            if name == "ring":
                parts = _ring_parts(args[0])
            elif name == "hset" and len(args) == 1 and set(kwargs) == {"mapping"} and kwargs["mapping"]:
                parts = [b"HSET", _arg(args[0])]
                for k, v in kwargs["mapping"].items():
                    parts += [_arg(k), _arg(v)]
            elif not kwargs and name.isalpha():
                parts = [name.upper().encode(), *(_arg(a) for a in args)]
            else:
                return None
            out.append(_resp(parts))
    except (TypeError, ValueError):
        return None
    return b"".join(out)


# XADD is most of every batch (a frame is one), and all of it but the values repeats: the
# command, key and MAXLEN part per stream, and the field names. So each stream's XADD of a given
# set of field names is kept as one template, and an entry costs one format of its values:
# 1.19-1.23 -> 0.84-0.89 µs for a frame's entry against keeping the head and names apart
# (docs/performance.md, "What the 4 December round changed"). Bounded, as streams come and go.
_XADD_TEMPLATES: dict[tuple[Any, ...], bytes] = {}
_MAX_PACKED = 20_000
_VALUE = b"$%d\r\n%s\r\n"


def _pack_xadd(key: Any, fields: Fields, maxlen: Any, approximate: Any) -> bytes:
    names = tuple(fields)
    values: list[int | bytes] = []
    for v in fields.values():
        if not isinstance(v, bytes):
            v = _arg(v)
        values.append(len(v))
        values.append(v)
    template = _XADD_TEMPLATES.get((key, maxlen, approximate, names))
    if template is None:
        template = _xadd_template(key, names, maxlen, approximate)
    return template % tuple(values)


def _xadd_template(key: Any, names: tuple[Any, ...], maxlen: Any, approximate: Any) -> bytes:
    """The XADD's RESP with a `$%d\r\n%s\r\n` hole for each value (every other `%` doubled)."""
    parts = [b"XADD", _arg(key)]
    if maxlen:
        parts += [b"MAXLEN", b"~" if approximate else b"=", _arg(maxlen)]
    parts.append(b"*")
    fixed = b"*%d\r\n" % (len(parts) + 2 * len(names)) + b"".join(_bulk(p) for p in parts)
    template = fixed.replace(b"%", b"%%") + b"".join(
        _bulk(_arg(k)).replace(b"%", b"%%") + _VALUE for k in names)
    if len(_XADD_TEMPLATES) >= _MAX_PACKED:
        _XADD_TEMPLATES.clear()
    _XADD_TEMPLATES[(key, maxlen, approximate, names)] = template
    return template


class MultiReader:
    """The reads of every stream this process follows, one round trip per wake-up.

    A stream is followed in one of two ways. *Blocked*: named in one blocked multi-key XREAD, as
    any writer works with. *Rung*: its writer rings this process's wake stream after every batch
    it writes there (`BatchWriter.ring`), so only the wake stream needs to block; the rung streams
    are read without BLOCK right behind it, in the same pipeline. A blocked read costs Redis about
    2 µs per stream it names when it blocks and wakes, a plain read about 1.1 µs, and the blocked
    read is re-issued after every wake-up (docs/performance.md, "Where the rest goes"). A stream
    is rung only once its writer said it rings us (`ring`), and goes back to blocked the moment
    its writer may change; a rung stream is still read at least every RING_SWEEP_MS, so an entry
    written without a ring (the claim script's `own`, the call API) is late, never lost."""

    def __init__(
        self,
        redis: aioredis.Redis,
        wake_key: str,
        on_entries: OnEntries,
        *,
        count: int = 100,
        block_ms: int = 1000,
        sweep_ms: int = RING_SWEEP_MS,
        on_error: OnError | None = None,
        on_read: OnRead | None = None,
    ) -> None:
        self._redis = redis
        self._wake_key = wake_key.encode()
        self._sweep_ms = min(block_ms, sweep_ms)
        self._on_entries = on_entries
        self._on_read = on_read  # sees a whole read's fresh entries before they are handed out
        self._count = count
        self._block_ms = block_ms
        self._on_error = on_error
        self._ids: dict[bytes, bytes] = {}
        # The streams' names and ids as RESP, in the same order, kept up to date as they change
        # (blocked ones in `_blocked`, rung ones in `_rung`): a read names every stream, and
        # packing it afresh took 73.7 µs for 100 streams against 8.2 µs kept (docs/performance.md).
        self._blocked: tuple[dict[bytes, bytes], dict[bytes, bytes]] = ({}, {})
        self._rung: tuple[dict[bytes, bytes], dict[bytes, bytes]] = ({}, {})
        self._cluster = isinstance(redis, RedisCluster)  # a Protocol's isinstance: once, not per read
        self._rings = not self._cluster  # rings are for one Redis only
        self._conn = KeptConnection(redis)

        def head(block_ms: int | None) -> bytes:
            block = (b"BLOCK", b"%d" % block_ms) if block_ms is not None else ()
            return b"".join(_bulk(p) for p in (b"XREAD", b"COUNT", b"%d" % count, *block,
                                               b"STREAMS", self._wake_key))

        self._head = head(block_ms)
        self._head_sweep = head(self._sweep_ms)
        self._head_now = head(None)
        self._rung_head = b"".join(_bulk(p) for p in (b"XREAD", b"COUNT", b"%d" % count, b"STREAMS"))
        self._seen: dict[bytes, dict[bytes, int]] = {}  # stream -> writer id -> last n delivered
        self.duplicates = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._poked_at = 0.0
        self._poked_id: bytes | None = None  # our last poke's entry id
        self._poking: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="redis-multi-reader")

    def tasks(self) -> list[asyncio.Task[None]]:
        """The background task, for the process to supervise (it must never end)."""
        return [self._task] if self._task is not None else []

    @property
    def rung(self) -> int:
        """How many followed streams are rung (the rest are named in the blocked read)."""
        return len(self._rung[0])

    @property
    def following(self) -> int:
        return len(self._ids)

    async def close(self) -> None:
        """Stop reading. Besides the cancel, the loop checks `_closing` after every read, and a
        poke of the wake stream ends the read at once if a cancellation was lost (shared/tasks.py)."""
        self._closing = True
        if self._task:
            task = self._task
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
            if not task.done():  # the cancel was lost: end the blocked read now, not in block_ms
                await self._poke()
            self._task = None
            every = self._block_ms / 1000 + 1
            ended = await stop_tasks([task], 2 * every, every=every, what="redis reader")
            await self._conn.release(usable=ended)
        if self._poking is not None:
            await stop_tasks([self._poking], 1.0, what="redis reader poke")
        try:
            await self._redis.delete(self._wake_key)
        except (RedisError, OSError):
            pass

    async def add(self, key: str, from_id: str = "0-0") -> None:
        """Follow `key` from after `from_id`, blocked (until its writer says it rings); wakes the
        read so it takes effect now."""
        k = key.encode()
        self._rung[0].pop(k, None)
        self._rung[1].pop(k, None)
        self._ids[k] = from_id.encode()
        self._blocked[0][k] = _bulk(k)
        self._blocked[1][k] = _bulk(self._ids[k])
        self._seen.setdefault(k, {})
        await self._poke()

    def remove(self, key: str) -> None:
        k = key.encode()
        self._forget(k)
        self._ids.pop(k, None)
        self._seen.pop(k, None)

    def ring(self, key: str, rung: bool) -> None:
        """`key`'s writer rings us from now on (True), or it may not (False: a new writer)."""
        k = key.encode()
        if k not in self._ids or not self._rings:
            return
        to = self._rung if rung else self._blocked
        if k in to[0]:
            return
        self._forget(k)
        to[0][k] = _bulk(k)
        to[1][k] = _bulk(self._ids[k])

    def _forget(self, k: bytes) -> None:
        for names, ids in (self._blocked, self._rung):
            names.pop(k, None)
            ids.pop(k, None)

    def _command(self, wake_id: bytes, now: bool = False) -> tuple[bytes, int]:
        """The read as RESP, and how many replies it has: XREAD COUNT … BLOCK … STREAMS <wake,
        the blocked streams> <their ids>, then, when streams are rung, XREAD COUNT … STREAMS
        <rung streams> <their ids>. The blocked read waits at most RING_SWEEP_MS while streams
        are rung (`sweep_ms`), and not at all when `now` (a rung stream had COUNT waiting)."""
        names, ids = self._blocked
        rnames, rids = self._rung
        head = self._head_now if now else self._head_sweep if rnames else self._head
        blocked = b"".join((b"*%d\r\n" % ((6 if now else 8) + 2 * len(names)), head,
                            *names.values(), _bulk(wake_id), *ids.values()))
        if not rnames:
            return blocked, 1
        return b"".join((blocked, b"*%d\r\n" % (4 + 2 * len(rnames)), self._rung_head,
                         *rnames.values(), *rids.values())), 2

    def _fresh(self, key: bytes, entries: Entries) -> Entries:
        """`entries` without the ones their writer already delivered on `key`. Allocates nothing
        unless a duplicate is found; an entry without a well-formed `q` is passed on."""
        seen = self._seen.get(key)
        if seen is None:
            return entries
        kept: Entries | None = None
        for i, entry in enumerate(entries):
            q = entry[1].get(SEQ_FIELD)
            if q is not None:
                writer, _, n_ = q.rpartition(b":")
                if writer and 0 < len(n_) <= 19 and n_.isdigit():
                    n = int(n_)
                    last = seen.get(writer)
                    if last is not None and n <= last:
                        self.duplicates += 1
                        if kept is None:
                            kept = entries[:i]
                        continue
                    if last is None and len(seen) >= MAX_WRITERS_PER_KEY:
                        del seen[next(iter(seen))]
                    seen[writer] = n
            if kept is not None:
                kept.append(entry)
        return entries if kept is None else kept

    async def _poke(self) -> None:
        """An entry on our wake stream: ends a blocked read now, and (re)creates the stream that
        writers ring (theirs is NOMKSTREAM), with an expiry in case this process dies."""
        if self._task is None:
            return
        self._poked_at = time.monotonic()
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xadd(self._wake_key, {b"w": b"1"}, maxlen=1, approximate=False)
            pipe.expire(self._wake_key, WAKE_TTL_S)
            entry_id, _ = await pipe.execute()
        except (RedisError, OSError):
            return  # the read loop notices within block_ms anyway
        if isinstance(entry_id, bytes):
            self._poked_id = entry_id

    def _poke_soon(self) -> None:
        """A poke that does not hold up the read loop (it takes a connection of its own)."""
        if self._poking is None or self._poking.done():
            self._poking = asyncio.create_task(self._poke(), name="redis-reader-poke")

    async def _read(self, wake_id: bytes, now: bool) -> tuple[list[tuple[bytes, Entries]], bool]:
        """One round trip: the entries read, and whether rung streams had entries although the
        blocked read ran out (nothing rang them)."""
        if self._cluster:
            streams: dict[bytes, bytes] = {self._wake_key: wake_id, **self._ids}
            return await xread(self._redis, streams, self._count, self._block_ms), False
        command, replies = self._command(wake_id, now)
        block_ms = 0 if now else self._sweep_ms if replies == 2 else self._block_ms
        got = await xread_packed(self._redis, command, block_ms, replies, self._conn)
        if replies == 1:
            return got[0], False
        return got[0] + got[1], not now and not got[0] and bool(got[1])

    async def _run(self) -> None:
        backoff = 0.05
        failing = False
        now = False
        wake_id = b"0-0"  # the wake stream is this process's own; MAXLEN 1 keeps it tiny
        while not self._closing:
            try:
                if self._rung[0] and time.monotonic() - self._poked_at > WAKE_TTL_S / 3:
                    self._poke_soon()  # keep the wake stream alive while rung streams need it
                resp, unrung = await self._read(wake_id, now)
                backoff = 0.05
                if failing:
                    failing = False
                    if self._on_error:
                        self._on_error("reconnect")
            except asyncio.CancelledError:
                raise
            except TRANSIENT as exc:
                if self._on_error:
                    self._on_error("read")
                if not failing:
                    log.warning("redis read failed, retrying", extra={"error": _name(exc)})
                failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            now = False
            if self._poked_id is not None:
                if _id_tuple(self._poked_id) < _id_tuple(wake_id):
                    # The wake stream was made anew below where we read from (Redis restarted
                    # empty on a clock behind ours): rings would go unseen. Read it whole.
                    wake_id = b"0-0"
                self._poked_id = None
            fresh: list[tuple[bytes, Entries]] = []
            for key, entries in resp:
                if not entries:
                    continue
                if key == self._wake_key:
                    wake_id = entries[-1][0]
                    continue
                if key not in self._ids:
                    continue  # removed while the read was in flight
                last = entries[-1][0]
                self._ids[key] = last
                if key in self._rung[1]:
                    self._rung[1][key] = _bulk(last)
                    if len(entries) >= self._count:
                        now = True  # more may wait, and no ring is coming for them
                elif key in self._blocked[1]:
                    self._blocked[1][key] = _bulk(last)
                entries = self._fresh(key, entries)
                if entries:
                    fresh.append((key, entries))
            if fresh and self._on_read is not None:
                try:
                    self._on_read(fresh)
                except Exception:
                    log.exception("stream read hook failed")
            for key, entries in fresh:
                try:
                    self._on_entries(key, entries)
                except Exception:
                    log.exception("stream consumer failed", extra={"stream": key.decode()})
            if unrung and not self._closing:
                # Rung streams had entries but nothing rang for a whole sweep: a writer that does
                # not ring (the claim script, the call API), or our wake stream is gone (Redis lost
                # its data) and every ring is dropped. Make it anew; it costs one round trip.
                self._poke_soon()


def _id_tuple(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return (int(ms) if ms.isdigit() else 0, int(seq) if seq.isdigit() else 0)


class LaneWriter:
    """`BatchWriter`s by lane, plus one for the keys outside the lanes (`{ctl}`), each with a
    cluster client of its own: on a cluster a primary that died holds up its own lanes' writes
    only. Measured (2.3–2.7 s gaps on every lane during a promotion, ≤ 0.26 s on the live ones
    after): one writer's batch that carries a dead node's commands waits for the replica, and
    redis-py's cluster pipelines on one client stall together while it relearns the slots. A
    lane's keys always go through the same writer, so per-key order holds. On one Redis: one
    writer on the client given."""

    def __init__(self, redis: aioredis.Redis, keys: Keys,
                 client: Callable[[], aioredis.Redis] | None = None, **kwargs: Any) -> None:
        self._keys = keys
        self._lanes = keys.lanes
        self._own: list[aioredis.Redis] = (
            [client() for _ in range(keys.lanes + 1)] if keys.lanes and client else [])
        clients = self._own or [redis] * (keys.lanes + 1 if keys.lanes else 1)
        self._writers = [BatchWriter(c, **kwargs) for c in clients]

    @property
    def clients(self) -> list[aioredis.Redis]:
        """The clients this writer made (to warm up before use)."""
        return list(self._own)

    def _for(self, key: Any) -> BatchWriter:
        if not self._lanes:
            return self._writers[0]
        raw = key.encode() if isinstance(key, str) else bytes(key)
        lane = self._keys.lane_in_key(raw)
        return self._writers[-1] if lane is None else self._writers[lane]

    def start(self) -> None:
        for w in self._writers:
            w.start()

    def tasks(self) -> list[asyncio.Task[None]]:
        return [t for w in self._writers for t in w.tasks()]

    @property
    def dropped(self) -> int:
        return sum(w.dropped for w in self._writers)

    @property
    def batches(self) -> int:
        return sum(w.batches for w in self._writers)

    def xadd(self, key: str, fields: Fields, maxlen: int | None = None) -> None:
        self._for(key).xadd(key, fields, maxlen)

    def ring(self, key: str, wake_key: str | None) -> None:
        self._for(key).ring(key, wake_key)

    def command(self, name: str, *args: Any, **kwargs: Any) -> None:
        key = args[2] if name == "eval" and len(args) > 2 and args[1] else args[0]
        self._for(key).command(name, *args, **kwargs)

    async def flush(self, timeout: float = 5.0) -> None:
        await asyncio.gather(*(w.flush(timeout) for w in self._writers))

    async def close(self) -> None:
        await asyncio.gather(*(w.close() for w in self._writers))
        for c in self._own:
            with contextlib.suppress(*TRANSIENT):
                await c.aclose()


class LaneReader:
    """`MultiReader`s by lane: one blocked XREAD per lane, over the streams this process follows in
    that lane. A Redis Cluster refuses a multi-key read across slots, and each lane is one slot
    (shared/streams.py, `Keys`); on one Redis there is one lane, so this is one `MultiReader`."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, process_id: str, on_entries: OnEntries,
                 *, on_error: OnError | None = None, on_read: OnRead | None = None,
                 on_follow: Callable[[int, int], None] | None = None) -> None:
        # One client for every lane: its blocked reads only wait, so a dead node's lanes failing
        # and the client relearning the slots cost the live lanes a reconnect (measured: gaps of
        # at most 0.19 s on them during a promotion), unlike the writers (LaneWriter).
        self._keys = keys
        self._on_follow = on_follow  # (rung, following) whenever either changes
        self._readers = [MultiReader(redis, keys.wake(process_id, lane), on_entries, on_error=on_error,
                                     on_read=on_read)
                         for lane in range(max(1, keys.lanes))]

    def start(self) -> None:
        for reader in self._readers:
            reader.start()

    def tasks(self) -> list[asyncio.Task[None]]:
        return [t for reader in self._readers for t in reader.tasks()]

    @property
    def duplicates(self) -> int:
        return sum(reader.duplicates for reader in self._readers)

    async def close(self) -> None:
        await asyncio.gather(*(reader.close() for reader in self._readers))

    def _reader(self, key: str) -> MultiReader:
        return self._readers[self._keys.lane_of_key(key.encode())]

    async def add(self, key: str, from_id: str = "0-0") -> None:
        await self._reader(key).add(key, from_id)
        self._followed()

    def remove(self, key: str) -> None:
        self._reader(key).remove(key)
        self._followed()

    def ring(self, key: str, rung: bool) -> None:
        self._reader(key).ring(key, rung)
        self._followed()

    def _followed(self) -> None:
        if self._on_follow is not None:
            self._on_follow(self.rung, self.following)

    @property
    def rung(self) -> int:
        return sum(reader.rung for reader in self._readers)

    @property
    def following(self) -> int:
        return sum(reader.following for reader in self._readers)


Writer = BatchWriter | LaneWriter  # what the tiers write through (LaneWriter on a cluster)
