"""The console's streams end to end (docs/console.md): real gateway and worker processes, the
stand-ins, a real Redis; the feeds read as a browser reads them (a streamed GET with the bearer
header), the listen-in socket as a browser opens it. The page itself is driven in a real browser
by tests/test_console_browser.py."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import websockets

from shared import streams as S
from sim.vapi import greeter
from tests.conftest import Proc
from tests.test_e2e import Stack, caller_utterance, make_stack, wait_heard

KEY = "console-test-key-0123456789"
ENV = {"API_KEYS": KEY}


@pytest.fixture
async def stack(redis_url: str, prefix: str, procs: list[Proc],
                redis: aioredis.Redis) -> AsyncIterator[Stack]:
    async for s in make_stack(redis_url, prefix, procs, redis, assistant=greeter(answers=3), **ENV):
        yield s


def client(stack: Stack, key: str = KEY) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.gateway.env["PUBLIC_URL"], timeout=10,
                             headers={"Authorization": f"Bearer {key}"})


class Feed:
    """Server-sent events off a streamed response, as the console's fetch() reader parses them."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()

    async def next(self, timeout: float = 10.0) -> tuple[str, Any]:
        async def read() -> tuple[str, Any]:
            event, data = "", b""
            async for line in self.lines:
                if line.startswith(":"):
                    continue
                if not line:
                    if event:
                        return event, orjson.loads(data)
                    continue
                name, _, value = line.partition(": ")
                if name == "event":
                    event = value
                elif name == "data":
                    data = value.encode()
            raise EOFError("the stream ended")
        return await asyncio.wait_for(read(), timeout)

    async def until(self, pred: Any, timeout: float, what: str) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {what} within {timeout} s"
            event, data = await self.next(left)
            if pred(event, data):
                return event, data


async def metric(stack: Stack, name: str) -> float:
    async with httpx.AsyncClient() as c:
        text = (await c.get(stack.gateway.env["PUBLIC_URL"] + "/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def ws_url(stack: Stack, sid: str) -> str:
    return stack.gateway.env["PUBLIC_URL"].replace("http://", "ws://") + f"/v1/calls/{sid}/listen"


async def test_the_list_and_a_call_follow_a_call_live_and_listen_in_hears_both_ways(stack: Stack) -> None:
    async with client(stack) as c, c.stream("GET", "/v1/feed") as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-store"
        feed = Feed(resp)
        event, snap = await feed.next()
        assert event == "snapshot" and snap == {"calls": []}

        call = await stack.call()
        sid = call.call_sid
        _, first = await feed.until(lambda e, d: e == "call" and d["call"]["call_sid"] == sid, 10,
                                    "row for the new call")
        assert first["call"]["direction"] == "inbound" and first["call"]["from"] == call.from_
        await feed.until(lambda e, d: d["call"]["status"] == "live" and d["call"]["worker"], 10,
                         "the call live, with its worker")
        session = await stack.vapi.wait_session(10)
        await wait_heard(call, 1)  # the greeting

        # One call: the view, then its transcript and health as they happen.
        async with c.stream("GET", f"/v1/calls/{sid}/feed") as one:
            assert one.status_code == 200
            call_feed = Feed(one)
            event, view = await call_feed.next()
            assert event == "view" and view["call_sid"] == sid and view["status"] == "live"
            assert view["barge_ins"] == 0 and isinstance(view["events"], list)

            # Listen in meanwhile: both directions arrive, 20 ms μ-law behind a direction byte.
            async with websockets.connect(ws_url(stack, sid)) as ws:
                await ws.send(orjson.dumps({"key": KEY}).decode())
                call.say_pcm(caller_utterance(0))
                seen: dict[int, int] = {0: 0, 1: 0}
                deadline = time.monotonic() + 10
                while min(seen.values()) < 10:
                    assert time.monotonic() < deadline, f"listen-in frames each way: {seen}"
                    frame = await asyncio.wait_for(ws.recv(), 5)
                    assert isinstance(frame, bytes) and len(frame) == 161 and frame[0] in (0, 1)
                    seen[frame[0]] += 1

            _, said = await call_feed.until(
                lambda e, d: e == "event" and d["kind"] == "transcript" and d["data"]["role"] == "user",
                10, "the caller's transcript line")
            assert said["data"]["text"] and said["at"] > 0
            _, health = await call_feed.until(lambda e, d: e == "health" and d["frames_in_per_s"] > 0,
                                              5, "audio health with caller frames")
            assert 20 <= health["frames_in_per_s"] <= 80, health  # 50/s, give or take a window edge
            assert health["caller_level_dbfs"] is not None and isinstance(health["underruns"], int)

            _, turn = await feed.until(lambda e, d: d["kind"] == "turn-latency", 10,
                                       "the turn latency in the list")
            assert turn["call"]["last_turn_ms"] and turn["call"]["last_turn_ms"] > 0

            # Hang up (as the console's button does): both feeds see it end.
            assert (await c.post(f"/v1/calls/{sid}/hangup")).status_code == 202
            await call_feed.until(lambda e, d: e == "end", 10, "`end` on the call's feed")
            with pytest.raises(EOFError):
                await call_feed.next(5)  # and the server closed it
        _, gone = await feed.until(lambda e, d: d["call"]["status"] == "ended", 10, "the row ended")
        assert gone["call"]["end_reason"] == "api-hangup" and gone["kind"] == "ended"
        await session.wait_closed(5)

        # Ended calls stay viewable: the call feed answers with the view and `end`.
        async with c.stream("GET", f"/v1/calls/{sid}/feed") as again:
            ended = Feed(again)
            event, view = await ended.next()
            assert event == "view" and view["status"] == "ended" and view["transcript"]
            assert (await ended.next())[0] == "end"
        async with websockets.connect(ws_url(stack, sid)) as ws:
            await ws.send(orjson.dumps({"key": KEY}).decode())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4409


async def test_wrong_keys_unknown_calls_and_the_stream_bound_are_refused(
        redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis, CONSOLE_MAX_STREAMS=1, **ENV):
        unknown = "CA" + "0" * 32
        async with client(stack, "wrong-key") as bad:
            for path in ("/v1/feed", f"/v1/calls/{unknown}/feed"):
                r = await bad.get(path)
                assert r.status_code == 401 and "event:" not in r.text, (path, r.text)
        async with client(stack) as c:
            assert (await c.get(f"/v1/calls/{unknown}/feed")).status_code == 404
            page = await c.get("/console")  # the page needs no key: it carries no data
            assert page.status_code == 200 and "<html" in page.text.lower()
            assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
            assert page.headers["x-content-type-options"] == "nosniff"
            asset = await c.get("/console/assets/console.js")
            assert asset.status_code == 200 and "javascript" in asset.headers["content-type"]
            assert (await c.get("/console/assets/%2e%2e/console.py")).status_code == 404  # no way out
        for first, code in (('{"key": "wrong-key"}', 4401), ("not json", 4401),
                            (orjson.dumps({"key": KEY}).decode(), 4404)):
            async with websockets.connect(ws_url(stack, unknown)) as ws:
                await ws.send(first)
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == code, first
        # A key must come first, and soon: silence is refused too.
        async with websockets.connect(ws_url(stack, unknown)) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401

        # CONSOLE_MAX_STREAMS=1: a second call stream waits its turn with a 503 / 1013.
        call = await stack.call()
        await stack.vapi.wait_session(10)
        async with client(stack) as c, c.stream("GET", f"/v1/calls/{call.call_sid}/feed") as one:
            held = Feed(one)  # kept: a dropped reader would close the stream
            assert (await held.next())[0] == "view"
            r = await c.get(f"/v1/calls/{call.call_sid}/feed")
            assert r.status_code == 503 and "CONSOLE_MAX_STREAMS" in r.text
            async with websockets.connect(ws_url(stack, call.call_sid)) as ws:
                await ws.send(orjson.dumps({"key": KEY}).decode())
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        # The slot is given back when the browser goes away.
        async with client(stack) as c:
            deadline = time.monotonic() + 5
            while True:
                async with c.stream("GET", f"/v1/calls/{call.call_sid}/feed") as again:
                    if again.status_code == 200:
                        break
                assert time.monotonic() < deadline, "the call stream's slot was not given back"
                await asyncio.sleep(0.05)
        await call.hangup()


async def test_a_browser_that_stops_reading_the_list_is_cut_off(
        redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis) -> None:
    """A viewer that reads nothing: once a write to it has waited CONSOLE_SEND_TIMEOUT_S the
    gateway ends its stream (its rows never pile up: at most one per call waits), and a viewer
    that reads goes on. (More than CONSOLE_QUEUE calls waiting cuts too: tests/test_feed.py.)"""
    async for stack in make_stack(redis_url, prefix, procs, redis, CONSOLE_QUEUE=100,
                                  CONSOLE_SEND_TIMEOUT_S=1, **ENV):
        sids = [f"CA{i:032x}" for i in range(20)]
        for sid in sids:  # rows of ~0.6 KB: the worker name is the longest field a row carries
            await redis.hset(stack.keys.call(sid), mapping={
                "status": "live", "from": "+15550001111", "to": "+15550002222",
                "created": str(time.time()), "owner": "w" * 200})
            await redis.expire(stack.keys.call(sid), 60)
        url = urlsplit(stack.gateway.env["PUBLIC_URL"])
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        stuck.connect((url.hostname, url.port))
        stuck.sendall(f"GET /v1/feed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
        cut_metric = 'callbridge_console_streams_cut_total{kind="list"}'
        async with client(stack) as c, c.stream("GET", "/v1/feed") as resp:
            reader = Feed(resp)
            assert (await reader.next())[0] == "snapshot"
            before = await metric(stack, cut_metric)
            cut = False
            for i in range(1000):  # bounded: 20 rows a round, ~12 MB at most, far past any buffer
                pipe = redis.pipeline(transaction=False)
                for sid in sids:
                    pipe.xadd(stack.keys.feed, S.feed_entry("turn-latency", sid, orjson.dumps({"ms": i})))
                await pipe.execute()
                # The viewer that reads sees every round (it is never the one cut off).
                last, n = sids[-1], i
                await reader.until(lambda e, d, last=last, n=n: d["call"]["call_sid"] == last
                                   and d["call"]["last_turn_ms"] == n, 30,
                                   f"round {n} at the reading viewer")
                if i % 10 == 9 and await metric(stack, cut_metric) > before:
                    cut = True
                    break
            assert cut, "the viewer that never reads was not cut off"
            # It is closed, not parked: the socket reaches its end once what was sent is read.
            stuck.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while stuck.recv(65536):
                    pass
            stuck.close()
            # The reading viewer is still served.
            await redis.xadd(stack.keys.feed,
                             S.feed_entry("turn-latency", sids[0], orjson.dumps({"ms": 1e6})))
            await reader.until(lambda e, d: d["call"]["last_turn_ms"] == 1e6, 10, "the last update")
        await redis.delete(*(stack.keys.call(sid) for sid in sids))

        # A draining gateway (SIGTERM) ends its console streams at once: the browsers reconnect
        # to another gateway, and the drain is not held up by them.
        async with client(stack) as c, c.stream("GET", "/v1/feed") as resp:
            reader = Feed(resp)
            assert (await reader.next())[0] == "snapshot"
            stack.gateway.signal(signal.SIGTERM)
            asked = time.monotonic()
            with pytest.raises((EOFError, httpx.RemoteProtocolError, httpx.ReadError)):
                await reader.next(10)
            assert time.monotonic() - asked < 5, "the list stream outlived the drain"
