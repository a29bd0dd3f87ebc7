"""The Vapi socket that hands whole messages over as they arrive (worker/vapi_socket.py), on a
real websockets server on loopback: every message exactly once, in the order sent, whichever
way it came (straight from the socket, or queued for `recv()`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from worker.vapi_socket import VapiConnection

Got = list[tuple[str, bytes | str]]


@contextlib.asynccontextmanager
async def _server(script: list[bytes | str | list[bytes]]) -> AsyncIterator[str]:
    """A server that, on `go` from the client, sends `script` (a list: one fragmented message)
    and then `end`."""

    async def handler(ws: ServerConnection) -> None:
        async for msg in ws:
            if msg == "go":
                for item in script:
                    await ws.send(item)
                await ws.send("end")

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


async def _read(ws: VapiConnection, got: Got) -> None:
    async for msg in ws:
        got.append(("recv", msg))
        if msg == "end":
            return


async def test_messages_come_in_order_whether_taken_at_once_or_queued() -> None:
    script: list[bytes | str | list[bytes]] = [
        b"A" * 640, '{"type":"speech-update"}', b"B" * 640, [b"C1", b"C2", b"C3"], b"D" * 640]
    got: Got = []
    async with _server(script) as url, connect(url, create_connection=VapiConnection) as ws:
        assert isinstance(ws, VapiConnection)
        ws.take_messages(lambda msg: got.append(("take", msg)))
        reader = asyncio.create_task(_read(ws, got))
        await ws.send("go")
        await asyncio.wait_for(reader, 5)
    assert [m for _, m in got] == [b"A" * 640, '{"type":"speech-update"}', b"B" * 640, b"C1C2C3",
                                   b"D" * 640, "end"]
    # Whole messages with nothing queued before them skip the queue; a fragmented one cannot.
    assert [way for way, _ in got[:3]] == ["take"] * 3
    assert got[3][0] == "recv"


async def test_messages_queued_before_the_callback_keep_later_ones_behind_them() -> None:
    got: Got = []
    async with _server([b"X1", b"X2", b"Y1", b"Y2"]) as url, \
            connect(url, create_connection=VapiConnection) as ws:
        assert isinstance(ws, VapiConnection)
        await ws.send("go")
        first = await ws.recv()  # X1; the rest may well be queued already
        got.append(("recv", first))
        ws.take_messages(lambda msg: got.append(("take", msg)))
        await asyncio.wait_for(_read(ws, got), 5)
    assert [m for _, m in got] == [b"X1", b"X2", b"Y1", b"Y2", "end"]


async def test_text_that_is_not_utf8_still_fails_the_connection() -> None:
    """The library's own check stays: such a message is queued, and `recv()` closes over it."""
    from websockets.exceptions import ConnectionClosedError
    from websockets.frames import Frame, Opcode

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        ws.protocol.send_frame(Frame(Opcode.TEXT, b"\xff\xfe"))  # what a broken peer would send
        ws.send_data()
        with contextlib.suppress(Exception):
            await ws.wait_closed()

    taken: list[bytes | str] = []
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", create_connection=VapiConnection) as ws:
            assert isinstance(ws, VapiConnection)
            ws.take_messages(taken.append)
            await ws.send("go")
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except ConnectionClosedError as exc:
                assert exc.rcvd is None and exc.sent is not None and exc.sent.code == 1007
            else:
                raise AssertionError("invalid UTF-8 was delivered")
    assert taken == []
