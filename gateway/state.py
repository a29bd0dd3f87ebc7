"""Per-process gateway state: clients and flags shared by the routes (no call state lives here)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from gateway.hub import OutboundHub
from shared.redisio import Generation, Writer
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
    writer: Writer
    hub: OutboundHub
    process_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    draining: bool = False
    failed: bool = False  # a background loop died: unready, drain, exit non-zero
    sockets: dict[Any, SocketInfo] = field(default_factory=dict)  # WebSocket -> info
    # Redis came back (a reconnect, or a new run_id: restarted, maybe empty): when, and how many
    # more times the watchdog re-asserts what this gateway holds (twice: the second pass finds
    # the streams that caller audio re-created meanwhile).
    redis_back_at: float = 0.0
    redis_generation: Generation = field(default_factory=Generation)
    reassert_rounds: int = 0
    on_drain: list[Any] = field(default_factory=list)  # callables: end what a drain must end


# The socket's decisions, apart from I/O (tested on a virtual clock in tests/test_socket_state.py).

CLOSE_IDLE, CHECK_OWNER, WORKER_SEEN = "close_idle", "check_owner", "worker_seen"


def watchdog_verdict(info: SocketInfo, now: float, *, idle_timeout: float, no_worker_timeout: float,
                     redis_back_at: float) -> str | None:
    """What the once-a-second watchdog does about one socket: close it as dead (Twilio sends a
    frame every 20 ms while a call lives), ask Redis whether any worker owns the call (none has
    written to it for NO_WORKER_TIMEOUT_S, counted from the later of attach and Redis's last
    return: after an empty restart no `owner` is left until a worker writes it again), note that
    a worker is alive (it wrote to the call in that window), or nothing."""
    if info.idle:
        return None
    if now - info.last_rx > idle_timeout:
        return CLOSE_IDLE
    since = max(info.attached, redis_back_at)
    if info.owner_ok_since == since or now - since <= no_worker_timeout:
        return None
    return WORKER_SEEN if info.last_out >= since else CHECK_OWNER


def closing_cause(ended: str, *, hung_up: bool, draining: bool) -> tuple[str, bytes | None]:
    """Why a socket closed (the `callbridge_gateway_media_closed_total` cause) and what the worker
    is told on `in` (`detach` value; None when Twilio said `stop`, which the worker already has).
    `ended` is what the receive side saw: "stop", "closed" (by the peer or by us), or the cause
    the watchdog or the supervisor set (idle_timeout, no_worker, error)."""
    if ended == "stop":
        return "stop", None
    if hung_up:
        return "hangup", b"hangup"
    if draining:
        return "drain", b"drain"
    return (ended if ended != "closed" else "lost"), b"lost"
