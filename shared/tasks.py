"""Stopping tasks in bounded time, even when a cancellation is lost.

On Python 3.11 `asyncio.wait_for` returns normally when the awaited operation completes in the
same loop turn as a cancel of the task around it (CPython gh-86296): the CancelledError is
swallowed and the task goes on. redis-py's asyncio client sends every command under `wait_for`
(its socket_timeout), so a task cancelled inside a Redis call may keep running, and
`task.cancel(); await task` (or a gather, or `suppress(CancelledError)`) can then wait forever:
a drain on SIGTERM never ends, a call session never closes. `stop_tasks` is the bounded form.

Cancelling again after a while is not enough on its own: a task looping over Redis commands
spends a few loop turns inside the send's `wait_for` after every reply, and a caller woken by a
timer tends to run in the turn right after that reply was read (I/O is handled before timers),
so its cancels land there and are lost. Measured against a tight INCR loop on a local Redis: the
first cancel was lost in 100 of 100 rounds, and 12 of 100 loops still ran after 20 more cancels
50 ms apart. So a task still running is cancelled on each of a few successive turns: one of them
lands while it waits for the reply, where a cancel is not lost (every loop ended within 3 turns).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("callbridge.tasks")

CANCEL_TURNS = 20  # successive loop turns on which a task still running is cancelled again


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], timeout: float, *, every: float = 0.5,
                     what: str = "tasks") -> bool:
    """Cancel `tasks` and wait for them to end, at most `timeout` s; True when all ended.

    A task still running `every` s after its cancel is cancelled again (on CANCEL_TURNS successive
    loop turns, then again after `every` s, and so on), so `every` must exceed the time a task's
    own clean-up may take once cancelled. Past `timeout` the tasks still running are left alone,
    with a warning. Their outcomes are retrieved, never raised; a cancel of the caller propagates
    (the tasks stay cancelled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(every, left))
        if pending and loop.time() < deadline:
            pending = await _cancel_each_turn(pending)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" noise
    if pending:
        log.warning("tasks did not end after being cancelled", extra={
            "what": what, "tasks": sorted(task.get_name() for task in pending)[:10],
            "timeout_s": timeout})
    return not pending


async def _cancel_each_turn(tasks: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Cancel `tasks` on each of the next CANCEL_TURNS loop turns; those still running."""
    for _ in range(CANCEL_TURNS):
        for task in tasks:
            task.cancel()
        await asyncio.sleep(0)
        tasks = {task for task in tasks if not task.done()}
        if not tasks:
            break
    return tasks
