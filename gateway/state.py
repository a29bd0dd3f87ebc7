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
    """What the idle watchdog needs to know about one live media socket."""

    last_rx: float
    call_sid: str = ""
    attached: float = 0.0
    idle: bool = False
    owner_seen: bool = False
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
    sockets: dict[Any, SocketInfo] = field(default_factory=dict)  # WebSocket -> info
