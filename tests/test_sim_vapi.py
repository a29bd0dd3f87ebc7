"""The Vapi stand-in (sim/vapi.py, sim/voices.py), over real loopback sockets."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from sim import voices
from sim.vapi import (
    AssistantScript,
    SavedModel,
    VapiObserver,
    VapiSession,
    VapiSim,
    call_spec,
    greeter,
    interrupter,
    silent,
)
from sim.vapi.scripts import resume_text, utterance_text

KEY = "test-vapi-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FORMATS = [("pcm_s16le", 16000, 640), ("mulaw", 8000, 160)]
MODEL_GENERATED = "assistant-speaks-first-with-model-generated-message"


def resumed_body(messages: list[dict[str, Any]], provider: str = "openai",
                 model: str = "gpt-4o-mini", **overrides: Any) -> dict[str, Any]:
    """A failover's body: the model speaks first from the conversation handed over."""
    body = call_body()
    body["assistantOverrides"].update(
        firstMessageMode=MODEL_GENERATED,
        model={"provider": provider, "model": model, "messages": messages}, **overrides)
    return body


def call_body(fmt: str = "pcm_s16le", rate: int = 16000, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "assistantId": "asst-test-0001",
        "assistantOverrides": {
            "variableValues": {"callerNumber": "+15551234567", "twilioCallSid": "CA123"},
            "metadata": {"twilioCallSid": "CA123", "from": "+15551234567"},
        },
        "transport": {
            "provider": "vapi.websocket",
            "audioFormat": {"format": fmt, "container": "raw", "sampleRate": rate},
        },
    }
    body.update(extra)
    return body


@pytest.fixture
async def sim() -> AsyncIterator[VapiSim]:
    s = VapiSim(assistant=greeter(greeting_s=0.6, answer_s=0.4))
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def post_call(
    sim: VapiSim, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=5) as client:
        return await client.post("/call", json=call_body() if body is None else body,
                                 headers=AUTH if headers is None else headers)


async def new_call(sim: VapiSim, body: dict[str, Any] | None = None) -> tuple[str, VapiSession]:
    r = await post_call(sim, body)
    assert r.status_code == 201, r.text
    call = r.json()
    return call["transport"]["websocketCallUrl"], sim.sessions[call["id"]]


class Client:
    """The bridge side of a transport socket: records everything in arrival order and streams
    caller audio as real-time 20 ms frames (silence unless a tone is queued)."""

    def __init__(self, ws: ClientConnection, fmt: str, rate: int) -> None:
        self.ws, self.fmt, self.rate = ws, fmt, rate
        self.events: list[tuple[float, bytes | dict[str, Any]]] = []
        self.sent = bytearray()
        self.sent_sizes: list[int] = []
        self.closed: ConnectionClosed | None = None
        self.done = False
        self._changed = asyncio.Event()
        self._tone: deque[bytes] = deque()
        self._reader = asyncio.create_task(self._read())
        self._pump: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        try:
            async for m in self.ws:
                self.events.append((time.monotonic(), m if isinstance(m, bytes) else orjson.loads(m)))
                self._changed.set()
        except ConnectionClosed as exc:
            self.closed = exc
        finally:
            self.done = True
            self._changed.set()

    async def wait(self, pred: Callable[[], bool], limit: float = 5.0) -> None:
        async with asyncio.timeout(limit):
            while not pred():
                self._changed.clear()
                await self._changed.wait()

    @property
    def msgs(self) -> list[dict[str, Any]]:
        return [e for _, e in self.events if isinstance(e, dict)]

    @property
    def frames(self) -> list[bytes]:
        return [e for _, e in self.events if isinstance(e, bytes)]

    def of(self, type_: str, **match: Any) -> list[dict[str, Any]]:
        return [m for m in self.msgs
                if m.get("type") == type_ and all(m.get(k) == v for k, v in match.items())]

    async def wait_msg(self, type_: str, limit: float = 5.0, **match: Any) -> dict[str, Any]:
        await self.wait(lambda: bool(self.of(type_, **match)), limit)
        return self.of(type_, **match)[0]

    def turn_frames(self, turn: int) -> list[tuple[float, bytes]]:
        """Audio frames received after the assistant's speech-update started for ``turn``
        (and before the next assistant speech-update started)."""
        out: list[tuple[float, bytes]] = []
        current: int | None = None
        for t, e in self.events:
            if isinstance(e, dict):
                if e.get("type") == "speech-update" and e.get("role") == "assistant" \
                        and e.get("status") == "started":
                    current = e["turn"]
            elif current == turn:
                out.append((t, e))
        return out

    def label(self, frames: list[tuple[float, bytes]]) -> str | None:
        return voices.identify(voices.decode(b"".join(f for _, f in frames), self.fmt), self.rate)

    def start_stream(self) -> None:
        self._pump = asyncio.create_task(self._stream())

    def speak(self, seconds: float, index: int = 0) -> None:
        self._tone.extend(voices.frames("caller", index, seconds, self.rate, self.fmt))

    async def _stream(self) -> None:
        silence = voices.silence(0.02, self.rate, self.fmt)
        next_at = time.monotonic()
        while True:
            frame = self._tone.popleft() if self._tone else silence
            try:
                await self.ws.send(frame)
            except ConnectionClosed:
                return
            self.sent += frame
            self.sent_sizes.append(len(frame))
            next_at += 0.02
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop_stream(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
            self._pump = None

    async def aclose(self) -> None:
        await self.stop_stream()
        await self.ws.close()
        await asyncio.wait_for(self._reader, 3)


class Tap(VapiObserver):
    """Everything the observer is told, in order."""

    def __init__(self) -> None:
        self.frames: list[tuple[VapiSession, bytes, float, str, int]] = []
        self.caller: list[tuple[VapiSession, bytes, float]] = []
        self.sent: list[tuple[VapiSession, dict[str, Any], float]] = []
        self.received: list[tuple[VapiSession, dict[str, Any], float]] = []

    def assistant_frame_sent(self, session: VapiSession, frame: bytes, at: float, turn_id: str,
                             index: int) -> None:
        self.frames.append((session, frame, at, turn_id, index))

    def caller_audio_received(self, session: VapiSession, data: bytes, at: float) -> None:
        self.caller.append((session, data, at))

    def control_sent(self, session: VapiSession, msg: dict[str, Any], at: float) -> None:
        self.sent.append((session, msg, at))

    def control_received(self, session: VapiSession, msg: dict[str, Any], at: float) -> None:
        self.received.append((session, msg, at))


# ------------------------------------------------------------------------------------------------
# REST


async def test_auth_401(sim: VapiSim) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = await post_call(sim, headers=headers)
        assert r.status_code == 401
        assert r.json()["statusCode"] == 401 and r.json()["error"] == "Unauthorized"
    assert sim.sessions == {}


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda b: b.update(foo=1), "property foo should not exist"),
        (lambda b: b["transport"].pop("provider"), "transport.provider must be one of"),
        (lambda b: b.update(phoneNumberId="pn-1"), "phoneNumberId is not allowed"),
        (lambda b: b.update(assistant={"name": "x"}), "Only one of assistantId"),
        (lambda b: b.pop("assistantId"), "Exactly one of assistantId"),
        (lambda b: b["transport"]["audioFormat"].update(format="opus"),
         "transport.audioFormat.format must be one of the following values: pcm_s16le, mulaw"),
        (lambda b: b["transport"]["audioFormat"].update(container="wav"),
         "transport.audioFormat.container"),
        (lambda b: b["transport"]["audioFormat"].pop("sampleRate"),
         "transport.audioFormat.sampleRate must be a number"),
        (lambda b: b["transport"].update(extra=True), "transport.property extra should not exist"),
    ],
)
async def test_body_validation_400(sim: VapiSim, mutate: Callable[[dict[str, Any]], Any],
                                   expect: str) -> None:
    body = call_body()
    mutate(body)
    r = await post_call(sim, body)
    assert r.status_code == 400
    j = r.json()
    assert j["error"] == "Bad Request" and j["statusCode"] == 400
    assert isinstance(j["message"], list)
    assert any(expect in m for m in j["message"]), j["message"]
    assert sim.sessions == {}


async def test_body_not_json_400(sim: VapiSim) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        r = await client.post("/call", content=b"{nope", headers=AUTH)
    assert r.status_code == 400 and r.json()["statusCode"] == 400


async def test_create_call_201_and_body_recorded(sim: VapiSim) -> None:
    body = call_body("mulaw", 8000, metadata={"k": "v"}, name="demo")
    r = await post_call(sim, body)
    assert r.status_code == 201
    call = r.json()
    assert call["type"] == "vapi.websocketCall" and call["status"] == "queued"
    assert call["assistantId"] == "asst-test-0001"
    assert call["createdAt"].endswith("Z")
    assert call["transport"]["provider"] == "vapi.websocket"
    assert call["transport"]["websocketCallUrl"] == \
        f"ws://127.0.0.1:{sim.port}/{call['id']}/transport"
    session = await sim.wait_session(1)
    assert session.id == call["id"] and session.body == body
    assert session.body["assistantOverrides"]["variableValues"]["callerNumber"] == "+15551234567"
    assert session.body["assistantOverrides"]["metadata"]["twilioCallSid"] == "CA123"
    assert (session.audio_format, session.sample_rate) == ("mulaw", 8000)
    # default format, GET /call/{id}
    _url, s2 = await new_call(sim, {"assistantId": "a", "transport": {"provider": "vapi.websocket"}})
    assert (s2.audio_format, s2.sample_rate) == ("pcm_s16le", 16000)
    assert (await sim.wait_session(1)) is s2
    with pytest.raises(TimeoutError):
        await sim.wait_session(0.05)
    async with httpx.AsyncClient(base_url=sim.base_url) as client:
        got = await client.get(f"/call/{call['id']}", headers=AUTH)
        assert got.status_code == 200 and got.json()["id"] == call["id"]
        assert (await client.get("/call/nope", headers=AUTH)).status_code == 404


async def test_create_delay_honoured(sim: VapiSim) -> None:
    sim.create_delay = 0.3
    t0 = time.monotonic()
    r = await post_call(sim)
    assert r.status_code == 201
    assert time.monotonic() - t0 >= 0.3


@pytest.mark.parametrize(
    ("status", "check"),
    [
        (400, lambda j: j["error"] == "Bad Request" and isinstance(j["message"], list)),
        (429, lambda j: j["message"] == "Rate limit exceeded" and j["statusCode"] == 429),
        (500, lambda j: j["statusCode"] == 500 and j["message"] == "Internal server error"),
    ],
)
async def test_fail_status(sim: VapiSim, status: int, check: Callable[[Any], bool]) -> None:
    sim.fail_status = status
    r = await post_call(sim)
    assert r.status_code == status and check(r.json()), r.text
    assert sim.sessions == {}
    sim.fail_status = None
    assert (await post_call(sim)).status_code == 201
    assert [e["status"] for e in sim.create_log] == [status, 201]


async def test_get_assistant_auth_shape_and_count(sim: VapiSim) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=5) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = await client.get("/assistant/asst-test-0001", headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "Unauthorized"
        r = await client.get("/assistant/asst-test-0001", headers=AUTH)
        assert r.status_code == 200
        got = r.json()
        assert {k: got[k] for k in ("id", "name", "firstMessageMode", "model")} == {
            "id": "asst-test-0001", "name": "greeter", "firstMessageMode": "assistant-speaks-first",
            "model": {"provider": "openai", "model": "gpt-4o-mini",
                      "messages": [{"role": "system", "content": "You are a test assistant."}]}}
        # configurable, read on every request; every GET counted, answered or not
        sim.assistant_provider, sim.assistant_model = "anthropic", "claude-sonnet-4"
        model = (await client.get("/assistant/other", headers=AUTH)).json()["model"]
        assert (model["provider"], model["model"]) == ("anthropic", "claude-sonnet-4")
        sim.assistant_fail_status = 500
        assert (await client.get("/assistant/other", headers=AUTH)).status_code == 500
    assert sim.assistant_gets == 5
    assert [e["status"] for e in sim.assistant_log] == [401, 401, 200, 200, 500]
    assert [e["id"] for e in sim.assistant_log][-1] == "other"
    assert sim.create_log == [] and sim.sessions == {}


def _model_override(**model: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda b: b["assistantOverrides"].update(model=model)


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (_model_override(model="gpt-4o-mini", messages=[]),
         "assistantOverrides.model.provider must be a string"),
        (_model_override(provider="openai"), "assistantOverrides.model.model must be a string"),
        (_model_override(provider="", model="gpt-4o-mini"),
         "assistantOverrides.model.provider should not be empty"),
        (lambda b: b["assistantOverrides"].update(model="gpt-4o"),
         "assistantOverrides.model must be an object"),
        (_model_override(provider="openai", model="m", messages={"role": "user"}),
         "assistantOverrides.model.messages must be an array"),
        (_model_override(provider="openai", model="m", messages=["hi"]),
         "assistantOverrides.model.messages.0 must be an object"),
        (_model_override(provider="openai", model="m",
                         messages=[{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]),
         "assistantOverrides.model.messages.1.role must be one of the following values: "
         "system, user, assistant, tool, function"),
        (_model_override(provider="openai", model="m", messages=[{"role": "user", "content": 5}]),
         "assistantOverrides.model.messages.0.content must be a string"),
        (_model_override(provider="openai", model="m", messages=[{"role": "user"}]),
         "assistantOverrides.model.messages.0.content must be a string"),
        (lambda b: b["assistantOverrides"].update(firstMessageMode="model-speaks-first"),
         "assistantOverrides.firstMessageMode must be one of the following values: "
         "assistant-speaks-first, assistant-speaks-first-with-model-generated-message, "
         "assistant-waits-for-user"),
    ],
)
async def test_model_override_and_first_message_mode_validation_400(
    sim: VapiSim, mutate: Callable[[dict[str, Any]], Any], expect: str
) -> None:
    body = call_body()
    mutate(body)
    r = await post_call(sim, body)
    assert r.status_code == 400
    assert expect in r.json()["message"], r.json()["message"]
    assert sim.sessions == {}


async def test_model_override_accepted_and_read_into_the_spec(sim: VapiSim) -> None:
    history = [{"role": "user", "content": "utterance 1"},
               {"role": "assistant", "content": "answer:0 w1 w2…"}]
    _url, session = await new_call(sim, resumed_body(history))
    spec = session.spec
    assert spec.first_message_mode == MODEL_GENERATED and spec.first_message == "resume"
    assert spec.history == (("user", "utterance 1"), ("assistant", "answer:0 w1 w2…"))
    assert spec.messages == (("system", "You are a test assistant."), *spec.history)
    assert not spec.model_replaced and not spec.system_replaced
    # the saved model is the sim's at creation time
    sim.assistant_model = "gpt-4o"
    _url, session = await new_call(sim, resumed_body(history))
    assert session.spec.model_replaced and session.spec.messages[0][0] == "system"
    # every documented mode is accepted
    for mode in ("assistant-speaks-first", "assistant-waits-for-user"):
        body = call_body()
        body["assistantOverrides"]["firstMessageMode"] = mode
        assert (await post_call(sim, body)).status_code == 201


def test_call_spec_applies_the_model_override_as_documented() -> None:
    saved = SavedModel("openai", "gpt-4o-mini", "PROMPT")
    script = greeter()

    def spec(model: dict[str, Any] | None) -> Any:
        body = call_body()
        if model is not None:
            body["assistantOverrides"]["model"] = model
        return call_spec(body, script, saved)

    plain = spec(None)
    assert plain.history == () and plain.messages == (("system", "PROMPT"),)
    assert not plain.model_replaced and not plain.system_replaced
    assert plain.first_message == "greeting"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
             {"role": "tool", "content": "{}"}]
    # same provider and model: merged, the saved prompt stays first
    same = spec({"provider": "openai", "model": "gpt-4o-mini", "messages": turns})
    assert same.history == (("user", "hi"), ("assistant", "hello there"))
    assert same.messages == (("system", "PROMPT"), *same.history, ("tool", "{}"))
    assert not same.model_replaced and not same.system_replaced
    # a system message replaces the saved prompt
    system = spec({"provider": "openai", "model": "gpt-4o-mini",
                   "messages": [{"role": "system", "content": "NEW"}, *turns[:1]]})
    assert system.system_replaced and not system.model_replaced
    assert system.messages == (("system", "NEW"), ("user", "hi"))
    assert system.history == (("user", "hi"),)
    # same provider, other model: merged (prompt kept), but another LLM runs
    other_model = spec({"provider": "openai", "model": "gpt-4o", "messages": turns[:1]})
    assert other_model.model_replaced and other_model.messages[0] == ("system", "PROMPT")
    # another provider replaces the whole model: the saved prompt is gone
    other = spec({"provider": "anthropic", "model": "gpt-4o-mini", "messages": turns[:1]})
    assert other.model_replaced and not other.system_replaced
    assert other.messages == (("user", "hi"),)
    # no messages: the same provider keeps the saved ones
    bare = spec({"provider": "openai", "model": "gpt-4o-mini"})
    assert bare.messages == (("system", "PROMPT"),) and bare.history == ()
    assert script.greeting_s == 1.0, "the script is copied, not modified"


def test_utterance_texts() -> None:
    assert utterance_text("answer:0", 4.0) == "answer:0 " + " ".join(f"w{i}" for i in range(1, 11))
    assert utterance_text("greeting", 1.2) == "greeting w1 w2 w3"
    assert utterance_text("say", 0.1) == "say"
    assert resume_text(()) == "resume"
    assert resume_text((("user", "hi"),)) == "resume"
    assert resume_text((("assistant", "answer:0 w1  w2…"), ("user", "and?"))) == \
        "resume answer:0 w1 w2…"


# ------------------------------------------------------------------------------------------------
# Transport socket


async def test_handshake_rejections(sim: VapiSim) -> None:
    with pytest.raises(InvalidStatus) as err:
        async with connect(f"{sim.ws_base_url}/no-such-call/transport"):
            pass
    assert err.value.response.status_code == 404
    with pytest.raises(InvalidStatus):
        async with connect(f"{sim.ws_base_url}/elsewhere"):
            pass
    url, session = await new_call(sim)
    async with connect(url, ping_interval=None):
        await session.wait_connected(2)
        with pytest.raises(InvalidStatus) as err:
            async with connect(url):
                pass
        assert err.value.response.status_code == 409  # one transport per call
    await _wait_true(lambda: sim.open_sessions() == 0)


async def _wait_true(pred: Callable[[], bool], limit: float = 2.0) -> bool:
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    return True


@pytest.mark.parametrize(("fmt", "rate", "frame_bytes"), FORMATS)
async def test_greeter_paced_greeting_then_answer(
    sim: VapiSim, fmt: str, rate: int, frame_bytes: int
) -> None:
    sim.assistant = greeter(answers=1, greeting_s=0.6, answer_s=0.4)
    sim.observer = tap = Tap()
    url, session = await new_call(sim, call_body(fmt, rate))
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, fmt, rate)
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=0)
        assert c.msgs[0]["type"] == "status-update" and c.msgs[0]["status"] == "in-progress"
        greeting = c.turn_frames(0)
        assert len(greeting) == 30 and {len(f) for _, f in greeting} == {frame_bytes}
        assert c.label(greeting) == "greeting"
        # Paced, judged where the frames leave (receive times add the client's own delays):
        # frame k never leaves before k intervals of 20 ms (exact), and the last is not late by
        # more than a busy machine's scheduling delays (a doubled interval would be 0.58 s late).
        started = session.spoken[0].started
        sent_at = [at - started for _, _, at, _, _ in tap.frames[:30]]
        assert all(t >= k * 0.02 - 1e-6 for k, t in enumerate(sent_at)), sent_at
        assert sent_at[-1] <= 0.58 + 0.4, sent_at[-1]
        # no gap inside the utterance: every 20 ms frame is voiced
        assert all(voices.dominant_frequency(voices.decode(f, fmt), rate) for _, f in greeting[1:-1])

        c.start_stream()
        c.speak(0.5, index=1)
        tr = await c.wait_msg("transcript", role="user")
        assert tr["transcriptType"] == "final" and tr["transcript"] == "utterance 1"
        assert c.of("speech-update", role="user", status="started")[0]["turn"] == 1
        assert not c.of("user-interrupted")
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=2)
        answer = c.turn_frames(2)
        assert len(answer) == 20 and {len(f) for _, f in answer} == {frame_bytes}
        assert c.label(answer) == "answer:0"
        assert [s.label for s in session.spoken] == ["greeting", "answer:0"]
        assert session.caller_turns[0].audio_end_s is not None

        await c.stop_stream()
        await session.wait_for(lambda: len(session.received_audio) >= len(c.sent), 2)
        assert bytes(session.received_audio) == bytes(c.sent)
        assert session.received_frames == c.sent_sizes
        assert set(session.received_frames) == {frame_bytes}
        assert len(session.received_times) == len(session.received_frames)
        await c.aclose()
    await session.wait_closed(2)
    assert session.ended_reason == "transport-closed-by-client"
    assert session.client_close_code == 1000


async def test_burst_sends_utterance_at_once(sim: VapiSim) -> None:
    sim.downlink = "burst"
    sim.assistant = greeter(greeting_s=1.0)
    sim.observer = tap = Tap()
    url, _session = await new_call(sim)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait(lambda: len(c.turn_frames(0)) >= 50, 2)
        frames = c.turn_frames(0)
        assert len(frames) == 50 and {len(f) for _, f in frames} == {640}
        # all sent in one synchronous loop (paced, the last would leave 0.98 s after the first)
        sent_at = [at for _, _, at, _, _ in tap.frames]
        assert len(sent_at) == 50 and sent_at[-1] - sent_at[0] < 0.1
        started = c.of("speech-update", role="assistant", status="started")[0]
        stopped = await c.wait_msg("speech-update", role="assistant", status="stopped")
        # the assistant "speaks" on a real-time playout clock even though it sent everything
        assert stopped["timestamp"] - started["timestamp"] >= 900
        await c.aclose()


@pytest.mark.parametrize("downlink", ["paced", "burst"])
async def test_interrupter_barge_in(sim: VapiSim, downlink: str) -> None:
    sim.downlink = downlink  # type: ignore[assignment]
    sim.assistant = interrupter(long_s=6.0, answers=1, answer_s=0.4)
    url, session = await new_call(sim)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait(lambda: bool(c.frames), 2)
        c.start_stream()
        # 0.2 s of a quiet line before the caller talks
        await session.wait_for(lambda: len(session.received_frames) >= 10, 2)
        c.speak(0.6, index=2)
        interrupted = await c.wait_msg("user-interrupted", limit=3)
        long = session.spoken[0]
        assert interrupted["turnId"] == long.turn_id
        kinds = [(m["type"], m.get("role"), m.get("status")) for m in c.msgs]
        i = kinds.index(("user-interrupted", None, None))
        assert kinds[i - 1] == ("speech-update", "user", "started")
        assert kinds[i + 1] == ("speech-update", "assistant", "stopped")
        n_before = len(c.turn_frames(0))
        assert n_before == long.frames_sent and long.ended is not None
        if downlink == "paced":
            # cut short, and never ahead of the playout clock at the moment of the barge-in
            assert n_before < 300
            assert n_before <= int((long.ended - long.started) / 0.02 + 1e-6) + 1
        else:
            assert n_before == 300  # all sent at once; still "speaking" on the playout clock
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=2, limit=4)
        assert len(c.turn_frames(0)) == n_before  # nothing more of the long utterance
        assert c.label(c.turn_frames(2)) == "answer:0"
        assert session.spoken[0].interrupted and not session.spoken[1].interrupted
        await c.aclose()


@pytest.mark.parametrize("msg_type", ["end-call", "hangup"])
async def test_client_end_call(sim: VapiSim, msg_type: str) -> None:
    url, session = await new_call(sim)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait_msg("status-update", status="in-progress")
        await ws.send(orjson.dumps({"type": msg_type}).decode())
        ended = await c.wait_msg("status-update", status="ended")
        assert ended["endedReason"] == "customer-ended-call"
        await c.wait(lambda: c.done, 3)
        assert ws.close_code == 1000
    await session.wait_closed(2)
    assert session.ended_reason == "customer-ended-call" and session.status == "ended"
    assert session.control == [{"type": msg_type}]
    assert sim.open_sessions() == 0


async def test_greeter_end_after_goodbye(sim: VapiSim) -> None:
    sim.assistant = greeter(answers=1, end_after=True, greeting_s=0.3, answer_s=0.3, goodbye_s=0.3)
    url, session = await new_call(sim)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=0)
        c.start_stream()
        c.speak(0.4)
        ended = await c.wait_msg("status-update", status="ended", limit=5)
        assert ended["endedReason"] == "assistant-ended-call"
        await c.wait(lambda: c.done, 3)
        assert ws.close_code == 1000
        assert [c.label(c.turn_frames(t)) for t in (0, 2, 3)] == ["greeting", "answer:0", "goodbye"]
        await c.stop_stream()
    assert session.ended_reason == "assistant-ended-call"


async def test_drop_aborts_without_close_frame(sim: VapiSim) -> None:
    url, session = await new_call(sim)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait(lambda: bool(c.frames), 2)
        await session.drop()
        await c.wait(lambda: c.done, 2)
        assert isinstance(c.closed, ConnectionClosedError)
        assert c.closed.rcvd is None  # no close frame: TCP aborted
        assert ws.close_code == 1006
        assert not c.of("status-update", status="ended")
    assert session.closed and session.ended_reason == "sim-dropped"
    assert sim.open_sessions() == 0


async def test_ping_handling(sim: VapiSim) -> None:
    sim.assistant = silent()
    sim.respond_to_pings = False
    url, session = await new_call(sim)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        pong = await ws.ping()
        await session.wait_for(lambda: session.pings_received == 1, 2)
        # a pong would have been written before anything the server sends after seeing the ping
        await session.send_json({"type": "after-ping"})
        await c.wait_msg("after-ping")
        assert not pong.done()
        sim.respond_to_pings = True  # live switch
        await asyncio.wait_for(await ws.ping(), 2.0)
    # a client keepalive gives up on a Vapi that stops answering pings
    sim.respond_to_pings = False
    url, session = await new_call(sim)
    async with connect(url, ping_interval=0.1, ping_timeout=0.2) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait(lambda: c.done, 2)
        assert isinstance(c.closed, ConnectionClosedError)
    await session.wait_closed(2)
    assert session.pings_received >= 1


async def test_records_audio_and_ignores_garbage(sim: VapiSim) -> None:
    sim.assistant = silent()
    url, session = await new_call(sim, call_body("mulaw", 8000))
    chunks = [b"\xff" * 160, b"\x00", bytes(range(256)) * 12, b"\x7f" * 33]
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "mulaw", 8000)
        await c.wait_msg("status-update", status="in-progress")
        for chunk in chunks:
            await ws.send(chunk)
        await ws.send("not json")
        await ws.send("[1, 2]")
        await ws.send('{"type": 5}')
        await ws.send('{"type": "add-message", "message": {"role": "system", "content": "VIP"}}')
        await ws.send([b"ab", b"cd"])  # fragmented binary message
        await ws.send('{"type": "control", "control": "mute-assistant"}')
        await session.wait_for(lambda: len(session.control) == 2, 2)
        assert session.received_frames == [*map(len, chunks), 4]
        assert bytes(session.received_audio) == b"".join(chunks) + b"abcd"
        assert session.invalid == ["not json", "[1, 2]", '{"type": 5}']
        assert [m["type"] for m in session.control] == ["add-message", "control"]
        await ws.send('{"type": "end-call"}')  # still fully working
        await c.wait(lambda: c.done, 3)
    assert session.ended_reason == "customer-ended-call"
    # the silent script has no answer to give (the loud garbage audio does start a caller turn)
    assert not c.of("speech-update", role="assistant")
    assert c.of("speech-update", role="user", status="started")


async def _raw_ws(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host_port, path = url.removeprefix("ws://").split("/", 1)
    host, port = host_port.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


def _masked(opcode: int, payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_malformed_frames_never_break_the_server(sim: VapiSim) -> None:
    sim.assistant = silent()
    url, session = await new_call(sim)
    reader, writer = await _raw_ws(url)
    writer.write(_masked(0x1, b"\xff\xfe bad utf-8"))  # text frame, invalid UTF-8
    writer.write(_masked(0x2, b"\x00\x01"))
    await session.wait_for(lambda: len(session.received_frames) == 1, 2)
    assert session.invalid == [b"\xff\xfe bad utf-8"]
    writer.write(b"\x8f\xff" + b"\x00" * 20)  # reserved opcode: a protocol error
    await asyncio.wait_for(reader.read(), 2)  # server fails the connection and closes it
    writer.close()
    await session.wait_closed(2)
    # unmasked-client garbage on another call, then the server still serves new calls
    url2, session2 = await new_call(sim)
    reader, writer = await _raw_ws(url2)
    writer.write(bytes(range(256)))
    await asyncio.wait_for(reader.read(), 2)
    writer.close()
    await session2.wait_closed(2)
    url3, _session3 = await new_call(sim)
    async with connect(url3, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait_msg("status-update", status="in-progress")
    await _wait_true(lambda: sim.open_sessions() == 0)


async def test_keypad_add_message_and_say(sim: VapiSim) -> None:
    sim.assistant = AssistantScript(greeting_s=None, answers=1, answer_s=0.3, say_s=0.3)
    url, session = await new_call(sim)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait_msg("status-update", status="in-progress")
        await ws.send(orjson.dumps({"type": "add-message", "triggerResponseEnabled": True,
                                    "message": {"role": "user",
                                                "content": "User's Keypad Entry: 1234"}}).decode())
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=0)
        assert c.label(c.turn_frames(0)) == "answer:0"
        await ws.send('{"type": "say", "content": "One moment please."}')
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=1)
        assert c.label(c.turn_frames(1)) == "say"
        await c.aclose()
    assert [s.label for s in session.spoken] == ["answer:0", "say"]


async def test_say_speaks_its_content_and_can_end_the_call(sim: VapiSim) -> None:
    sim.assistant = AssistantScript(greeting_s=None, answers=1, say_s=0.4)
    url, session = await new_call(sim)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait_msg("status-update", status="in-progress")
        await ws.send(orjson.dumps({"type": "say", "content": "Please call us back.",
                                    "endCallAfterSpoken": True}).decode())
        await c.wait(lambda: c.done, 5)
    assert c.of("model-output")[0]["output"] == "Please call us back."
    assert c.of("transcript", role="assistant")[0]["transcript"] == "Please call us back."
    assert c.label(c.turn_frames(0)) == "say" and len(c.turn_frames(0)) == 20, "all of it first"
    assert c.of("status-update", status="ended")[0]["endedReason"] == \
        "assistant-ended-call-after-message-spoken"
    assert session.ended_reason == "assistant-ended-call-after-message-spoken"


async def test_add_message_triggers_a_response_unless_told_not_to(sim: VapiSim) -> None:
    sim.assistant = AssistantScript(greeting_s=None, answers=2, answer_s=0.3)
    url, session = await new_call(sim)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait_msg("status-update", status="in-progress")
        await ws.send(orjson.dumps({"type": "add-message", "triggerResponseEnabled": False,
                                    "message": {"role": "system", "content": "quiet"}}).decode())
        await ws.send(orjson.dumps({"type": "add-message", "triggerResponseEnabled": True,
                                    "message": {"role": "system", "content": "say hi"}}).decode())
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=0)
        assert c.label(c.turn_frames(0)) == "answer:0"
        await c.aclose()
    assert session.added_messages == [("system", "quiet"), ("system", "say hi")]
    assert [s.label for s in session.spoken] == ["answer:0"], "one answer: the silent one got none"
    assert not c.of("transcript", role="user"), "a system note is not the caller speaking"


async def test_mute_assistant_holds_the_speech_and_unmute_goes_on_from_there(sim: VapiSim) -> None:
    sim.assistant = greeter(answers=0, greeting_s=0.6)
    url, session = await new_call(sim)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait(lambda: len(c.frames) >= 5, 2)
        await ws.send('{"type": "control", "control": "mute-assistant"}')
        await session.wait_for(lambda: bool(session.received_control("control")), 2)
        held = len(c.frames)
        muted_at = time.monotonic()
        await asyncio.sleep(0.5)  # the greeting would have ended by now
        assert len(c.frames) == held and session.speaking, "nothing sent, nothing skipped"
        assert not c.of("speech-update", role="assistant", status="stopped")
        await ws.send('{"type": "control", "control": "unmute-assistant"}')
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=0)
        unmuted = [t for t, e in c.events if isinstance(e, bytes)][held:]
        assert unmuted and unmuted[0] - muted_at >= 0.5
        await c.aclose()
    assert len(c.frames) == 30, "the whole greeting, once"
    assert c.label(c.turn_frames(0)) == "greeting"
    assert not session.spoken[0].interrupted


@pytest.mark.parametrize(("fmt", "rate", "frame_bytes"), FORMATS)
async def test_model_generated_first_message_speaks_resume_from_the_history(
    sim: VapiSim, fmt: str, rate: int, frame_bytes: int
) -> None:
    sim.assistant = greeter(answers=1, greeting_s=0.6, answer_s=0.4)
    history = [{"role": "assistant", "content": "greeting w1 w2"},
               {"role": "user", "content": "utterance 1"},
               {"role": "assistant", "content": "answer:0 w1 w2 w3…"},
               {"role": "user", "content": "utterance 2"}]
    body = resumed_body(history)
    body["transport"]["audioFormat"] = {"format": fmt, "container": "raw", "sampleRate": rate}
    url, session = await new_call(sim, body)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, fmt, rate)
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=0)
        resume = c.turn_frames(0)
        assert len(resume) == 50 and {len(f) for _, f in resume} == {frame_bytes}  # 1.0 s
        assert c.label(resume) == "resume"
        text = "resume answer:0 w1 w2 w3…"  # the last assistant message handed over
        assert c.of("model-output")[0]["output"] == text
        final = await c.wait_msg("transcript", role="assistant")  # sent just after "stopped"
        assert final["transcript"] == text
        assert session.spoken[0].label == "resume" and session.spoken[0].text == text
        # then the conversation goes on as usual
        c.start_stream()
        c.speak(0.5)
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=2)
        assert c.label(c.turn_frames(2)) == "answer:0"
        assert [s.label for s in session.spoken] == ["resume", "answer:0"]
        await c.aclose()


async def test_first_message_modes_without_history(sim: VapiSim) -> None:
    sim.assistant = AssistantScript(greeting_s=0.6, answers=1, answer_s=0.3, resume_s=0.4)
    # model-generated without an assistant message: plain "resume", resume_s long
    url, session = await new_call(sim, resumed_body([{"role": "user", "content": "hello?"}]))
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=0)
        assert len(c.turn_frames(0)) == 20 and c.label(c.turn_frames(0)) == "resume"
        assert [m["output"] for m in c.of("model-output")] == ["resume"]
        await c.aclose()
    # waits-for-user: nothing until the caller (here a keypad entry) asks; the first utterance
    # is the answer, so no greeting was queued on connect (it would have started at once)
    for mode in ("assistant-waits-for-user", MODEL_GENERATED):
        body = call_body()
        body["assistantOverrides"]["firstMessageMode"] = mode
        if mode == MODEL_GENERATED:  # a script with resume_s None skips the model's first message
            sim.assistants["asst-test-0001"] = AssistantScript(
                greeting_s=0.6, answers=1, answer_s=0.3, resume_s=None)
        url, session = await new_call(sim, body)
        async with connect(url, ping_interval=None) as ws:
            c = Client(ws, "pcm_s16le", 16000)
            await c.wait_msg("status-update", status="in-progress")
            await ws.send(orjson.dumps({"type": "add-message", "message": {
                "role": "user", "content": "User's Keypad Entry: 1"}}).decode())
            await c.wait_msg("speech-update", role="assistant", status="stopped", turn=0)
            assert c.label(c.turn_frames(0)) == "answer:0", mode
            assert [s.label for s in session.spoken] == ["answer:0"], mode
            await c.aclose()


async def test_model_output_precedes_each_utterance_and_matches_its_transcript(
    sim: VapiSim,
) -> None:
    sim.assistant = greeter(answers=1, greeting_s=0.6, answer_s=0.4)
    url, session = await new_call(sim)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=0)
        c.start_stream()
        c.speak(0.5)
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=2)
        await c.stop_stream()
        await c.wait(lambda: len(c.of("transcript", role="assistant")) == 2)
        outputs = c.of("model-output")
        assert [m["output"] for m in outputs] == ["greeting w1 w2", "answer:0 w1"]
        assert [m["turnId"] for m in outputs] == [s.turn_id for s in session.spoken]
        assert [m["transcript"] for m in c.of("transcript", role="assistant")] == \
            [m["output"] for m in outputs]
        assert [s.text for s in session.spoken] == ["greeting w1 w2", "answer:0 w1"]
        # each output comes before its utterance's speech-update started and its first frame
        events = [e if isinstance(e, dict) else {"type": "audio"} for _, e in c.events]
        kinds = [e["type"] for e in events]
        for output in outputs:
            i = next(k for k, e in enumerate(events) if e is output)
            assert kinds[i + 1] == "speech-update" and events[i + 1]["status"] == "started"
            assert kinds[i + 2] == "audio"
        await c.aclose()
    # clientMessages: only when subscribed
    for subscribed in (["speech-update", "model-output"], ["speech-update", "transcript"]):
        body = call_body()
        body["assistantOverrides"]["clientMessages"] = subscribed
        url, session = await new_call(sim, body)
        async with connect(url, ping_interval=None) as ws:
            c = Client(ws, "pcm_s16le", 16000)
            await session.wait_for(lambda s=session: bool(s.spoken) and s.spoken[0].ended, 3)
            await session.send_json({"type": "hang"})  # arrives after all that came before it
            await c.wait_msg("hang")
            assert {m["type"] for m in c.msgs} == {*subscribed, "hang"}
            await c.aclose()


async def test_control_url_client_messages_and_hooks(sim: VapiSim) -> None:
    body = call_body()
    body["assistantOverrides"]["clientMessages"] = ["status-update", "tool-calls"]
    r = await post_call(sim, body)
    call = r.json()
    session = sim.sessions[call["id"]]
    async with connect(call["transport"]["websocketCallUrl"], ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait(lambda: len(c.frames) >= 5, 2)
        await session.send_json({"type": "hang"})
        tool_id = session.send_tool_call("transfer_call", {"to": "+1555"})
        await c.wait_msg("tool-calls")
        tc = c.of("tool-calls")[0]["toolCallList"][0]
        assert tc["id"] == tool_id and orjson.loads(tc["function"]["arguments"]) == {"to": "+1555"}
        async with httpx.AsyncClient() as client:
            resp = await client.post(call["monitor"]["controlUrl"], json={"type": "end-call"})
        assert resp.status_code == 200
        await c.wait(lambda: c.done, 3)
        # only the subscribed types (plus raw send_json) went out
        assert {m["type"] for m in c.msgs} == {"status-update", "tool-calls", "hang"}
    assert session.ended_reason == "customer-ended-call"


async def test_observer_sees_what_crosses_the_socket(sim: VapiSim) -> None:
    tap = Tap()
    assert VapiSim(observer=tap).observer is tap
    sim.observer = tap
    sim.assistant = greeter(answers=1, greeting_s=0.3, answer_s=0.2)
    body = call_body()
    body["assistantOverrides"]["clientMessages"] = ["status-update", "speech-update"]
    url, session = await new_call(sim, body)
    t0 = time.monotonic()
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=0)
        c.start_stream()
        c.speak(0.4)
        await c.wait_msg("speech-update", role="assistant", status="stopped", turn=2)
        await c.stop_stream()
        await ws.send('{"type": "add-message", "message": {"role": "system", "content": "x"}}')
        async with httpx.AsyncClient() as client:
            resp = await client.post(session.call_json()["monitor"]["controlUrl"],
                                     json={"type": "control", "control": "mute-assistant"})
        assert resp.status_code == 200
        await session.send_json({"type": "hang"})
        await session.wait_for(lambda: len(session.received_frames) == len(c.sent_sizes), 2)
        await c.wait_msg("hang")
        # assistant frames: every frame the client got, with its utterance and position in it
        greeting, answer = session.spoken
        assert [(t, i) for _, _, _, t, i in tap.frames] == \
            [(greeting.turn_id, i) for i in range(15)] + [(answer.turn_id, i) for i in range(10)]
        assert [f for _, f, _, _, _ in tap.frames] == c.frames
        assert all(s is session for s, *_ in tap.frames)
        times = [at for _, _, at, _, _ in tap.frames]
        assert times == sorted(times) and t0 <= times[0] and times[-1] <= time.monotonic()
        assert times[14] - times[0] >= 0.2  # paced: stamped when sent, not when queued
        # caller audio: every binary message, as received, when received
        assert b"".join(d for _, d, _ in tap.caller) == bytes(c.sent)
        assert [at for _, _, at in tap.caller] == session.received_times
        # control sent: exactly what passed the clientMessages filter (no transcripts), plus
        # send_json's object; control received: socket and control URL alike
        assert [m for _, m, _ in tap.sent] == session.sent_control == c.msgs
        assert not [m for m in c.msgs if m["type"] == "transcript"]
        assert c.msgs[-1] == {"type": "hang"}
        assert [m for _, m, _ in tap.received] == session.control
        assert [m["type"] for m in session.control] == ["add-message", "control"]
        sent_at = [at for _, _, at in tap.sent]
        assert sent_at == sorted(sent_at)
        await c.aclose()


async def test_session_end_hook_and_max_duration(sim: VapiSim) -> None:
    url, session = await new_call(sim)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait(lambda: bool(c.frames), 2)
        await session.end("assistant-forwarded-call")
        assert c.of("status-update", status="ended")[0]["endedReason"] == "assistant-forwarded-call"
        await asyncio.wait_for(ws.wait_closed(), 2)  # the close frame follows the last message
        assert ws.close_code == 1000
    body = call_body()
    body["assistantOverrides"]["maxDurationSeconds"] = 0.3  # Vapi's minimum is 10; not checked
    url, session = await new_call(sim, body)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        ended = await c.wait_msg("status-update", status="ended", limit=2)
        assert ended["endedReason"] == "exceeded-max-duration"


async def test_greeting_delay_record_audio_off_and_prune(sim: VapiSim) -> None:
    sim.assistant = greeter(greeting_s=0.2, greeting_delay_s=0.3)
    sim.record_audio = False
    url, session = await new_call(sim)
    async with connect(url, ping_interval=None) as ws:
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait(lambda: bool(c.frames), 2)
        # the greeting starts no earlier than its delay after the socket opened (exact: the
        # receive times would add the client's own scheduling delays)
        assert session.opened_at is not None
        assert session.spoken[0].started - session.opened_at >= 0.3
        await ws.send(b"\x00" * 640)
        await session.wait_for(lambda: len(session.received_frames) == 1, 2)
        assert session.received_audio == bytearray()  # sizes/times kept, bytes not
    await session.wait_closed(2)
    assert sim.prune() == 1 and session.id not in sim.sessions


async def test_never_connected_and_stop_closes_sockets() -> None:
    sim = VapiSim(connect_timeout=0.1)
    await sim.start()
    try:
        url, session = await new_call(sim)
        await session.wait_for(lambda: session.ended_reason is not None, 2)
        assert str(session.ended_reason).endswith("transport-never-connected")
        with pytest.raises(InvalidStatus):
            async with connect(url):
                pass
        url, session = await new_call(sim)
        ws = await connect(url, ping_interval=None)
        c = Client(ws, "pcm_s16le", 16000)
        await c.wait(lambda: bool(c.frames), 2)
        assert sim.open_sessions() == 1
    finally:
        await sim.stop()
    await c.wait(lambda: c.done, 2)
    assert ws.close_code == 1001 and sim.open_sessions() == 0


# ------------------------------------------------------------------------------------------------
# voices


@pytest.mark.parametrize(("fmt", "rate", "frame_bytes"), FORMATS)
def test_voices_identify_every_utterance(fmt: str, rate: int, frame_bytes: int) -> None:
    cases = [("greeting", 0), ("goodbye", 0), ("say", 0), ("resume", 0),
             *[("answer", k) for k in range(5)], *[("caller", k) for k in range(6)]]
    for kind, index in cases:
        data = voices.render(kind, index, 0.3, rate, fmt)
        assert len(data) == round(0.3 * rate) * (2 if fmt == "pcm_s16le" else 1)
        pcm = voices.decode(data, fmt)
        assert voices.identify(pcm, rate) == voices.label(kind, index)
        # any single 20 ms frame from the middle identifies it too
        frames = voices.frames(kind, index, 0.3, rate, fmt)
        assert {len(f) for f in frames} == {frame_bytes}
        assert voices.identify(voices.decode(frames[7], fmt), rate) == voices.label(kind, index)
    assert voices.identify(voices.decode(voices.silence(0.2, rate, fmt), fmt), rate) is None
    assert voices.frequency("answer", 2) == 700 and voices.frequency("greeting") == 400
    assert voices.frequency("resume") == 300 and voices.label("resume") == "resume"
    # every label more than two tolerances from every other: a tone is never mistaken
    freqs = sorted(voices.LABELS)
    assert len(voices.LABELS) == 4 + 5 + 6  # no two labels share a frequency (a dict key)
    assert min(b - a for a, b in itertools.pairwise(freqs)) > 2 * voices.IDENTIFY_TOLERANCE_HZ


def test_voices_tone_shape() -> None:
    pcm = np.frombuffer(voices.utterance("greeting", 0, 1.0, 16000), dtype="<i2").astype(float)
    assert len(pcm) == 16000
    assert abs(pcm[0]) < 50 and abs(pcm[-1]) < 50  # raised-cosine fades, no click
    assert 0.28 * 32767 < np.max(np.abs(pcm)) <= 0.3 * 32767 + 1
    body = pcm[80:-80]  # after the 5 ms fades: steady, no gaps
    env = np.abs(body).reshape(-1, 80).max(axis=1) if len(body) % 80 == 0 else None
    assert env is not None and env.min() > 0.25 * 32767
    assert voices.utterance("greeting", 0, 1.0, 16000) == voices.utterance("greeting", 0, 1.0, 16000)


def test_the_downlink_tick_is_bounded() -> None:
    assert VapiSim(tick_s=0.005).tick_s == 0.005 and VapiSim(tick_s=0.002).tick_s == 0.002
    for bad in (0.0, 0.001, 0.02):  # uvloop's 1 ms timer steps, and never coarser than half a frame
        with pytest.raises(ValueError, match="tick_s"):
            VapiSim(tick_s=bad)
