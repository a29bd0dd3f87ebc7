"""Sends started at once (shared/eager.py) and the gateway's Twilio sender built on them
(gateway/sender.py): order kept when a send has to wait, failures reaching the sender task.

The end-to-end tests (test_gateway.py, test_e2e.py) run the same sender on real sockets; these
pin down what a loopback run rarely shows, a send that suspends."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, cast

import pytest

from gateway.doorbell import Doorbell
from gateway.fence import OwnerFence
from gateway.hub import OutQueue
from gateway.sender import NORMAL, TwilioSender
from gateway.state import SocketInfo
from shared import eager
from shared import streams as S
from shared.twilio_proto import Outbound


async def test_a_coroutine_that_never_waits_finishes_inside_start() -> None:
    done: list[int] = []

    async def quick() -> None:
        done.append(1)

    assert eager.start(quick()) is None
    assert done == [1]


async def test_what_a_coroutine_raises_before_waiting_is_raised_by_start() -> None:
    async def broken() -> None:
        raise RuntimeError("socket gone")

    with pytest.raises(RuntimeError, match="socket gone"):
        eager.start(broken())


async def test_the_rest_of_a_coroutine_that_waits_is_finished_by_whoever_awaits_it() -> None:
    gate = asyncio.Event()
    steps: list[str] = []

    async def slow() -> str:
        steps.append("started")
        await gate.wait()
        await asyncio.sleep(0)  # a bare yield too
        steps.append("finished")
        return "result"

    rest = eager.start(slow())
    assert rest is not None and steps == ["started"]
    task = asyncio.create_task(_await(rest))
    await asyncio.sleep(0.01)
    assert not task.done()
    gate.set()
    assert await asyncio.wait_for(task, 2) == "result"
    assert steps == ["started", "finished"]


async def test_cancelling_the_awaiting_task_cancels_the_coroutine() -> None:
    cleaned: list[bool] = []

    async def slow() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    rest = eager.start(slow())
    assert rest is not None
    task = asyncio.create_task(_await(rest))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]


async def _await(awaitable: Any) -> Any:
    return await awaitable


class _Socket:
    """What the sender uses of Starlette's WebSocket: `send_text` (which suspends while `hold`
    is set, as uvicorn's does under back-pressure) and `close`."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.hold: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.closed: int | None = None

    async def send_text(self, text: str) -> None:
        if self.fail is not None:
            raise self.fail
        if self.hold is not None:
            hold, self.hold = self.hold, None
            await hold.wait()
        self.sent.append(text)

    async def close(self, code: int = 1000) -> None:
        self.closed = code


def _sender(ws: _Socket, queue: OutQueue) -> TwilioSender:
    info = SocketInfo(last_rx=0.0)
    return TwilioSender(cast(Any, ws), queue, Outbound("MZ1"), OwnerFence(0), info,
                        cast(Doorbell, None))


def _media(i: int) -> tuple[bytes, dict[bytes, bytes]]:
    return (b"%d-0" % i, S.entry(S.OUT_MEDIA, audio=bytes([i]) * 160, epoch=b"1"))


def _payloads(ws: _Socket) -> list[int]:
    return [base64.b64decode(json.loads(t)["media"]["payload"])[0] for t in ws.sent]


async def _settled(queue: OutQueue) -> None:
    """Until the sender task waits for entries again, with nothing queued."""
    for _ in range(200):
        await asyncio.sleep(0)
        if queue._waiting and not queue.size:  # the hand-off state, read
            return
    raise AssertionError("the sender never went back to waiting")


async def test_entries_are_sent_in_order_when_a_send_has_to_wait() -> None:
    ws, queue = _Socket(), OutQueue()
    task = asyncio.create_task(_sender(ws, queue).run())
    await _settled(queue)
    queue.put([_media(1)])
    assert _payloads(ws) == [1]  # sent at once, in the hub's turn: no task switch
    gate = ws.hold = asyncio.Event()
    queue.put([_media(2), _media(3)])  # 2 suspends: 3 waits for the task, behind it
    queue.put([_media(4)])
    assert _payloads(ws) == [1]
    await asyncio.sleep(0.01)
    assert _payloads(ws) == [1]  # still held
    gate.set()
    await _settled(queue)
    assert _payloads(ws) == [1, 2, 3, 4]
    queue.put([_media(5)])
    assert _payloads(ws) == [1, 2, 3, 4, 5]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_send_that_fails_outside_the_task_fails_the_task() -> None:
    ws, queue = _Socket(), OutQueue()
    task = asyncio.create_task(_sender(ws, queue).run())
    await _settled(queue)
    ws.fail = RuntimeError("the socket closed under us")
    queue.put([_media(1)])  # the hub's call must not raise
    with pytest.raises(RuntimeError, match="closed under us"):
        await asyncio.wait_for(task, 2)


async def test_a_hang_up_closes_the_socket_after_what_came_before_it() -> None:
    ws, queue = _Socket(), OutQueue()
    task = asyncio.create_task(_sender(ws, queue).run())
    await _settled(queue)
    hangup = (b"9-0", S.entry(S.OUT_HANGUP, epoch=b"1"))
    queue.put([_media(1), _media(2), hangup, _media(3)])
    assert await asyncio.wait_for(task, 2) is True
    assert _payloads(ws) == [1, 2] and ws.closed == NORMAL


async def test_a_replaced_owners_audio_is_dropped_on_either_path() -> None:
    ws, queue = _Socket(), OutQueue()
    task = asyncio.create_task(_sender(ws, queue).run())
    await _settled(queue)
    stale = (b"5-0", S.entry(S.OUT_MEDIA, audio=b"\x07" * 160, epoch=b"0"))
    gate = ws.hold = asyncio.Event()
    queue.put([_media(1), stale, _media(2)])  # 1 suspends: the rest go through the task
    gate.set()
    await _settled(queue)
    queue.put([stale, _media(3)])
    assert _payloads(ws) == [1, 2, 3]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
