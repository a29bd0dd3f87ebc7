"""The console: its page and assets, and the streams it reads (contract: docs/console.md).

Everything here reads what the call API reads (records, event streams, the calls' audio streams)
and is authorised the same way. Streams are bounded twice: a gateway serves at most
CONSOLE_MAX_STREAMS call feeds and listeners, and a browser that stops reading is cut off
(more than CONSOLE_QUEUE calls waiting for it, or one write waiting CONSOLE_SEND_TIMEOUT_S),
never buffered without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from gateway import api
from gateway import calls as views
from gateway.audio_watch import ASSISTANT, CALLER, AudioHealth, listen_frame
from gateway.feed import KEEPALIVE, SID_RE, FeedHub, Viewer, sse
from gateway.state import GatewayState
from shared import metrics
from shared import streams as S
from shared.redisio import TRANSIENT, connect
from shared.tasks import stop_tasks

log = logging.getLogger("callbridge.gateway.console")

UI_DIR = Path(__file__).parent / "console_ui"
KEEPALIVE_S = 15.0
HEALTH_EVERY_S = 1.0
LISTEN_AUTH_S = 5.0
LISTEN_MAX_AGE_MS = 500.0  # listen-in audio older than this is dropped, not played late
READ_COUNT = 300
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer"}
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self' ws: wss:; media-src 'self' blob:; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'none'")


class Slots:
    """At most `size` streams at once (call feeds and listeners share them)."""

    def __init__(self, size: int) -> None:
        self.size, self.used = size, 0

    def take(self) -> bool:
        if self.used >= self.size:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used = max(0, self.used - 1)


class ConsoleHost:
    """Per gateway: a Redis client whose connections may block (a feed's XREAD holds one), the
    list's hub, and the stream slots."""

    def __init__(self, st: GatewayState) -> None:
        s = st.settings
        self.st = st
        self.redis: aioredis.Redis = connect(s.redis_url or "", cluster=s.redis_cluster,
                                             max_connections=s.console_max_streams + 4)
        self.hub = FeedHub(self.redis, st.keys, s.console_queue,
                           on_error=lambda op: metrics.REDIS_ERRORS.labels(op).inc())
        self.slots = Slots(s.console_max_streams)
        self.streams: set[asyncio.Event] = set()  # each open stream's stop
        self.ending = False
        st.on_drain.append(self.end_streams)

    def stream_stop(self) -> asyncio.Event:
        stop = asyncio.Event()
        if self.ending:
            stop.set()
        self.streams.add(stop)
        return stop

    def end_streams(self) -> None:
        """Draining: every stream ends within a second (the browsers reconnect elsewhere)."""
        self.ending = True
        for stop in self.streams:
            stop.set()
        self.hub.wake_all()

    async def close(self) -> None:
        await self.hub.close()
        await self.redis.aclose()


def _host(request: Request | WebSocket) -> ConsoleHost:
    host: ConsoleHost = request.app.state.console
    return host


class EventStream(Response):
    """`text/event-stream` from an async iterator of messages. A write the browser does not take
    within `send_timeout` ends the stream (`on_cut`); the iterator is closed either way, and as
    soon as the browser goes away."""

    media_type = "text/event-stream"

    def __init__(self, messages: AsyncIterator[bytes], stop: asyncio.Event, send_timeout: float,
                 on_cut: Callable[[], None], streams: set[asyncio.Event] | None = None) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({**HEADERS, "X-Accel-Buffering": "no"})  # no body: no Content-Length
        self.messages, self.stop, self.send_timeout, self.on_cut = messages, stop, send_timeout, on_cut
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            # asyncio.timeout, not wait_for: on 3.11 a wait_for whose send had just completed
            # swallows the cancel that `gone` sends, and the stream would outlive its browser.
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.messages:
                if self.stop.is_set():
                    return
                async with asyncio.timeout(self.send_timeout):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            async with asyncio.timeout(self.send_timeout):
                await send({"type": "http.response.body", "body": b""})

        async def gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.create_task(pump()), asyncio.create_task(gone())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[0] in done and isinstance(tasks[0].exception(), TimeoutError):
                self.on_cut()
            elif tasks[0] in done and (exc := tasks[0].exception()) is not None:
                log.warning("console stream failed", extra={"error": type(exc).__name__})
        finally:
            self.stop.set()  # the generators also end at their next turn
            if self.streams is not None:
                self.streams.discard(self.stop)
            await stop_tasks(tasks, 5.0, what="console stream")
            await _aclose(self.messages)


async def _aclose(it: AsyncIterator[bytes]) -> None:
    close: Callable[[], Awaitable[None]] | None = getattr(it, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


def _cut(kind: str) -> Callable[[], None]:
    return lambda: metrics.CONSOLE_CUT.labels(kind).inc()


# The page ------------------------------------------------------------------------------------

page = APIRouter(include_in_schema=False)


@page.get("/console")
async def console_page() -> Response:
    index = UI_DIR / "index.html"
    if not index.is_file():
        return Response("the console is not installed\n", status_code=404, media_type="text/plain")
    return FileResponse(index, headers={**HEADERS, "Content-Security-Policy": PAGE_CSP})


# The list ------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", tags=["console"], dependencies=[Depends(api.require_key)])


@router.get("/feed", response_class=EventStream, status_code=200,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "`snapshot`, then `call` messages (docs/console.md)"}})
async def calls_feed(request: Request) -> Response:
    """The live calls: a snapshot of the calls not ended, then each change as it happens."""
    host = _host(request)
    try:
        viewer = await host.hub.join()
    except TRANSIENT:
        raise HTTPException(503, "redis unavailable") from None
    try:
        rows = await host.hub.snapshot()
    except TRANSIENT:
        host.hub.leave(viewer)
        raise HTTPException(503, "redis unavailable") from None
    stop = host.stream_stop()
    return EventStream(_list_messages(host, viewer, rows, stop), stop,
                       host.st.settings.console_send_timeout_s, _cut("list"), host.streams)


async def _list_messages(host: ConsoleHost, viewer: Viewer, rows: list[dict[str, Any]],
                         stop: asyncio.Event) -> AsyncIterator[bytes]:
    metrics.CONSOLE_STREAMS.labels("list").inc()
    try:
        yield sse("snapshot", {"calls": rows})
        while not stop.is_set() and not host.ending:
            item = viewer.take()
            if item is None:
                if viewer.cut:  # more than CONSOLE_QUEUE calls waited for it
                    metrics.CONSOLE_CUT.labels("list").inc()
                    return
                try:
                    async with asyncio.timeout(KEEPALIVE_S):
                        await viewer.wake.wait()
                except TimeoutError:
                    yield KEEPALIVE
                continue
            if (message := viewer.message(*item)) is not None:
                yield message
    finally:
        host.hub.leave(viewer)
        metrics.CONSOLE_STREAMS.labels("list").dec()


# One call ------------------------------------------------------------------------------------


async def _newest_ids(r: aioredis.Redis, *keys: str) -> list[str]:
    """Where each stream ends now ('0-0' for one that does not exist yet)."""
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.xrevrange(key, count=1)
    return [got[0][0].decode() if got else "0-0" for got in await pipe.execute()]


def _event(fields: dict[bytes, bytes]) -> dict[str, Any] | None:
    listed = views.event_list([(b"", fields)])
    return listed[0] if listed else None


@router.get("/calls/{call_sid}/feed", response_class=EventStream, status_code=200,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "`view`, then `event`, `call`, `health`, `end` "
                                            "(docs/console.md)"},
                       404: {"model": api.Problem}, 503: {"model": api.Problem}})
async def call_feed(call_sid: api.SID, request: Request) -> Response:
    """One call as it happens: the view, then each new event, its audio health every second, and
    `end` when it has ended."""
    host = _host(request)
    st = host.st
    if not host.slots.take():
        metrics.CONSOLE_REFUSED.labels("busy").inc()
        raise HTTPException(503, "the console's streams are all in use (CONSOLE_MAX_STREAMS)")
    try:
        record = await api._record(st, call_sid)
        k = st.keys
        events: Any = await st.redis.xrevrange(k.events(call_sid), count=2000)
        ids = await _newest_ids(st.redis, k.inbound(call_sid), k.outbound(call_sid))
    except HTTPException as exc:
        host.slots.give()
        if exc.status_code == 404:
            metrics.CONSOLE_REFUSED.labels("unknown_call").inc()
        raise
    except TRANSIENT:
        host.slots.give()
        raise HTTPException(503, "redis unavailable") from None
    events = list(reversed(events or []))
    row = views.row(call_sid, record)
    view = {**views.view(call_sid, record, events), **row}  # the row adds the turn and barge-ins
    last_event = events[-1][0].decode() if events else "0-0"
    stop = host.stream_stop()
    return EventStream(_call_messages(host, call_sid, view, row, last_event, ids, stop), stop,
                       st.settings.console_send_timeout_s, _cut("call"), host.streams)


async def _call_messages(host: ConsoleHost, sid: str, view: dict[str, Any], shown: dict[str, Any],
                         last_event: str, ids: list[str], stop: asyncio.Event) -> AsyncIterator[bytes]:
    """`shown`: the summary as the browser was last sent it (a `call` message when it changes)."""
    st, r, k = host.st, host.redis, host.st.keys
    keys: dict[Any, Any] = {k.events(sid): last_event, k.inbound(sid): ids[0], k.outbound(sid): ids[1]}
    ev_key, in_key = k.events(sid).encode(), k.inbound(sid).encode()
    health = AudioHealth()
    loop = asyncio.get_running_loop()
    window_at = said_at = loop.time()
    metrics.CONSOLE_STREAMS.labels("call").inc()
    try:
        yield sse("view", view)
        if view["status"] == S.STATUS_ENDED:
            yield sse("end", {})
            return
        while not stop.is_set():
            wait_ms = max(1, int((window_at + HEALTH_EVERY_S - loop.time()) * 1000))
            try:
                got: Any = await r.xread(keys, count=READ_COUNT, block=wait_ms)
            except TRANSIENT:
                await asyncio.sleep(0.1)
                got = []
            ended = False
            for key, entries in got or []:
                keys[key.decode()] = entries[-1][0].decode()
                if key == ev_key:
                    for _id, fields in entries:
                        if (ev := _event(fields)) is not None:
                            yield sse("event", ev)
                            ended |= ev["kind"] == "call-ended"
                    continue
                direction = CALLER if key == in_key else ASSISTANT
                for _id, fields in entries:
                    if fields.get(b"k") == S.IN_MEDIA and (audio := fields.get(b"a")):
                        health.frame(direction, audio, S.entry_time_s(fields))
            now = loop.time()
            if not ended and now < window_at + HEALTH_EVERY_S:
                continue
            if now - said_at >= KEEPALIVE_S:  # a call not live yet sends nothing else
                said_at = now
                yield KEEPALIVE
            try:
                record: Any = await st.redis.hgetall(k.call(sid))
            except TRANSIENT:
                record = None
            if record is not None:
                row = views.row(sid, record) if record else {**shown, "status": S.STATUS_ENDED}
                if row != shown:
                    shown = row
                    yield sse("call", row)
                if row["status"] == S.STATUS_ENDED:
                    yield sse("end", {})
                    return
            if now >= window_at + HEALTH_EVERY_S:
                figures = health.window(now - window_at, time.time())
                window_at = now
                if shown["status"] == S.STATUS_LIVE:
                    said_at = now
                    yield sse("health", figures)
    finally:
        host.slots.give()
        metrics.CONSOLE_STREAMS.labels("call").dec()


# Listen in -----------------------------------------------------------------------------------

listen_router = APIRouter(prefix="/v1")


async def _close(ws: WebSocket, code: int, reason: str, cause: str | None = None) -> None:
    if cause:
        metrics.CONSOLE_REFUSED.labels(cause).inc()
    with contextlib.suppress(Exception):
        await ws.close(code, reason)


@listen_router.websocket("/calls/{call_sid}/listen")
async def listen(ws: WebSocket, call_sid: str) -> None:
    """Both directions of a live call, 20 ms μ-law frames behind a direction byte. Authorised
    by the first message, `{"key": …}` (a browser cannot set headers on a websocket)."""
    host = _host(ws)
    st = host.st
    await ws.accept()
    try:
        async with asyncio.timeout(LISTEN_AUTH_S):
            first = await ws.receive_text()
        given = orjson.loads(first).get("key") if len(first) < 4096 else None
    except (TimeoutError, WebSocketDisconnect, KeyError, RuntimeError, AttributeError,
            orjson.JSONDecodeError):
        given = None
    if not isinstance(given, str) or not api.key_ok(st, given.encode(errors="replace")):
        return await _close(ws, 4401, "missing or wrong API key", "unauthorized")
    if not SID_RE.fullmatch(call_sid):
        return await _close(ws, 4404, "unknown call", "unknown_call")
    if not host.slots.take():
        return await _close(ws, 1013, "the console's streams are all in use", "busy")
    metrics.CONSOLE_STREAMS.labels("listen").inc()
    try:
        await _listen(host, ws, call_sid)
    finally:
        host.slots.give()
        metrics.CONSOLE_STREAMS.labels("listen").dec()


async def _listen(host: ConsoleHost, ws: WebSocket, sid: str) -> None:
    st, r, k = host.st, host.redis, host.st.keys
    try:
        record: Any = await st.redis.hgetall(k.call(sid))
        ids = await _newest_ids(st.redis, k.inbound(sid), k.outbound(sid))
    except TRANSIENT:
        return await _close(ws, 1011, "redis unavailable")
    if not record:
        return await _close(ws, 4404, "unknown call", "unknown_call")
    if views.api_status(record) == S.STATUS_ENDED:
        return await _close(ws, 4409, "the call has ended")
    keys: dict[Any, Any] = {k.inbound(sid): ids[0], k.outbound(sid): ids[1]}
    in_key = k.inbound(sid).encode()
    gone = asyncio.create_task(_until_gone(ws))
    loop = asyncio.get_running_loop()
    check_at = loop.time() + HEALTH_EVERY_S
    timeout = st.settings.console_send_timeout_s
    try:
        while not gone.done() and not host.ending:
            try:
                got: Any = await r.xread(keys, count=READ_COUNT, block=1000)
            except TRANSIENT:
                await asyncio.sleep(0.1)
                got = []
            for key, entries in got or []:
                keys[key.decode()] = entries[-1][0].decode()
                direction = CALLER if key == in_key else ASSISTANT
                for _id, fields in entries:
                    audio = fields.get(b"a")
                    if fields.get(b"k") != S.IN_MEDIA or not audio:
                        continue
                    if S.entry_age_ms(fields) > LISTEN_MAX_AGE_MS:
                        metrics.CONSOLE_DROPPED_FRAMES.inc()
                        continue
                    try:
                        async with asyncio.timeout(timeout):
                            await ws.send_bytes(listen_frame(direction, audio))
                    except TimeoutError:
                        metrics.CONSOLE_CUT.labels("listen").inc()
                        return await _close(ws, 1008, "not reading")
                    except (WebSocketDisconnect, RuntimeError, OSError):
                        return None
            if loop.time() >= check_at:
                check_at = loop.time() + HEALTH_EVERY_S
                with contextlib.suppress(*TRANSIENT):
                    status: Any = await st.redis.hget(k.call(sid), "status")
                    if status is None or status == S.STATUS_ENDED.encode():
                        return await _close(ws, 4409, "the call has ended")
        if host.ending:
            await _close(ws, 1012, "the gateway is restarting")
        return None
    finally:
        await stop_tasks([gone], 2.0, what="listen-in reader")


async def _until_gone(ws: WebSocket) -> None:
    """Reads (and ignores) what the browser sends until it goes away."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return


def install(app: FastAPI, st: GatewayState) -> ConsoleHost:
    """Mount the console on the gateway's app; the lifespan closes the host it returns."""
    host = ConsoleHost(st)
    app.state.console = host
    app.include_router(page)
    app.include_router(router)
    app.include_router(listen_router)
    app.mount("/console/assets", StaticFiles(directory=UI_DIR, check_dir=False), name="console-assets")
    return host
