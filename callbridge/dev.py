"""Gateway and worker in one event loop: the one-machine, no-Docker way to run callbridge.

Used by `callbridge dev` and by the demo; the command line lives in `callbridge/cli.py`.
"""

from __future__ import annotations

import asyncio
import sys

from callbridge.redis_server import RedisServer, start_redis
from gateway.app import create_app, server_config
from shared.serving import quiet_server
from shared.settings import Settings
from worker.main import Worker


async def run_dev(settings: Settings, host: str, port: int, stop: asyncio.Event,
                  ready: asyncio.Event | None = None) -> None:
    """Serve gateway and worker until `stop` is set; `ready` is set once the gateway listens."""
    app = create_app(settings)
    server = quiet_server(server_config(app, settings, host, port))
    worker = Worker(settings)
    gw_task = asyncio.create_task(server.serve())
    wk_task = asyncio.create_task(worker.run(stop, serve_http=False))
    while not server.started:
        if gw_task.done():
            gw_task.result()
            return
        await asyncio.sleep(0.02)
    if ready is not None:
        ready.set()
    await stop.wait()
    await wk_task
    server.should_exit = True
    await gw_task


def embedded_redis(settings: Settings) -> RedisServer | None:
    """Start a private Redis when REDIS_URL is unset, so `dev` runs with nothing but pip."""
    if settings.redis_url:
        return None
    server = start_redis()
    settings.redis_url = server.url
    print(f"callbridge: REDIS_URL unset, started an embedded redis at {server.url}", file=sys.stderr)
    return server
