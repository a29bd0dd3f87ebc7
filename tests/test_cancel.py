"""Stopping tasks when a cancellation can be lost (shared/tasks.py).

On Python 3.11 `asyncio.wait_for` returns normally when what it waits for completes in the same
loop turn as a cancel of its task (CPython gh-86296), and redis-py sends and reads every command
under `wait_for`. The loss is reproduced here deterministically: the awaited future is resolved,
then the task cancelled, with no await between them.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

import pytest
import redis.asyncio as aioredis

from shared.tasks import stop_tasks

LOSES_CANCELS = sys.version_info < (3, 12)  # gh-86296 is fixed in 3.12's wait_for


class Poller:
    """A loop like a Redis poller: each turn awaits one reply under `asyncio.wait_for`."""

    def __init__(self) -> None:
        self.reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting = asyncio.Event()  # set while a turn waits for its reply
        self.turns = 0
        self.after_cancel = 0  # turns begun while a cancel was pending: each a lost cancel

    async def run(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        while True:
            if task.cancelling():
                self.after_cancel += 1
            self.reply = asyncio.get_running_loop().create_future()
            self.waiting.set()
            await asyncio.wait_for(self.reply, 30)
            self.waiting.clear()
            self.turns += 1


async def _bounded(aw: asyncio.Event | asyncio.Future[Any], timeout: float) -> bool:
    """Whether `aw` (a task, or an event to be set) completes within `timeout` s."""
    waiter: asyncio.Future[Any] = asyncio.ensure_future(aw.wait()) if isinstance(aw, asyncio.Event) else aw
    done, _ = await asyncio.wait({waiter}, timeout=timeout)
    if not done:
        waiter.cancel()
    return bool(done)


async def _started() -> tuple[Poller, asyncio.Task[None]]:
    poller = Poller()
    task = asyncio.create_task(poller.run(), name="poller")
    assert await _bounded(poller.waiting, 2), "the poller never waited"
    return poller, task


@pytest.mark.skipif(not LOSES_CANCELS, reason="wait_for no longer loses cancels (3.12+)")
async def test_a_cancel_landing_as_the_reply_arrives_is_lost() -> None:
    """The bug itself: after one such cancel, the loop simply goes on to its next turn, so an
    unbounded `task.cancel(); await task` would wait forever."""
    poller, task = await _started()
    poller.waiting.clear()
    poller.reply.set_result(1)
    task.cancel()
    assert await _bounded(poller.waiting, 2), "the loop went on to its next turn"
    assert not task.done() and poller.after_cancel == 1
    await stop_tasks([task], 2)  # clean up
    assert task.cancelled()


async def test_stop_tasks_ends_a_loop_whose_first_cancel_is_lost() -> None:
    poller, task = await _started()
    poller.reply.set_result(1)  # the reply lands in the same loop turn as stop_tasks' cancel
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await stop_tasks([task], 2.0, every=0.05, what="poller")
    assert task.cancelled()
    assert loop.time() - t0 < 1.0, "ended by the second cancel, not at the bound"
    if LOSES_CANCELS:
        assert poller.after_cancel == 1, "the first cancel was lost: the loop took another turn"


async def test_stop_tasks_waits_every_before_cancelling_again() -> None:
    """A task's own clean-up after a cancel is not cut short before `every` s have passed."""
    release = asyncio.Event()
    cleaning = asyncio.Event()
    cleaned = []

    async def with_cleanup() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaning.set()
            await release.wait()
            cleaned.append(True)

    task = asyncio.create_task(with_cleanup())
    await asyncio.sleep(0)  # let it start
    stopping = asyncio.create_task(stop_tasks([task], 30.0, every=30.0))
    assert await _bounded(cleaning, 2)
    release.set()
    assert await _bounded(stopping, 2) and stopping.result() is True
    assert cleaned == [True] and task.cancelling() == 1, "cancelled once, clean-up complete"


async def test_stop_tasks_gives_up_at_its_bound_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """A task that never ends (every cancel swallowed) costs `timeout`, then a warning; the
    caller goes on. Its outcome is never raised to the caller."""
    let_go = asyncio.Event()
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while not let_go.is_set():
            try:
                await let_go.wait()
            except asyncio.CancelledError:
                swallowed += 1

    async def failing() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(stubborn(), name="stubborn")
    failed = asyncio.create_task(failing())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with caplog.at_level(logging.WARNING, logger="callbridge.tasks"):
        ended = await stop_tasks([task, failed], 0.3, every=0.1, what="stubborn things")
    took = loop.time() - t0
    assert not ended and not task.done() and 0.3 <= took < 1.5
    assert swallowed >= 2, "cancelled again while it ran"
    assert failed.done() and isinstance(failed.exception(), RuntimeError)
    (record,) = [r for r in caplog.records if r.name == "callbridge.tasks"]
    assert record.what == "stubborn things" and record.tasks == ["stubborn"]  # type: ignore[attr-defined]
    let_go.set()
    assert await _bounded(task, 2)


async def test_stop_tasks_ends_real_redis_pollers(redis_url: str, prefix: str) -> None:
    """The real thing: tight loops of a redis-py client with a socket timeout (so every command
    is sent under wait_for), each stopped mid-loop. Whether a round loses its first cancel is a
    race (here nearly every round loses it); every round must end within the bound either way.
    Cancelling again once per timer wake-up (as shared/redisio.py's `_stop` did) is not enough
    here: most of those cancels are lost too (shared/tasks.py says why)."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    key = f"{prefix}poll"
    rounds = 60
    lost = 0
    try:
        for i in range(rounds):
            turns = 0
            went_on = 0

            async def poll() -> None:
                nonlocal turns, went_on
                task = asyncio.current_task()
                assert task is not None
                while True:
                    if task.cancelling():
                        went_on += 1
                    await client.incr(key)
                    turns += 1

            task = asyncio.create_task(poll())
            deadline = asyncio.get_running_loop().time() + 5
            while turns < 1 + i % 7:  # stop it after a varying number of commands
                assert not task.done() and asyncio.get_running_loop().time() < deadline, "poller stuck"
                await asyncio.sleep(0)
            assert await stop_tasks([task], 3.0, every=0.05, what="redis poller"), f"round {i}"
            lost += went_on > 0
    finally:
        await client.aclose()
    print(f"rounds whose first cancel was lost: {lost}/{rounds}")
