"""A call session's bounds and failure paths, driven directly (a real Redis behind its writer)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from shared import streams as S
from shared import vapi_proto as V
from shared.logs import call_sid_var
from shared.redisio import BatchWriter
from shared.settings import Settings
from shared.streams import Keys
from worker import session as sess
from worker.session import CallSession
from worker.vapi_client import VapiCall


class Host:
    """The few things a session asks of its worker, with a real Redis writer."""

    def __init__(self, redis: aioredis.Redis, prefix: str) -> None:
        self.settings = Settings(REDIS_URL="redis://unused", REDIS_PREFIX=prefix,  # type: ignore[call-arg]
                                 VAPI_API_KEY="k", VAPI_ASSISTANT_ID="a")
        self.keys = Keys(prefix)
        self.worker_id = "w-test"
        self.redis = redis
        self.writer = BatchWriter(redis)
        self.vapi: Any = None
        self.twilio: Any = None
        self.done: list[bool] = []
        self.rung: list[bool] = []

    def session_done(self, session: CallSession, completed: bool) -> None:
        self.done.append(completed)

    def wake_ticker(self, session: CallSession) -> None:
        pass

    def inbound_rung(self, sid: str, rung: bool) -> None:
        self.rung.append(rung)

    def emit_due(self, session: CallSession, now: float) -> None:
        pass


@pytest.fixture
async def host(redis: aioredis.Redis, prefix: str) -> AsyncIterator[Host]:
    h = Host(redis, prefix)
    h.writer.start()
    yield h
    await h.writer.close()


def _session(host: Host) -> CallSession:
    return CallSession(host, "CA1", {b"sid": b"CA1"}, epoch=1, record={"status": "ringing"})


class StalledSocket:
    """A Vapi socket that takes nothing: every send waits forever, nothing ever arrives."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed = asyncio.Event()

    async def send(self, _data: object) -> None:
        self.sent += 1
        await asyncio.Event().wait()

    def __aiter__(self) -> StalledSocket:
        return self

    async def __anext__(self) -> bytes:
        await self.closed.wait()
        raise StopAsyncIteration

    async def close(self) -> None:
        self.closed.set()


class StalledVapi:
    def __init__(self) -> None:
        self.socket = StalledSocket()

    async def create_call(self, _body: object) -> VapiCall:
        return VapiCall(id="v1", websocket_url="wss://vapi.invalid/x")

    async def connect(self, _call: VapiCall) -> StalledSocket:
        return self.socket


async def test_caller_audio_queued_for_a_stalled_vapi_is_bounded_and_control_entries_survive(
        host: Host) -> None:
    host.vapi = StalledVapi()
    session = _session(host)
    run = asyncio.create_task(session.run())
    for _ in range(100):
        if session.core.vapi_up:
            break
        await asyncio.sleep(0.01)
    media = [(b"1-0", {b"k": S.IN_MEDIA, b"a": b"\xff" * 160})]
    for _ in range(sess.MAX_VAPI_QUEUE + 500):
        session.on_inbound(media)
    assert len(session._tx) == sess.MAX_VAPI_QUEUE, "audio for a stalled Vapi is bounded"
    session.on_inbound([(b"2-0", {b"k": S.IN_MEDIA, b"a": b"\xff" * 160}),
                        (b"3-0", {b"k": S.IN_STOP, b"s": b"MZ1"})])
    await asyncio.wait_for(run, 5)
    assert session.ending is not None and session.ending.reason == "caller-hangup", \
        "the hang-up is never dropped"
    assert host.done == [True] and host.vapi.socket.closed.is_set()


class RecordingSocket:
    """A Vapi socket that keeps what it is sent; nothing arrives until it is closed."""

    def __init__(self) -> None:
        self.sent: list[object] = []
        self.closed = asyncio.Event()

    async def send(self, data: object) -> None:
        self.sent.append(data)

    def __aiter__(self) -> RecordingSocket:
        return self

    async def __anext__(self) -> bytes:
        await self.closed.wait()
        raise StopAsyncIteration

    async def close(self) -> None:
        self.closed.set()


class RecordingVapi:
    def __init__(self) -> None:
        self.socket = RecordingSocket()
        self.bodies: list[dict[str, Any]] = []
        self.model_asked = 0
        self.models_asked: list[str | None] = []

    async def create_call(self, body: dict[str, Any]) -> VapiCall:
        self.bodies.append(body)
        return VapiCall(id="v1", websocket_url="wss://vapi.invalid/x")

    async def connect(self, _call: VapiCall) -> RecordingSocket:
        return self.socket

    async def assistant_model(self, assistant_id: str | None = None) -> V.AssistantModel:
        self.model_asked += 1
        self.models_asked.append(assistant_id)
        if assistant_id == "asst-own":
            return V.AssistantModel("anthropic", "claude-own")
        return V.AssistantModel("openai", "gpt-4o-mini")


async def _until(pred: Any, what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


OWN = {"status": "ringing", "assistant_id": "asst-own",
       "variables": '{"name": "Ada", "callerNumber": "+1999"}', "metadata": '{"crm": 1}'}


async def test_control_entries_reach_the_call_and_bad_ones_never_escape_the_reader(host: Host) -> None:
    host.vapi = RecordingVapi()
    session = CallSession(host, "CA1", {b"sid": b"CA1", b"from": b"+1555", b"to": b"+1666"},
                          epoch=1, record=OWN)
    run = asyncio.create_task(session.run())
    await _until(lambda: session.core.vapi_up, "vapi")
    (body,) = host.vapi.bodies
    assert body["assistantId"] == "asst-own", "the call's own assistant, not VAPI_ASSISTANT_ID"
    assert body["assistantOverrides"]["variableValues"] == {
        "name": "Ada", "callerNumber": "+1555", "calledNumber": "+1666", "twilioCallSid": "CA1"}
    assert body["assistantOverrides"]["metadata"]["crm"] == 1
    session.on_inbound([  # none of these may raise into the worker's shared reader
        (b"1-0", {b"k": S.IN_CONTROL, b"v": b"{not json"}),
        (b"2-0", {b"k": S.IN_CONTROL}),
        (b"3-0", {b"k": S.IN_CONTROL, b"v": orjson.dumps({"op": "say", "text": "x" * 100_000})}),
        (b"4-0", {b"k": S.IN_CONTROL, b"v": b'{"op": "say", "text": "Hold on"}'}),
    ])
    await _until(lambda: V.say("Hold on") in host.vapi.socket.sent, "the say")
    assert session.core.in_pos == "4-0" and session.ending is None
    session.on_inbound([(b"5-0", {b"k": S.IN_CONTROL, b"v": b'{"op": "hangup"}'})])
    await _until(lambda: host.vapi.socket.closed.is_set(), "vapi closed")
    assert V.END_CALL in host.vapi.socket.sent
    assert session.ending is not None and session.ending.reason == "api-hangup"
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)


async def test_a_takeover_keeps_the_calls_own_assistant_and_overrides_only_with_its_model(
        host: Host) -> None:
    host.vapi = RecordingVapi()
    session = CallSession(host, "CA1", {b"sid": b"CA1"}, epoch=2, record=OWN)
    run = asyncio.create_task(session.run())
    await _until(lambda: session.core.vapi_up, "vapi")
    (body,) = host.vapi.bodies
    assert body["assistantId"] == "asst-own" and body["assistantOverrides"]["variableValues"]["name"] == "Ada"
    # The model override is asst-own's own (VAPI_ASSISTANT_ID's would replace it), so the new
    # session can speak first from the history.
    assert host.vapi.models_asked == ["asst-own"]
    model = body["assistantOverrides"].get("model")
    assert model is not None and (model["provider"], model["model"]) == ("anthropic", "claude-own")
    assert body["assistantOverrides"]["firstMessageMode"] == V.FIRST_MESSAGE_MODEL_GENERATED
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)


class BrokenSocket:
    """A Vapi socket whose reader fails with something other than a close."""

    def __aiter__(self) -> BrokenSocket:
        return self

    async def __anext__(self) -> bytes:
        raise RuntimeError("boom")


async def test_a_failing_vapi_reader_ends_the_call_with_the_unavailable_message(host: Host) -> None:
    session = _session(host)
    await session._downlink(BrokenSocket())  # type: ignore[arg-type]
    assert session.ending is not None and session.ending.reason == "error"
    assert session.ending.say == host.settings.unavailable_message


async def test_writes_for_a_call_are_fenced_by_the_epoch(host: Host, redis: aioredis.Redis) -> None:
    keys = host.keys
    await redis.hset(keys.call("CA1"), mapping={"status": "live", "epoch": "2", "owner": "other"})
    session = _session(host)  # epoch 1: replaced
    session.update_call({"status": "ended", "end_reason": "error"})
    session.out(S.OUT_HANGUP)
    await host.writer.flush()
    assert await redis.hget(keys.call("CA1"), "status") == b"live", "a replaced owner cannot end it"
    (_id, fields), = await redis.xrange(keys.outbound("CA1"))
    assert fields[b"e"] == b"1", "its out entries carry its epoch for the gateway to drop"


async def test_a_worker_whose_redis_writer_dies_turns_unready_and_exits_failed(
        redis_url: str, prefix: str) -> None:
    import asyncio

    from worker.main import Worker

    settings = Settings(REDIS_URL=redis_url, REDIS_PREFIX=prefix,  # type: ignore[call-arg]
                        VAPI_API_KEY="k", VAPI_ASSISTANT_ID="a", VAPI_BASE_URL="http://127.0.0.1:9",
                        WORKER_HTTP_PORT=0)
    worker = Worker(settings)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop, serve_http=False))
    deadline = asyncio.get_running_loop().time() + 10
    while not worker.writer.tasks():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    worker.writer.tasks()[0].cancel()  # the loop every write depends on is gone
    await asyncio.wait_for(running, 20)
    assert worker.failed and worker.draining, "unready, and the command exits non-zero"


class CallSidLog(logging.Handler):
    """Keeps (message, the call_sid the log line carries) for every record."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage(), getattr(record, "call_sid", None) or call_sid_var.get()))


@pytest.fixture
def call_log() -> Iterator[CallSidLog]:
    handler = CallSidLog()
    root = logging.getLogger()
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)


class BrokenVapi:
    async def create_call(self, _body: object) -> VapiCall:
        raise RuntimeError("a bug in the setup")


async def _ended_record(host: Host, redis: aioredis.Redis) -> Any:
    await host.writer.flush()
    return await redis.hgetall(host.keys.call("CA1"))


async def test_a_failing_session_task_is_logged_with_the_call_and_ends_it_cleanly(
        host: Host, redis: aioredis.Redis, call_log: CallSidLog) -> None:
    await redis.hset(host.keys.call("CA1"), mapping={"status": "ringing", "epoch": "1"})
    host.vapi = BrokenVapi()
    host.settings.hangup_grace_s = 0.1
    host.twilio = FakeTwilio()
    session = _session(host)
    await asyncio.wait_for(session.run(), 5)
    assert ("call session task failed", "CA1") in call_log.lines
    record = await _ended_record(host, redis)
    assert record[b"status"] == b"ended" and record[b"end_reason"] == b"error"
    assert record[b"say"] == host.settings.unavailable_message.encode()
    assert host.done == [True] and host.twilio.hung_up == ["CA1"], "no stream: REST hang-up"


async def test_a_failing_state_machine_ends_the_call_without_it(
        host: Host, redis: aioredis.Redis, call_log: CallSidLog) -> None:
    await redis.hset(host.keys.call("CA1"), mapping={"status": "ringing", "epoch": "1"})
    host.vapi = StalledVapi()
    session = _session(host)

    def broken(*_args: object) -> list[object]:
        raise RuntimeError("a bug in the core")

    session.core.dtmf = broken  # type: ignore[method-assign]
    run = asyncio.create_task(session.run())
    await asyncio.sleep(0.05)
    session.on_inbound([(b"1-0", {b"k": S.IN_DTMF, b"v": b"5"})])
    await asyncio.wait_for(run, 5)
    assert ("call state machine failed", "CA1") in call_log.lines
    record = await _ended_record(host, redis)
    assert record[b"end_reason"] == b"error" and record[b"say"] == host.settings.unavailable_message.encode()
    (_id, fields), = await redis.xrange(host.keys.outbound("CA1"))
    assert fields[b"k"] == S.OUT_HANGUP and host.done == [True]
    assert host.vapi.socket.closed.is_set()


async def test_the_worker_ends_a_call_whose_task_dies(redis_url: str, prefix: str, redis: aioredis.Redis,
                                                      call_log: CallSidLog) -> None:
    from worker.main import Worker

    settings = Settings(REDIS_URL=redis_url, REDIS_PREFIX=prefix,  # type: ignore[call-arg]
                        VAPI_API_KEY="k", VAPI_ASSISTANT_ID="a")
    w = Worker(settings)
    w.writer.start()
    try:
        keys = w.keys
        await redis.hset(keys.call("CA1"), mapping={"status": "live", "epoch": "1"})
        session = CallSession(w, "CA1", {b"sid": b"CA1"}, epoch=1, record={"status": "live"})
        w.sessions["CA1"] = session

        async def dies() -> None:
            raise RuntimeError("a bug around the session")

        w._spawn(dies(), "session-CA1", "CA1")
        await asyncio.sleep(0.05)
        await w.writer.flush()
        assert ("call task failed", "CA1") in call_log.lines
        assert "CA1" not in w.sessions
        record = await redis.hgetall(keys.call("CA1"))
        assert record[b"end_reason"] == b"error" and record[b"say"] == settings.unavailable_message.encode()
    finally:
        await w.writer.close()
        await w.vapi.aclose()
        for r in (w.redis, w._reader_redis, w._claim_redis):
            await r.aclose()


class FakeTwilio:
    def __init__(self) -> None:
        self.hung_up: list[str] = []

    async def complete(self, sid: str) -> str:
        self.hung_up.append(sid)
        return "completed"


class RecordingTwilio:
    def __init__(self) -> None:
        self.completed: list[str] = []

    async def complete(self, sid: str) -> str:
        self.completed.append(sid)
        return "completed"


async def test_a_replaced_owner_never_hangs_the_call_up_over_rest(host: Host,
                                                                  redis: aioredis.Redis) -> None:
    host.twilio = RecordingTwilio()
    await redis.hset(host.keys.call("CA1"), mapping={"status": "live", "epoch": "2"})
    session = _session(host)  # epoch 1: a worker that woke after its call was taken over
    await session._rest_hangup()
    assert host.twilio.completed == []
    await redis.hset(host.keys.call("CA1"), "epoch", "1")  # still ours: the fallback works
    await session._rest_hangup()
    assert host.twilio.completed == ["CA1"]


class ReplyInTheCancelsTurnVapi:
    """Its create_call waits for the reply under `asyncio.wait_for`, as redis-py sends every
    command; connect never answers."""

    def __init__(self) -> None:
        self.reply: asyncio.Future[VapiCall] = asyncio.get_running_loop().create_future()
        self.asked = asyncio.Event()
        self.connecting = asyncio.Event()

    async def create_call(self, _body: object) -> VapiCall:
        self.asked.set()
        return await asyncio.wait_for(self.reply, 30)

    async def connect(self, _call: VapiCall) -> None:
        self.connecting.set()
        await asyncio.Event().wait()


async def test_a_released_session_ends_even_when_its_setup_loses_the_cancel(host: Host) -> None:
    """On Python 3.11 a cancel that lands in the turn the awaited reply arrives is lost
    (CPython gh-86296): the reply is handed over in the very turn the release cancels the setup,
    which then goes on to connect, and the session's end must still not wait on it forever."""
    vapi = host.vapi = ReplyInTheCancelsTurnVapi()
    session = _session(host)
    run = asyncio.create_task(session.run())
    await _until(vapi.asked.is_set, "the vapi call asked for")
    release = session.core.release

    def release_as_the_reply_lands(now: float) -> Any:
        vapi.reply.set_result(VapiCall(id="v1", websocket_url="wss://vapi.invalid/x"))
        return release(now)

    session.core.release = release_as_the_reply_lands  # type: ignore[method-assign]
    run.cancel()  # released: a drain, or another worker took the call over
    done, _ = await asyncio.wait({run}, timeout=sess.SESSION_TASKS_STOP_S + 2)
    assert done, "the session's end waited on its setup"
    assert run.cancelled() and len(host.done) == 1
    if sys.version_info < (3, 12):
        assert vapi.connecting.is_set(), "the setup lost its first cancel and went on"


async def test_the_session_rings_its_gateway_and_reads_in_as_its_gateway_says(
        host: Host, redis: aioredis.Redis) -> None:
    """The record's gateway is rung from the claim on, if the record says it rings back; a
    `start` sends `in` back to the blocked read and names the gateway to ring (if it says it
    rings: another version's is not rung); an `IN_RING` naming us makes `in` rung, one naming
    another worker does not. Each ring change is said on `out`, under our epoch; an empty one
    when we stop ringing."""
    host.vapi = StalledVapi()
    session = CallSession(host, "CA1", {b"sid": b"CA1"}, epoch=3,
                          record={"status": "live", "gateway": "g1", "gateway_rings": "g1"})
    run = asyncio.create_task(session.run())
    start = orjson.dumps({"stream_sid": "MZ2", "gateway": "g2", "rings": True})
    session.on_inbound([(b"1-0", {b"k": S.IN_START, b"s": b"MZ2", b"v": start}),
                        (b"2-0", {b"k": S.IN_RING, b"v": b"w-test"}),
                        (b"3-0", {b"k": S.IN_RING, b"v": b"w-other"}),
                        (b"4-0", {b"k": S.IN_START, b"s": b"MZ3",
                                  b"v": b'{"gateway": "bad id", "rings": true}'})])
    assert host.rung == [False, True, False, False]
    out_key = host.keys.outbound("CA1")
    assert out_key not in host.writer._rings, "a gateway named badly is not rung"
    session.on_inbound([(b"5-0", {b"k": S.IN_START, b"s": b"MZ4", b"v": b'{"gateway": "g5"}'})])
    assert out_key not in host.writer._rings, "a gateway that does not say it rings is not rung"
    session.on_inbound([(b"6-0", {b"k": S.IN_START, b"s": b"MZ5",
                                  b"v": b'{"gateway": "g6", "rings": true}'})])
    assert host.writer._rings[out_key] == host.keys.wake(S.gateway_reader("g6"))
    await host.writer.flush()
    out = await redis.xrange(out_key)
    rings = [(f[b"v"], f[b"e"]) for _id, f in out if f[b"k"] == S.OUT_RING]
    assert rings == [(b"g1", b"3"), (b"g2", b"3"), (b"", b"3"), (b"g6", b"3")]
    session.on_inbound([(b"7-0", {b"k": S.IN_STOP, b"s": b"MZ5"})])
    await asyncio.wait_for(run, 5)


async def test_a_record_whose_gateway_does_not_ring_back_is_not_rung(host: Host) -> None:
    """An older gateway wrote `gateway` but not `gateway_rings`: ringing it would wake it twice
    a batch, for nothing."""
    session = CallSession(host, "CA2", {b"sid": b"CA2"}, epoch=1,
                          record={"status": "live", "gateway": "g-old", "gateway_rings": "g-gone"})
    assert host.keys.outbound("CA2") not in host.writer._rings
    assert session._ringing is None


async def test_send_now_writes_at_once_in_order_and_gives_way_to_back_pressure_and_close() -> None:
    """`send_now` on a real websockets connection over loopback: frames written without awaiting
    arrive in order with those sent by `ws.send`; once the peer stops reading and the transport's
    buffer passes its limit it declines (the caller queues), so what sits in our buffer stays
    bounded; on a closed socket it declines too."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import ServerConnection, serve

    from worker.vapi_client import send_now

    got: list[bytes] = []
    reading = asyncio.Event()
    reading.set()

    async def handler(ws: ServerConnection) -> None:
        async for msg in ws:
            got.append(msg if isinstance(msg, bytes) else msg.encode())
            await reading.wait()

    async with serve(handler, "127.0.0.1", 0, compression=None, max_queue=1) as server:
        port = server.sockets[0].getsockname()[1]
        ws = await connect(f"ws://127.0.0.1:{port}", compression=None, write_limit=8192)
        assert send_now(ws, b"a")
        await ws.send(b"b")
        assert send_now(ws, "c")
        for _ in range(200):
            if len(got) == 3:
                break
            await asyncio.sleep(0.01)
        assert got == [b"a", b"b", b"c"]

        reading.clear()  # the peer stalls: the kernel's buffers fill, then the transport's
        frame, taken = bytes(640), 0
        for _ in range(100_000):
            if not send_now(ws, frame):
                break
            taken += 1
            await asyncio.sleep(0)  # let the loop try to write, as between frames
        else:
            pytest.fail("send_now never declined on a peer that reads nothing")
        assert ws.transport.get_write_buffer_size() <= 8192 + len(frame) + 16
        reading.set()
        await ws.close()
        assert not send_now(ws, frame), "a closed socket declines"
