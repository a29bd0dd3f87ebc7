"""Readiness, shared by both tiers: ready means Redis answers and we are not draining."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from starlette.responses import Response

from shared.redisio import TRANSIENT

# Redis failing, or not answering within the second a probe may take.
_UNREADY: tuple[type[Exception], ...] = (*TRANSIENT, TimeoutError)


async def readiness(redis: aioredis.Redis, draining: bool) -> Response:
    if draining:
        return Response('{"status":"draining"}', status_code=503, media_type="application/json")
    try:
        await asyncio.wait_for(redis.ping(), 1.0)
    except _UNREADY:
        return Response('{"status":"redis unavailable"}', status_code=503,
                        media_type="application/json")
    return Response('{"status":"ready"}', media_type="application/json")
