"""The Twilio Media Stream socket: authenticate, then pump frames between Twilio and Redis.

Inbound (gateway/receiver.py): every Twilio event becomes one entry on `call:{sid}:in` (raw
μ-law, not base64) via the process-wide batch writer. Outbound (gateway/sender.py): the hub hands
us `call:{sid}:out` entries, which become `media` / `mark` / `clear` messages or a deliberate
close on `hangup`. Nothing here outlives the socket; a closed socket without `stop` is reported
to the worker as `detach`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from gateway.doorbell import Doorbell
from gateway.fence import OwnerFence, epoch_of
from gateway.receiver import TwilioReceiver, decode
from gateway.records import ensure_ttl, reassert
from gateway.sender import NORMAL, TwilioSender
from gateway.state import (
    CHECK_OWNER,
    CLOSE_IDLE,
    WORKER_SEEN,
    GatewayState,
    SocketInfo,
    closing_cause,
    watchdog_verdict,
)
from shared import metrics
from shared import streams as S
from shared.logs import call_sid_var, error_fields, stream_sid_var
from shared.redisio import TRANSIENT, Generation
from shared.security import verify_stream_token, ws_signature_ok
from shared.tasks import stop_tasks
from shared.twilio_proto import (
    Connected,
    Outbound,
    ProtocolError,
    Start,
)

log = logging.getLogger("callbridge.gateway.media")
router = APIRouter()

# Close codes: 1008 policy violation (auth, a malformed start), 1013 try again later (draining /
# Redis down), 1011 internal error (the socket is ended so that Twilio re-attaches).
# 1000 normal (NORMAL, gateway/sender.py) for a hang-up and every other deliberate close.
POLICY, TRY_LATER, INTERNAL_ERROR = 1008, 1013, 1011
# How long a closing socket waits for its two loops to end once cancelled (each cancel is
# repeated, since one can be lost: shared/tasks.py); past it they are left behind, with a warning.
SOCKET_TASKS_STOP_S = 2.0


class Rejected(Exception):
    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


async def _await_start(ws: WebSocket, st: GatewayState) -> Start:
    """Read until `start`; `connected` comes first. Anything else before it is dropped; a
    malformed `start` ends the socket (Twilio sends one start, so no good one will follow)."""
    limit = st.settings.max_message_bytes
    while True:
        msg = await ws.receive()
        if msg["type"] == "websocket.disconnect":
            raise Rejected("disconnected")
        try:
            event = decode(msg, limit)
        except ProtocolError as exc:
            metrics.dropped(exc.cause)
            if exc.event == "start":
                raise Rejected("bad_start") from None
            continue
        if isinstance(event, Start):
            return event
        if not isinstance(event, Connected):
            metrics.dropped("before_start")


async def _authorize(st: GatewayState, start: Start) -> str:
    """Check the token (single use) and the call; returns the call's status."""
    token = start.custom_parameters.get("token", "")
    if not verify_stream_token(st.settings.token_secret, start.call_sid, token):
        raise Rejected("bad_token")
    try:  # single use: a replayed `start` cannot attach a second socket to a live call
        fresh = await st.redis.set(f"{st.keys.prefix}tok:{token[-24:]}", b"1", nx=True,
                                   ex=st.settings.stream_token_ttl_s + 60)
    except TRANSIENT:
        raise Rejected("redis_error") from None
    if not fresh:
        raise Rejected("token_reused")
    try:
        status: Any = await st.redis.hget(st.keys.call(start.call_sid), "status")
    except TRANSIENT:
        raise Rejected("redis_error") from None
    if status is None:
        raise Rejected("unknown_call")
    if status == S.STATUS_ENDED.encode():
        raise Rejected("call_ended")
    return S.STATUS_LIVE if status == S.STATUS_LIVE.encode() else S.STATUS_RINGING


@router.websocket("/twilio/media")
async def media_socket(ws: WebSocket) -> None:
    st: GatewayState = ws.app.state.gw
    if st.draining:
        metrics.MEDIA_REJECTED.labels("draining").inc()
        await ws.close(code=TRY_LATER)
        return
    signature = ws.headers.get("x-twilio-signature")
    if not ws_signature_ok(st.settings.auth_token, st.settings.stream_url, signature):
        metrics.MEDIA_REJECTED.labels("bad_signature").inc()
        log.warning("rejected media socket: invalid signature")
        await ws.close(code=POLICY)  # before accept: the handshake fails with 403
        return
    await ws.accept()
    try:
        start = await asyncio.wait_for(_await_start(ws, st), st.settings.start_timeout_s)
        status = await _authorize(st, start)
    except TimeoutError:
        await _reject(ws, "no_start")
        return
    except Rejected as exc:
        if exc.cause == "call_ended":
            # The worker already ended this call and waits for the stream to close: it has.
            in_key = st.keys.inbound(start.call_sid)
            st.writer.xadd(in_key, S.entry(S.IN_DETACH, value=b"hangup"), st.settings.stream_maxlen)
            ensure_ttl(st.writer, st.settings.call_ttl_s, in_key)
        await _reject(ws, exc.cause)
        return
    except Exception as exc:  # a bug must still end the socket with a close frame, not 1006
        log.error("media socket failed before start", extra={"error": type(exc).__name__})
        await _reject(ws, "error")
        return
    call_sid_var.set(start.call_sid)
    stream_sid_var.set(start.stream_sid)
    await _serve(ws, st, start, live=status == S.STATUS_LIVE)


async def _reject(ws: WebSocket, cause: str) -> None:
    metrics.MEDIA_REJECTED.labels(cause).inc()
    log.warning("rejected media socket", extra={"cause": cause})
    if ws.client_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(Exception):
            code = {"redis_error": TRY_LATER, "error": INTERNAL_ERROR}.get(cause, POLICY)
            await ws.close(code=code)


async def _serve(ws: WebSocket, st: GatewayState, start: Start, live: bool) -> None:
    sid = start.call_sid
    in_key, out_key = st.keys.inbound(sid), st.keys.outbound(sid)
    maxlen = st.settings.stream_maxlen
    try:
        # Follow `out` from its current end, taken *before* announcing ourselves, so nothing the
        # worker writes in reply to `start` can slip between the two.
        pipe = st.redis.pipeline(transaction=False)
        pipe.xrevrange(out_key, count=1)
        pipe.hget(st.keys.call(sid), "epoch")  # the current owner's: nothing older may play
        pipe.hmget(st.keys.call(sid), ["owner", "owner_rings"])  # whom to ring (gateway/doorbell.py)
        last, epoch, (owner, owner_rings) = await pipe.execute()
        from_id = last[0][0].decode() if last else "0-0"
        floor = epoch_of({b"e": epoch}) if isinstance(epoch, bytes) else None
        fence = OwnerFence(floor or 0)
        queue = await st.hub.attach(out_key, from_id)
    except TRANSIENT:
        await _reject(ws, "redis_error")
        return
    announce = orjson.dumps({"stream_sid": start.stream_sid, "params": start.custom_parameters,
                             "gateway": st.process_id, "rings": True})
    st.writer.xadd(in_key, S.entry(S.IN_START, value=announce, stream=start.stream_sid), maxlen)
    bell = Doorbell(st, in_key, out_key)
    bell.owner(owner if owner == owner_rings else None)  # only an owner that rings back knows
    # rings (another version's would be woken twice a batch); `start` sent its reading of `in`
    # back to blocked, and the ring entry after it moves it to rung again
    st.writer.command("expire", in_key, st.settings.call_ttl_s)  # even if no worker ever claims it
    st.writer.command("hset", st.keys.call(sid), mapping={"stream_sid": start.stream_sid,
                                                          "gateway": st.process_id,
                                                          "gateway_rings": st.process_id})
    ensure_ttl(st.writer, st.settings.call_ttl_s, st.keys.call(sid))
    metrics.MEDIA_SOCKETS.inc()
    info = SocketInfo(last_rx=time.monotonic(), call_sid=sid, stream_sid=start.stream_sid,
                      attached=time.monotonic(), live=live)
    st.sockets[ws] = info
    log.info("media stream started")
    sender = asyncio.create_task(
        TwilioSender(ws, queue, Outbound(start.stream_sid), fence, info, bell).run(),
        name="twilio-send")
    receiver = asyncio.create_task(
        TwilioReceiver(ws, st, in_key, maxlen, info, start.stream_sid, st.keys.call(sid)).run(),
        name="twilio-receive")
    ended = "closed"
    try:
        if st.draining:  # drain began while we were attaching: hand this one back too
            await ws.close(code=1001)
        ended = await _supervise(ws, sid, receiver, sender)
    finally:
        st.hub.detach(out_key, queue)
        st.sockets.pop(ws, None)
        metrics.MEDIA_SOCKETS.dec()
        hung_up = sender.done() and not sender.cancelled() and sender.exception() is None and sender.result()
        await stop_tasks([receiver, sender], SOCKET_TASKS_STOP_S, what="media socket loops")
        cause, detach = closing_cause(ended, hung_up=bool(hung_up), draining=st.draining)
        if detach is not None:
            # The worker must know the stream is gone even when Twilio did not say `stop`.
            st.writer.xadd(in_key, S.entry(S.IN_DETACH, value=detach, stream=start.stream_sid), maxlen)
            ensure_ttl(st.writer, st.settings.call_ttl_s, in_key)
        if not st.hub.follows(out_key):  # no newer socket of the call here (decided after the
            bell.close()                  # awaits above); after `detach`, which still rings
        metrics.MEDIA_CLOSED.labels(cause).inc()
        if cause in ("stop", "hangup", "no_worker"):  # the call is over: its place is free
            st.writer.command("zrem", st.keys.active, sid)
        if ws.client_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(code=NORMAL)
        log.info("media stream closed", extra={"cause": cause})


def _peer_gone(ws: WebSocket, exc: BaseException) -> bool:
    """A send or receive that failed because the socket is already closing is no bug."""
    return isinstance(exc, WebSocketDisconnect) or WebSocketState.DISCONNECTED in (
        ws.application_state, ws.client_state)


async def _supervise(ws: WebSocket, sid: str, receiver: asyncio.Task[str],
                     sender: asyncio.Task[bool]) -> str:
    """Run both directions of one socket as a unit and return how it ended (the receive loop's
    cause, or "error"). A call must never go on half: if either loop fails, the socket is closed
    with 1011, so Twilio asks `<Connect action>` and re-attaches to a fresh socket. The sender
    ending (a hang-up closed the socket) leaves the receive loop to see the disconnect."""
    pending: set[asyncio.Task[Any]] = {receiver, sender}
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = None if task.cancelled() else task.exception()
            if exc is not None and not _peer_gone(ws, exc):
                log.error("media socket failed; closing it so Twilio re-attaches",
                          extra={"call_sid": sid, **error_fields(exc),
                                 "direction": "uplink" if task is receiver else "downlink"})
                with contextlib.suppress(Exception):
                    await ws.close(code=INTERNAL_ERROR)
                return "error"
            if task is receiver:
                return receiver.result() if exc is None and not task.cancelled() else "closed"
    return "closed"


def redis_came_back(st: GatewayState) -> None:
    """Redis answers again after failing, or restarted (perhaps empty): the no-worker window
    starts over, since a worker needs time to re-assert its calls as well, and the watchdog
    re-asserts what this gateway holds."""
    st.redis_back_at = time.monotonic()
    st.reassert_rounds = 2


async def _redis_restarted(st: GatewayState) -> bool:
    """Whether Redis may have lost writes since the last look: one Redis restarted, or a cluster
    node failed over (shared/redisio.py, `Generation`), even if no command of ours saw it fail
    (redis-py reconnects and retries by itself)."""
    return st.redis_generation.changed(await Generation.read(st.redis))


async def idle_watchdog(st: GatewayState) -> None:
    """Once a second for the whole process (not a timer per message): notice Redis coming back
    and re-assert the sockets' call records; close a socket silent for MEDIA_IDLE_TIMEOUT_S
    (Twilio sends a frame every 20 ms while a call lives); end a call no worker serves."""
    timeout = st.settings.media_idle_timeout_s
    no_worker = st.settings.no_worker_timeout_s
    while True:
        await asyncio.sleep(min(1.0, timeout / 4))
        if await _redis_restarted(st):
            log.warning("redis restarted; re-asserting the calls this gateway serves")
            redis_came_back(st)
        if st.reassert_rounds > 0:
            st.reassert_rounds -= 1
            if st.sockets:
                log.info("re-asserted call records after redis came back",
                         extra={"sockets": reassert(st)})
        now = time.monotonic()
        for ws, info in list(st.sockets.items()):
            verdict = watchdog_verdict(info, now, idle_timeout=timeout, no_worker_timeout=no_worker,
                                       redis_back_at=st.redis_back_at)
            since = max(info.attached, st.redis_back_at)
            if verdict == CLOSE_IDLE:
                info.idle = True
                info.closed_by = "idle_timeout"
                log.warning("twilio socket went silent; closing it", extra={"idle_s": timeout})
                with contextlib.suppress(Exception):
                    await ws.close(code=1011)
            elif verdict == WORKER_SEEN:
                info.owner_ok_since = since  # a worker writes to this call: it lives
            elif verdict == CHECK_OWNER:
                await _check_owner(st, ws, info, since)


async def _check_owner(st: GatewayState, ws: WebSocket, info: SocketInfo, since: float) -> None:
    """No worker claimed the call, and none wrote to it, for NO_WORKER_TIMEOUT_S (none running,
    or all full): end it with the unavailable message rather than leave the caller in silence."""
    key = st.keys.call(info.call_sid)
    try:
        owner = await st.redis.hget(key, "owner")
    except TRANSIENT:
        return
    info.owner_ok_since = since  # decided either way for this window
    if owner:
        return
    log.error("no worker took the call; ending it", extra={"call_sid": info.call_sid})
    info.closed_by = "no_worker"
    st.writer.command("hset", key, mapping={"status": S.STATUS_ENDED, "end_reason": "no-worker",
                                            "ended_at": str(time.time()),
                                            "say": st.settings.unavailable_message})
    ensure_ttl(st.writer, st.settings.call_ttl_s, key)
    await st.writer.flush()
    with contextlib.suppress(Exception):
        await ws.close(code=NORMAL)
