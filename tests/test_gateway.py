"""The gateway against real sockets and a real Redis: signatures, tokens, bad input, health."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from redis.exceptions import RedisError
from websockets.asyncio.client import ClientConnection

from callbridge.redis_server import RedisServer, free_port, start_redis
from gateway.app import create_app, drain, server_config
from gateway.state import GatewayState
from shared.serving import quiet_server
from shared.settings import Settings
from shared.streams import Keys
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, call_sid, sign


@dataclass
class Gw:
    base: str
    settings: Settings
    keys: Keys
    state: GatewayState

    @property
    def ws_url(self) -> str:
        return self.base.replace("http", "ws", 1) + "/twilio/media"


async def _serve(settings: Settings, port: int) -> AsyncIterator[GatewayState]:
    app = create_app(settings)
    server = quiet_server(server_config(app, settings, "127.0.0.1", port))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "gateway failed to start"
        await asyncio.sleep(0.01)
    try:
        yield app.state.gw
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def gw(redis_url: str, prefix: str) -> AsyncIterator[Gw]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = Settings(  # type: ignore[call-arg]
        REDIS_URL=redis_url, REDIS_PREFIX=prefix, PUBLIC_URL=base, TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN, START_TIMEOUT_S=0.5, MAX_MESSAGE_BYTES=4096, LOG_FORMAT="text")
    async for state in _serve(settings, port):
        yield Gw(base, settings, Keys(prefix), state)


def _form(sid: str) -> dict[str, str]:
    return {"AccountSid": ACCOUNT_SID, "CallSid": sid, "From": "+15550001111", "To": "+15550002222",
            "CallStatus": "ringing", "Direction": "inbound"}


async def _post(gw: Gw, path: str, form: dict[str, str], signature: str | None = "auto") -> httpx.Response:
    headers = {}
    if signature == "auto":
        headers["X-Twilio-Signature"] = sign(gw.base + path, form)
    elif signature is not None:
        headers["X-Twilio-Signature"] = signature
    async with httpx.AsyncClient() as client:
        return await client.post(gw.base + path, data=form, headers=headers)


async def _answer(gw: Gw, sid: str) -> str:
    """Answer a call; returns the stream token from the TwiML."""
    resp = await _post(gw, "/twilio/voice", _form(sid))
    assert resp.status_code == 200, resp.text
    param = ET.fromstring(resp.text).find("./Connect/Stream/Parameter")
    assert param is not None
    return str(param.get("value"))


async def _metric(gw: Gw, name: str, **labels: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(gw.base + "/metrics")).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+-]+)"
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


def _start_msg(sid: str, token: str, stream_sid: str = "MZ" + "0" * 32) -> str:
    return orjson.dumps({
        "event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
        "start": {"accountSid": ACCOUNT_SID, "streamSid": stream_sid, "callSid": sid,
                  "tracks": ["inbound"], "customParameters": {"token": token},
                  "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}},
    }).decode()


def _media_msg(payload: bytes, seq: int = 2) -> str:
    return orjson.dumps({"event": "media", "sequenceNumber": str(seq), "streamSid": "MZ" + "0" * 32,
                         "media": {"track": "inbound", "chunk": str(seq - 1), "timestamp": "20",
                                   "payload": base64.b64encode(payload).decode()}}).decode()


async def _open(gw: Gw, signature: str | None = "auto") -> ClientConnection:
    headers = {}
    if signature == "auto":
        headers["X-Twilio-Signature"] = sign(gw.settings.stream_url)
    elif signature is not None:
        headers["X-Twilio-Signature"] = signature
    return await websockets.connect(gw.ws_url, additional_headers=headers, open_timeout=5)


async def _entries(redis: aioredis.Redis, key: str) -> list[dict[bytes, bytes]]:
    return [f for _id, f in await redis.xrange(key)]


# Webhooks ------------------------------------------------------------------------------------


async def test_voice_webhook_rejects_unsigned_and_wrongly_signed(gw: Gw, redis: aioredis.Redis) -> None:
    before = await _metric(gw, "callbridge_gateway_webhooks_total", route="voice", outcome="forbidden")
    sid = call_sid()
    assert (await _post(gw, "/twilio/voice", _form(sid), signature=None)).status_code == 403
    assert (await _post(gw, "/twilio/voice", _form(sid), signature="bm9wZQ==")).status_code == 403
    # Signed for another URL (a proxy's internal address) is wrong too.
    bad = sign("http://internal:8080/twilio/voice", _form(sid))
    assert (await _post(gw, "/twilio/voice", _form(sid), signature=bad)).status_code == 403
    assert await redis.exists(gw.keys.call(sid)) == 0
    after = await _metric(gw, "callbridge_gateway_webhooks_total", route="voice", outcome="forbidden")
    assert after - before == 3


async def test_voice_webhook_answers_and_enqueues_once(gw: Gw, redis: aioredis.Redis) -> None:
    sid = call_sid()
    token = await _answer(gw, sid)
    await _answer(gw, sid)  # Twilio retried the webhook
    assert token
    call = await redis.hgetall(gw.keys.call(sid))
    assert call[b"status"] == b"ringing" and call[b"from"] == b"+15550001111"
    jobs = await redis.xrange(gw.keys.calls)
    assert [f[b"sid"] for _i, f in jobs] == [sid.encode()]
    assert 0 < await redis.ttl(gw.keys.call(sid)) <= gw.settings.call_ttl_s


async def test_webhook_without_call_sid_is_a_clear_400(gw: Gw) -> None:
    form = {"AccountSid": ACCOUNT_SID, "From": "+1"}
    resp = await _post(gw, "/twilio/voice", form)
    assert resp.status_code == 400 and "CallSid" in resp.text


async def test_stream_ended_decides_hangup_dial_or_reconnect(gw: Gw, redis: aioredis.Redis) -> None:
    live = call_sid()
    await _answer(gw, live)
    resp = await _post(gw, "/twilio/stream-ended", _form(live))
    assert ET.fromstring(resp.text).find("./Connect/Stream") is not None  # still live: re-attach

    ended = call_sid()
    await _answer(gw, ended)
    await redis.hset(gw.keys.call(ended), mapping={"status": "ended", "say": "Goodbye."})
    root = ET.fromstring((await _post(gw, "/twilio/stream-ended", _form(ended))).text)
    assert [e.tag for e in root] == ["Say", "Hangup"]

    moved = call_sid()
    await _answer(gw, moved)
    await redis.hset(gw.keys.call(moved), mapping={"status": "ended", "transfer_to": "+14155550100"})
    root = ET.fromstring((await _post(gw, "/twilio/stream-ended", _form(moved))).text)
    assert root[0].tag == "Dial" and root[0][0].text == "+14155550100"

    unknown = call_sid()
    root = ET.fromstring((await _post(gw, "/twilio/stream-ended", _form(unknown))).text)
    assert [e.tag for e in root] == ["Hangup"]
    assert (await _post(gw, "/twilio/stream-ended", _form(unknown), signature=None)).status_code == 403


async def test_status_callback_is_signed_and_recorded(gw: Gw, redis: aioredis.Redis) -> None:
    sid = call_sid()
    form = {**_form(sid), "StreamEvent": "stream-error", "StreamError": "boom"}
    assert (await _post(gw, "/twilio/status", form, signature=None)).status_code == 403
    assert (await _post(gw, "/twilio/status", form)).status_code == 204
    await asyncio.sleep(0)  # let the batch writer's flush task run
    app_writer_flushed = False
    for _ in range(100):
        if await redis.xlen(gw.keys.events(sid)):
            app_writer_flushed = True
            break
        await asyncio.sleep(0.01)
    assert app_writer_flushed
    (entry,) = await _entries(redis, gw.keys.events(sid))
    assert orjson.loads(entry[b"v"]) == {"status": "stream-error", "detail": "boom"}


# Media socket --------------------------------------------------------------------------------


async def test_media_socket_without_or_with_wrong_signature_is_refused(gw: Gw) -> None:
    before = await _metric(gw, "callbridge_gateway_media_rejected_total", cause="bad_signature")
    for signature in (None, sign("wss://elsewhere.example.com/twilio/media"), "garbage"):
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            await _open(gw, signature=signature)
        assert info.value.response.status_code == 403
    after = await _metric(gw, "callbridge_gateway_media_rejected_total", cause="bad_signature")
    assert after - before == 3


async def test_media_socket_with_wrong_token_is_closed_before_audio(gw: Gw, redis: aioredis.Redis) -> None:
    before = await _metric(gw, "callbridge_gateway_media_rejected_total", cause="bad_token")
    sid = call_sid()
    await _answer(gw, sid)
    other = call_sid()
    other_token = await _answer(gw, other)
    for token in ("", "123.abc", other_token):  # a token for another call does not open this one
        ws = await _open(gw)
        await ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        await ws.send(_start_msg(sid, token))
        await ws.send(_media_msg(b"\x01" * 160))
        with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert await redis.exists(gw.keys.inbound(sid)) == 0, "no audio may flow"
    assert await _metric(gw, "callbridge_gateway_media_rejected_total", cause="bad_token") - before == 3


async def test_media_socket_for_unknown_call_is_closed(gw: Gw, redis: aioredis.Redis) -> None:
    from shared.security import make_stream_token

    sid = call_sid()  # never answered: no call record, even with a valid token
    token = make_stream_token(gw.settings.token_secret, sid, 60)
    ws = await _open(gw)
    await ws.send(_start_msg(sid, token))
    with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
        await asyncio.wait_for(ws.recv(), 5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert await redis.exists(gw.keys.inbound(sid)) == 0


async def test_no_start_within_deadline_closes_the_socket(gw: Gw) -> None:
    before = await _metric(gw, "callbridge_gateway_media_rejected_total", cause="no_start")
    ws = await _open(gw)
    await ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(websockets.exceptions.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert loop.time() - t0 < 3, "closed by the start deadline (0.5 s), not by a timeout here"
    assert await _metric(gw, "callbridge_gateway_media_rejected_total", cause="no_start") - before == 1


async def test_bad_messages_are_counted_and_dropped_and_the_call_continues(
    gw: Gw, redis: aioredis.Redis
) -> None:
    causes = ("not_json", "unknown_event", "oversized", "binary", "bad_base64")
    before = {c: await _metric(gw, "callbridge_messages_dropped_total", cause=c) for c in causes}
    sid = call_sid()
    token = await _answer(gw, sid)
    ws = await _open(gw)
    await ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
    await ws.send(_start_msg(sid, token))
    await ws.send("this is not json")
    await ws.send('{"event":"surprise","x":1}')
    await ws.send("{" + " " * 8000 + "}")  # over MAX_MESSAGE_BYTES (4096 here)
    await ws.send(b"\x00\x01binary")
    await ws.send('{"event":"media","sequenceNumber":"3","media":{"payload":"%%%not-base64%%%"}}')
    good = bytes(range(160))
    await ws.send(_media_msg(good, seq=4))
    await ws.send('{"event":"dtmf","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"7"}}')
    await ws.send('{"event":"mark","sequenceNumber":"6","mark":{"name":"0:100"}}')
    await ws.send(f'{{"event":"stop","sequenceNumber":"7","stop":{{"callSid":"{sid}"}}}}')
    for _ in range(300):
        entries = await _entries(redis, gw.keys.inbound(sid))
        if entries and entries[-1][b"k"] == b"stop":
            break
        await asyncio.sleep(0.01)
    kinds = [(e[b"k"], e.get(b"a"), e.get(b"v")) for e in entries]
    assert [k for k, _a, _v in kinds] == [b"start", b"m", b"dtmf", b"mark", b"stop"]
    assert kinds[1][1] == good and kinds[2][2] == b"7" and kinds[3][2] == b"0:100"
    for cause in causes:
        after = await _metric(gw, "callbridge_messages_dropped_total", cause=cause)
        assert after - before[cause] == 1, cause
    await ws.close()


async def test_outbound_entries_reach_twilio_and_hangup_closes(gw: Gw, redis: aioredis.Redis) -> None:
    from shared import streams as S

    sid = call_sid()
    token = await _answer(gw, sid)
    ws = await _open(gw)
    await ws.send(_start_msg(sid, token, stream_sid="MZ" + "7" * 32))
    for _ in range(300):
        if await redis.xlen(gw.keys.inbound(sid)):
            break
        await asyncio.sleep(0.01)
    out = gw.keys.outbound(sid)
    await redis.xadd(out, S.entry(S.OUT_MEDIA, b"\x11" * 160))
    await redis.xadd(out, S.entry(S.OUT_MARK, value="0:20"))
    await redis.xadd(out, S.entry(S.OUT_CLEAR))
    got = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
    assert got[0] == {"event": "media", "streamSid": "MZ" + "7" * 32,
                      "media": {"payload": base64.b64encode(b"\x11" * 160).decode()}}
    assert got[1]["mark"] == {"name": "0:20"} and got[2]["event"] == "clear"
    await redis.xadd(out, S.entry(S.OUT_HANGUP))
    with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
        await asyncio.wait_for(ws.recv(), 5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1000
    for _ in range(300):
        entries = await _entries(redis, gw.keys.inbound(sid))
        if entries[-1][b"k"] == S.IN_DETACH:
            break
        await asyncio.sleep(0.01)
    assert entries[-1] [b"v"] == b"hangup"


async def _attached_at_epoch(gw: Gw, redis: aioredis.Redis, epoch: int) -> tuple[str, ClientConnection]:
    """A call whose owner is at `epoch`, with a Twilio socket attached to the gateway."""
    sid = call_sid()
    token = await _answer(gw, sid)
    await redis.hset(gw.keys.call(sid), "epoch", str(epoch))
    ws = await _open(gw)
    await ws.send(_start_msg(sid, token))
    for _ in range(300):
        if await redis.xlen(gw.keys.inbound(sid)):
            break
        await asyncio.sleep(0.01)
    return sid, ws


async def test_a_replaced_owner_cannot_reach_the_caller(gw: Gw, redis: aioredis.Redis) -> None:
    """Ownership fencing at the gateway: once the new owner's `own` marker (epoch 2) is on `out`,
    the old owner's entries (epoch 1) are dropped, and Twilio is told to flush what the old one
    left in its buffer."""
    from shared import streams as S

    sid, ws = await _attached_at_epoch(gw, redis, 1)
    dropped = await _metric(gw, "callbridge_messages_dropped_total", cause="stale_owner")
    out = gw.keys.outbound(sid)
    old, new = b"\x11" * 160, b"\x22" * 160
    await redis.xadd(out, S.entry(S.OUT_MEDIA, old, epoch=b"1"))
    await redis.xadd(out, {b"k": S.OUT_OWN, b"e": b"2"})
    await redis.xadd(out, S.entry(S.OUT_MEDIA, old, epoch=b"1"))  # the frozen owner woke up
    await redis.xadd(out, S.entry(S.OUT_HANGUP, epoch=b"1"))
    await redis.xadd(out, S.entry(S.OUT_MEDIA, new, epoch=b"2"))
    got = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
    assert [g["event"] for g in got] == ["media", "clear", "media"]
    assert base64.b64decode(got[0]["media"]["payload"]) == old
    assert base64.b64decode(got[2]["media"]["payload"]) == new, "the old owner's frame and hang-up dropped"
    assert await _metric(gw, "callbridge_messages_dropped_total", cause="stale_owner") == dropped + 2
    await ws.close()


async def test_a_socket_attached_after_a_takeover_starts_at_the_owner_s_epoch(
        gw: Gw, redis: aioredis.Redis) -> None:
    from shared import streams as S

    sid, ws = await _attached_at_epoch(gw, redis, 3)
    out = gw.keys.outbound(sid)
    await redis.xadd(out, S.entry(S.OUT_MEDIA, b"\x11" * 160, epoch=b"2"))
    await redis.xadd(out, S.entry(S.OUT_MEDIA, b"\x33" * 160, epoch=b"3"))
    got = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
    assert base64.b64decode(got["media"]["payload"]) == b"\x33" * 160
    await ws.close()


async def test_health_and_readiness(gw: Gw) -> None:
    async with httpx.AsyncClient() as client:
        assert (await client.get(gw.base + "/healthz")).status_code == 200
        assert (await client.get(gw.base + "/readyz")).status_code == 200
        metrics = await client.get(gw.base + "/metrics")
        assert "callbridge_gateway_media_sockets" in metrics.text


async def test_draining_gateway_is_not_ready_refuses_new_streams_and_hands_back_live_ones(
    gw: Gw, redis: aioredis.Redis
) -> None:
    live_sid = call_sid()
    live = await _open(gw)
    await live.send(_start_msg(live_sid, await _answer(gw, live_sid)))
    deadline = asyncio.get_running_loop().time() + 5
    while not gw.state.sockets:  # attached once the start is authorized
        assert asyncio.get_running_loop().time() < deadline, "the stream never attached"
        await asyncio.sleep(0.01)
    refused_before = await _metric(gw, "callbridge_gateway_media_rejected_total", cause="draining")
    draining = asyncio.create_task(drain(gw.state))
    await asyncio.sleep(0)  # drain has begun: the flag is set before its first await
    async with httpx.AsyncClient() as client:
        assert (await client.get(gw.base + "/readyz")).status_code == 503
        assert (await client.get(gw.base + "/healthz")).status_code == 200, "alive while draining"
    with pytest.raises(websockets.exceptions.InvalidStatus):
        await _open(gw)  # a new stream (e.g. Twilio re-attaching here) is refused at the handshake
    await asyncio.wait_for(draining, 10)
    with pytest.raises(websockets.exceptions.ConnectionClosed):
        await asyncio.wait_for(live.recv(), 5)
    assert live.close_code == 1001, "the live stream is handed back to Twilio (going away)"
    refused = await _metric(gw, "callbridge_gateway_media_rejected_total", cause="draining")
    assert refused == refused_before + 1
    assert not gw.state.sockets


async def test_readyz_is_503_when_redis_is_down(prefix: str) -> None:
    port = free_port()
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(  # type: ignore[call-arg]
        REDIS_URL=dead, REDIS_PREFIX=prefix, PUBLIC_URL=f"http://127.0.0.1:{port}",
        TWILIO_AUTH_TOKEN=AUTH_TOKEN, LOG_FORMAT="text")
    async for _state in _serve(settings, port):
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
            ready = await client.get(f"http://127.0.0.1:{port}/readyz")
            assert ready.status_code == 503 and "redis" in ready.text
            sid = call_sid()
            base = f"http://127.0.0.1:{port}"
            form = _form(sid)
            resp = await client.post(base + "/twilio/voice", data=form,
                                     headers={"X-Twilio-Signature": sign(base + "/twilio/voice", form)})
            assert resp.status_code == 503  # Twilio retries, then uses the number's fallback URL


async def test_a_stream_token_works_once(gw: Gw, redis: aioredis.Redis) -> None:
    sid = call_sid()
    token = await _answer(gw, sid)
    first = await _open(gw)
    await first.send(_start_msg(sid, token))
    for _ in range(300):
        if await redis.xlen(gw.keys.inbound(sid)):
            break
        await asyncio.sleep(0.01)
    replay = await _open(gw)  # someone replays the captured start on a second socket
    await replay.send(_start_msg(sid, token, stream_sid="MZ" + "9" * 32))
    with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
        await asyncio.wait_for(replay.recv(), 5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    starts = [f for f in await _entries(redis, gw.keys.inbound(sid)) if f[b"k"] == b"start"]
    assert len(starts) == 1
    await first.close()


async def test_reattaching_is_bounded(gw: Gw, redis: aioredis.Redis) -> None:
    sid = call_sid()
    await _answer(gw, sid)
    outcomes = []
    for _ in range(gw.settings.max_reattaches + 2):
        root = ET.fromstring((await _post(gw, "/twilio/stream-ended", _form(sid))).text)
        outcomes.append(root[0].tag)
    assert outcomes[: gw.settings.max_reattaches] == ["Connect"] * gw.settings.max_reattaches
    assert outcomes[-1] == "Say" and root[-1].tag == "Hangup"


async def _attached(gw: Gw, redis: aioredis.Redis, sid: str, starts: int) -> None:
    """Wait until `starts` start entries are on the call's inbound stream."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        got = [f for f in await _entries(redis, gw.keys.inbound(sid)) if f[b"k"] == b"start"]
        if len(got) >= starts:
            return
        assert asyncio.get_running_loop().time() < deadline, f"only {len(got)} of {starts} starts"
        await asyncio.sleep(0.01)


async def test_reattach_token_minted_in_the_same_second_as_a_used_one_is_accepted(
    gw: Gw, redis: aioredis.Redis
) -> None:
    """Two `<Connect action>` answers within one second carry different tokens, so the second
    re-attach is not refused as `token_reused`."""
    sid = call_sid()
    first = await _open(gw)
    await first.send(_start_msg(sid, await _answer(gw, sid)))
    await _attached(gw, redis, sid, 1)
    await first.close()

    async def reattach_token() -> str:
        root = ET.fromstring((await _post(gw, "/twilio/stream-ended", _form(sid))).text)
        param = root.find("./Connect/Stream/Parameter")
        assert param is not None
        return str(param.get("value"))

    # Two tokens minted in the same second (the expiry is their first part); consecutive pairs
    # straddle a second boundary at most once, so this takes at most three answers.
    a, b = await reattach_token(), await reattach_token()
    while a.split(".")[0] != b.split(".")[0]:
        a, b = b, await reattach_token()
    rejected_before = await _metric(gw, "callbridge_gateway_media_rejected_total", cause="token_reused")
    for n, token in enumerate((a, b), start=2):
        ws = await _open(gw)
        await ws.send(_start_msg(sid, token, stream_sid=f"MZ{n:032d}"))
        await _attached(gw, redis, sid, n)
        await ws.close()
    reused = await _metric(gw, "callbridge_gateway_media_rejected_total", cause="token_reused")
    assert reused == rejected_before


async def _ttls(redis: aioredis.Redis, prefix: str) -> dict[str, int]:
    return {k.decode(): await redis.ttl(k) async for k in redis.scan_iter(match=f"{prefix}*")}


async def test_every_key_the_gateway_creates_expires(gw: Gw, redis: aioredis.Redis, prefix: str) -> None:
    """A call whose every process died must not leave keys behind: each key a gateway write can
    create (also after the hash or `:in` vanished) has an expiry, and an ended call's shorter
    expiry is not stretched back to CALL_TTL_S. The job queue `calls` is the one exception."""
    from shared import streams as S

    sid = call_sid()
    token = await _answer(gw, sid)
    form = {**_form(sid), "StreamEvent": "stream-started"}
    assert (await _post(gw, "/twilio/status", form)).status_code == 204  # creates :events
    await gw.state.writer.flush()
    assert 0 < await redis.ttl(gw.keys.events(sid)) <= gw.settings.call_ttl_s
    ws = await _open(gw)
    await ws.send(_start_msg(sid, token))
    await _attached(gw, redis, sid, 1)
    await ws.send(_media_msg(b"\x01" * 160))
    await redis.delete(gw.keys.call(sid))  # the hash expired (or Redis lost it) mid-call
    await ws.send(f'{{"event":"stop","sequenceNumber":"9","stop":{{"callSid":"{sid}"}}}}')
    deadline = asyncio.get_running_loop().time() + 5
    while await redis.hget(gw.keys.call(sid), "status") != b"ended":
        assert asyncio.get_running_loop().time() < deadline, "stop was not recorded"
        await asyncio.sleep(0.01)

    # A socket for a call that ended while its :in had already gone: the gateway writes detach.
    ended = call_sid()
    token = await _answer(gw, ended)
    await redis.hset(gw.keys.call(ended), "status", S.STATUS_ENDED)
    ws = await _open(gw)
    await ws.send(_start_msg(ended, token))
    with pytest.raises(websockets.exceptions.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    # A worker completed this one: its keys carry ENDED_TTL_S, which a late status callback keeps.
    await redis.expire(gw.keys.events(sid), 120)
    late = await _post(gw, "/twilio/status", {**_form(sid), "StreamEvent": "stream-stopped"})
    assert late.status_code == 204
    await gw.state.writer.flush()

    ttls = await _ttls(redis, prefix)
    assert gw.keys.inbound(ended) in ttls, "the detach was written"
    # The deployment-wide keys are bounded by pruning or MAXLEN, not by expiry
    # (docs/architecture.md).
    shared = (gw.keys.calls, gw.keys.active, gw.keys.index, gw.keys.feed)
    persistent = sorted(k for k, ttl in ttls.items() if ttl < 0 and k not in shared)
    assert persistent == [], persistent
    assert all(ttl <= gw.settings.call_ttl_s for ttl in ttls.values())
    assert 0 < ttls[gw.keys.events(sid)] <= 120


async def test_caller_numbers_are_masked_at_info_and_whole_only_at_debug(
    gw: Gw, redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A call through the gateway (webhook, stream, stop): no INFO-or-above line carries a whole
    phone number, in its message or its structured fields; DEBUG may."""
    from shared.logs import JsonFormatter

    caplog.set_level(logging.DEBUG, logger="callbridge")
    sid = call_sid()
    ws = await _open(gw)
    await ws.send(_start_msg(sid, await _answer(gw, sid)))
    await _attached(gw, redis, sid, 1)
    await ws.send(f'{{"event":"stop","sequenceNumber":"2","stop":{{"callSid":"{sid}"}}}}')
    with pytest.raises(websockets.exceptions.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    fmt = JsonFormatter()
    lines = [(r.levelno, fmt.format(r)) for r in caplog.records if r.name.startswith("callbridge")]
    numbers = ("15550001111", "15550002222")
    loud = [line for level, line in lines if level >= logging.INFO]
    assert any("call answered" in line for line in loud)
    assert not [line for line in loud if any(n in line for n in numbers)], loud
    assert any("***1111" in line for line in loud), "the masked caller number is still logged"
    assert any(numbers[0] in line for level, line in lines if level == logging.DEBUG)


MZ = "MZ" + "0" * 32
# Malformed messages after a good `start`: each must be counted and dropped, and the call go on.
AFTER_START = [
    '{"event":"connected","protocol":5,"version":"1.0.0"}',
    '{"event":"connected","protocol":"Call","version":{"a":1}}',
    '{"event":"media"}',
    '{"event":"media","media":"AAAA"}',
    '{"event":"media","media":null}',
    '{"event":"media","media":["AAAA"]}',
    '{"event":"media","media":{}}',
    '{"event":"media","media":{"payload":5}}',
    '{"event":"media","media":{"payload":null}}',
    '{"event":"media","media":{"payload":["AAAA"]}}',
    '{"event":"media","media":{"payload":"AAAA","track":"outbound"}}',
    '{"event":"media","media":{"payload":"AAAA","track":5}}',
    '{"event":"media","media":{"payload":"AAAA","chunk":{"a":1}}}',
    '{"event":"media","media":{"payload":"AAAA","timestamp":"1e3"}}',
    '{"event":"media","media":{"payload":"AAAA","timestamp":true}}',
    '{"event":"media","sequenceNumber":[1],"media":{"payload":"AAAA"}}',
    '{"event":"media","sequenceNumber":"' + "9" * 3000 + '","media":{"payload":"AAAA"}}',
    '{"event":"media","media":{"payload":"' + "A" * 3001 + '"}}',
    '{"event":"mark"}',
    '{"event":"mark","mark":"0:100"}',
    '{"event":"mark","mark":{"name":5}}',
    '{"event":"mark","mark":{"name":null}}',
    '{"event":"mark","mark":{"name":"' + "n" * 3000 + '"}}',
    '{"event":"dtmf"}',
    '{"event":"dtmf","dtmf":"7"}',
    '{"event":"dtmf","dtmf":{"digit":7}}',
    '{"event":"dtmf","dtmf":{"digit":"77"}}',
    '{"event":"dtmf","dtmf":{}}',
    '{"event":"stop","stop":"x"}',
    '{"event":"stop","stop":{"callSid":5}}',
    '{"event":"stop","sequenceNumber":{},"stop":{}}',
    '{"event":"start","start":"x"}',  # a second start, malformed
    '{"event":5}',
    '{"event":null}',
    '{"event":["media"]}',
    '{"event":"' + "e" * 3000 + '"}',
    '{"event":"media","extra":' + "[" * 2000 + "]" * 2000 + "}",  # nested past orjson's limit
    "[]",
    "null",
    '"media"',
    "1e999",
]
# Malformed starts: the socket is closed with a close frame, never dropped (1006).
BAD_STARTS = [
    '{"event":"start","start":"x"}',
    '{"event":"start","start":null}',
    '{"event":"start","start":[1]}',
    '{"event":"start","start":{}}',
    '{"event":"start","streamSid":5,"start":{"callSid":"CA' + "0" * 32 + '"}}',
    '{"event":"start","start":{"streamSid":"MZ1","callSid":5}}',
    '{"event":"start","start":{"streamSid":"MZ1","callSid":{"a":1}}}',
    '{"event":"start","start":{"streamSid":"MZ1","callSid":"CA1","customParameters":"token"}}',
    '{"event":"start","start":{"streamSid":"MZ1","callSid":"CA1","customParameters":{"token":5}}}',
    '{"event":"start","start":{"streamSid":"MZ1","callSid":"CA1","customParameters":[]}}',
    '{"event":"start","start":{"streamSid":"MZ1","callSid":"CA1","accountSid":[]}}',
    '{"event":"start","start":{"streamSid":"MZ1","callSid":"CA1","mediaFormat":"x"}}',
    '{"event":"start","start":{"streamSid":"' + "M" * 3000 + '","callSid":"CA1"}}',
    '{"event":"start","sequenceNumber":"x","start":{"streamSid":"MZ1","callSid":"CA1"}}',
]


class _Raised(logging.Handler):
    """Collects what uvicorn logs when the app raises out of a websocket handler."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_malformed_twilio_messages_are_dropped_or_close_with_a_frame(
    gw: Gw, redis: aioredis.Redis
) -> None:
    """Wrong types for every field of every event, missing fields, unknown events, huge values,
    through the real socket: a bad message after `start` is counted and dropped and the call
    goes on (the next frame and `stop` arrive, nothing else); a bad `start` closes the socket with
    a close frame and a counted cause. The gateway never raises out of the handler."""
    raised = _Raised()
    logging.getLogger("uvicorn.error").addHandler(raised)
    try:
        good = bytes(range(160))
        for n, bad in enumerate(AFTER_START):
            sid = call_sid()
            ws = await _open(gw)
            await ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
            await ws.send(_start_msg(sid, await _answer(gw, sid)))
            await ws.send(bad)
            await ws.send(_media_msg(good))
            await ws.send(f'{{"event":"stop","sequenceNumber":"9","stop":{{"callSid":"{sid}"}}}}')
            deadline = asyncio.get_running_loop().time() + 5
            while True:
                kinds = [f[b"k"] for f in await _entries(redis, gw.keys.inbound(sid))]
                if kinds and kinds[-1] == b"stop":
                    break
                assert asyncio.get_running_loop().time() < deadline, \
                    f"case {n} ended the call (close code {ws.close_code}): {bad[:80]}"
                await asyncio.sleep(0.01)
            assert kinds == [b"start", b"m", b"stop"], f"case {n} was forwarded: {bad[:80]}"
            assert ws.close_code in (None, 1000), (n, ws.close_code)  # 1000: closed after the stop
            await ws.close()

        before = await _metric(gw, "callbridge_gateway_media_rejected_total", cause="bad_start")
        for n, bad in enumerate(BAD_STARTS):
            ws = await _open(gw)
            await ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
            await ws.send(bad)
            with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None, f"start case {n} dropped without a close frame"
            assert info.value.rcvd.code == 1008, (n, info.value.rcvd.code)
        after = await _metric(gw, "callbridge_gateway_media_rejected_total", cause="bad_start")
        assert after - before == len(BAD_STARTS)

        sid = call_sid()  # a frame over WS_MAX_SIZE ends the socket, with a close frame
        ws = await _open(gw)
        await ws.send(_start_msg(sid, await _answer(gw, sid)))
        await ws.send('{"event":"media","media":{"payload":"' + "A" * (2 << 20) + '"}}')
        with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        assert await _metric(gw, "callbridge_messages_dropped_total", cause="not_inbound") >= 1
    finally:
        logging.getLogger("uvicorn.error").removeHandler(raised)
    assert not raised.records, [r.getMessage() for r in raised.records]


async def _live_socket(gw: Gw, redis: aioredis.Redis, stream_sid: str = MZ) -> tuple[str, ClientConnection]:
    sid = call_sid()
    ws = await _open(gw)
    await ws.send(_start_msg(sid, await _answer(gw, sid), stream_sid=stream_sid))
    await _attached(gw, redis, sid, 1)
    return sid, ws


async def test_bad_out_entries_are_dropped_and_the_audio_goes_on(gw: Gw, redis: aioredis.Redis) -> None:
    """`out` entries are untrusted too: one without audio, with too much, with a mark name that
    is not text or of an unknown kind is counted and dropped; the entries after it still play."""
    from shared import streams as S

    before = await _metric(gw, "callbridge_messages_dropped_total", cause="bad_out_entry")
    sid, ws = await _live_socket(gw, redis)
    out = gw.keys.outbound(sid)
    for fields in ({b"k": b"m"}, {b"k": b"m", b"a": b"\x01" * 100_000}, {b"k": b"mark", b"v": b"\xff\xfe"},
                   {b"k": b"mark", b"v": b"n" * 1000}, {b"k": b"surprise"}):
        await redis.xadd(out, fields)
    await redis.xadd(out, {b"k": b"m", b"a": b"\x02" * 160, b"t": b"not-a-time"})  # audio is fine
    await redis.xadd(out, S.entry(S.OUT_MEDIA, b"\x03" * 160))
    await redis.xadd(out, S.entry(S.OUT_MARK, value="1:40"))
    got = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
    assert [m["event"] for m in got] == ["media", "media", "mark"]
    assert base64.b64decode(got[0]["media"]["payload"]) == b"\x02" * 160
    assert base64.b64decode(got[1]["media"]["payload"]) == b"\x03" * 160
    assert got[2]["mark"]["name"] == "1:40"
    assert await _metric(gw, "callbridge_messages_dropped_total", cause="bad_out_entry") - before == 5
    await ws.close()


async def _closed_for_error(gw: Gw, redis: aioredis.Redis, sid: str, ws: ClientConnection,
                            caplog: pytest.LogCaptureFixture, before: float) -> None:
    """The socket ended with 1011 (so Twilio re-attaches), counted, logged with the call_sid and
    the error type but not its message, and the worker was told the stream is lost."""
    with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1011
    assert await _metric(gw, "callbridge_gateway_media_closed_total", cause="error") - before == 1
    deadline = asyncio.get_running_loop().time() + 5
    while (await _entries(redis, gw.keys.inbound(sid)))[-1][b"k"] != b"detach":
        assert asyncio.get_running_loop().time() < deadline, "no detach for the worker"
        await asyncio.sleep(0.01)
    assert (await _entries(redis, gw.keys.inbound(sid)))[-1][b"v"] == b"lost"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("callbridge")]
    assert any(getattr(r, "call_sid", None) == sid and getattr(r, "error", None) == "RuntimeError"
               for r in errors), [r.__dict__ for r in errors]
    from shared.logs import JsonFormatter

    assert not [r for r in caplog.records if "SECRET" in JsonFormatter().format(r)]


async def test_a_failing_sender_closes_the_socket_with_1011(
    gw: Gw, redis: aioredis.Redis, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Either direction failing ends both: no call keeps its uplink with a dead downlink."""
    from shared import streams as S
    from shared.twilio_proto import Outbound

    def broken(self: Outbound, ulaw: bytes) -> str:
        raise RuntimeError("auth token SECRET must not be logged")

    caplog.set_level(logging.INFO, logger="callbridge")
    before = await _metric(gw, "callbridge_gateway_media_closed_total", cause="error")
    sid, ws = await _live_socket(gw, redis)
    monkeypatch.setattr(Outbound, "media", broken)  # a bug in the downlink, injected
    await redis.xadd(gw.keys.outbound(sid), S.entry(S.OUT_MEDIA, b"\x01" * 160))
    await _closed_for_error(gw, redis, sid, ws, caplog, before)


async def test_a_failing_receiver_closes_the_socket_with_1011(
    gw: Gw, redis: aioredis.Redis, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.receiver

    real = gateway.receiver.parse

    def broken(text: str | bytes) -> Any:
        if "boom" in str(text):
            raise RuntimeError("Vapi key SECRET must not be logged")
        return real(text)

    caplog.set_level(logging.INFO, logger="callbridge")
    before = await _metric(gw, "callbridge_gateway_media_closed_total", cause="error")
    sid, ws = await _live_socket(gw, redis)
    monkeypatch.setattr(gateway.receiver, "parse", broken)  # a bug in the uplink, injected
    await ws.send('{"event":"boom"}')
    await _closed_for_error(gw, redis, sid, ws, caplog, before)


async def test_a_slow_socket_backlog_is_bounded(redis_url: str, prefix: str, redis: aioredis.Redis) -> None:
    """A socket that does not drain its `out` queue holds at most 5 s of audio: the oldest frames
    go first (counted); marks, clear and hangup are all kept, in order."""
    from gateway.hub import OutboundHub
    from shared import metrics
    from shared import streams as S

    dropped = metrics.DROPPED.labels("out_overflow")
    before = dropped._value.get()
    reader = aioredis.Redis.from_url(redis_url)
    hub = OutboundHub(reader, S.Keys(prefix), "test")
    hub.start()
    out = f"{prefix}call:X:out"
    try:
        queue = await hub.attach(out, "0-0")
        pipe = redis.pipeline(transaction=False)
        for i in range(600):
            pipe.xadd(out, S.entry(S.OUT_MEDIA, i.to_bytes(2, "big") * 80))
            if i % 60 == 59:
                pipe.xadd(out, S.entry(S.OUT_MARK, value=f"0:{i}"))
        pipe.xadd(out, S.entry(S.OUT_CLEAR))
        pipe.xadd(out, S.entry(S.OUT_HANGUP))
        await pipe.execute()
        deadline = asyncio.get_running_loop().time() + 10
        while dropped._value.get() - before < 600 - 250:
            assert asyncio.get_running_loop().time() < deadline, dropped._value.get() - before
            await asyncio.sleep(0.01)
        got: list[dict[bytes, bytes]] = []
        while not got or got[-1][b"k"] != S.OUT_HANGUP:
            got.extend(f for _id, f in await asyncio.wait_for(queue.get(), 5))
    finally:
        await hub.close()
        await reader.aclose()
    frames = [int.from_bytes(f[b"a"][:2], "big") for f in got if f[b"k"] == S.OUT_MEDIA]
    assert frames == list(range(350, 600)), "the newest 5 s of audio, in order"
    control = [(f[b"k"], f.get(b"v")) for f in got if f[b"k"] != S.OUT_MEDIA]
    assert control == [(S.OUT_MARK, f"0:{i}".encode()) for i in range(59, 600, 60)] + [
        (S.OUT_CLEAR, None), (S.OUT_HANGUP, None)]
    assert dropped._value.get() - before == 350


# Redis restarts empty mid-call ------------------------------------------------------------------


@dataclass
class Restartable:
    """An in-process gateway on a private redis-server that a test can restart empty."""

    gw: Gw
    port: int
    server: RedisServer

    def restart_empty(self) -> None:
        self.server.stop()
        self.server = start_redis(self.port)

    def client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.server.url, socket_timeout=2)


@pytest.fixture
async def restartable(prefix: str) -> AsyncIterator[Restartable]:
    redis_port, port = free_port(), free_port()
    server = start_redis(redis_port)
    base = f"http://127.0.0.1:{port}"
    settings = Settings(  # type: ignore[call-arg]
        REDIS_URL=server.url, REDIS_PREFIX=prefix, PUBLIC_URL=base, TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN, NO_WORKER_TIMEOUT_S=2, MEDIA_IDLE_TIMEOUT_S=30,
        LOG_FORMAT="text")
    box = Restartable(Gw(base, settings, Keys(prefix), None), redis_port, server)  # type: ignore[arg-type]
    try:
        async for state in _serve(settings, port):
            box.gw.state = state
            yield box
    finally:
        box.server.stop()


async def _until_true(what: str, check: Callable[[], Awaitable[object]], timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            if await check():
                return
        except (RedisError, OSError):
            pass  # Redis is restarting
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


async def _keep_writing(r: aioredis.Redis, key: str, fields: dict[bytes, bytes], every: float) -> None:
    """A stand-in for a live owner (or Twilio) that keeps writing through a Redis restart."""
    while True:
        with contextlib.suppress(RedisError, OSError):
            await r.xadd(key, dict(fields))
        await asyncio.sleep(every)


async def test_a_call_a_worker_still_serves_survives_redis_restarting_empty(
    restartable: Restartable,
) -> None:
    """Redis comes back empty mid-call; the owner never re-writes `owner` but keeps writing audio.
    The gateway re-asserts its part of the call record (stream_sid, gateway, status live, the
    expiry) and does not end the call: a worker that writes `out` entries is alive."""
    from shared import streams as S

    box, gw = restartable, restartable.gw
    r = box.client()
    sid = call_sid()
    await r.hset(gw.keys.call(sid), "owner", "worker-1")  # the owner took the call at once
    ws = await _open(gw)
    await ws.send(_start_msg(sid, await _answer(gw, sid)))
    await _until_true("attached", lambda: r.exists(gw.keys.inbound(sid)))
    audio = S.entry(S.OUT_MEDIA, b"\x05" * 160)
    owner = asyncio.create_task(_keep_writing(r, gw.keys.outbound(sid), audio, 0.1))
    await asyncio.wait_for(ws.recv(), 5)  # the owner's audio flows: the call went live
    box.restart_empty()
    restarted = asyncio.get_running_loop().time()
    r2 = box.client()

    async def reasserted() -> bool:
        call = await r2.hgetall(gw.keys.call(sid))
        return (call.get(b"stream_sid") == MZ.encode() and call.get(b"status") == b"live"
                and call.get(b"gateway") == gw.state.process_id.encode()
                and 0 < await r2.ttl(gw.keys.call(sid)) <= gw.settings.call_ttl_s)

    try:
        await _until_true("the gateway never re-asserted the call record", reasserted)
        # Caller audio keeps flowing into the new Redis; its stream gets its expiry back too.
        await ws.send(_media_msg(b"\x01" * 160))
        await _until_true("no expiry on :in", lambda: _positive(r2.ttl(gw.keys.inbound(sid))))
        # Well past NO_WORKER_TIMEOUT_S after the restart the call still carries the owner's audio.
        while asyncio.get_running_loop().time() - restarted < 2 * gw.settings.no_worker_timeout_s + 2:
            msg = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
            assert msg["event"] == "media"
        assert await r2.hget(gw.keys.call(sid), "status") == b"live"
        assert gw.state.sockets, "the socket is still served"
    finally:
        owner.cancel()
        await asyncio.gather(owner, return_exceptions=True)
        await ws.close()
        await r.aclose()
        await r2.aclose()


async def _positive(ttl: Awaitable[int]) -> bool:
    return await ttl > 0


async def test_a_call_no_worker_serves_still_ends_after_redis_restarts_empty(
    restartable: Restartable,
) -> None:
    """No owner and no `out` entries: the call ends with the unavailable message, no sooner than
    NO_WORKER_TIMEOUT_S after Redis came back (the timeout restarts with Redis)."""
    box, gw = restartable, restartable.gw
    sid = call_sid()
    ws = await _open(gw)
    await ws.send(_start_msg(sid, await _answer(gw, sid)))
    r = box.client()
    await _until_true("attached", lambda: r.exists(gw.keys.inbound(sid)))
    await r.aclose()
    box.restart_empty()
    back = asyncio.get_running_loop().time()
    r = box.client()
    try:
        with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 15)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1000
        assert asyncio.get_running_loop().time() - back >= gw.settings.no_worker_timeout_s
        call = await r.hgetall(gw.keys.call(sid))
        assert call[b"status"] == b"ended" and call[b"end_reason"] == b"no-worker"
        assert call[b"say"] == gw.settings.unavailable_message.encode()
        assert 0 < await r.ttl(gw.keys.call(sid)) <= gw.settings.call_ttl_s
    finally:
        await r.aclose()


async def test_a_dead_background_loop_makes_the_gateway_unready_and_stop(gw: Gw) -> None:
    from gateway.app import supervise

    stopped: list[bool] = []

    async def loop_that_fails() -> None:
        raise RuntimeError("boom")

    async def loop_that_lives() -> None:
        await asyncio.Event().wait()

    alive = asyncio.create_task(loop_that_lives())
    await supervise(gw.state, [alive, asyncio.create_task(loop_that_fails())],
                    stop=lambda: stopped.append(True))
    assert stopped == [True] and gw.state.failed
    async with httpx.AsyncClient() as client:
        assert (await client.get(gw.base + "/readyz")).status_code == 503
    alive.cancel()
    gw.state.draining = gw.state.failed = False


def test_a_process_run_until_a_signal_keeps_its_startup_heap_out_of_full_collections() -> None:
    """run_until_signal freezes what start-up allocated, so a full collection walks only what
    calls allocated (docs/performance.md, "Garbage collection")."""
    code = (
        "import asyncio, gc\n"
        "import gateway.app\n"
        "from shared.serving import run_until_signal\n"
        "async def main(stop: asyncio.Event) -> None:\n"
        "    print(gc.get_freeze_count())\n"
        "run_until_signal(main)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent, check=True).stdout
    assert int(out.strip()) > 10_000  # the imported app's objects, frozen


def test_a_per_frame_tally_reaches_prometheus_in_bulk_and_whole_at_every_scrape() -> None:
    """The per-frame counters are tallied: added to the Prometheus counter every 50 counts, and
    whatever is pending at every /metrics, so a scrape never reads them short."""
    from prometheus_client import CollectorRegistry, Counter

    from shared import metrics

    registry = CollectorRegistry()
    counter = Counter("t_frames_total", "test", ["d"], registry=registry)
    tally = metrics.Tally(counter.labels("in"), every=50)

    def value() -> float | None:
        return registry.get_sample_value("t_frames_total", {"d": "in"})

    for _ in range(49):
        tally.inc()
    tally.inc(160)  # bytes counted by size: the 50th call hands over 49 + 160
    assert value() == 209
    tally.inc(3)
    assert value() == 209  # pending
    metrics.exposition()  # a scrape of this process
    assert value() == 212
