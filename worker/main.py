"""The worker process: claims calls, runs their sessions, paces all playout on one ticker.

Per process, not per call: one multi-key XREAD for every call's `in` stream, one batch writer,
one 10 ms playout ticker, one XREADGROUP for new jobs. A call costs the worker its Vapi socket
and a little state, not connections or timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, Response
from redis.exceptions import RedisError

from shared import metrics
from shared import streams as S
from shared.health import readiness
from shared.redisio import BatchWriter, Entries, MultiReader, connect, media_latency_observer
from shared.serving import quiet_server
from shared.settings import Settings
from shared.streams import WORKER_GROUP, Keys
from worker.claims import Claimer
from worker.session import CallSession
from worker.twilio_rest import TwilioRest
from worker.vapi_client import VapiClient

log = logging.getLogger("callbridge.worker")

TICK_S = 0.010


def _redis_error(op: str) -> None:
    if op == "reconnect":
        metrics.REDIS_RECONNECTS.inc()
    else:
        metrics.REDIS_ERRORS.labels(op).inc()


class Worker:
    def __init__(self, settings: Settings) -> None:
        settings.require("REDIS_URL", "VAPI_API_KEY", "VAPI_ASSISTANT_ID")
        assert settings.redis_url
        self.settings = settings
        self.keys = Keys(settings.redis_prefix)
        self.worker_id = settings.effective_worker_id()
        self.redis: aioredis.Redis = connect(settings.redis_url)
        self._reader_redis = connect(settings.redis_url, max_connections=2)
        self._claim_redis = connect(settings.redis_url, max_connections=2)
        self.writer = BatchWriter(self.redis, on_error=_redis_error, on_flushed=media_latency_observer(
            metrics.HOP_LATENCY.labels("worker_to_redis").observe))
        self.inbox = MultiReader(self._reader_redis, self.keys.wake(f"wk-{self.worker_id}"),
                                 self._on_inbound, on_error=_redis_error)
        self.vapi = VapiClient(settings)
        self.twilio = TwilioRest(settings)
        self.sessions: dict[str, CallSession] = {}
        self._by_in_key: dict[bytes, CallSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._playing: set[CallSession] = set()
        self._tick_wake = asyncio.Event()
        self.claimer = Claimer(
            self._claim_redis, self.keys.calls, self.worker_id,
            lease_s=settings.claim_lease_s,
            free_slots=lambda: settings.worker_max_calls - len(self.sessions),
            owned=lambda: [s.job_id for s in self.sessions.values()],
            on_job=self._on_job,
            on_lost=self._on_lost,
        )
        self.draining = False
        self.failed = False
        self._frames_out = metrics.FRAMES.labels("out", "redis")

    # Jobs and sessions ------------------------------------------------------------------------

    def _on_job(self, job_id: bytes, fields: dict[bytes, bytes], takeover: bool) -> None:
        sid = fields.get(b"sid", b"").decode()
        if not sid or sid in self.sessions:
            if not sid:
                self.writer.command("xack", self.keys.calls, WORKER_GROUP, job_id)
            return
        session = CallSession(self, sid, job_id, fields, takeover)
        self.sessions[sid] = session
        in_key = self.keys.inbound(sid)
        self._by_in_key[in_key.encode()] = session
        metrics.CALLS_ACTIVE.set(len(self.sessions))
        metrics.CALLS_STARTED.inc()
        task = asyncio.create_task(self._start_session(session, in_key, takeover),
                                   name=f"session-{sid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_session(self, session: CallSession, in_key: str, takeover: bool) -> None:
        # A new owner reads the caller's audio from the first entry: what arrived before Vapi
        # was ready is delivered, in order. A takeover starts from now: the old audio is stale.
        from_id = "0-0"
        if takeover:
            with contextlib.suppress(RedisError, OSError):
                last: Any = await self.redis.xrevrange(in_key, count=1)
                from_id = last[0][0].decode() if last else "0-0"
        await self.inbox.add(in_key, from_id)
        await session.run()

    def _on_lost(self, job_id: bytes) -> None:
        """Another worker owns this call now: stop ours without touching the call's state."""
        for session in list(self.sessions.values()):
            if session.job_id == job_id:
                session.lost = True
                for task in self._tasks:
                    if task.get_name() == f"session-{session.sid}":
                        task.cancel()

    def session_done(self, session: CallSession, completed: bool) -> None:
        sid = session.sid
        self.sessions.pop(sid, None)
        self._by_in_key.pop(self.keys.inbound(sid).encode(), None)
        self.inbox.remove(self.keys.inbound(sid))
        self._playing.discard(session)
        metrics.CALLS_ACTIVE.set(len(self.sessions))
        if not completed:
            return  # released: the job stays pending and another worker takes it over
        reason = session.ending.reason if session.ending else "skipped"
        if session.ending:
            metrics.CALLS_ENDED.labels(metrics.end_reason_label(reason)).inc()
            session.event("call-ended", reason=reason, side=session.ending.side,
                          detail=session.ending.detail[:300])
            self.writer.command("hset", self.keys.call(sid), mapping={
                "status": S.STATUS_ENDED, "end_reason": reason})
        for key in self.keys.all_call_keys(sid):
            self.writer.command("expire", key, self.settings.ended_ttl_s)
        self.writer.command("xack", self.keys.calls, WORKER_GROUP, session.job_id)
        self.writer.command("xdel", self.keys.calls, session.job_id)
        log.info("call finished", extra={"call_sid": sid, "reason": reason})

    def _on_inbound(self, key: bytes, entries: Entries) -> None:
        session = self._by_in_key.get(key)
        if session is not None:
            session.on_inbound(entries)

    # Playout ticker ---------------------------------------------------------------------------

    def wake_ticker(self, session: CallSession) -> None:
        self._playing.add(session)
        self._tick_wake.set()

    def emit_due(self, session: CallSession, now: float) -> None:
        """Hand a call's due frames to the batch writer. Called on arrival (paced audio leaves
        at once, no tick wait) and by the ticker (the rest of a burst, on the playout clock)."""
        if not session.stream_live:
            return  # hold audio until Twilio's socket is there
        xadd = self.writer.xadd
        maxlen = self.settings.stream_maxlen
        out_key = session.out_key
        for frame in session.playout.due(now):
            if frame.first:
                session.on_turn_started()
            xadd(out_key, S.entry(S.OUT_MEDIA, frame.audio), maxlen)
            self._frames_out.inc()
            if frame.mark:
                xadd(out_key, S.entry(S.OUT_MARK, value=frame.mark), maxlen)

    async def _ticker(self) -> None:
        """Every 10 ms, emit what has come due for every playing call (one pipeline for all)."""
        next_t = time.monotonic()
        while True:
            if not self._playing:
                self._tick_wake.clear()
                await self._tick_wake.wait()
                next_t = time.monotonic()
            now = time.monotonic()
            for session in list(self._playing):
                self.emit_due(session, now)
                if session.playout.idle:
                    self._playing.discard(session)
            next_t += TICK_S
            delay = next_t - time.monotonic()
            if delay < -0.1:
                next_t = time.monotonic()  # we fell far behind (GC, overload): do not burst
            await asyncio.sleep(max(0.0, delay))

    async def _silence_keeper(self) -> None:
        """Keep Vapi fed with silence while a call's caller audio is stalled (gateway restart,
        network), so Vapi's silence timeout reflects the caller, not our transport. Only after a
        real gap (SILENCE_FILL_AFTER_S): late frames under load must not be doubled by fill."""
        after = self.settings.silence_fill_after_s
        frames = metrics.FRAMES.labels("in", "silence_fill")
        fill: Entries = [(b"0-0", {b"k": S.IN_SILENCE})]
        while True:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            lost_after = self.settings.reattach_timeout_s
            for session in self.sessions.values():
                if session.vapi_connected and now - session.last_media_at > after:
                    session.last_media_at += 0.02
                    session.silent_for += 0.02
                    session.on_inbound(fill)
                    frames.inc()
                    if session.stream_live and session.silent_for > lost_after:
                        # No frame, no stop, no detach: the gateway holding the socket died.
                        session.on_inbound([(b"0-0", {b"k": S.IN_DETACH, b"v": b"lost"})])

    # Process lifecycle ------------------------------------------------------------------------

    def http_app(self) -> FastAPI:
        app = FastAPI(title="callbridge worker", docs_url=None, redoc_url=None)

        @app.get("/healthz")
        async def healthz() -> dict[str, str | int]:
            return {"status": "ok", "worker_id": self.worker_id, "calls": len(self.sessions)}

        @app.get("/readyz")
        async def readyz() -> Response:
            return await readiness(self.redis, self.draining)

        @app.get("/metrics")
        async def prometheus_metrics() -> Response:
            body, content_type = metrics.exposition()
            return Response(body, media_type=content_type)

        return app

    async def run(self, stop: asyncio.Event, *, serve_http: bool = True) -> None:
        """Serve until `stop` is set, then drain: finish live calls up to the drain timeout."""
        self.writer.start()
        self.inbox.start()
        background = [
            asyncio.create_task(self._ticker(), name="playout-ticker"),
            asyncio.create_task(self.claimer.run(), name="claimer"),
            asyncio.create_task(self._silence_keeper(), name="silence-keeper"),
        ]
        server = None
        if serve_http and self.settings.worker_http_port:
            config = uvicorn.Config(self.http_app(), host=self.settings.worker_http_host,
                                    port=self.settings.worker_http_port, log_level="warning",
                                    lifespan="off", access_log=False)
            server = quiet_server(config)
            background.append(asyncio.create_task(server.serve(), name="worker-http"))
        log.info("worker ready", extra={"worker_id": self.worker_id,
                                        "max_calls": self.settings.worker_max_calls})
        try:
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({stopper, *background}, return_when=asyncio.FIRST_COMPLETED)
            if stopper not in done:
                # A loop this process depends on died: better to exit (and be restarted, with
                # our calls taken over) than to look healthy while claiming nothing.
                for task in done:
                    log.critical("worker loop died", extra={"task": task.get_name()},
                                 exc_info=task.exception() if not task.cancelled() else None)
                self.failed = True
            stopper.cancel()
            await self.drain(self.settings.worker_drain_timeout_s)
        finally:
            if server is not None:
                server.should_exit = True
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.close()

    async def drain(self, timeout: float = 0.0) -> None:
        """Stop claiming; let calls finish for `timeout`; release the rest for a takeover."""
        self.draining = True
        self.claimer.paused = True
        log.info("draining", extra={"calls": len(self.sessions), "timeout_s": timeout})
        deadline = time.monotonic() + timeout
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        released: list[Any] = [s.job_id for s in self.sessions.values()]
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if released:
            # Make the jobs look long idle so a live worker's next XAUTOCLAIM takes them at once.
            with contextlib.suppress(RedisError, OSError):
                await self.redis.xclaim(self.keys.calls, WORKER_GROUP, self.worker_id, 0, released,
                                        idle=10 * 24 * 3600 * 1000, justid=True)
            log.info("released calls for takeover", extra={"calls": len(released)})
        await self.writer.flush()

    async def close(self) -> None:
        await self.inbox.close()
        await self.writer.close()
        await self.vapi.aclose()
        await self.twilio.aclose()
        for r in (self.redis, self._reader_redis, self._claim_redis):
            await r.aclose()
