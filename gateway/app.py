"""The gateway's FastAPI app: Twilio webhooks, the Media Stream socket, health and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError

from gateway import api, console, media, twilio_socket, webhooks
from gateway.hub import OutboundHub
from gateway.outbound import Dialer
from gateway.state import GatewayState
from shared import metrics
from shared import streams as S
from shared.health import readiness
from shared.logs import error_fields
from shared.redisio import LaneWriter, check_layout, connect, media_latency_observer, warm
from shared.settings import Settings

log = logging.getLogger("callbridge.gateway")


def _redis_error(op: str) -> None:
    if op == "reconnect":
        metrics.REDIS_RECONNECTS.inc()
    else:
        metrics.REDIS_ERRORS.labels(op).inc()


def build_state(settings: Settings) -> GatewayState:
    assert settings.redis_url
    keys = settings.keys()
    cluster = settings.redis_cluster
    redis = connect(settings.redis_url, cluster=cluster)
    # One blocked read per lane (on a cluster, per node: its share of the lanes) plus a poke.
    reader = connect(settings.redis_url, cluster=cluster, max_connections=max(1, keys.lanes) + 4)
    process_id = uuid.uuid4().hex[:12]
    state: GatewayState | None = None

    def on_redis_error(op: str) -> None:
        _redis_error(op)
        if op == "reconnect" and state is not None:  # it may have come back empty
            media.redis_came_back(state)

    state = GatewayState(
        settings=settings,
        keys=keys,
        redis=redis,
        reader_redis=reader,
        writer=LaneWriter(redis, keys, lambda: connect(settings.redis_url or "", cluster=cluster,
                                                       max_connections=4),
                          on_error=on_redis_error, on_flushed=media_latency_observer(
            metrics.HOP_LATENCY.labels("twilio_to_redis").observe, every=metrics.HOP_SAMPLE)),
        hub=OutboundHub(reader, keys, S.gateway_reader(process_id), on_error=on_redis_error),
        process_id=process_id,
    )
    return state


async def drain(state: GatewayState) -> None:
    """Stop taking streams and hand live ones back to Twilio, which re-attaches each call through
    `<Connect action>` to a gateway that is not draining (the worker keeps the Vapi side up)."""
    state.draining = True
    for end in state.on_drain:  # the console's streams: browsers reconnect to another gateway
        end()
    live = list(state.sockets)
    log.info("draining", extra={"sockets": len(live)})
    for ws in live:
        with contextlib.suppress(Exception):
            await ws.close(code=1001)
    deadline = asyncio.get_running_loop().time() + state.settings.gateway_drain_timeout_s
    while state.sockets and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    await state.writer.flush()


def _stop_process() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


async def supervise(state: GatewayState, tasks: list[asyncio.Task[Any]],
                    stop: Callable[[], None] = _stop_process) -> None:
    """These loops live as long as the process: if one ends, the gateway cannot carry calls.
    Say which and why, turn unready, and stop the process (SIGTERM: live streams are handed
    back to Twilio, which re-attaches them to a healthy gateway); `callbridge gateway` then
    exits non-zero so the orchestrator restarts it."""
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    current = asyncio.current_task()
    if current is not None and current.cancelling():
        return  # shutting down: the loops end because we end them
    for task in done:
        error = None if task.cancelled() else task.exception()
        log.critical("gateway loop died", extra={"task": task.get_name(), **error_fields(error)})
    state.failed = True
    state.draining = True
    stop()


def create_app(settings: Settings) -> FastAPI:
    settings.require("REDIS_URL", "PUBLIC_URL", "TWILIO_AUTH_TOKEN")
    state = build_state(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await warm(state.redis, state.reader_redis, *state.writer.clients)
        await check_layout(state.redis, state.keys)
        state.writer.start()
        state.hub.start()
        watchdog = asyncio.create_task(media.idle_watchdog(state), name="media-idle-watchdog")
        supervisor = asyncio.create_task(
            supervise(state, [watchdog, *state.writer.tasks(), *state.hub.tasks()]), name="supervisor")
        log.info("gateway ready", extra={"public_url": settings.public_url})
        try:
            yield
        finally:
            supervisor.cancel()
            watchdog.cancel()
            await state.hub.close()
            await app.state.console.close()
            await state.writer.close()
            await state.redis.aclose()
            await state.reader_redis.aclose()
            await app.state.dialer.aclose()
            metrics.process_exit(os.getpid())

    app = FastAPI(title="callbridge gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="The call API: place, watch, steer calls. Every /v1 request needs "
                              "`Authorization: Bearer <one of API_KEYS>`.")
    app.state.gw = state
    app.state.dialer = Dialer(settings)
    app.include_router(webhooks.router, include_in_schema=False)
    app.include_router(media.router, include_in_schema=False)
    app.include_router(api.router)
    console.install(app, state)
    app.add_exception_handler(RequestValidationError, api.validation_error)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        return await readiness(state.redis, state.draining)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(_: Request) -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app


def app_from_env() -> FastAPI:
    """App factory for running under a process manager, e.g.
    `uvicorn gateway.app:app_from_env --factory --workers 4 --ws gateway.twilio_socket:MediaProtocol`
    (set PROMETHEUS_MULTIPROC_DIR so /metrics adds up all processes; `--ws` as `server_config`
    chooses). `callbridge gateway` is one process with graceful drain."""
    from shared.logs import setup_logging
    from shared.settings import load_settings

    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format, role="gateway")
    return create_app(settings)


def server_config(app: FastAPI, settings: Settings, host: str, port: int) -> uvicorn.Config:
    """How the gateway's uvicorn runs: the sans-I/O websockets implementation (with the media
    socket's shorter path, gateway/twilio_socket.py) with keepalive pings on the Twilio socket,
    a frame size bound, and no access log on the media path."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        ws=twilio_socket.MediaProtocol if twilio_socket.usable() else "websockets-sansio",
        ws_max_size=settings.ws_max_size,
        ws_ping_interval=settings.twilio_ping_interval_s,
        ws_ping_timeout=settings.twilio_ping_timeout_s,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )
