"""TwilioSim: places calls against a gateway and serves the REST stand-in.

Inbound calls are placed by the test (`place_call`); outbound ones by whoever POSTs to the REST
stand-in's `Calls.json` (the gateway, through the `twilio` library), and dialled to the callee
configured for the number (`callees`, `default_callee`); a test takes them with `wait_outbound`.

It owns what all calls share: the webhook client, the REST server (uvicorn in-process) and ONE
media ticker task that sends every live stream's due frames each 20 ms. The ticker is deadline
based (frame k of a stream is due at a fixed time, never `sleep(0.02)` drift), so 100+ calls
stay paced without a task or timer each. By default every stream is on one grid, so the whole
load arrives in one burst per 20 ms; `phases=N` ticks N times per 20 ms and leaves each stream
in the phase its start fell in, as independent calls' streams are on a real line.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import math
import socket
import time
from typing import Any

import uvicorn
from websockets.exceptions import ConnectionClosed

from shared.serving import QuietServer, quiet_server

from . import wire as w
from .call import SimCall
from .dialer import Outbound, dial
from .errors import TwilioSimError
from .hooks import TwilioObserver
from .outbound import Callee, CreateCall
from .rest import rest_app
from .stream import MediaStream
from .webhooks import Webhooks

log = logging.getLogger("sim.twilio")

# The most phases per 20 ms: uvloop's timers step in 1 ms, so ticks stay at 2 ms or more.
MAX_PHASES = 10
_mono = time.monotonic


class TwilioSim:
    """Simulated Twilio: places calls against the gateway and serves a REST stand-in.

    Args:
        gateway_url: where the gateway really listens, e.g. "http://127.0.0.1:8123".
        public_url: the base the gateway was configured with (PUBLIC_URL). Signatures are
            computed over public URLs; connections go to gateway_url.
        account_sid / auth_token: the account; REST Basic auth and all signatures use them.
        playout_model: True models Twilio's outbound buffer (marks echo at play time, clear
            drops audio). False: marks are echoed on arrival and clear has nothing to drop.
        voice_path: path of the voice webhook under public_url.
        max_call_duration: calls are ended ("time-limit") after this many seconds.
        observer: told about caller frames, gateway media, marks and clears of every call
            (hooks.py); may also be set later as `TwilioSim.observer`.
        idle_frame: 160 μ-law bytes a caller sends while it has nothing to say (default digital
            silence); e.g. a quiet line, so every frame can be told apart from silence.

    Outbound calls (`POST /Calls.json`), set as attributes at any time:
        callees: destination number → the `Callee` that answers it; others get `default_callee`
            (a human that answers after a short ring).
        invalid_numbers: `To` numbers refused with 21211 although well formed.
        verified_caller_ids: when set, a `From` outside it is refused with 21210.
        reject_url_with_twiml: both `Url` and `Twiml` is a 400 (21205); False follows the
            create docstring instead (`Twiml` ignored).
        outbound_calls: every outbound SimCall, in creation order (also in `calls`).
    """

    def __init__(
        self,
        *,
        gateway_url: str,
        public_url: str,
        account_sid: str,
        auth_token: str,
        playout_model: bool = True,
        voice_path: str = "/twilio/voice",
        max_call_duration: float = 4 * 3600.0,
        observer: TwilioObserver | None = None,
        idle_frame: bytes | None = None,
        phases: int = 1,
    ) -> None:
        if not 1 <= phases <= MAX_PHASES:
            raise ValueError(f"phases must be 1..{MAX_PHASES} (a tick of 2 ms or more), not {phases}")
        self.phases = phases
        self._gateway_url = gateway_url.rstrip("/")
        self.public_url = public_url.rstrip("/")
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.playout_model = playout_model
        self.voice_url = self.public_url + voice_path
        self.max_call_duration = max_call_duration
        self.observer = observer
        if idle_frame is None:
            self._idle_frame = (w.SILENCE_FRAME, w.SILENCE_FRAME_B64)
        elif len(idle_frame) != w.FRAME_BYTES:
            raise ValueError(f"idle_frame must be {w.FRAME_BYTES} bytes, not {len(idle_frame)}")
        else:
            frame = bytes(idle_frame)
            self._idle_frame = (frame, binascii.b2a_base64(frame, newline=False).decode("ascii"))
        self.calls: dict[str, SimCall] = {}
        self.rest_requests: list[tuple[float, str, str, dict[str, str]]] = []
        self.callees: dict[str, Callee] = {}
        self.default_callee = Callee()
        self.invalid_numbers: set[str] = set()
        self.verified_caller_ids: set[str] | None = None
        self.reject_url_with_twiml = True
        self.outbound_calls: list[SimCall] = []
        self._outbound_taken: set[str] = set()
        self._outbound_changed = asyncio.Event()
        self._live: dict[MediaStream, None] = {}
        self._epoch = _mono()
        self._ticker: asyncio.Task[None] | None = None
        self._webhooks = Webhooks(
            auth_token=auth_token, public_url=self.public_url, gateway_url=self._gateway_url
        )
        self._server: QuietServer | None = None
        self._server_task: asyncio.Task[None] | None = None
        self._rest_base: str | None = None
        self._stopped = False

    @property
    def gateway_url(self) -> str:
        """Where requests and sockets really go. Tests move it between gateways mid-call, like a
        load balancer taking one out of rotation: every later request follows."""
        return self._gateway_url

    @gateway_url.setter
    def gateway_url(self, url: str) -> None:
        self._gateway_url = url.rstrip("/")
        self._webhooks.gateway_url = self._gateway_url

    async def __aenter__(self) -> TwilioSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start the REST API stand-in (uvicorn in-process) and the media ticker."""
        if self._server is not None:
            return
        self._stopped = False
        self._webhooks.open()
        self._ensure_ticker()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: with proto 0, asyncio does not set TCP_NODELAY on accepted sockets
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        bound_port = sock.getsockname()[1]
        config = uvicorn.Config(
            rest_app(self),
            log_level="warning",
            lifespan="off",
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=1,
        )
        server = quiet_server(config)
        self._server = server
        self._server_task = asyncio.create_task(server.serve(sockets=[sock]), name="twilio-sim-rest")
        for _ in range(500):  # ≤ 5 s
            if server.started:
                break
            if self._server_task.done():
                exc = self._server_task.exception()
                raise TwilioSimError(f"REST stand-in failed to start: {exc!r}")
            await asyncio.sleep(0.01)
        else:
            raise TwilioSimError("REST stand-in did not start within 5 s")
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        self._rest_base = f"http://{shown}:{bound_port}"

    async def stop(self) -> None:
        """End every live call (`stop` + close), cancel every task, stop the REST server."""
        self._stopped = True
        live = [c for c in self.calls.values() if c.end_reason is None]
        if live:  # bounded (asyncio.wait: a cancel lost or ignored cannot hold stop() forever)
            finishing = [asyncio.ensure_future(c._finish("sim-stopped")) for c in live]
            _, pending = await asyncio.wait(finishing, timeout=5.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
            for task in finishing:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: the outcome does not matter here
        tasks: list[asyncio.Task[Any]] = []
        for call in self.calls.values():
            if call._driver is not None:
                tasks.append(call._driver)
            tasks.extend(call._tasks)
            call._cancel_mark_timer()
        tasks.extend(self._webhooks.pending)
        if self._ticker is not None:
            tasks.append(self._ticker)
            self._ticker = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        self._live.clear()
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            done, _ = await asyncio.wait({self._server_task}, timeout=5.0)
            if not done:
                self._server_task.cancel()
                await asyncio.wait({self._server_task}, timeout=1.0)
        self._server = None
        self._server_task = None
        await self._webhooks.aclose()

    @property
    def rest_base_url(self) -> str:
        """Base URL of the REST stand-in (give it to the gateway/worker as TWILIO_API_BASE_URL)."""
        if self._rest_base is None:
            raise RuntimeError("TwilioSim.start() has not been called")
        return self._rest_base

    # ------------------------------------------------------------------ calls

    async def place_call(
        self,
        *,
        from_: str = "+15550001111",
        to: str = "+15550002222",
        call_sid: str | None = None,
        timeout: float = 30.0,
    ) -> SimCall:
        """Place an inbound call: signed voice webhook, TwiML, Media Stream.

        Returns once `start` was sent on the socket. Raises TwilioSimError if the webhook did
        not answer 2xx, the TwiML has no `<Connect><Stream>`, or the socket was rejected.
        """
        if self._stopped:
            raise RuntimeError("TwilioSim was stopped")
        self._webhooks.open()
        sid = call_sid or w.new_sid("CA")
        if sid in self.calls:
            raise ValueError(f"call {sid} already exists")
        call = SimCall(self, sid, from_, to)
        self.calls[sid] = call
        driver = asyncio.create_task(call._drive(), name=f"{sid}:driver")
        call._driver = driver
        started = asyncio.ensure_future(call._started.wait())
        try:
            await asyncio.wait({started, driver}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        if call._started.is_set():
            return call
        if call.end_reason is None:
            await call._finish("error")
            call.error = call.error or f"no Media Stream started within {timeout}s"
            raise TwilioSimError(call.error, call)
        if call.error:
            raise TwilioSimError(call.error, call)
        raise TwilioSimError(
            f"TwiML has no <Connect><Stream> (call ended: {call.end_reason}); "
            f"TwiML: {call.twiml_log[-1] if call.twiml_log else None!r}",
            call,
        )

    def callee_for(self, number: str) -> Callee:
        """Who answers `number` when an outbound call dials it."""
        return self.callees.get(number, self.default_callee)

    async def wait_outbound(self, timeout: float = 10.0, *, to: str | None = None) -> SimCall:
        """The oldest outbound call (to `to`, if given) not yet returned by this method; waits
        for one to be created (TimeoutError after `timeout` s). The call may still be ringing:
        `await call.wait_streams(1, timeout)` waits for its Media Stream."""
        deadline = time.monotonic() + timeout
        while True:
            for call in self.outbound_calls:
                if call.call_sid not in self._outbound_taken and to in (None, call.to):
                    self._outbound_taken.add(call.call_sid)
                    return call
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no outbound call{' to ' + to if to else ''} within {timeout}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbound_changed.wait(), remaining)

    def _create_outbound(self, req: CreateCall) -> SimCall:
        """A validated `POST /Calls.json`: the call (queued) and its dialer task."""
        self._webhooks.open()
        sid = w.new_sid("CA")
        call = SimCall(self, sid, req.from_, req.to)
        call.direction = "outbound-api"
        call.outbound = Outbound(req, self.callee_for(req.to))
        call._event("created", to=req.to, from_=req.from_)
        self.calls[sid] = call
        self.outbound_calls.append(call)
        call._driver = asyncio.create_task(call._drive(lambda: dial(call)), name=f"{sid}:dialer")
        if self.observer is not None:
            self.observer.outbound_call_created(call, call.created)
        self._outbound_changed.set()
        self._outbound_changed = asyncio.Event()
        return call

    # ------------------------------------------------------------------ the media ticker

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick_loop(), name="twilio-sim-ticker")

    async def _tick_loop(self) -> None:
        period = w.FRAME_S / self.phases
        epoch = self._epoch
        k = math.floor((_mono() - epoch) / period)
        idle = 0
        while True:
            k += 1
            delay = epoch + k * period - _mono()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
                if delay < -0.5:  # the loop stalled: re-sync the grid (streams catch up by due)
                    k = math.floor((_mono() - epoch) / period)
            if not self._live:
                idle += 1
                if idle >= 50 * self.phases:  # 1 s without streams: exit; _ensure_ticker restarts it
                    return
                continue
            idle = 0
            now = _mono()
            for st in list(self._live):
                if st.due(now) <= 0:
                    continue  # another phase's stream (a DTMF waits for its stream's next frame)
                try:
                    await st.pump(now)
                except ConnectionClosed:
                    self._live.pop(st, None)
                except Exception:
                    log.exception("media pump failed on %s", st.sid)
                    self._live.pop(st, None)
