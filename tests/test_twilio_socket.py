"""The media socket's shorter path through uvicorn (gateway/twilio_socket.py), on a real uvicorn
server on loopback with a real websockets client: every message exactly once and in the order
sent, whichever way it came (handed over as read, or through the ASGI queue); sends written at
once while the socket is open and refused (for the ASGI path) once it is closing; uvicorn's own
checks kept."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import uvicorn
from fastapi import FastAPI, WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError
from websockets.frames import Frame, Opcode

from callbridge.redis_server import free_port
from gateway import twilio_socket
from gateway.app import server_config
from gateway.twilio_socket import MediaProtocol
from shared.serving import quiet_server
from shared.settings import Settings

Got = list[tuple[str, str]]
Handler = Callable[[WebSocket], Awaitable[None]]


@contextlib.asynccontextmanager
async def _server(handler: Handler) -> AsyncIterator[str]:
    app = FastAPI()
    app.add_api_websocket_route("/ws", handler)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), ws=MediaProtocol,
                            log_level="warning", lifespan="off")
    server = quiet_server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "server failed to start"
        await asyncio.sleep(0.01)
    try:
        yield f"ws://127.0.0.1:{config.port}/ws"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_messages_come_in_order_whether_handed_over_or_queued() -> None:
    """The app reads two messages the ASGI way while a burst arrives, then takes messages as they
    are read and still reads the queue for what waits there: one sequence, in order, each
    message once. Each message is acknowledged, and past the burst the client waits for each
    acknowledgement, so the queue is empty when the next arrives: those are all handed over."""
    got: Got = []
    burst, sent = 20, [str(i) for i in range(100)]

    async def handler(ws: WebSocket) -> None:
        await ws.accept()
        proto = twilio_socket.taps(ws)
        assert proto is not None
        for _ in range(2):
            text = (await ws.receive())["text"]
            got.append(("queue", text))
            await ws.send_text(f"ack:{text}")

        def take(text: str) -> None:
            got.append(("take", text))
            assert proto.send_text_now(f"ack:{text}")

        proto.take_text(take)
        await ws.send_text("ready")
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            got.append(("queue", msg["text"]))
            await ws.send_text(f"ack:{msg['text']}")

    async def until(ws: ClientConnection, reply: str) -> None:
        while await ws.recv() != reply:
            pass

    async with _server(handler) as url, connect(url) as ws:
        for m in sent[:burst]:
            await ws.send(m)
        await asyncio.wait_for(until(ws, "ready"), 5)
        for m in sent[burst:]:
            await ws.send(m)
            await asyncio.wait_for(until(ws, f"ack:{m}"), 5)
    assert [m for _, m in got] == sent
    ways = [w for w, _ in got]
    assert ways[:2] == ["queue", "queue"]
    assert set(ways[burst + 1:]) == {"take"}


async def test_send_text_now_writes_while_open_and_refuses_once_closing() -> None:
    results: list[bool] = []

    async def handler(ws: WebSocket) -> None:
        await ws.accept()
        proto = twilio_socket.taps(ws)
        assert proto is not None
        results.append(proto.send_text_now("one"))
        results.append(proto.send_text_now("two"))
        await ws.receive()  # the client's go-ahead
        await ws.close(code=1000)
        results.append(proto.send_text_now("after close"))

    async with _server(handler) as url, connect(url) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) == "one"
        assert await asyncio.wait_for(ws.recv(), 5) == "two"
        await ws.send("go")
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.close_code == 1000
    assert results == [True, True, False]


async def test_send_text_now_refuses_while_the_peer_does_not_read_and_order_holds() -> None:
    """A peer that stops reading fills the socket: uvicorn pauses writing, `send_text_now` says
    False, and the ASGI send waits for the peer instead; nothing is lost or reordered."""
    sent: list[int] = []
    paused = asyncio.Event()
    big = "x" * 65_536

    async def handler(ws: WebSocket) -> None:
        await ws.accept()
        proto = twilio_socket.taps(ws)
        assert proto is not None
        n = 0
        while proto.send_text_now(f"{n:08d}{big}"):
            n += 1
            assert n < 2_000, "writing never paused"  # bounded: kernel buffers hold a few MB
        sent.append(n)
        paused.set()
        await ws.send_text(f"{n:08d}{big}")  # the ASGI path: waits until the peer reads
        await ws.send_text("end")

    # No compression: it would shrink these messages to nothing, and the socket would never fill.
    async with _server(handler) as url, \
            connect(url, max_queue=4, max_size=None, compression=None) as ws:
        await asyncio.wait_for(paused.wait(), 10)
        got: list[int] = []
        while (msg := await asyncio.wait_for(ws.recv(), 10)) != "end":
            got.append(int(msg[:8]))
    assert sent and sent[0] > 0
    assert got == list(range(sent[0] + 1))


async def test_binary_and_invalid_utf8_take_uvicorns_path() -> None:
    """Binary messages still reach `receive()` (the gateway counts and drops them); text that is
    not UTF-8 still makes uvicorn close with 1007, and is never handed over."""
    taken: list[str] = []
    queued: list[dict[str, object]] = []

    async def handler(ws: WebSocket) -> None:
        await ws.accept()
        proto = twilio_socket.taps(ws)
        assert proto is not None
        proto.take_text(taken.append)
        while True:
            msg = await ws.receive()
            queued.append(msg)
            if msg["type"] == "websocket.disconnect":
                return

    async with _server(handler) as url, connect(url) as ws:
        await ws.send("fine")
        await ws.send(b"\x01\x02")
        ws.protocol.send_frame(Frame(Opcode.TEXT, b"\xff\xfe"))  # what a broken peer would send
        ws.send_data()
        try:
            await asyncio.wait_for(ws.recv(), 5)
        except ConnectionClosedError:
            pass
        assert ws.close_code == 1007
    assert taken == ["fine"]
    assert [m.get("bytes") for m in queued if m["type"] == "websocket.receive"] == [b"\x01\x02"]


def test_the_gateway_serves_media_through_it_when_uvicorn_has_what_it_needs() -> None:
    assert twilio_socket.usable()
    config = server_config(FastAPI(), Settings(), "127.0.0.1", 0)
    assert config.ws is MediaProtocol


async def test_a_socket_served_by_plain_uvicorn_has_no_taps() -> None:
    seen: list[object] = []

    async def handler(ws: WebSocket) -> None:
        await ws.accept()
        seen.append(twilio_socket.taps(ws))
        await ws.send_text("ok")

    app = FastAPI()
    app.add_api_websocket_route("/ws", handler)
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), ws="websockets-sansio",
                            log_level="warning", lifespan="off")
    server = quiet_server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done()
        await asyncio.sleep(0.01)
    try:
        async with connect(f"ws://127.0.0.1:{config.port}/ws") as ws:
            assert await asyncio.wait_for(ws.recv(), 5) == "ok"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
    assert seen == [None]


def test_a_uvicorn_without_what_it_relies_on_gets_uvicorns_own_class(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`usable()` reads uvicorn's protocol; one that renamed an attribute gets the plain class."""
    monkeypatch.setattr(twilio_socket, "_ATTRIBUTES", (*twilio_socket._ATTRIBUTES, "renamed_away"))
    assert not twilio_socket.usable()
    assert server_config(FastAPI(), Settings(), "127.0.0.1", 0).ws == "websockets-sansio"
