"""One call on the assistant side: the I/O around its `CallCore` (worker/call.py).

The core decides everything; this adapter only feeds it what happens and carries out what it
says. Inputs: caller entries from `call:{sid}:in` (pushed by the worker's shared reader), the Vapi
setup, the Vapi socket's messages, and ticks (the worker's shared playout ticker while audio is
being paced, one loop timer at `next_deadline()` otherwise). Outputs go to the worker's batch
writer (every `out` entry stamped with our epoch, every hash write fenced by it), to the Vapi
socket (written at once, or through one ordered, bounded queue while the socket pushes back), or
start the few awaitable jobs (closing Vapi, the REST hang-up). Every task it starts is
supervised: one that fails ends the call, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, Protocol

import orjson
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from shared import metrics
from shared import streams as S
from shared import vapi_proto as V
from shared.audio import Uplink
from shared.logs import call_sid_var, error_fields
from shared.redisio import TRANSIENT, Entries, Writer
from shared.settings import Settings
from shared.streams import Keys
from shared.tasks import stop_tasks
from worker import ownership
from worker.call import (
    ASSISTANT,
    CallConfig,
    CallCore,
    CloseVapi,
    Command,
    Done,
    Ending,
    Event,
    Metric,
    RestHangup,
    SendVapiAudio,
    SendVapiText,
    UpdateCall,
    WriteOut,
    parse_control,
)
from worker.twilio_rest import TwilioRest
from worker.vapi_client import VapiClient, VapiError, send_now
from worker.vapi_socket import VapiConnection

__all__ = ["MAX_VAPI_QUEUE", "SESSION_TASKS_STOP_S", "CallSession", "Ending", "SessionHost"]

log = logging.getLogger("callbridge.worker.session")
# Per-frame counters, tallied (shared/metrics.py, `Tally`).
_FRAMES_OUT = metrics.Tally(metrics.FRAMES.labels("out", "redis"))
_FRAMES_FROM_VAPI = metrics.Tally(metrics.FRAMES.labels("out", "vapi"))
_BYTES_FROM_VAPI = metrics.Tally(metrics.AUDIO_BYTES.labels("out", "vapi"))
_FRAMES_TO_VAPI = metrics.Tally(metrics.FRAMES.labels("in", "vapi"))
_HOP_SAMPLE = metrics.Sample()
_TO_VAPI_LATENCY = metrics.HOP_LATENCY.labels("twilio_to_vapi")
P = ParamSpec("P")

# Messages queued for the Vapi socket (each normally one 20 ms frame): beyond this Vapi is not
# taking the caller's audio (a stalled socket), so audio is dropped; text is always kept.
MAX_VAPI_QUEUE = 1000
# How long an ending session waits for its tasks to end once cancelled; past it they are left
# behind, with a warning.
SESSION_TASKS_STOP_S = 2.0


class SessionHost(Protocol):
    """What a call session needs from the process that runs it (worker/main.py's Worker).

    Named here so a session depends on this small surface, not on the worker module."""

    settings: Settings
    keys: Keys
    worker_id: str
    redis: aioredis.Redis
    writer: Writer
    vapi: VapiClient
    twilio: TwilioRest

    def session_done(self, session: CallSession, completed: bool) -> None: ...
    def wake_ticker(self, session: CallSession) -> None: ...
    def inbound_rung(self, sid: str, rung: bool) -> None: ...


_METRICS: dict[str, Callable[[str, float], None]] = {
    "dropped": lambda label, v: metrics.DROPPED.labels(label).inc(v),
    "barge_in": lambda _label, v: metrics.BARGE_INS.inc(v),
    "fast_barge_in": lambda label, v: metrics.FAST_BARGE_INS.labels(label).inc(v),
    "turn_latency": lambda _label, v: metrics.TURN_LATENCY.observe(v),
    "vapi_error": lambda label, v: metrics.VAPI_ERRORS.labels(label).inc(v),
    "vapi_setup": lambda _label, v: metrics.VAPI_SETUP.observe(v),
    "silence_fill": lambda _label, v: metrics.FRAMES.labels("in", "silence_fill").inc(v),
}


class CallSession:
    def __init__(self, worker: SessionHost, sid: str, job: dict[bytes, bytes], *, epoch: int,
                 record: dict[str, str]) -> None:
        s = worker.settings
        self.w = worker
        self.sid = sid
        self.epoch = epoch
        self.epoch_b = str(epoch).encode()
        self.keys = worker.keys
        self.out_key = worker.keys.outbound(sid)
        now = time.monotonic()
        self.core = CallCore(CallConfig.from_settings(s, worker.worker_id), sid, epoch=epoch,
                             record=record, call_from=job.get(b"from", b"").decode(errors="replace"),
                             call_to=job.get(b"to", b"").decode(errors="replace"), now=now,
                             wall_offset=time.time() - now)
        self._started = False
        self._running = False  # timers only while run() is there to see the call through
        self._done = asyncio.Event()
        self._completed = False
        self._aborted: Ending | None = None
        self._events_expire = True
        self._ws: ClientConnection | None = None
        self._vapi_closed = False
        self._tx: deque[tuple[bytes | str, float | None]] = deque()
        self._tx_wake = asyncio.Event()
        self._sending = False  # the sender task is inside `ws.send`
        self._tasks: set[asyncio.Task[Any]] = set()  # cancelled when the session ends
        self._closers: set[asyncio.Task[Any]] = set()  # awaited when the session ends
        self._setup_call: object | None = None
        self._connected = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._ringing: str | None = None  # the gateway whose wake stream we ring after `out`
        # Only a gateway that rings back knows rings (another version's would be woken twice).
        gateway = record.get("gateway")
        self._ring_gateway(gateway if gateway and gateway == record.get("gateway_rings") else None)

    # What the worker reads --------------------------------------------------------------------

    @property
    def takeover(self) -> bool:
        return self.core.takeover

    @property
    def ending(self) -> Ending | None:
        return self.core.ending or self._aborted

    @property
    def playing(self) -> bool:
        return self.core.playing and not self._aborted

    def record_fields(self) -> dict[str, str]:
        return self.core.record_fields()

    # Inputs -----------------------------------------------------------------------------------

    def on_inbound(self, entries: Entries) -> None:
        """Caller-side entries, from the worker's shared reader (must not block)."""
        self._start()
        core = self.core
        for entry_id, f in entries:
            eid = entry_id.decode(errors="replace")
            kind = f.get(b"k")
            now = time.monotonic()
            if kind == S.IN_MEDIA:
                self._feed(core.caller_frame, eid, f.get(b"a", b""), S.entry_time_s(f), now)
            elif kind == S.IN_MARK:
                self._feed(core.mark, eid, f.get(b"v", b"").decode(errors="replace"), now)
            elif kind == S.IN_START:
                stream_sid, gateway, rings = _announced(f.get(b"v", b"{}"))
                self.w.inbound_rung(self.sid, False)  # a new socket: its gateway may not ring
                self._ring_gateway(gateway if rings is True else None)
                self._feed(core.stream_start, eid, f.get(b"s", b"").decode(errors="replace"), now,
                           stream_sid)
            elif kind == S.IN_RING:  # the gateway rings us from here on (gateway/doorbell.py)
                self.w.inbound_rung(self.sid, f.get(b"v") == self.w.worker_id.encode())
            elif kind == S.IN_DTMF:
                self._feed(core.dtmf, eid, f.get(b"v", b"").decode(errors="replace"), now)
            elif kind == S.IN_STOP:
                self._feed(core.stream_stop, eid, f.get(b"s", b"").decode(errors="replace"), now)
            elif kind == S.IN_DETACH:
                self._feed(core.stream_detach, eid, f.get(b"s", b"").decode(errors="replace"),
                           f.get(b"v", b"").decode(errors="replace"), now)
            elif kind == S.IN_CONTROL:  # the call API; parse_control never raises
                self._feed(core.control, eid, parse_control(f.get(b"v", b"")), now)

    def uplink_job(self, entries: Entries) -> tuple[Uplink, list[bytes]] | None:
        """The caller frames among `entries` that will be converted for Vapi, and by what."""
        uplink = None if self._aborted else self.core.uplink_ahead()
        if uplink is None:
            return None
        frames = [f[b"a"] for _id, f in entries if f.get(b"k") == S.IN_MEDIA and b"a" in f]
        return (uplink, frames) if frames else None

    def on_tick(self, now: float) -> None:
        """The worker's shared playout ticker (every 10 ms while `playing`): the core ticks only
        when something of it has come due. Frames that arrive in real time leave as they come
        (`vapi_audio`), so most ticks find nothing to do, and finding that costs one look."""
        deadline = self.core.next_deadline()
        if deadline is not None and deadline <= now:
            self._feed(self.core.tick, now)

    def ownership_lost(self) -> None:
        self.core.ownership_lost()

    def on_reasserted(self) -> None:
        """Redis came back without our call: its streams start anew, expiries with them."""
        self._events_expire = True
        self.w.writer.command("expire", self.out_key, self.w.settings.call_ttl_s)
        self._feed(self.core.reasserted, time.monotonic())

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._feed(self.core.start, time.monotonic())

    def _feed(self, fn: Callable[P, list[Command]], *args: P.args, **kwargs: P.kwargs) -> None:
        """One input into the core, its commands carried out, the timer re-armed. A failure in
        the core itself must not take the worker's shared reader or ticker down with it: the
        call is ended without the core."""
        if self._aborted:
            return
        token = call_sid_var.set(self.sid)
        try:
            self._execute(fn(*args, **kwargs))
            self._rearm()
        except Exception as exc:
            log.error("call state machine failed", extra=error_fields(exc))
            self.abort("core")
        finally:
            call_sid_var.reset(token)

    # Outputs ----------------------------------------------------------------------------------

    def _execute(self, commands: list[Command]) -> None:
        for c in commands:
            if isinstance(c, WriteOut):
                self.out(c.kind, c.audio, c.value)
            elif isinstance(c, SendVapiAudio):
                self._send_vapi(c.audio, c.sent_at)
            elif isinstance(c, Event):
                self.event(c.kind, **c.data)
            elif isinstance(c, UpdateCall):
                self.update_call(c.fields)
            elif isinstance(c, Metric):
                _METRICS[c.name](c.label, c.value)
            elif isinstance(c, SendVapiText):
                self._send_vapi(c.text, None)
            elif isinstance(c, CloseVapi):
                self._close_vapi(c.send_end)
            elif isinstance(c, RestHangup):
                self._spawn(self._rest_hangup(), "rest-hangup", closer=True)
            elif isinstance(c, Done):
                self._completed = c.completed
                self._done.set()

    def event(self, kind: str, **data: object) -> None:
        """Append to call:{sid}:events (transcripts, barge-ins, timings, the end)."""
        value = orjson.dumps(data) if data else None
        key = self.keys.events(self.sid)
        self.w.writer.xadd(key, S.entry(kind.encode(), value=value, epoch=self.epoch_b), 2000)
        if kind in S.FEED_KINDS:  # the console's live list: a few entries per turn, never audio
            self.w.writer.xadd(self.keys.feed, S.feed_entry(kind, self.sid, value), S.FEED_MAXLEN)
        if self._events_expire:  # once it exists: a call whose every process died must expire
            self._events_expire = False
            self.w.writer.command("expire", key, self.w.settings.call_ttl_s)

    def out(self, kind: bytes, audio: bytes | None = None, value: str | bytes | None = None) -> None:
        """Write to call:{sid}:out, stamped with our epoch (the gateway drops a replaced owner's)."""
        if kind == S.OUT_MEDIA:
            _FRAMES_OUT.inc()
        self.w.writer.xadd(self.out_key, S.entry(kind, audio, value=value, epoch=self.epoch_b),
                           self.w.settings.stream_maxlen)

    def _ring_gateway(self, raw: object) -> None:
        """Ring the gateway `raw` names (the record's, a `start`'s) after each batch written to
        `out`, and say so there (gateway/doorbell.py); stop ringing when it names none."""
        if not self.keys.rings:
            return
        gateway = S.ring_target(raw)
        self.w.writer.ring(self.out_key, self.keys.wake(S.gateway_reader(gateway)) if gateway else None)
        if gateway or self._ringing:  # an empty one: we stopped ringing, read `out` blocked again
            self.out(S.OUT_RING, value=gateway or "")
        self._ringing = gateway

    def update_call(self, mapping: dict[str, str]) -> None:
        """HSET on the call record, only while we still own the call (our epoch is its epoch)."""
        self.w.writer.command("eval", *ownership.fenced_hset_args(self.keys, self.sid, self.epoch,
                                                                  mapping))

    def _send_vapi(self, payload: bytes | str, sent_at: float | None) -> None:
        if self._ws is None:
            return
        if not self._tx and not self._sending and send_now(self._ws, payload):
            self._sent(sent_at)  # the common case: no task switch per frame
            return
        if isinstance(payload, bytes) and len(self._tx) >= MAX_VAPI_QUEUE:
            metrics.DROPPED.labels("inbound_overflow").inc()
            return
        self._tx.append((payload, sent_at))
        self._tx_wake.set()

    def _sent(self, sent_at: float | None) -> None:
        if sent_at is not None:  # audio (text carries no stamp)
            _FRAMES_TO_VAPI.inc()
            if _HOP_SAMPLE.due():
                _TO_VAPI_LATENCY.observe(max(0.0, time.time() - sent_at))

    def _rearm(self) -> None:
        """Tick when the core next needs it: the shared ticker while audio is being paced (it
        looks at every deadline of the call each 10 ms, so no timer of our own is needed), else
        one loop timer, moved only when the core's next deadline comes earlier."""
        if self.core.playing:
            self.w.wake_ticker(self)
            return
        self._arm(self.core.next_deadline())

    def _arm(self, deadline: float | None) -> None:
        """The call's loop timer at `deadline`, moved only when that comes earlier."""
        if deadline is None or not self._running or self._done.is_set():
            return
        if self._timer is not None:
            if self._timer_at <= deadline + 1e-4:
                return
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = deadline
        self._timer = loop.call_at(max(deadline, loop.time() + 0.001), self._on_timer)

    def _on_timer(self) -> None:
        """The timer fires at the deadline it was set for; inputs since may have moved that
        later (each frame of an utterance moves its end mark), and then it only moves on:
        while audio streams in real time, about half the firings (docs/performance.md)."""
        self._timer = None
        if self._aborted:
            return
        now = time.monotonic()
        try:
            deadline = self.core.next_deadline()
        except Exception:  # a broken core: let the tick fail and end the call (`_feed`)
            deadline = now
        if deadline is None or deadline > now:
            self._arm(deadline)
            return
        self._feed(self.core.tick, now)

    # Lifecycle --------------------------------------------------------------------------------

    async def run(self) -> None:
        call_sid_var.set(self.sid)
        self._running = True
        try:
            self._start()
            if not self._done.is_set():
                # `out` got its expiry with our claim, `events` gets it with its first entry.
                self.w.writer.command("expire", self.keys.inbound(self.sid), self.w.settings.call_ttl_s)
                self._spawn(self._setup(), "vapi-setup")
                self._rearm()
            await self._done.wait()
        except asyncio.CancelledError:  # released (drain) or lost: another worker goes on
            self._feed(self.core.release, time.monotonic())
            raise
        except Exception as exc:
            log.error("call session failed", extra=error_fields(exc))
            self.abort("session")
        finally:
            self._running = False
            if self._timer is not None:
                self._timer.cancel()
            # Vapi setup, reader and sender: any may be inside a Redis call (or a wait_for), where a
            # cancel can be lost (shared/tasks.py), so the wait is bounded and the cancel repeated.
            await stop_tasks(list(self._tasks), SESSION_TASKS_STOP_S, what="call session tasks")
            await asyncio.gather(*self._closers, return_exceptions=True)  # not cancelled
            if self._setup_call is not None and not self._connected and not self._completed:
                metrics.VAPI_ERRORS.labels("abandoned").inc()
            self.w.session_done(self, completed=self._completed)

    def abort(self, where: str) -> None:
        """End the call without the core (it failed, or a task around it did and the core could
        not be trusted with it): record the end with the unavailable message, ask the gateway to
        hang up, close Vapi. Nothing more is fed to the core."""
        if self._aborted:
            return
        s = self.w.settings
        self._aborted = Ending("error", ASSISTANT, say=s.unavailable_message, detail=where)
        self.update_call({"status": S.STATUS_ENDED, "end_reason": "error", "ended_at": str(time.time()),
                          "say": s.unavailable_message})
        self.out(S.OUT_HANGUP)
        self.event("call-ended", reason="error", side=ASSISTANT, detail=f"aborted: {where}")
        self._close_vapi(send_end=True)
        self._completed = True
        self._done.set()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str, *, closer: bool = False) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{name}-{self.sid}")
        group = self._closers if closer else self._tasks
        group.add(task)
        task.add_done_callback(group.discard)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        """A session task must not fail silently: end the call, saying why."""
        if task.cancelled() or task.exception() is None:
            return
        token = call_sid_var.set(self.sid)
        try:
            log.error("call session task failed", extra={"task": task.get_name().rsplit("-", 1)[0],
                                                         **error_fields(task.exception())})
        finally:
            call_sid_var.reset(token)
        self._feed(self.core.fail, time.monotonic(), type(task.exception()).__name__)

    # Vapi -------------------------------------------------------------------------------------

    async def _setup(self) -> None:
        s, t0 = self.w.settings, time.monotonic()
        resume = None
        opts = V.call_options(self.core.record)
        if opts.ignored:
            log.warning("call record fields ignored for the vapi call",
                        extra={"fields": list(opts.ignored[:10])})
        try:
            if self.core.takeover:
                transcripts = await self._transcripts()
                model = None
                # The call's own assistant's model (the model override must be that one's):
                # known since the worker started for the configured and routed assistants; else
                # asked briefly, and the older way of resuming used rather than keep the caller
                # waiting.
                if s.takeover_resume == V.RESUME_SPEAK:
                    with contextlib.suppress(TimeoutError):
                        model = await asyncio.wait_for(
                            self.w.vapi.assistant_model(opts.assistant_id), 0.5)
                resume = self.core.takeover_context(transcripts, model)
            body = V.create_call_body(
                assistant_id=opts.assistant_id or s.vapi_assistant_id or "",
                audio_format=s.vapi_audio_format, sample_rate=s.audio_sample_rate,
                call_sid=self.sid, from_=self.core.call_from, to=self.core.call_to, resume=resume,
                variables=opts.variables, metadata=opts.metadata)
            call = await self.w.vapi.create_call(body)
            self._setup_call = call
            self._feed(self.core.vapi_call_created, call.id, time.monotonic())
            ws = await self.w.vapi.connect(call)
        except VapiError as err:
            self._feed(self.core.vapi_setup_failed, time.monotonic(), err.reason, err.kind, err.detail)
            return
        metrics.VAPI_SOCKETS.inc()
        if self._vapi_closed or self._done.is_set():  # the call ended while we connected
            self._spawn(self._close_ws(ws, True), "vapi-close", closer=True)
            return
        self._ws = ws
        self._connected = True
        if isinstance(ws, VapiConnection):
            ws.take_messages(self._from_vapi)
        self._spawn(self._vapi_sender(ws), "vapi-send")
        self._spawn(self._downlink(ws), "vapi-read")
        now = time.monotonic()
        self._feed(self.core.vapi_connected, now, now - t0)

    async def _transcripts(self) -> list[tuple[str, str]]:
        """The final transcripts so far, from `:events` (what a successor hands the new session)."""
        try:
            entries: Any = await self.w.redis.xrange(self.keys.events(self.sid))
        except TRANSIENT:
            entries = []
        out: list[tuple[str, str]] = []
        for _id, f in entries:
            if f.get(b"k") == b"transcript":
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                    data = orjson.loads(f.get(b"v", b"{}"))
                    if isinstance(data, dict):
                        out.append((str(data.get("role", "")), str(data.get("text", ""))))
        return out

    async def _downlink(self, ws: ClientConnection) -> None:
        """Vapi's messages in arrival order into the core. Most reach `_from_vapi` straight from
        the socket as they arrive (worker/vapi_socket.py); this takes what the socket queued
        instead, and sees it close."""
        try:
            async for msg in ws:
                self._on_vapi(msg)
        except ConnectionClosed:
            pass
        except Exception as exc:
            self._downlink_failed(exc)
            return
        self._feed(self.core.vapi_closed, time.monotonic(), False)

    def _from_vapi(self, msg: bytes | str) -> None:
        """A message straight from the socket, inside its `data_received`: must not raise."""
        try:
            self._on_vapi(msg)
        except Exception as exc:
            self._downlink_failed(exc)

    def _downlink_failed(self, exc: Exception) -> None:
        """A bug or a message we could not handle, on either way in: end the call, say why (with
        the call's sid: `_from_vapi` runs in the socket's context, not the session's)."""
        token = call_sid_var.set(self.sid)
        try:
            log.error("vapi downlink failed", extra=error_fields(exc))
        finally:
            call_sid_var.reset(token)
        self._feed(self.core.vapi_closed, time.monotonic(), True)

    def _on_vapi(self, msg: bytes | str) -> None:
        """One Vapi message, audio or a control message, into the core."""
        if isinstance(msg, bytes):
            _FRAMES_FROM_VAPI.inc()
            _BYTES_FROM_VAPI.inc(len(msg))
            self._feed(self.core.vapi_audio, msg, time.monotonic())
            return
        try:
            parsed = V.parse(msg)
        except ValueError:
            metrics.DROPPED.labels("vapi_bad_json").inc()
            return
        self._feed(self.core.vapi_message, parsed, time.monotonic())

    async def _vapi_sender(self, ws: ClientConnection) -> None:
        """What `_send_vapi` could not write at once (back-pressure, a fragmented send), in the
        core's order: while this has a message, every later one queues behind it."""
        while True:
            if not self._tx:
                self._tx_wake.clear()
                await self._tx_wake.wait()
                continue
            payload, sent_at = self._tx.popleft()
            self._sending = True
            try:
                await ws.send(payload)
            except ConnectionClosed:
                return  # the reader sees the close and ends the call
            finally:
                self._sending = False
            self._sent(sent_at)

    def _close_vapi(self, send_end: bool) -> None:
        self._vapi_closed = True
        ws, self._ws = self._ws, None
        self._tx.clear()
        for task in list(self._tasks):  # setup, reader, sender: nothing more to or from Vapi
            task.cancel()
        if ws is not None:
            self._spawn(self._close_ws(ws, send_end), "vapi-close", closer=True)

    async def _close_ws(self, ws: ClientConnection, send_end: bool) -> None:
        if send_end:  # a Vapi that takes nothing must not keep its socket open
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.send(V.END_CALL), 0.5)
        with contextlib.suppress(Exception):
            await ws.close()
        metrics.VAPI_SOCKETS.dec()

    async def _rest_hangup(self) -> None:
        try:
            # Fenced like every other write: a worker that woke from a stall must not hang up a
            # call another worker now serves (its own Vapi session may have timed out meanwhile).
            epoch = await self.w.redis.hget(self.keys.call(self.sid), "epoch")
            if epoch is not None and epoch != self.epoch_b:
                log.warning("not hanging up: the call has another owner now")
                outcome = "not-owner"
            else:
                outcome = await self.w.twilio.complete(self.sid)
        except Exception as exc:  # the call must still finish: the core waits for an outcome
            log.error("twilio hang-up failed", extra=error_fields(exc))
            outcome = "failed"
        self._feed(self.core.rest_hangup_done, outcome, time.monotonic())


def _announced(raw: bytes) -> tuple[str, object, object]:
    """The streamSid inside a `start` entry's JSON (the entry's own `s` field comes first), the
    gateway it names and whether that gateway rings (untrusted: S.ring_target checks the id)."""
    try:
        info = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "", None, None
    if not isinstance(info, dict):
        return "", None, None
    sid = info.get("stream_sid")
    return sid if isinstance(sid, str) else "", info.get("gateway"), info.get("rings")
