"""Per-process gateway state: clients and flags shared by the routes (no call state lives here)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from gateway.hub import OutboundHub
from shared.redisio import BatchWriter
from shared.settings import Settings
from shared.streams import Keys


@dataclass
class SocketInfo:
    """What the idle watchdog and the re-assertion after a Redis restart need to know about one
    live media socket (monotonic times)."""

    last_rx: float
    call_sid: str = ""
    stream_sid: str = ""
    attached: float = 0.0
    idle: bool = False
    live: bool = False  # the call went live: it was at attach, or the worker sent audio or marks
    last_out: float = 0.0  # when the last `out` entry arrived (a worker writing them is alive)
    owner_ok_since: float = -1.0  # the no-worker window (its start) in which a worker was seen
    closed_by: str = ""  # "idle_timeout" / "no_worker" when the watchdog closed it


@dataclass
class GatewayState:
    settings: Settings
    keys: Keys
    redis: aioredis.Redis  # commands and the batch writer
    reader_redis: aioredis.Redis  # the hub's blocked XREAD
    writer: BatchWriter
    hub: OutboundHub
    process_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    draining: bool = False
    failed: bool = False  # a background loop died: unready, drain, exit non-zero
    sockets: dict[Any, SocketInfo] = field(default_factory=dict)  # WebSocket -> info
    # Redis came back (a reconnect, or a new run_id: restarted, maybe empty): when, and how many
    # more times the watchdog re-asserts what this gateway holds (twice: the second pass finds
    # the streams that caller audio re-created meanwhile).
    redis_back_at: float = 0.0
    redis_run_id: str | None = None
    reassert_rounds: int = 0
