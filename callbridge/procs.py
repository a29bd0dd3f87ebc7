"""Real `callbridge` child processes for the tests and the bench.

One harness, so both start the tiers the same way: `python -m callbridge.cli …` with a given
environment, output captured to a log file (read when something fails), readiness polled over
HTTP against a deadline, and a stop that is SIGTERM (a graceful drain) first, SIGKILL after.

And, for what must never be left behind whatever happened (the bench's own watchdog, the tests
that run the bench): a process's live descendants, the processes whose environment carries a
marker, and a kill of such a list that cannot hit a pid reused meanwhile (Linux /proc; elsewhere
the lists are empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

import httpx


def _log_file(name: str) -> Path:
    fd, path = tempfile.mkstemp(prefix=f"callbridge-{name}-", suffix=".log")
    os.close(fd)
    return Path(path)


@dataclass
class ManagedProcess:
    """A `callbridge` process (gateway, worker…), or another `program`, with its log captured to
    a file.

    `own_session` puts it in a session of its own, so a Ctrl-C in the terminal reaches only the
    parent, which then stops its children in order (the bench wants that; tests do not care)."""

    name: str
    args: list[str]
    env: dict[str, str]
    health_url: str | None = None
    cwd: Path | None = None
    own_session: bool = False
    program: list[str] = field(default_factory=lambda: [sys.executable, "-m", "callbridge.cli"])
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.log_path = _log_file(self.name)

    def start(self) -> Self:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*self.program, *self.args], env=self.env, cwd=self.cwd,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=self.own_session)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.logs()[-chars:]

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until `health_url` answers 200; raises with the log when the process exits or the
        deadline passes."""
        assert self.health_url and self.proc
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(trust_env=False) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.health_url, timeout=1)).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to `timeout` for the drain, then SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(max(0.1, timeout))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def discard_log(self) -> None:
        with contextlib.suppress(OSError):
            self.log_path.unlink()


# ------------------------------------------------------------------------------------------
# Processes by ancestry or by environment (Linux /proc)

Pid = tuple[int, int]  # (pid, start time in clock ticks since boot): one process, never a reused pid


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, start time, session id) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    if fields[0] == b"Z":  # a zombie: already dead, only not reaped
        return None
    return int(fields[1]), int(fields[19]), int(fields[3])


SCHED_RUN, SCHED_WAIT = 0, 1  # /proc/PID/task/TID/schedstat: ns on a CPU, ns runnable but waiting


def schedstat_seconds(pid: int, field: int) -> float | None:
    """One schedstat figure summed over every thread of a process, in seconds (ns precision,
    unlike stat's 10 ms ticks); None if the process is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for tid in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[field])
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total / 1e9


def _pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def descendants(pid: int) -> list[Pid]:
    """Every live descendant of `pid` (children first, also those in sessions of their own).
    Orphans are not found: a child whose parent died belongs to init (or a subreaper) now."""
    children: dict[int, list[Pid]] = {}
    for p in _pids():
        st = _stat(p)
        if st is not None:
            children.setdefault(st[0], []).append((p, st[1]))
    out: list[Pid] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child[0])
    return out


def in_session(sid: int) -> list[Pid]:
    """Every live process of session `sid` (a child started with start_new_session=True leads
    one): its descendants that did not start a session of their own, orphans included."""
    out: list[Pid] = []
    for p in _pids():
        st = _stat(p)
        if st is not None and st[2] == sid:
            out.append((p, st[1]))
    return out


def with_env(key: str, value: str) -> list[Pid]:
    """Every live process (of this user) whose environment has `key`=`value`: a marker set in a
    parent's environment finds all its descendants, orphans included, unless they overwrote
    their environment (redis-server does, for its process title: see in_session)."""
    want = f"{key}={value}".encode()
    out: list[Pid] = []
    for p in _pids():
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        st = _stat(p)
        if want in env and st is not None:
            out.append((p, st[1]))
    return out


def alive(proc: Pid) -> bool:
    st = _stat(proc[0])
    return st is not None and st[1] == proc[1]


def kill_all(procs: list[Pid], sig: int = signal.SIGKILL) -> list[Pid]:
    """Send `sig` to each process still alive (checked against its start time), and to the
    whole process group of one that leads its own (a child started with `own_session`).
    Returns the processes signalled."""
    hit: list[Pid] = []
    mine = os.getpgrp()
    for proc in procs:
        if proc[0] == os.getpid() or not alive(proc):
            continue
        with contextlib.suppress(OSError):
            if os.getpgid(proc[0]) == proc[0] and proc[0] != mine:
                os.killpg(proc[0], sig)
            else:
                os.kill(proc[0], sig)
            hit.append(proc)
    return hit
