"""Tests for the Twilio stand-in (sim/twilio/) against a tiny throwaway gateway.

Everything runs over real loopback sockets: the gateway below is a FastAPI app under uvicorn
(in-process), the stand-in is the real thing. Waits are event-driven with deadlines, never a
sleep; where time must pass, the caller's 20 ms media frames arriving at the gateway are the
clock. Timing bounds leave room for a machine with one of two cores busy elsewhere: a lower bound
the model guarantees is exact, an upper bound only says "soon, not much later".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import re
import socket
import time
import warnings
import wave
from collections.abc import AsyncIterator, Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response, WebSocket
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from twilio.twiml.voice_response import Connect, VoiceResponse

from shared.serving import quiet_server
from sim import voices
from sim.twilio import Callee, SimCall, TwilioObserver, TwilioSim, TwilioSimError
from sim.twilio.outbound import BEEP_HZ
from sim.twilio.playout import Playout
from sim.twilio.stream import first_due

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "sim-test-auth-token"
SID_RE = re.compile(r"^(CA|MZ)[0-9a-f]{32}$")


# ----------------------------------------------------------------------------- audio helpers


def tone_ulaw(seconds: float, freq: float = 440.0, amp: int = 8000) -> bytes:
    n = int(seconds * 8000)
    pcm = b"".join(
        int(amp * math.sin(2 * math.pi * freq * i / 8000)).to_bytes(2, "little", signed=True)
        for i in range(n)
    )
    return audioop.lin2ulaw(pcm, 2)


TONE_400MS = tone_ulaw(0.4)
TONE_1S = tone_ulaw(1.0, freq=600.0)


# ----------------------------------------------------------------------------- test gateway


class Waitable:
    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, pred: Callable[[], bool], timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("condition not met")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


class Conn(Waitable):
    """The gateway's view of one Media Stream socket."""

    def __init__(self, ws: WebSocket, signature: str) -> None:
        super().__init__()
        self.ws = ws
        self.signature = signature
        self.connected: dict[str, Any] = {}
        self.start: dict[str, Any] = {}
        self.raw: list[str] = []  # every text frame after `start`, as received
        self.messages: list[tuple[float, dict[str, Any]]] = []  # (arrival, parsed)
        self.inbound = bytearray()  # concatenated inbound media payloads
        self.closed = asyncio.Event()
        self.echo = False
        self._echo_buf = bytearray()
        self._echo_n = 0

    @property
    def sid(self) -> str:
        return str(self.start["streamSid"])

    def of(self, event: str) -> list[dict[str, Any]]:
        return [m for _, m in self.messages if m["event"] == event]

    def media_arrivals(self) -> list[float]:
        return [t for t, m in self.messages if m["event"] == "media"]

    def media_since(self, t: float) -> bool:
        """A caller frame arrived at or after monotonic time `t`: the caller's 20 ms frames are
        the clock a test waits on instead of sleeping."""
        return any(m["event"] == "media" and at >= t for at, m in reversed(self.messages))

    def mark_echo(self, name: str) -> tuple[float, dict[str, Any]] | None:
        for t, m in self.messages:
            if m["event"] == "mark" and m["mark"]["name"] == name:
                return t, m
        return None

    async def send(self, doc: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(doc))

    async def send_media(self, ulaw: bytes) -> None:
        payload = base64.b64encode(ulaw).decode()
        await self.send({"event": "media", "streamSid": self.sid, "media": {"payload": payload}})

    async def send_mark(self, name: str) -> None:
        await self.send({"event": "mark", "streamSid": self.sid, "mark": {"name": name}})

    async def send_clear(self) -> None:
        await self.send({"event": "clear", "streamSid": self.sid})


class FakeGateway(Waitable):
    """A minimal, strict gateway: validates signatures, echoes, closes/clears on DTMF."""

    def __init__(self, auth_token: str) -> None:
        super().__init__()
        self.validator = RequestValidator(auth_token)
        self.public = ""
        self.url = ""
        self.voice_mode = "connect"  # connect | connect-no-action | say-hangup | http-500
        self.reject_ws = False
        self.echo = False
        self.action_replies: list[str] = []  # consumed per action request; default hangup
        self.webhooks: list[tuple[str, dict[str, str], bool]] = []  # (path, params, sig ok)
        self.stream_status: list[dict[str, str]] = []
        # outbound calls: (method, params, signature ok) of each status / AMD callback
        self.call_status: list[tuple[str, dict[str, str], bool]] = []
        self.amd: list[tuple[str, dict[str, str], bool]] = []
        self.conns: list[Conn] = []
        self.app = self._build()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def ws_url(self) -> str:
        return self.public.replace("https://", "wss://").replace("http://", "ws://") + "/twilio/media"

    async def next_conn(self, n: int = 1, timeout: float = 3.0) -> Conn:
        await self.wait_for(lambda: len(self.conns) >= n, timeout)
        return self.conns[n - 1]

    def _connect_twiml(self, call_sid: str, say: str | None = None, action: bool = True) -> str:
        resp = VoiceResponse()
        connect = Connect(action=self.public + "/twilio/stream-ended" if action else None)
        stream = connect.stream(
            url=self.ws_url, status_callback=self.public + "/twilio/stream-status"
        )
        stream.parameter(name="token", value="tok-" + call_sid)
        stream.parameter(name="greeting", value="hello & welcome")
        resp.append(connect)
        if say:
            resp.say(say)
        return str(resp)

    async def _form(self, request: Request) -> tuple[dict[str, str], bool]:
        form = {k: str(v) for k, v in (await request.form()).items()}
        url = self.public + request.url.path
        ok = self.validator.validate(url, form, request.headers.get("x-twilio-signature", ""))
        self.webhooks.append((request.url.path, form, ok))
        self.changed()
        return form, ok

    async def _params(self, request: Request) -> tuple[dict[str, str], bool]:
        """A signed request's parameters, GET (signed over the URL with its query) or POST."""
        sig = request.headers.get("x-twilio-signature", "")
        if request.method == "GET":
            params = dict(request.query_params)
            url = self.public + request.url.path + "?" + request.url.query
            ok = self.validator.validate(url, {}, sig)
        else:
            params = {k: str(v) for k, v in (await request.form()).items()}
            ok = self.validator.validate(self.public + request.url.path, params, sig)
        self.webhooks.append((request.url.path, params, ok))
        self.changed()
        return params, ok

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.api_route("/twilio/outbound", methods=["GET", "POST"])
        async def outbound(request: Request) -> Response:
            params, ok = await self._params(request)
            if not ok:
                return Response("bad signature", status_code=403)
            return Response(self._connect_twiml(params["CallSid"]), media_type="application/xml")

        @app.api_route("/twilio/call-status", methods=["GET", "POST"])
        async def call_status(request: Request) -> Response:
            params, ok = await self._params(request)
            self.call_status.append((request.method, params, ok))
            self.changed()
            return Response(status_code=204)

        @app.post("/twilio/amd")
        async def amd(request: Request) -> Response:
            params, ok = await self._params(request)
            self.amd.append((request.method, params, ok))
            self.changed()
            return Response(status_code=204)

        @app.post("/twilio/voice")
        async def voice(request: Request) -> Response:
            form, ok = await self._form(request)
            if not ok:
                return Response("bad signature", status_code=403)
            if self.voice_mode == "http-500":
                return Response("boom", status_code=500)
            if self.voice_mode == "say-hangup":
                resp = VoiceResponse()
                resp.say("Goodbye")
                resp.hangup()
                return Response(str(resp), media_type="application/xml")
            if self.voice_mode == "connect-no-action":
                twiml = self._connect_twiml(form["CallSid"], say="Bye for now", action=False)
                return Response(twiml, media_type="application/xml")
            return Response(self._connect_twiml(form["CallSid"]), media_type="application/xml")

        @app.post("/twilio/stream-ended")
        async def stream_ended(request: Request) -> Response:
            form, ok = await self._form(request)
            if not ok:
                return Response("bad signature", status_code=403)
            reply = self.action_replies.pop(0) if self.action_replies else "hangup"
            resp = VoiceResponse()
            if reply == "dial":
                resp.say("Transferring you now")
                resp.dial().number("+15557654321")
                return Response(str(resp), media_type="application/xml")
            if reply == "reconnect":
                return Response(self._connect_twiml(form["CallSid"]), media_type="text/xml")
            resp.hangup()
            return Response(str(resp), media_type="application/xml")

        @app.post("/twilio/stream-status")
        async def stream_status(request: Request) -> Response:
            form, _ = await self._form(request)
            self.stream_status.append(form)
            return Response(status_code=204)

        @app.websocket("/twilio/media")
        async def media(ws: WebSocket) -> None:
            sig = ws.headers.get("x-twilio-signature", "")
            if self.reject_ws or not self.validator.validate(self.ws_url, {}, sig):
                await ws.close(code=1008)  # before accept: handshake rejected (HTTP 403)
                return
            await ws.accept()
            conn = Conn(ws, sig)
            conn.echo = self.echo
            conn.connected = json.loads(await ws.receive_text())
            conn.start = json.loads(await ws.receive_text())
            self.conns.append(conn)
            self.changed()
            try:
                while True:
                    msg = await ws.receive()
                    if msg["type"] == "websocket.disconnect":
                        break
                    text = msg.get("text")
                    if text is None:
                        continue
                    doc = json.loads(text)
                    conn.raw.append(text)
                    conn.messages.append((time.monotonic(), doc))
                    await self._on_message(conn, doc)
                    conn.changed()
            finally:
                conn.closed.set()
                conn.changed()

        return app

    async def _on_message(self, conn: Conn, doc: dict[str, Any]) -> None:
        event = doc["event"]
        if event == "media":
            audio = base64.b64decode(doc["media"]["payload"])
            conn.inbound += audio
            if conn.echo:  # echo in 100 ms chunks, each followed by a mark
                conn._echo_buf += audio
                if len(conn._echo_buf) >= 800:
                    chunk, conn._echo_buf = bytes(conn._echo_buf[:800]), conn._echo_buf[800:]
                    conn._echo_n += 1
                    await conn.send_media(chunk)
                    await conn.send_mark(f"echo-{conn._echo_n}")
        elif event == "dtmf":
            digit = doc["dtmf"]["digit"]
            if digit == "#":
                await conn.ws.close(code=1000)
            elif digit == "*":
                await conn.send_clear()

    async def start(self, public_url: str | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # → TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.public = (public_url or self.url).rstrip("/")
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan="off", ws="websockets-sansio",
            timeout_graceful_shutdown=1,
        )
        server = quiet_server(config)
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        for _ in range(300):
            if server.started:
                return
            await asyncio.sleep(0.01)
        raise RuntimeError("gateway did not start")

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            done, _ = await asyncio.wait({self._task}, timeout=5)
            if not done:
                self._task.cancel()


@contextlib.asynccontextmanager
async def environment(
    public_url: str | None = None,
    sim_public_url: str | None = None,
    auth_token: str = AUTH_TOKEN,
    **sim_options: Any,
) -> AsyncIterator[tuple[FakeGateway, TwilioSim]]:
    gw = FakeGateway(AUTH_TOKEN)
    await gw.start(public_url)
    sim = TwilioSim(
        gateway_url=gw.url,
        public_url=sim_public_url or gw.public,
        account_sid=ACCOUNT_SID,
        auth_token=auth_token,
        **sim_options,
    )
    await sim.start()
    try:
        yield gw, sim
    finally:
        await sim.stop()
        await gw.stop()


@pytest.fixture
async def env() -> AsyncIterator[tuple[FakeGateway, TwilioSim]]:
    async with environment() as pair:
        yield pair


async def assert_paced(conns: list[Conn]) -> None:
    """50 frames/s per call: counted over 2 s so that a stall at either end of the window (the
    ticker catches up afterwards) moves a few frames, not the verdict."""
    t1 = time.monotonic() + 0.1
    for conn in conns:
        await conn.wait_for(lambda c=conn: c.media_since(t1 + 2.0), timeout=5.0)
    for conn in conns:
        n = sum(1 for t in conn.media_arrivals() if t1 <= t < t1 + 2.0)
        assert abs(n - 100) <= 5, n


def assert_consecutive_seq(conn: Conn) -> None:
    """One string counter shared by every message after `start` ("1")."""
    seqs = [m["sequenceNumber"] for _, m in conn.messages]
    assert all(isinstance(s, str) for s in seqs)
    assert [int(s) for s in seqs] == list(range(2, 2 + len(seqs)))


# ----------------------------------------------------------------------------- tests


async def test_webhook_start_and_string_counters(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    call = await sim.place_call(from_="+15551230000", to="+15559870000")
    conn = await gw.next_conn()

    path, params, sig_ok = gw.webhooks[0]
    assert path == "/twilio/voice" and sig_ok
    assert SID_RE.match(params["CallSid"]) and params["CallSid"] == call.call_sid
    assert params["AccountSid"] == ACCOUNT_SID
    assert params["From"] == params["Caller"] == "+15551230000"
    assert params["To"] == params["Called"] == "+15559870000"
    assert params["CallStatus"] == "ringing"
    assert params["Direction"] == "inbound"
    assert params["ApiVersion"] == "2010-04-01"
    assert sim.calls[call.call_sid] is call

    assert conn.connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    sid = conn.sid
    assert SID_RE.match(sid) and sid.startswith("MZ") and call.streams == [sid]
    assert conn.start == {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": ACCOUNT_SID,
            "streamSid": sid,
            "callSid": call.call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"token": "tok-" + call.call_sid, "greeting": "hello & welcome"},
        },
        "streamSid": sid,
    }
    assert call.custom_parameters["greeting"] == "hello & welcome"

    await conn.wait_for(lambda: len(conn.of("media")) >= 5)
    call.send_dtmf("7")
    await conn.wait_for(lambda: bool(conn.of("dtmf")))
    await conn.wait_for(lambda: conn.messages[-1][1]["event"] == "media")
    await call.hangup()
    await asyncio.wait_for(conn.closed.wait(), 3)

    assert call.end_reason == "caller-hangup" and call.ended.is_set()
    assert_consecutive_seq(conn)
    media = conn.of("media")
    for i, m in enumerate(media):
        assert list(m) == ["event", "sequenceNumber", "media", "streamSid"]
        assert m["streamSid"] == sid
        assert m["media"]["track"] == "inbound"
        assert m["media"]["chunk"] == str(i + 1)
        assert m["media"]["timestamp"] == str(i * 20)
        assert len(base64.b64decode(m["media"]["payload"], validate=True)) == 160
    (dtmf,) = conn.of("dtmf")
    assert dtmf == {
        "event": "dtmf",
        "streamSid": sid,
        "sequenceNumber": dtmf["sequenceNumber"],
        "dtmf": {"track": "inbound_track", "digit": "7"},
    }
    stop = conn.messages[-1][1]
    assert stop == {
        "event": "stop",
        "sequenceNumber": stop["sequenceNumber"],
        "stop": {"accountSid": ACCOUNT_SID, "callSid": call.call_sid},
        "streamSid": sid,
    }
    # Silence is sent continuously while the caller says nothing.
    assert set(conn.inbound) == {0xFF}
    # <Stream statusCallback> got stream-started (fire-and-forget, so wait for it).
    await gw.wait_for(lambda: any(s["StreamEvent"] == "stream-stopped" for s in gw.stream_status))
    assert [s["StreamEvent"] for s in gw.stream_status] == ["stream-started", "stream-stopped"]
    assert all(s["StreamSid"] == sid for s in gw.stream_status)


async def test_pacing_and_caller_audio(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    calls = [await sim.place_call() for _ in range(8)]  # all share the one 20 ms ticker
    conns = [await gw.next_conn(i + 1) for i in range(len(calls))]
    speech = tone_ulaw(0.5) + b"\x00" * 100  # 100 bytes → last frame padded with 0xFF
    calls[0].say(speech)
    calls[1].say_pcm(audioop.ulaw2lin(speech, 2))

    await assert_paced(conns)

    await calls[0].wait_speaking_done(timeout=3)
    await calls[1].wait_speaking_done(timeout=3)
    padded = speech + b"\xff" * 60
    for call, conn in zip(calls[:2], conns[:2], strict=True):
        assert padded in bytes(conn.inbound)
        assert padded in call.sent
    # `sent` is a call-time timeline: frame k of the stream sits at offset0 + 160 k.
    frames = calls[0].sent_frames
    offs = [pos for _, pos in frames]
    assert offs == [offs[0] + 160 * k for k in range(len(offs))]
    assert [t for t, _ in frames] == sorted(t for t, _ in frames)
    seg = calls[0].sent_segments()
    assert len(seg) == 1 and abs((seg[0][1] - seg[0][0]) - 0.5125) < 0.01
    # Each frame goes out once its 20 ms of audio exist, i.e. after the audio's call time.
    t_sent = calls[0].sent_time_at(seg[0][1] - 0.001)
    assert t_sent is not None and seg[0][1] - 0.001 < t_sent < seg[0][1] + 0.3
    for call in calls:
        await call.hangup()
    for conn in conns:
        assert_consecutive_seq(conn)


def test_streams_keep_the_phase_their_start_fell_in() -> None:
    epoch, period = 100.0, 0.020
    # One phase: every stream on one grid, half a period before the tick that sends it.
    assert {round((first_due(epoch + s, epoch) - epoch) % period, 6) for s in (0.001, 0.007, 0.013)} \
        == {0.01}
    # Four: a stream started in each quarter of the 20 ms gets its own phase, 5 ms apart.
    tick = period / 4
    starts = [epoch + 0.001 + 0.005 * j for j in range(4)] + [epoch + 0.004, epoch + 0.005]
    dues = [first_due(s, epoch, 4) for s in starts]
    assert sorted({round((d - epoch) % period, 6) for d in dues[:4]}) == [0.0025, 0.0075, 0.0125, 0.0175]
    for start, d in zip(starts, dues, strict=True):
        # Sent on the first tick at which its 20 ms of audio exist, and due half a tick before.
        assert start + period <= d + tick / 2 < start + period + tick, (start - epoch, d - epoch)
    with pytest.raises(ValueError, match="phases"):
        TwilioSim(gateway_url="http://127.0.0.1:9", public_url="http://127.0.0.1:9",
                  account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, phases=11)  # 2 ms ticks at most


async def test_streams_over_phases_stay_paced_and_never_send_early() -> None:
    async with environment(phases=4) as (gw, sim):
        calls = [await sim.place_call() for _ in range(6)]
        conns = [await gw.next_conn(i + 1) for i in range(len(calls))]
        await assert_paced(conns)
        tick = 0.020 / 4
        for call in calls:
            st = call._stream
            assert st is not None
            # On the four-phase grid (half a tick before a 5 ms tick), not the one-phase one
            # (half of 20 ms before a 20 ms tick), whatever the phase its start fell in.
            offset = (st.first_due - sim._epoch + tick / 2) % tick
            assert min(offset, tick - offset) < 1e-6, offset
            # Frame k leaves on a tick at or after its due time, never before.
            assert len(call.sent_frames) >= 100
            for k, (t, _pos) in enumerate(call.sent_frames):
                assert call.t0 + t >= st.first_due + k * 0.020 - 1e-6, (k, call.t0 + t, st.first_due)
            await call.hangup()
        for conn in conns:
            assert_consecutive_seq(conn)


async def test_mark_echo_waits_for_playout(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    call = await sim.place_call()
    conn = await gw.next_conn()

    await conn.send_media(TONE_400MS)
    await conn.send_mark("after-400ms")
    await call.wait_for(lambda: len(call.marks_echoed) == 1, timeout=3)
    (t_rx, name_rx), (t_echo, name_echo) = call.marks_sent_by_server[0], call.marks_echoed[0]
    assert name_rx == name_echo == "after-400ms"
    t_media = call.received_media_times[0][0]
    assert t_echo - t_media >= 0.399  # echoed only when the 400 ms had played
    assert t_rx < t_echo < t_media + 0.9  # ... and soon after (a timer, not a poll)

    # Buffer empty now: the next mark comes back at once.
    await conn.send_mark("empty")
    await call.wait_for(lambda: len(call.marks_echoed) == 2, timeout=3)
    assert call.marks_echoed[1][1] == "empty"
    assert call.marks_echoed[1][0] - call.marks_sent_by_server[1][0] < 0.1

    # Two chunks with a mark after each: echoes come in order, each once its chunk has played
    # (the second chunk queues behind the first).
    chunk = TONE_400MS[:1600]  # 200 ms
    await conn.send_media(chunk)
    await conn.send_mark("a")
    await conn.send_media(chunk)
    await conn.send_mark("b")
    await call.wait_for(lambda: len(call.marks_echoed) == 4, timeout=3)
    (ta, na), (tb, nb) = call.marks_echoed[2:]
    assert (na, nb) == ("a", "b")
    t_a = call.received_media_times[1][0]  # the buffer was empty: chunk a plays from here
    assert ta >= t_a + 0.199 and tb >= t_a + 0.399
    assert tb < t_a + 0.4 + 0.5
    await conn.wait_for(lambda: conn.mark_echo("b") is not None)
    echo = conn.mark_echo("b")
    assert echo is not None
    assert list(echo[1]) == ["event", "sequenceNumber", "streamSid", "mark"]
    assert echo[1]["streamSid"] == conn.sid
    # What the caller heard: the tone, then the two chunks back to back (the 2nd was queued).
    heard = call.heard
    assert TONE_400MS in heard and chunk + chunk in heard
    segs = call.heard_segments()
    assert abs(segs[0][0] - t_media) < 0.002
    t_chunk = call.received_media_times[1][0]  # plays at max(arrival, end of the tone)
    assert abs(segs[-1][1] - (max(t_chunk, t_media + 0.4) + 0.4)) < 0.002
    await call.hangup()
    assert_consecutive_seq(conn)


async def test_clear_drops_unplayed_audio_and_echoes_marks(
    env: tuple[FakeGateway, TwilioSim],
) -> None:
    gw, sim = env
    call = await sim.place_call()
    conn = await gw.next_conn()

    await conn.send_media(TONE_1S)
    await conn.send_mark("first-second")
    await conn.send_media(TONE_1S)
    await conn.send_mark("second-second")
    await call.wait_for(lambda: len(call.marks_sent_by_server) == 2, timeout=3)
    t_media = call.received_media_times[0][0]
    # Let ≥ 250 ms play: a caller frame that reaches the gateway later proves the time passed.
    played_by = call.t0 + t_media + 0.25
    await conn.wait_for(lambda: conn.media_since(played_by))
    call.send_dtmf("*")  # the test gateway answers '*' with a clear
    await call.wait_for(lambda: len(call.marks_echoed) == 2, timeout=3)

    (t_clear,) = call.clears
    assert [n for _, n in call.marks_echoed] == ["first-second", "second-second"]
    causes = [d["cause"] for _, k, d in call.events if k == "mark-echoed"]
    assert causes == ["clear", "clear"]  # released by the clear, not by playout ...
    assert all(t - t_clear < 0.2 for t, _ in call.marks_echoed)  # ... at once (2nd: due in > 1 s)
    await conn.wait_for(lambda: conn.mark_echo("second-second") is not None)

    # Only what played before the clear was heard; the rest never was.
    played = t_clear - t_media
    segs = call.heard_segments()
    assert len(segs) == 1
    start, end = segs[0]
    assert abs(start - t_media) < 0.002
    assert abs(end - t_clear) < 0.002
    assert 0.25 <= played < 0.9  # the clear came mid-playout (2 s were queued)
    n_played = len(call.heard) - int(t_media * 8000)
    assert call.heard[int(t_media * 8000) :] == TONE_1S[:n_played]

    # After a clear the buffer is empty: new audio plays immediately, marks follow it.
    await conn.send_media(TONE_400MS[:800])
    await conn.send_mark("after-clear")
    await call.wait_for(lambda: len(call.marks_echoed) == 3, timeout=3)
    t_rx = call.received_media_times[-1][0]  # plays from its arrival: nothing else is queued
    assert 0.099 <= call.marks_echoed[-1][0] - t_rx < 0.6
    await call.hangup()
    assert_consecutive_seq(conn)


def test_playout_model_without_sockets() -> None:
    p = Playout()
    p.media(b"\x01" * 800, now_pos=100)  # plays 100..900
    assert p.mark("a", now_pos=200) == []  # waits for the audio queued before it
    p.media(b"\x02" * 400, now_pos=300)  # queues behind: 900..1300
    assert p.mark("b", now_pos=300) == [] and p.next_due() == 900
    assert p.take_due(880) == [] and p.take_due(900) == ["a"] and p.next_due() == 1300
    assert p.heard_until(950) == b"\xff" * 100 + b"\x01" * 800 + b"\x02" * 50
    assert p.clear(1000) == (300, ["b"])  # unplayed rest dropped, pending mark released
    assert p.heard == b"\xff" * 100 + b"\x01" * 800 + b"\x02" * 100
    assert p.mark("c", now_pos=1000) == ["c"]  # nothing queued: at once
    p.media(b"\x03" * 800, now_pos=2000)
    assert p.mark("d", now_pos=2000) == [] and p.drop_unplayed(2100) == ["d"]
    assert len(p.heard) == 2100 and p.next_due() is None

    off = Playout(enabled=False)  # TwilioSim(playout_model=False)
    off.media(b"\x01" * 800, now_pos=0)
    assert off.mark("a", now_pos=0) == ["a"] and off.clear(100) == (0, [])


async def test_signatures_over_public_url() -> None:
    public = "https://cb.example.com"
    async with environment(public_url=public) as (gw, sim):
        call = await sim.place_call()
        conn = await gw.next_conn()
        assert gw.webhooks[0][2]  # the gateway validated against https://cb.example.com/...
        expected = RequestValidator(AUTH_TOKEN).compute_signature(
            "wss://cb.example.com/twilio/media", {}
        )
        assert conn.signature == expected
        assert call.twiml_log and "wss://cb.example.com/twilio/media" in call.twiml_log[0]
        await call.hangup()

    # A sim that signs another public URL, or with another token, is rejected (403).
    async with environment(public_url=public, sim_public_url="https://other.example.com") as (
        gw,
        sim,
    ):
        with pytest.raises(TwilioSimError, match="403"):
            await sim.place_call()
        assert gw.webhooks and not gw.webhooks[0][2]
    async with environment(auth_token="wrong-token") as (gw, sim):
        with pytest.raises(TwilioSimError, match="403") as info:
            await sim.place_call()
        assert info.value.call is not None and info.value.call.end_reason == "error"


async def test_place_call_failures(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    gw.reject_ws = True
    with pytest.raises(TwilioSimError, match=r"31920.*403"):
        await sim.place_call()

    gw.reject_ws = False
    gw.voice_mode = "say-hangup"
    with pytest.raises(TwilioSimError, match="no <Connect><Stream>") as info:
        await sim.place_call()
    call = info.value.call
    assert isinstance(call, SimCall)
    assert call.say_texts == ["Goodbye"] and call.end_reason == "hangup"

    gw.voice_mode = "http-500"
    with pytest.raises(TwilioSimError, match="HTTP 500"):
        await sim.place_call()


async def test_action_hangup_after_server_close(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    gw.action_replies = ["hangup"]
    call = await sim.place_call()
    conn = await gw.next_conn()
    call.send_dtmf("#")  # the test gateway closes the socket on '#'
    assert await call.wait_ended(timeout=3) == "hangup"
    path, params, ok = gw.webhooks[-1]
    assert path == "/twilio/stream-ended" and ok
    assert params["CallStatus"] == "in-progress" and params["CallSid"] == call.call_sid
    assert conn.closed.is_set()
    assert not conn.of("stop")  # Twilio does not send `stop` when the server closed first
    closed = [d for _, k, d in call.events if k == "stream-closed"]
    assert closed and closed[0]["by"] == "server"


async def test_no_action_continues_document(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    gw.voice_mode = "connect-no-action"
    call = await sim.place_call()
    conn = await gw.next_conn()
    await conn.ws.close(code=1000)
    # Without <Connect action>, Twilio runs the verbs after </Connect>, then the call ends.
    assert await call.wait_ended(timeout=3) == "completed"
    assert call.say_texts == ["Bye for now"]
    assert [p for p, _, _ in gw.webhooks if p != "/twilio/stream-status"] == ["/twilio/voice"]


async def test_action_dial(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    gw.action_replies = ["dial"]
    call = await sim.place_call()
    conn = await gw.next_conn()
    await conn.ws.close(code=1000)
    assert await call.wait_ended(timeout=3) == "dial"
    assert call.dial_target == "+15557654321"
    assert call.say_texts == ["Transferring you now"]
    assert "<Dial>" in call.twiml_log[-1]


async def test_action_reconnect_opens_fresh_stream(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    gw.action_replies = ["reconnect", "hangup"]
    call = await sim.place_call()
    conn1 = await gw.next_conn(1)
    await conn1.wait_for(lambda: len(conn1.of("media")) >= 3)
    call.send_dtmf("#")
    conn2 = await gw.next_conn(2)
    assert call.end_reason is None
    sid2 = await call.wait_streams(2, timeout=3)
    assert sid2 == conn2.sid != conn1.sid
    assert conn2.start["sequenceNumber"] == "1"
    assert conn2.start["start"]["callSid"] == call.call_sid
    await conn2.wait_for(lambda: len(conn2.of("media")) >= 3)
    first = conn2.of("media")[0]
    assert first["sequenceNumber"] == "2"
    assert first["media"]["chunk"] == "1" and first["media"]["timestamp"] == "0"
    # Playout continues on the new socket.
    await conn2.send_media(TONE_400MS[:800])
    await conn2.send_mark("on-second-stream")
    await call.wait_for(lambda: len(call.marks_echoed) == 1, timeout=3)
    call.send_dtmf("#")
    assert await call.wait_ended(timeout=3) == "hangup"
    assert call.streams == [conn1.sid, conn2.sid]
    assert len(call.twiml_log) == 3
    assert_consecutive_seq(conn2)
    # The second stream's frames continue the call-time `sent` timeline.
    offs = [pos for _, pos in call.sent_frames]
    assert offs == sorted(offs) and len(set(offs)) == len(offs)


async def test_rest_api(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    call = await sim.place_call()
    conn = await gw.next_conn()
    base = f"{sim.rest_base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls"
    auth = (ACCOUNT_SID, AUTH_TOKEN)
    async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
        r = await http.post(f"{base}/{call.call_sid}.json", data={"Status": "completed"},
                            auth=(ACCOUNT_SID, "nope"))
        assert r.status_code == 401 and r.json()["code"] == 20003
        assert call.end_reason is None

        unknown = "CA" + "f" * 32
        r = await http.post(f"{base}/{unknown}.json", data={"Status": "completed"}, auth=auth)
        assert r.status_code == 404
        body = r.json()
        assert body["code"] == 20404 and body["status"] == 404
        assert body["more_info"] == "https://www.twilio.com/docs/errors/20404"
        assert unknown in body["message"] and "was not found" in body["message"]

        r = await http.post(f"{base}/{call.call_sid}.json", data={"Status": "completed"}, auth=auth)
        assert r.status_code == 200
        assert r.json()["sid"] == call.call_sid and r.json()["status"] == "completed"
        assert call.end_reason == "rest-completed"
        await asyncio.wait_for(conn.closed.wait(), 3)
        assert conn.messages[-1][1]["event"] == "stop"

        r = await http.post(f"{base}/{call.call_sid}.json", data={"Status": "completed"}, auth=auth)
        assert r.status_code == 404 and r.json()["code"] == 20404

        # Twiml=<Dial> on a live call: the stream is torn down and the call transfers.
        call2 = await sim.place_call()
        conn2 = await gw.next_conn(2)
        twiml = "<Response><Dial><Sip>sip:agent@pbx.example.com</Sip></Dial></Response>"
        r = await http.post(f"{base}/{call2.call_sid}.json", data={"Twiml": twiml}, auth=auth)
        assert r.status_code == 200
        assert await call2.wait_ended(timeout=3) == "dial"
        assert call2.dial_target == "sip:agent@pbx.example.com"
        assert twiml in call2.twiml_log
        await asyncio.wait_for(conn2.closed.wait(), 3)
        assert conn2.messages[-1][1]["event"] == "stop"


async def test_protocol_errors_are_recorded_and_ignored(
    env: tuple[FakeGateway, TwilioSim],
) -> None:
    gw, sim = env
    call = await sim.place_call()
    conn = await gw.next_conn()
    sid = conn.sid
    good = base64.b64encode(TONE_400MS[:160]).decode()
    await conn.ws.send_bytes(b"\x01\x02\x03")
    await conn.send({"event": "media", "streamSid": "MZ" + "0" * 32, "media": {"payload": good}})
    await conn.send({"event": "media", "media": {"payload": good}})
    await conn.send({"event": "mark", "streamSid": sid, "mark": {}})
    await conn.send({"event": "mark", "streamSid": sid})
    await conn.send({"event": "media", "streamSid": sid, "media": {"payload": "@@not-b64@@"}})
    await conn.send({"event": "dance", "streamSid": sid})
    await conn.ws.send_text("this is not json")
    await conn.send({"event": "clear", "streamSid": sid, "extra": 1})
    await conn.send_mark("still-alive")
    await call.wait_for(lambda: len(call.marks_echoed) == 1, timeout=3)

    errs = call.protocol_errors
    assert len(errs) == 9, errs
    assert errs[0].startswith("31950")
    assert all(e.startswith("31951") for e in errs[1:])
    for needle in ("wrong streamSid", "missing streamSid", "mark.name", "mark.name",
                   "base64", "unknown event", "not JSON", "extra field"):
        assert any(needle in e for e in errs), needle
    assert call.marks_echoed[0][1] == "still-alive"
    assert call.received_media_times == [] and call.heard_segments() == []
    n = len(conn.of("media"))
    await conn.wait_for(lambda: len(conn.of("media")) >= n + 3)  # media still flows
    assert call.end_reason is None
    await call.hangup()


async def test_echo_recording_and_wav(env: tuple[FakeGateway, TwilioSim], tmp_path: Path) -> None:
    gw, sim = env
    gw.echo = True
    call = await sim.place_call()
    conn = await gw.next_conn()
    speech = tone_ulaw(0.3, freq=500.0)
    call.say(speech)
    await call.wait_speaking_done(timeout=3)
    await call.wait_for(lambda: any(n == "echo-8" for _, n in call.marks_echoed), timeout=3)
    await call.hangup()
    assert_consecutive_seq(conn)

    heard = call.heard
    # Echo chunks play whole and in order; a chunk that arrives after the previous one has
    # finished leaves a (real) underrun gap, longer on a busy machine, so compare with silence
    # removed: the caller heard exactly what it said, once.
    assert heard.replace(b"\xff", b"") == speech.replace(b"\xff", b"")
    (s_start, _), = call.sent_segments()
    h_segs = call.heard_segments()
    assert h_segs and h_segs[0][0] > s_start  # heard after it was said
    assert all(n == 800 for _, n in call.received_media_times)

    path = tmp_path / "call.wav"
    call.write_wav(str(path))
    with wave.open(str(path), "rb") as wf:
        assert (wf.getnchannels(), wf.getsampwidth(), wf.getframerate()) == (2, 2, 8000)
        frames = wf.readframes(wf.getnframes())
        assert wf.getnframes() == max(len(call.sent), len(heard))
    left = audioop.tomono(frames, 2, 1, 0)
    right = audioop.tomono(frames, 2, 0, 1)
    i0 = int(s_start * 8000)
    assert audioop.rms(left[2 * i0 : 2 * (i0 + 800)], 2) > 1000
    assert audioop.rms(right[2 * i0 : 2 * (i0 + 80)], 2) < 50 or h_segs[0][0] - s_start < 0.01
    j0 = int(h_segs[0][0] * 8000)
    assert audioop.rms(right[2 * j0 : 2 * (j0 + 800)], 2) > 1000


class Tap(TwilioObserver):
    """Records every hook call as it comes."""

    def __init__(self) -> None:
        self.frames: list[tuple[SimCall, bytes, float, int]] = []
        self.media: list[tuple[SimCall, bytes, float]] = []
        self.marks: list[tuple[SimCall, str, float, str]] = []
        self.clears: list[tuple[SimCall, float, int]] = []

    def caller_frame_sent(self, call: SimCall, frame: bytes, at: float, pos: int) -> None:
        self.frames.append((call, frame, at, pos))

    def assistant_media_received(self, call: SimCall, audio: bytes, at: float) -> None:
        self.media.append((call, audio, at))

    def mark_echoed(self, call: SimCall, name: str, at: float, cause: str) -> None:
        self.marks.append((call, name, at, cause))

    def clear_received(self, call: SimCall, at: float, dropped: int) -> None:
        self.clears.append((call, at, dropped))


async def test_observer_sees_caller_frames_as_written() -> None:
    tap = Tap()
    async with environment(observer=tap) as (gw, sim):
        call = await sim.place_call()
        conn = await gw.next_conn()
        speech = tone_ulaw(0.1, freq=500.0)  # 5 frames
        call.say(speech)
        await call.wait_speaking_done(timeout=3)
        n = len(call.sent_frames)
        await conn.wait_for(lambda: len(conn.of("media")) >= n)
        await call.hangup()

    frames = tap.frames[:n]
    assert len(frames) == n and all(c is call for c, _, _, _ in frames)
    # The bytes of each media message, at its place on the call clock.
    assert b"".join(f for _, f, _, _ in frames) == bytes(conn.inbound[: 160 * n])
    assert [p for _, _, _, p in frames] == [p for _, p in call.sent_frames[:n]]
    assert all(call.sent[p : p + 160] == f for _, f, _, p in frames)
    assert speech in b"".join(f for _, f, _, _ in frames)
    # Taken after the write: no earlier than the ticker pass that sent it, before the gateway
    # read it (same process, same monotonic clock).
    arrivals = conn.media_arrivals()
    for (_, _, sent_at, _), (t_tick, _), arrival in zip(frames, call.sent_frames, arrivals, strict=False):
        assert call.t0 + t_tick - 1e-6 <= sent_at <= arrival


async def test_observer_sees_media_marks_and_clear() -> None:
    tap = Tap()
    async with environment(observer=tap) as (gw, sim):
        call = await sim.place_call()
        conn = await gw.next_conn()

        await conn.send_media(TONE_400MS)
        await conn.send_mark("played")
        await call.wait_for(lambda: len(call.marks_echoed) == 1, timeout=3)
        assert [(c, a) for c, a, _ in tap.media] == [(call, TONE_400MS)]
        assert tap.media[0][2] == pytest.approx(call.t0 + call.received_media_times[0][0], abs=1e-6)
        (c, name, echoed_at, cause), = tap.marks
        assert (c, name, cause) == (call, "played", "played")
        assert echoed_at == pytest.approx(call.t0 + call.marks_echoed[0][0], abs=1e-6)
        assert echoed_at - tap.media[0][2] >= 0.399

        # A clear mid-playout: the hook reports the unplayed rest, the mark comes back "clear".
        await conn.send_media(TONE_1S)
        await conn.send_mark("cleared")
        await call.wait_for(lambda: len(call.marks_sent_by_server) == 2, timeout=3)
        t_media = call.received_media_times[1][0]
        await conn.wait_for(lambda: conn.media_since(call.t0 + t_media + 0.2))
        await conn.send_clear()
        await call.wait_for(lambda: len(call.marks_echoed) == 2, timeout=3)
        (c, received_at, dropped), = tap.clears
        assert c is call
        assert received_at == pytest.approx(call.t0 + call.clears[0], abs=1e-6)
        played = len(call.heard) - int(t_media * 8000)  # heard ends where the clear cut it
        assert played >= 0.2 * 8000 and dropped == 8000 - played
        (event,) = [d for _, k, d in call.events if k == "clear"]
        assert event["dropped_s"] == dropped / 8000
        assert [(m[1], m[3]) for m in tap.marks] == [("played", "played"), ("cleared", "clear")]
        assert tap.marks[1][2] >= received_at
        await call.hangup()


async def test_idle_frame_replaces_digital_silence() -> None:
    quiet = tone_ulaw(0.02, freq=1000.0, amp=100)  # a quiet line, below any voice gate
    speech = TONE_400MS[:800]
    async with environment(idle_frame=quiet) as (gw, sim):
        call = await sim.place_call()
        conn = await gw.next_conn()
        call.say(speech)
        await call.wait_speaking_done(timeout=3)
        n = len(call.sent_frames)
        await conn.wait_for(lambda: len(conn.of("media")) >= n + 3)
        await call.hangup()
    inbound = bytes(conn.inbound)
    frames = [inbound[i : i + 160] for i in range(0, len(inbound), 160)]
    assert [f for f in frames if f != quiet] == [speech[i : i + 160] for i in range(0, 800, 160)]
    assert frames[-3:] == [quiet] * 3 and b"\xff" * 160 not in frames
    assert inbound in call.sent
    with pytest.raises(ValueError, match="160 bytes"):
        TwilioSim(gateway_url="http://127.0.0.1:9", public_url="http://127.0.0.1:9",
                  account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN, idle_frame=b"\xff" * 100)


# ----------------------------------------------------------------------------- outbound calls

CALLER = "+15550001111"  # our Twilio number
CALLEE = "+15550009999"
ALL_EVENTS = ["initiated", "ringing", "answered", "completed"]


def calls_url(sim: TwilioSim) -> str:
    return f"{sim.rest_base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"


def call_url(sim: TwilioSim, sid: str) -> str:
    return f"{sim.rest_base_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{sid}.json"


@contextlib.asynccontextmanager
async def rest_client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5, trust_env=False, auth=(ACCOUNT_SID, AUTH_TOKEN)) as http:
        yield http


async def create_call(
    http: httpx.AsyncClient, sim: TwilioSim, gw: FakeGateway, **fields: Any
) -> httpx.Response:
    """POST /Calls.json (list values become repeated fields, as the twilio library sends them)."""
    data: dict[str, Any] = {"From": CALLER, "To": CALLEE, "Url": gw.public + "/twilio/outbound"}
    data.update({k: v for k, v in fields.items() if v is not None})
    for k in [k for k, v in fields.items() if v is None]:
        data.pop(k, None)
    return await http.post(calls_url(sim), data=data)


def callbacks_for(gw: FakeGateway, sid: str) -> list[dict[str, str]]:
    return [p for _, p, _ in gw.call_status if p["CallSid"] == sid]


def event_time(call: SimCall, kind: str, **match: Any) -> float:
    """Call time of the first event `kind` whose data has `match`."""
    return next(
        t for t, k, d in call.events if k == kind and all(d.get(n) == v for n, v in match.items())
    )


def amd_time(call: SimCall) -> float:
    return event_time(call, "amd")


async def test_outbound_create_callbacks_and_stream(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    sim.callees[CALLEE] = Callee(ring_s=0.1, hello_s=1.0)  # outlasts the fetch and the handshake
    async with rest_client() as http:
        r = await create_call(
            http, sim, gw, StatusCallback=gw.public + "/twilio/call-status",
            StatusCallbackEvent=ALL_EVENTS,
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["status"] == "queued" and body["direction"] == "outbound-api"
        assert (body["to"], body["from"], body["account_sid"]) == (CALLEE, CALLER, ACCOUNT_SID)
        assert SID_RE.match(body["sid"]) and body["answered_by"] is None
        assert body["start_time"] is None and body["uri"].endswith(f"/Calls/{body['sid']}.json")

        call = await sim.wait_outbound(timeout=3)
        assert call is sim.calls[body["sid"]] and call.direction == "outbound-api"
        assert call.outbound is not None and call.outbound.request.status_callback_events == (
            "initiated", "ringing", "answered", "completed")
        await call.wait_streams(1, timeout=3)
        conn = await gw.next_conn()
        assert call.status == "in-progress" and call.answered
        # The Url was fetched once, signed, with the outbound call's parameters.
        (fetch,) = [(p, ok) for path, p, ok in gw.webhooks if path == "/twilio/outbound"]
        params, ok = fetch
        assert ok and params["CallSid"] == call.call_sid and params["AccountSid"] == ACCOUNT_SID
        assert params["CallStatus"] == "in-progress" and params["Direction"] == "outbound-api"
        assert (params["From"], params["To"]) == (CALLER, CALLEE) and "AnsweredBy" not in params
        assert conn.start["start"]["callSid"] == call.call_sid
        assert conn.start["start"]["customParameters"]["token"] == "tok-" + call.call_sid

        # The callee said hello on answering: the part after the stream opened reached the gateway.
        await call.wait_speaking_done(timeout=3)
        await conn.wait_for(lambda: len(conn.of("media")) >= len(call.sent_frames))
        assert call.answered_at is not None and call.answered_at < 0
        ((start, end),) = call.sent_segments()
        assert start < 0.03 and abs(end - (call.answered_at + 1.0)) < 0.01
        assert bytes(conn.inbound).replace(b"\xff", b"")

        # Talk and listen exactly as on an inbound call.
        await conn.send_media(TONE_400MS)
        await conn.send_mark("reply")
        await call.wait_for(lambda: len(call.marks_echoed) == 1, timeout=3)
        assert len(call.heard_segments()) == 1

        r = await http.post(call_url(sim, call.call_sid), data={"Status": "completed"})
        assert r.status_code == 200 and r.json()["status"] == "completed"
        assert await call.wait_ended(timeout=3) == "rest-completed"
        await asyncio.wait_for(conn.closed.wait(), 3)
        assert conn.messages[-1][1]["event"] == "stop"

        await gw.wait_for(lambda: len(gw.call_status) == 4)
        assert all(method == "POST" and ok for method, _, ok in gw.call_status)
        cbs = callbacks_for(gw, call.call_sid)
        assert [p["CallStatus"] for p in cbs] == ["initiated", "ringing", "in-progress", "completed"]
        assert [p["SequenceNumber"] for p in cbs] == ["0", "1", "2", "3"]
        validator = RequestValidator(AUTH_TOKEN)
        for p in cbs:
            assert p["Direction"] == "outbound-api" and p["CallbackSource"] == "call-progress-events"
            assert (p["From"], p["To"], p["AccountSid"]) == (CALLER, CALLEE, ACCOUNT_SID)
            assert parsedate_to_datetime(p["Timestamp"]).tzinfo is not None
            sig = validator.compute_signature(gw.public + "/twilio/call-status", p)
            assert validator.validate(gw.public + "/twilio/call-status", p, sig)
        assert "CallDuration" not in cbs[2] and cbs[3]["CallDuration"].isdigit()

        r = await http.get(call_url(sim, call.call_sid))
        got = r.json()
        assert got["status"] == "completed" and got["direction"] == "outbound-api"
        assert got["start_time"] is not None and got["end_time"] is not None
        assert got["answered_by"] is None


async def test_outbound_async_amd(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    human, machine, voicemail = "+15550000001", "+15550000002", "+15550000003"
    sim.callees[human] = Callee(ring_s=0.05, hello_s=0.3)
    sim.callees[machine] = Callee(kind="machine", ring_s=0.05, greeting_s=1.5)
    sim.callees[voicemail] = Callee(kind="machine", ring_s=0.05, greeting_s=0.8, beep_s=0.3)
    amd = {
        "AsyncAmd": "true",
        "AsyncAmdStatusCallback": gw.public + "/twilio/amd",
        "MachineDetectionSpeechThreshold": "1000",
        "MachineDetectionSpeechEndThreshold": "500",
    }
    async with rest_client() as http:
        for to, mode in ((human, "Enable"), (machine, "Enable"), (voicemail, "DetectMessageEnd")):
            r = await create_call(http, sim, gw, To=to, MachineDetection=mode, **amd)
            assert r.status_code == 201, r.text
        calls = {to: await sim.wait_outbound(timeout=3, to=to) for to in (human, machine, voicemail)}
        for call in calls.values():
            await call.wait_streams(1, timeout=3)  # async AMD: the TwiML runs at once
        await gw.wait_for(lambda: len(gw.amd) == 3, timeout=5)

        got = {p["CallSid"]: p for _, p, ok in gw.amd if ok}
        assert len(got) == 3
        # human: hello 0.3 s + end threshold 0.5 s; machine: speech threshold 1 s of its 1.5 s
        # greeting; voicemail: greeting 0.8 s, 0.1 s pause, beep 0.3 s.
        expect = {human: ("human", 800), machine: ("machine_start", 1000),
                  voicemail: ("machine_end_beep", 1200)}
        for to, (answered_by, ms) in expect.items():
            call = calls[to]
            p = got[call.call_sid]
            assert p == {"AccountSid": ACCOUNT_SID, "AnsweredBy": answered_by,
                         "CallSid": call.call_sid, "MachineDetectionDuration": str(ms)}
            assert call.answered_by == answered_by
            assert call.answered_at is not None
            assert amd_time(call) - call.answered_at >= ms / 1000 - 0.002
            assert event_time(call, "webhook") < amd_time(call)  # the TwiML did not wait
            (fetch,) = [p for path, p, _ in gw.webhooks
                        if path == "/twilio/outbound" and p["CallSid"] == call.call_sid]
            assert "AnsweredBy" not in fetch
            r = await http.get(call_url(sim, call.call_sid))
            assert r.json()["answered_by"] == answered_by and r.json()["status"] == "in-progress"
        for call in calls.values():
            await call.hangup()
            assert call.status == "completed" and call.end_reason == "callee-hangup"


async def test_machine_greeting_beep_and_recording(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    sim.callees[CALLEE] = Callee(kind="machine", ring_s=0.05, greeting_s=1.0, beep_s=0.3)
    async with rest_client() as http:
        r = await create_call(http, sim, gw, MachineDetection="DetectMessageEnd", AsyncAmd="true",
                              AsyncAmdStatusCallback=gw.public + "/twilio/amd")
        assert r.status_code == 201
    call = await sim.wait_outbound(timeout=3)
    await call.wait_streams(1, timeout=3)
    conn = await gw.next_conn()
    # Speaking over the greeting: the machine does not record it.
    await conn.send_media(TONE_400MS[:800])
    beep_at, beep_end = call.beep_at, call.beep_end
    assert beep_at is not None and beep_end is not None and call.answered_at is not None
    assert abs(beep_at - (call.answered_at + 1.1)) < 0.001  # greeting, 0.1 s pause, beep
    assert abs(beep_end - beep_at - 0.3) < 0.001
    # The greeting, then the beep, went out on the stream.
    await conn.wait_for(lambda: conn.media_since(call.t0 + beep_end + 0.05), timeout=4)
    greeting, beep = call.sent_segments()
    assert abs(greeting[1] - (call.answered_at + 1.0)) < 0.01
    assert abs(beep[0] - beep_at) < 0.01 and abs(beep[1] - beep_end) < 0.01
    i, j = int(beep_at * 8000), int(beep_end * 8000)
    freq = voices.dominant_frequency(audioop.ulaw2lin(call.sent[i:j], 2), 8000)
    assert freq is not None and abs(freq - BEEP_HZ) < 5
    assert call.sent[i:j] in bytes(conn.inbound)
    assert await wait_amd(gw) == "machine_end_beep"

    # After the beep the machine records what it hears.
    message = tone_ulaw(0.3, freq=700.0)
    await conn.send_media(message)
    await conn.send_mark("left-message")
    await call.wait_for(lambda: len(call.marks_echoed) == 1, timeout=3)
    recorded = call.heard_after_beep
    assert recorded.replace(b"\xff", b"") == message.replace(b"\xff", b"")
    (first, _), (second, _) = call.heard_segments()
    assert first < beep_at < beep_end <= second
    await call.hangup()


async def wait_amd(gw: FakeGateway) -> str:
    await gw.wait_for(lambda: bool(gw.amd), timeout=5)
    (_, p, ok), = gw.amd
    assert ok
    return p["AnsweredBy"]


async def test_outbound_blocking_amd(env: tuple[FakeGateway, TwilioSim]) -> None:
    """Without AsyncAmd the TwiML waits for the decision, which comes with the Url request."""
    gw, sim = env
    human = "+15550000001"
    sim.callees[CALLEE] = Callee(kind="machine", ring_s=0.05, greeting_s=0.6, beep_s=0.2)
    sim.callees[human] = Callee(ring_s=0.05, hello_s=0.2, detect_s=0.3)
    say_hangup = "<Response><Say>Hello from the bot</Say><Hangup/></Response>"
    async with rest_client() as http:
        r = await create_call(http, sim, gw, MachineDetection="DetectMessageEnd", Method="GET")
        assert r.status_code == 201
        r = await create_call(http, sim, gw, To=human, Url=None, Twiml=say_hangup,
                              MachineDetection="Enable",
                              StatusCallback=gw.public + "/twilio/call-status")
        assert r.status_code == 201

        call = await sim.wait_outbound(timeout=3, to=CALLEE)
        await call.wait_streams(1, timeout=3)
        conn = await gw.next_conn()
        (fetch,) = [(p, ok) for path, p, ok in gw.webhooks if path == "/twilio/outbound"]
        params, ok = fetch
        assert ok and params["AnsweredBy"] == "machine_end_beep"  # signed GET, AnsweredBy in it
        assert call.answered_by == "machine_end_beep" and call.answered_at is not None
        first_stream = event_time(call, "stream-started")
        assert first_stream >= call.answered_at + 0.9 - 0.002  # after greeting, pause and beep
        assert call.beep_end is not None and call.beep_end < 0  # all before the stream
        await conn.wait_for(lambda: len(conn.of("media")) >= 10)
        assert set(conn.inbound) == {0xFF}  # the stream carried none of the greeting
        await conn.send_media(TONE_400MS[:800])
        await conn.send_mark("m")
        await call.wait_for(lambda: len(call.marks_echoed) == 1, timeout=3)
        assert call.heard_after_beep == call.heard  # everything it heard came after the beep
        await call.hangup()

        call2 = await sim.wait_outbound(timeout=3, to=human)
        assert await call2.wait_ended(timeout=3) == "hangup"
        assert call2.say_texts == ["Hello from the bot"] and call2.answered_by == "human"
        assert call2.answered_at is not None
        assert event_time(call2, "ended") - call2.answered_at >= 0.3 - 0.002
        assert call2.streams == [] and call2.status == "completed"
        await gw.wait_for(lambda: bool(callbacks_for(gw, call2.call_sid)))
        (cb,) = callbacks_for(gw, call2.call_sid)  # StatusCallback without events: completed only
        assert cb["CallStatus"] == "completed" and cb["AnsweredBy"] == "human"
        r = await http.get(call_url(sim, call2.call_sid))
        assert r.json()["answered_by"] == "human"


async def test_outbound_unanswered_calls(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    busy, no_answer, long_ring, failed, cancel = (f"+1555000000{i}" for i in range(1, 6))
    sim.callees[busy] = Callee(kind="busy", ring_s=0.05)
    sim.callees[no_answer] = Callee(kind="no-answer")
    sim.callees[long_ring] = Callee(ring_s=30.0)  # rings longer than the Timeout
    sim.callees[failed] = Callee(kind="failed")
    sim.callees[cancel] = Callee(ring_s=30.0)
    status = {"StatusCallback": gw.public + "/twilio/call-status", "StatusCallbackEvent": ALL_EVENTS,
              "Timeout": "1"}
    async with rest_client() as http:
        r = await create_call(http, sim, gw, To=busy, StatusCallbackMethod="GET", **status)
        assert r.status_code == 201
        for to in (no_answer, long_ring, failed, cancel):
            assert (await create_call(http, sim, gw, To=to, **status)).status_code == 201
        calls = {to: await sim.wait_outbound(timeout=3, to=to)
                 for to in (busy, no_answer, long_ring, failed, cancel)}
        await calls[cancel].wait_for(lambda: calls[cancel].status == "ringing", timeout=3)
        r = await http.post(call_url(sim, calls[cancel].call_sid), data={"Status": "canceled"})
        assert r.status_code == 200 and r.json()["status"] == "canceled"

        expect = {
            busy: ("busy", ["initiated", "busy"]),
            no_answer: ("no-answer", ["initiated", "ringing", "no-answer"]),
            long_ring: ("no-answer", ["initiated", "ringing", "no-answer"]),
            failed: ("failed", ["initiated", "failed"]),
            cancel: ("canceled", ["initiated", "ringing", "canceled"]),
        }
        for to, (final, statuses) in expect.items():
            call = calls[to]
            await call.wait_ended(timeout=4)
            assert call.status == final and not call.answered and call.streams == []
            n = len(statuses)
            await gw.wait_for(lambda c=call, n=n: len(callbacks_for(gw, c.call_sid)) == n)
            cbs = callbacks_for(gw, call.call_sid)
            assert [p["CallStatus"] for p in cbs] == statuses
            assert cbs[-1]["CallDuration"] == "0"
            r = await http.get(call_url(sim, call.call_sid))
            assert r.json()["status"] == final and r.json()["start_time"] is None
        na = calls[no_answer]
        ring = event_time(na, "ended") - event_time(na, "call-status", status="ringing")
        assert ring >= 1.0 - 0.002  # rang for the whole Timeout
        assert all(m == "GET" and ok for m, p, ok in gw.call_status if p["To"] == busy)
        assert not [p for p, _, _ in gw.webhooks if p == "/twilio/outbound"]  # no TwiML fetched


async def test_outbound_create_validation(env: tuple[FakeGateway, TwilioSim]) -> None:
    gw, sim = env
    sim.invalid_numbers.add("+15550000404")
    async with rest_client() as http:
        r = await http.post(calls_url(sim), data={"To": CALLEE, "From": CALLER, "Url": gw.public},
                            auth=(ACCOUNT_SID, "wrong"))
        assert r.status_code == 401 and r.json()["code"] == 20003
        assert r.headers["www-authenticate"].startswith("Basic")

        cases: list[tuple[dict[str, Any], int, int, str]] = [
            ({"To": None}, 400, 21201, "'To'"),
            ({"From": None}, 400, 21213, "'From'"),
            ({"To": "5551234567"}, 400, 21211, "The 'To' number 5551234567 is not a valid"),
            ({"To": "+1 555 123 4567"}, 400, 21211, "not a valid phone number"),
            ({"To": "+15550000404"}, 400, 21211, "not a valid phone number"),
            ({"Url": None}, 400, 21205, "Url"),
            ({"Twiml": "<Response/>"}, 400, 21205, "mutually exclusive"),
            ({"Url": "/relative/path"}, 400, 21205, "not a valid URL"),
            ({"StatusCallbackEvent": ["initiated", "bogus"]}, 400, 21626, "StatusCallbackEvent"),
            ({"Method": "PUT"}, 400, 21200, "Method"),
            ({"MachineDetection": "Sometimes"}, 400, 21200, "MachineDetection"),
            ({"AsyncAmd": "maybe"}, 400, 21200, "AsyncAmd"),
        ]
        for fields, status, code, needle in cases:
            r = await create_call(http, sim, gw, **fields)
            body = r.json()
            assert (r.status_code, body["code"], body["status"]) == (status, code, status), fields
            assert needle in body["message"], (fields, body)
            assert body["more_info"] == f"https://www.twilio.com/docs/errors/{code}"
        r = await http.post(
            f"{sim.rest_base_url}/2010-04-01/Accounts/AC{'2' * 32}/Calls.json",
            data={"To": CALLEE, "From": CALLER, "Url": gw.public + "/twilio/outbound"},
        )
        assert r.status_code == 404 and r.json()["code"] == 20404
        sim.verified_caller_ids = {"+15550007777"}
        r = await create_call(http, sim, gw)
        assert r.status_code == 400 and r.json()["code"] == 21210

    assert sim.outbound_calls == [] and sim.calls == {} and gw.webhooks == []
    creates = [r for r in sim.rest_requests if r[2].endswith("/Calls.json")]
    assert len(creates) == len(cases) + 3  # every request is logged, refused or not
    assert creates[0][1:3] == ("POST", f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json")
    with pytest.raises(TimeoutError):
        await sim.wait_outbound(timeout=0.05)


class OutboundTap(TwilioObserver):
    def __init__(self) -> None:
        self.created: list[tuple[SimCall, float]] = []

    def outbound_call_created(self, call: SimCall, at: float) -> None:
        self.created.append((call, at))


@pytest.mark.filterwarnings("ignore:BasicAuth is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The 'auth' parameter is deprecated:DeprecationWarning")
async def test_outbound_with_the_twilio_library() -> None:
    """What the gateway will run: the official library, its base URL pointed at the stand-in
    (as worker/twilio_rest.py does with TWILIO_API_BASE_URL)."""
    tap = OutboundTap()
    async with environment(observer=tap) as (gw, sim):
        sim.callees[CALLEE] = Callee(ring_s=0.05, hello_s=0.2)
        http_client = AsyncTwilioHttpClient(timeout=5)
        client = Client(ACCOUNT_SID, AUTH_TOKEN, http_client=http_client)
        client.api.base_url = sim.rest_base_url
        try:
            created = await client.calls.create_async(
                to=CALLEE,
                from_=CALLER,
                url=gw.public + "/twilio/outbound",
                status_callback=gw.public + "/twilio/call-status",
                status_callback_event=["initiated", "answered", "completed"],
                machine_detection="Enable",
                machine_detection_speech_end_threshold=500,
                async_amd="true",
                async_amd_status_callback=gw.public + "/twilio/amd",
                timeout=20,
                record=False,
            )
            assert created.status == "queued" and created.direction == "outbound-api"
            assert created.to == CALLEE and created._from == CALLER and created.sid
            call = await sim.wait_outbound(timeout=3)
            assert call.call_sid == created.sid and [c for c, _ in tap.created] == [call]
            assert tap.created[0][1] == call.created
            assert call.outbound is not None
            req = call.outbound.request
            assert req.status_callback_events == ("initiated", "answered", "completed")
            assert (req.machine_detection, req.async_amd, req.timeout_s) == ("Enable", True, 20)
            assert ("Record", "false") in req.params
            await call.wait_streams(1, timeout=3)
            await call.wait_for(lambda: call.answered_by is not None, timeout=5)
            fetched = await client.calls(created.sid).fetch_async()
            assert fetched.answered_by == "human" and fetched.status == "in-progress"
            assert fetched.start_time is not None

            with pytest.raises(TwilioRestException) as info:
                await client.calls.create_async(to="12345", from_=CALLER, url=gw.public + "/x")
            assert (info.value.status, info.value.code) == (400, 21211)

            await client.calls(created.sid).update_async(status="completed")
            assert await call.wait_ended(timeout=3) == "rest-completed"
            await gw.wait_for(lambda: len(callbacks_for(gw, call.call_sid)) == 3)
            assert [p["CallStatus"] for p in callbacks_for(gw, call.call_sid)] == [
                "initiated", "in-progress", "completed"]
        finally:
            session = getattr(http_client, "session", None)
            if session is not None:
                await session.close()

        # The synchronous client too (the create most examples show), with inline TwiML.
        sync_client = Client(ACCOUNT_SID, AUTH_TOKEN)
        sync_client.api.base_url = sim.rest_base_url
        created2 = await asyncio.to_thread(
            sync_client.calls.create, to=CALLEE, from_=CALLER,
            twiml="<Response><Say>Short one</Say><Hangup/></Response>",
        )
        call2 = await sim.wait_outbound(timeout=3)
        assert call2.call_sid == created2.sid
        assert await call2.wait_ended(timeout=3) == "hangup"
        assert call2.say_texts == ["Short one"]
