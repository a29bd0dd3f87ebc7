"""In-process uvicorn servers that leave signal handling to their host.

uvicorn's own ``Server`` installs SIGINT/SIGTERM handlers that make it stop listening at once.
Our processes decide for themselves what a signal means (the gateway drains, the worker releases
its calls), and the stand-ins run inside a test's or the bench's process, whose signals are not
theirs to take. Every in-process server (gateway, worker health port, both stand-ins) is built
here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import uvicorn

from shared import metrics


class QuietServer(uvicorn.Server):
    """A uvicorn server that never touches the process's signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def quiet_server(config: uvicorn.Config) -> QuietServer:
    return QuietServer(config)


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM or SIGINT sets `stop` (drain, release, shut down as the process sees fit); a
    second one while stopping leaves at once."""
    def on_signal() -> None:
        if stop.is_set():
            os._exit(1)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal)


def run_until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run `main(stop)` on uvloop (when installed) with `stop_on_signals`: how every callbridge
    process runs."""
    async def runner() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await main(stop)

    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    freeze_startup_heap()
    try:
        asyncio.run(runner())
    finally:
        metrics.flush_tallies()


def freeze_startup_heap() -> None:
    """Move everything allocated so far (modules, app, settings: most of the process's objects)
    out of the garbage collector's reach. A full collection then walks only what calls
    allocated: without this each one took 55 ms, a pause every call in the process felt
    (docs/performance.md, "Garbage collection")."""
    gc.collect()
    gc.freeze()


async def serve_until(server: uvicorn.Server, stop: asyncio.Event,
                      before_exit: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve until the server ends or `stop` is set; then `before_exit` (a drain), then stop."""
    serving = asyncio.create_task(server.serve())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():
        if before_exit is not None:
            await before_exit()
        server.should_exit = True
        await serving
    stopping.cancel()
