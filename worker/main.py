"""The worker process: claims calls, runs their sessions, paces all playout on one ticker.

Per process, not per call: one multi-key XREAD for every call's `in` stream, one batch writer,
one 10 ms playout ticker, one XREADGROUP for new jobs. A call costs the worker its Vapi socket
and a little state, not connections or timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, Response
from redis.exceptions import RedisError

from shared import metrics
from shared import streams as S
from shared.audio import prepare_uplinks
from shared.health import readiness
from shared.logs import error_fields
from shared.redisio import (
    TRANSIENT,
    Entries,
    Generation,
    LaneReader,
    LaneWriter,
    Writer,
    check_layout,
    connect,
    media_latency_observer,
    warm,
)
from shared.serving import quiet_server
from shared.settings import ConfigError, Settings
from shared.streams import WORKER_GROUP
from shared.tasks import stop_tasks
from worker import ownership
from worker.claims import WATCH_STOP_S, Claimer, ensure_group
from worker.ownership import Lease
from worker.playback import unsent
from worker.session import SESSION_TASKS_STOP_S, CallSession
from worker.twilio_rest import TwilioRest
from worker.vapi_client import VapiClient

log = logging.getLogger("callbridge.worker")

TICK_S = 0.010
# Bounds on a stop (shared/tasks.py): the process loops once cancelled, and the calls once
# released at the end of a drain. A cancelled session stops its own tasks (SESSION_TASKS_STOP_S),
# then waits for its closers (the Vapi socket's close: 0.5 s for the end-call message, then a
# close bounded by its close_timeout of 2 s) before it ends: only after that is its cancel
# repeated, which would cut that clean-up short.
BACKGROUND_STOP_S = 5.0
SESSION_CLEANUP_S = SESSION_TASKS_STOP_S + 5.0
DRAIN_STOP_S = 2 * SESSION_CLEANUP_S


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
        self.keys = settings.keys()
        self.worker_id = settings.effective_worker_id()
        cluster = settings.redis_cluster
        self.redis: aioredis.Redis = connect(settings.redis_url, cluster=cluster)
        self._reader_redis = connect(settings.redis_url, cluster=cluster,
                                     max_connections=max(1, self.keys.lanes) + 2)
        self._claim_redis = connect(settings.redis_url, cluster=cluster, max_connections=2)
        self.writer: Writer = LaneWriter(
            self.redis, self.keys, lambda: connect(settings.redis_url or "", cluster=cluster,
                                                   max_connections=4),
            on_error=_redis_error, on_flushed=media_latency_observer(
                metrics.HOP_LATENCY.labels("worker_to_redis").observe, every=metrics.HOP_SAMPLE))
        self.inbox = LaneReader(self._reader_redis, self.keys, S.worker_reader(self.worker_id),
                                self._on_inbound, on_error=_redis_error,
                                on_read=self._on_read, on_follow=metrics.streams_followed)
        self.vapi = VapiClient(settings)
        self.twilio = TwilioRest(settings)
        self.sessions: dict[str, CallSession] = {}
        self._by_in_key: dict[bytes, CallSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._playing: set[CallSession] = set()
        self._tick_wake = asyncio.Event()
        self._claiming: set[str] = set()  # CallSids whose claim is under way
        self._session_tasks: dict[str, asyncio.Task[Any]] = {}
        self.claimer = Claimer(
            self._claim_redis, self.keys, self.worker_id,
            lease_s=settings.claim_lease_s,
            free_slots=self._free_slots,
            serving=lambda sid: sid in self.sessions or sid in self._claiming,
            on_job=self._on_job,
            steady=lambda: self.lease is not None and self.lease.steady(),
        )
        self.lease: Lease | None = None
        self._verifying: asyncio.Task[None] | None = None
        self.draining = False
        self.failed = False

    # Jobs and sessions ------------------------------------------------------------------------

    def _on_job(self, job_id: bytes | None, fields: dict[bytes, bytes], previous: str) -> None:
        """A new job (`previous` '') or a dead worker's call: claim it, then serve it."""
        sid = fields.get(b"sid", b"").decode()
        if not sid or sid in self.sessions or sid in self._claiming:
            if job_id is not None:  # malformed, or a duplicate of a call we already serve
                self.writer.command("xack", self.keys.calls, WORKER_GROUP, job_id)
            return
        self._claiming.add(sid)
        self._spawn(self._claim_and_serve(job_id, fields, sid, previous), f"claim-{sid}", sid)

    def _free_slots(self) -> int:
        """No new calls, and no one else's, while our own lease is not held: a worker cut off from
        Redis longer than the lease must not take over calls that are merely slow to renew."""
        if self.lease is None or not self.lease.held:
            return 0
        return self.settings.worker_max_calls - len(self.sessions) - len(self._claiming)

    def _spawn(self, coro: Any, name: str, sid: str = "") -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: self._task_done(t, sid))

    def _task_done(self, task: asyncio.Task[None], sid: str) -> None:
        """No task may die silently: log why (with the call, for a call's task) and end the call
        cleanly (the unavailable message) if its session is still registered."""
        if task.cancelled() or task.exception() is None:
            return
        if not sid:
            log.error("worker task failed", extra={"task": task.get_name(), **error_fields(task.exception())})
            return
        self._claiming.discard(sid)
        log.error("call task failed", extra={"call_sid": sid, **error_fields(task.exception())})
        session = self.sessions.get(sid)
        if session is not None:  # it never got to (or through) its own clean-up
            session.abort("worker")
            self.session_done(session, completed=True)

    async def _claim_and_serve(self, job_id: bytes | None, fields: dict[bytes, bytes], sid: str,
                               previous: str) -> None:
        try:
            epoch = await self._claim(sid, previous)
            if epoch <= 0:
                log.info("call not claimed", extra={"call_sid": sid, "outcome": epoch})
            pipe = self.redis.pipeline(transaction=False)
            if epoch > 0:
                pipe.sadd(self.keys.worker_calls(self.worker_id), sid)
            if previous:
                pipe.srem(self.keys.worker_calls(previous), sid)
            if job_id is not None:  # ownership lives in the call hash now: the job is done
                pipe.xack(self.keys.calls, WORKER_GROUP, job_id)
                pipe.xdel(self.keys.calls, job_id)
            await pipe.execute()
            if epoch <= 0:
                self._claiming.discard(sid)
                return
            record: Any = await self.redis.hgetall(self.keys.call(sid))
        except TRANSIENT as exc:
            # Not claimed, or claimed but not started: a claimed call stays in our set, and a
            # lease lapse check or our death hands it on; an unclaimed job stays pending.
            log.warning("claim failed", extra={"call_sid": sid, "error": type(exc).__name__})
            self._claiming.discard(sid)
            return
        info = {k.decode(): v.decode(errors="replace") for k, v in record.items()
                if isinstance(k, bytes) and isinstance(v, bytes)}
        job = dict(fields)
        for name in ("from", "to"):
            job.setdefault(name.encode(), info.get(name, "").encode())
        session = CallSession(self, sid, job, epoch=epoch, record=info)
        self.sessions[sid] = session
        self._claiming.discard(sid)
        in_key = self.keys.inbound(sid)
        self._by_in_key[in_key.encode()] = session
        metrics.CALLS_ACTIVE.set(len(self.sessions))
        metrics.CALLS_STARTED.inc()
        # A new owner reads the caller's audio from the first entry: what arrived before Vapi
        # was ready is delivered, in order. A takeover resumes after what the previous owner
        # forwarded (`in_pos`): what the caller said during the gap reaches the new session.
        from_id = "0-0"
        if session.takeover:
            from_id = info.get("in_pos") or await self._stream_end(in_key)
        await self.inbox.add(in_key, from_id)
        task = asyncio.current_task()
        if task is not None:
            self._session_tasks[sid] = task
        try:
            await session.run()
        finally:
            self._session_tasks.pop(sid, None)

    async def _claim(self, sid: str, previous: str) -> int:
        """Claim with a few retries (a Redis blip must not strand a call we were handed)."""
        s = self.settings
        for attempt in range(5):
            try:
                epoch = await ownership.claim(self.redis, self.keys, sid, self.worker_id, previous,
                                              maxlen=s.stream_maxlen, ttl_s=s.call_ttl_s)
                if epoch == 0 and previous:  # it had read the job but never claimed the call
                    epoch = await ownership.claim(self.redis, self.keys, sid, self.worker_id, "",
                                                  maxlen=s.stream_maxlen, ttl_s=s.call_ttl_s)
                return epoch
            except TRANSIENT:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.1 * 2**attempt)
        return 0

    async def _stream_end(self, key: str) -> str:
        with contextlib.suppress(RedisError, OSError):
            last: Any = await self.redis.xrevrange(key, count=1)
            if last:
                return str(last[0][0].decode())
        return "0-0"

    # Ownership --------------------------------------------------------------------------------

    async def _watch_generation(self) -> None:
        """Once a second: if Redis may have lost writes (a restart, a cluster failover: see
        `Generation`), check and re-assert every call as after a lapsed lease. A restart is
        also seen by the lease; a failover of a node that holds calls but not the leases is not."""
        generation = Generation()
        while True:
            if generation.changed(await Generation.read(self.redis)):
                log.warning("redis may have lost writes (restart or failover); re-asserting calls")
                self._on_lease_lapsed()
            await asyncio.sleep(1.0)

    def _on_lease_lapsed(self) -> None:
        """Our lease was gone when renewed: we stalled past it, or Redis lost its data. Check
        every call before going on (runs on the loop; one check at a time)."""
        if self._verifying is None or self._verifying.done():
            self._verifying = asyncio.create_task(self._verify_ownership(), name="verify-ownership")

    async def _verify_ownership(self) -> None:
        s = self.settings
        log.warning("lease lapsed; checking which calls are still ours",
                    extra={"calls": len(self.sessions)})
        with contextlib.suppress(RedisError, OSError):
            await ensure_group(self.redis, self.keys.calls)
        for session in list(self.sessions.values()):
            try:
                outcome = await ownership.reassert(self.redis, self.keys, session.sid, self.worker_id,
                                                   session.epoch, s.call_ttl_s, session.record_fields())
            except TRANSIENT:
                continue  # the next lapse check tries again
            if outcome == 0:
                log.warning("another worker took this call over; letting it go",
                            extra={"call_sid": session.sid})
                metrics.CLAIMS.labels("lost").inc()
                self._release_session(session)
                continue
            self.writer.command("sadd", self.keys.worker_calls(self.worker_id), session.sid)
            if outcome == 1:
                session.on_reasserted()

    def _release_session(self, session: CallSession) -> None:
        """Stop serving a call without touching its state (another worker owns it now)."""
        session.ownership_lost()
        if (task := self._session_tasks.get(session.sid)) is not None:
            task.cancel()

    def session_done(self, session: CallSession, completed: bool) -> None:
        sid = session.sid
        if self.sessions.get(sid) is not session:
            return  # already done (a failed task's clean-up came first)
        self.sessions.pop(sid, None)
        self._by_in_key.pop(self.keys.inbound(sid).encode(), None)
        self.inbox.remove(self.keys.inbound(sid))
        self.writer.ring(self.keys.outbound(sid), None)
        self._playing.discard(session)
        metrics.CALLS_ACTIVE.set(len(self.sessions))
        if not completed:
            return  # released or lost: another worker takes it over (or has)
        ending = session.ending  # its `call-ended` event and the record are written already
        reason = ending.reason if ending else "skipped"
        if ending:
            metrics.CALLS_ENDED.labels(metrics.end_reason_label(reason)).inc()
        # The audio streams go soon; the record and its events stay readable (the call API) for
        # CALL_RECORD_TTL_S.
        s = self.settings
        for key in (self.keys.inbound(sid), self.keys.outbound(sid)):
            self.writer.command("expire", key, s.ended_ttl_s)
        for key in (self.keys.call(sid), self.keys.events(sid)):
            self.writer.command("expire", key, max(s.ended_ttl_s, s.call_record_ttl_s))
        self.writer.command("srem", self.keys.worker_calls(self.worker_id), sid)
        log.info("call finished", extra={"call_sid": sid, "reason": reason})

    def inbound_rung(self, sid: str, rung: bool) -> None:
        """Whether the gateway rings us after writing the call's `in` (gateway/doorbell.py)."""
        if self.sessions.get(sid) is not None:
            self.inbox.ring(self.keys.inbound(sid), rung)

    def _on_read(self, batch: list[tuple[bytes, Entries]]) -> None:
        """Before one read's entries go to their calls: convert the caller audio of all of them
        in one vectorised pass (shared/audio.py, `prepare_uplinks`)."""
        jobs = []
        for key, entries in batch:
            session = self._by_in_key.get(key)
            if session is not None:
                job = session.uplink_job(entries)
                if job is not None:
                    jobs.append(job)
        if jobs:
            prepare_uplinks(jobs)

    def _on_inbound(self, key: bytes, entries: Entries) -> None:
        session = self._by_in_key.get(key)
        if session is not None:
            session.on_inbound(entries)

    # Playout ticker ---------------------------------------------------------------------------

    def wake_ticker(self, session: CallSession) -> None:
        self._playing.add(session)
        self._tick_wake.set()

    async def _ticker(self) -> None:
        """Every 10 ms, tick every call with audio being paced: their due frames leave in one
        pipeline for all calls (a call's other timers are its own loop timer)."""
        next_t = time.monotonic()
        while True:
            if not self._playing:
                self._tick_wake.clear()
                await self._tick_wake.wait()
                next_t = time.monotonic()
            now = time.monotonic()
            for session in list(self._playing):
                session.on_tick(now)
                if not session.playing:
                    self._playing.discard(session)
            next_t += TICK_S
            delay = next_t - time.monotonic()
            if delay < -0.1:
                next_t = time.monotonic()  # we fell far behind (GC, overload): do not burst
            await asyncio.sleep(max(0.0, delay))

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
            metrics.set_playout_unsent(unsent(s.core.playout for s in self.sessions.values()))
            body, content_type = metrics.exposition()
            return Response(body, media_type=content_type)

        return app

    def bind_http(self) -> socket.socket | None:
        """Take the health port before anything else: a second worker on the same host with the
        same port must stop here, before it claims a call it could not report on."""
        host, port = self.settings.worker_http_host, self.settings.worker_http_port
        if not port:
            return None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port} for health and metrics ({exc.strerror}); "
                              "set WORKER_HTTP_PORT to a free port (0 disables)") from None
        sock.listen(128)
        sock.setblocking(False)
        return sock

    async def run(self, stop: asyncio.Event, *, serve_http: bool = True,
                  http_socket: socket.socket | None = None) -> None:
        """Serve until `stop` is set, then drain: finish live calls up to the drain timeout."""
        if serve_http and http_socket is None:
            http_socket = self.bind_http()
        await warm(self.redis, self._reader_redis, self._claim_redis, *self.writer.clients)
        await check_layout(self.redis, self.keys)
        self.writer.start()
        self.inbox.start()
        self.lease = Lease(self.settings.redis_url or "", self.keys, self.worker_id,
                           lease_s=self.settings.claim_lease_s, on_lapsed=self._on_lease_lapsed,
                           loop=asyncio.get_running_loop(), cluster=self.settings.redis_cluster)
        self.lease.start()
        for aid in {None, *self.settings.routes().values()}:  # ready before a takeover
            self._spawn(self.vapi.assistant_model(aid), "vapi-assistant-model")
        background = [
            asyncio.create_task(self._ticker(), name="playout-ticker"),
            asyncio.create_task(self.claimer.run(), name="claimer"),
            asyncio.create_task(self._watch_generation(), name="redis-generation"),
        ]
        watched = [*self.writer.tasks(), *self.inbox.tasks()]  # stopped by close(), after a flush
        server = None
        if http_socket is not None:
            config = uvicorn.Config(self.http_app(), log_level="warning", lifespan="off",
                                    access_log=False)
            server = quiet_server(config)
            background.append(asyncio.create_task(server.serve(sockets=[http_socket]),
                                                  name="worker-http"))
        log.info("worker ready", extra={"worker_id": self.worker_id,
                                        "max_calls": self.settings.worker_max_calls})
        try:
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({stopper, *background, *watched},
                                         return_when=asyncio.FIRST_COMPLETED)
            if stopper not in done:
                # A loop this process depends on died: better to exit (and be restarted, with
                # our calls taken over) than to look healthy while claiming nothing.
                for task in done:
                    error = None if task.cancelled() else task.exception()
                    log.critical("worker loop died", extra={"task": task.get_name(),
                                                            **error_fields(error)})
                self.failed = True
                self.draining = True  # unready at once
            stopper.cancel()
            await self.drain(0.0 if self.failed else self.settings.worker_drain_timeout_s)
        finally:
            if server is not None:
                server.should_exit = True
            self.claimer.close()
            # Each may be inside a Redis call, where a cancel can be lost (shared/tasks.py). The
            # claimer's own clean-up (stopping its orphan watch) takes up to WATCH_STOP_S.
            await stop_tasks(background, BACKGROUND_STOP_S, every=WATCH_STOP_S + 0.5,
                             what="worker loops")
            await self.close()

    async def drain(self, timeout: float = 0.0) -> None:
        """Stop claiming; let calls finish for `timeout`; release the rest for a takeover."""
        self.draining = True
        self.claimer.paused = True
        log.info("draining", extra={"calls": len(self.sessions), "timeout_s": timeout})
        deadline = time.monotonic() + timeout
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        released = len(self.sessions)
        # Claims and sessions may be inside a Redis call, where a cancel can be lost: it is
        # repeated, but only after a cancelled session had the time for its own clean-up.
        await stop_tasks(list(self._tasks), DRAIN_STOP_S, every=SESSION_CLEANUP_S,
                         what="claims and sessions")
        with contextlib.suppress(TimeoutError):  # a dead writer (we are failing) cannot flush
            await self.writer.flush()
        if self.lease is not None:
            # Dropping the lease makes survivors take what we still hold at their next scan.
            await asyncio.to_thread(self.lease.stop, True)
            self.lease = None
        if released:
            log.info("released calls for takeover", extra={"calls": released})

    async def close(self) -> None:
        if self.lease is not None:
            await asyncio.to_thread(self.lease.stop, True)
            self.lease = None
        await self.inbox.close()
        await self.writer.close()
        await self.vapi.aclose()
        await self.twilio.aclose()
        for r in (self.redis, self._reader_redis, self._claim_redis):
            await r.aclose()
