"""In-process uvicorn servers that leave signal handling to their host.

uvicorn's own ``Server`` installs SIGINT/SIGTERM handlers that make it stop listening at once.
Our processes decide for themselves what a signal means (the gateway drains, the worker releases
its calls), and the stand-ins run inside a test's or the bench's process, whose signals are not
theirs to take. Every in-process server (gateway, worker health port, both stand-ins) is built
here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn


class QuietServer(uvicorn.Server):
    """A uvicorn server that never touches the process's signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def quiet_server(config: uvicorn.Config) -> QuietServer:
    return QuietServer(config)
