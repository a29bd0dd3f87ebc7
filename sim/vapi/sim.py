"""VapiSim: the stand-in's server (REST and transport sockets on one port), its calls and its clock.

Runs in the test's or the bench's own event loop. One shared ticker paces the downlink of every
session instead of a task per call: 100 speaking sessions cost one 10 ms wake-up, not 100.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from typing import Any, Literal

import uvicorn

from shared.serving import QuietServer, quiet_server
from sim.vapi.callspec import SavedModel, call_spec
from sim.vapi.hooks import VapiObserver
from sim.vapi.rest import build_app
from sim.vapi.scripts import AssistantScript, greeter
from sim.vapi.session import VapiSession
from sim.vapi.transport import bind

log = logging.getLogger("sim.vapi")

#: the downlink clock's period: half a 20 ms frame, so a frame is never more than 10 ms late.
TICK_S = 0.01

Downlink = Literal["paced", "burst"]


class VapiSim:
    """The Vapi stand-in server (REST + transport sockets on one port), run in-process.

    Attributes settable at runtime: ``assistant`` (script for new calls), ``assistants``
    (assistantId -> script, takes precedence), ``create_delay``, ``fail_status``, ``downlink``
    (for utterances started afterwards), ``respond_to_pings``, ``observer``, and the saved
    assistant's model as ``GET /assistant/{id}`` shows it and ``assistantOverrides.model`` is
    merged into: ``assistant_provider``, ``assistant_model``, ``system_prompt`` (one model for
    every assistant id); ``assistant_fail_status`` makes that GET fail.
    """

    def __init__(
        self,
        *,
        api_key: str = "test-vapi-key",
        assistant: AssistantScript | None = None,
        create_delay: float = 0.0,
        fail_status: int | None = None,
        downlink: Downlink = "paced",
        respond_to_pings: bool = True,
        assistants: dict[str, AssistantScript] | None = None,
        connect_timeout: float | None = 20.0,
        record_audio: bool = True,
        observer: VapiObserver | None = None,
        tick_s: float = TICK_S,
    ) -> None:
        if downlink not in ("paced", "burst"):
            raise ValueError("downlink must be 'paced' or 'burst'")
        if not 0.002 <= tick_s <= TICK_S:  # uvloop's timers have 1 ms steps
            raise ValueError(f"tick_s must be 0.002..{TICK_S} s, not {tick_s}")
        #: the downlink clock's period. Shorter ticks spread the sessions' frames over more
        #: phases of the 20 ms frame (each utterance starts on a tick), for the bench's `--phases`.
        self.tick_s = tick_s
        self.api_key = api_key
        self.assistant: AssistantScript = assistant if assistant is not None else greeter()
        self.assistants: dict[str, AssistantScript] = dict(assistants or {})
        self.create_delay = create_delay
        self.fail_status = fail_status
        self.downlink: Downlink = downlink
        self.respond_to_pings = respond_to_pings
        #: seconds a created call waits for its transport before it ends (None: forever).
        self.connect_timeout = connect_timeout
        #: keep every received byte in ``VapiSession.received_audio`` (turn off for long loads;
        #: frame sizes and times are still recorded).
        self.record_audio = record_audio
        #: told about frames and control messages as they cross the socket (None: nobody).
        self.observer = observer
        self.org_id = str(uuid.uuid4())
        saved = SavedModel()
        self.assistant_provider: str = saved.provider
        self.assistant_model: str = saved.model
        self.system_prompt: str = saved.system_prompt
        #: answer GET /assistant/{id} with this status instead (None: answer normally).
        self.assistant_fail_status: int | None = None

        self.sessions: dict[str, VapiSession] = {}
        #: every POST /call: {"status", "body", "at"}.
        self.create_log: list[dict[str, Any]] = []
        #: every GET /assistant/{id}: {"status", "id", "at"}.
        self.assistant_log: list[dict[str, Any]] = []
        #: transport handshakes refused: (path, status).
        self.rejected_handshakes: list[tuple[str, int]] = []

        self._new_sessions: asyncio.Queue[VapiSession] = asyncio.Queue()
        self._active: set[VapiSession] = set()
        self._wake = asyncio.Event()
        self._server: QuietServer | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._ticker_task: asyncio.Task[None] | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self._protocol_class = bind(self)
        self.app = build_app(self)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._serve_task is not None:
            raise RuntimeError("VapiSim already started")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            ws=self._protocol_class,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
            ws_per_message_deflate=False,
        )
        server = quiet_server(config)
        self._server = server
        self._serve_task = asyncio.create_task(server.serve(sockets=[sock]), name="vapi-sim")
        self._ticker_task = asyncio.create_task(self._ticker(), name="vapi-sim-ticker")
        deadline = time.monotonic() + 10.0
        while not server.started:
            if self._serve_task.done():
                exc = self._serve_task.exception()
                raise RuntimeError(f"VapiSim failed to start: {exc!r}")
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError("VapiSim did not start within 10 s")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        for session in list(self.sessions.values()):
            try:
                session._shutdown()
            except Exception:
                log.exception("vapi sim: error stopping session %s", session.id)
        self._active.clear()
        # Bounded waits (asyncio.wait), never `await task` after a cancel: a task that loses
        # or ignores its cancel would hold stop() forever, and a cancel of the caller must
        # propagate, not be taken for the task's.
        ticker, self._ticker_task = self._ticker_task, None
        if ticker is not None:
            ticker.cancel()
            await asyncio.wait({ticker}, timeout=2.0)
        server, task = self._server, self._serve_task
        self._server = self._serve_task = None
        if server is not None and task is not None:
            server.should_exit = True
            server.force_exit = True
            done, _ = await asyncio.wait({task}, timeout=5.0)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=2.0)
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("vapi sim: server task failed", exc_info=task.exception())

    async def __aenter__(self) -> VapiSim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._url_host}:{self._port}"

    @property
    def ws_base_url(self) -> str:
        return f"ws://{self._url_host}:{self._port}"

    @property
    def _url_host(self) -> str:
        return f"[{self._host}]" if ":" in self._host else self._host

    # -- calls -------------------------------------------------------------------------------

    @property
    def assistant_gets(self) -> int:
        """How many ``GET /assistant/{id}`` requests arrived (answered or not)."""
        return len(self.assistant_log)

    @property
    def saved_model(self) -> SavedModel:
        """The saved assistant's model as configured now."""
        return SavedModel(self.assistant_provider, self.assistant_model, self.system_prompt)

    def create_session(self, body: dict[str, Any]) -> VapiSession:
        """A new call for a valid ``POST /call`` body (what the route does once it has checked
        auth and the body)."""
        call_id = str(uuid.uuid4())
        script = self.assistants.get(str(body.get("assistantId")), self.assistant)
        session = VapiSession(self, call_id, body, call_spec(body, script, self.saved_model))
        self.sessions[call_id] = session
        if self.connect_timeout is not None:
            session._call_later(self.connect_timeout, session._never_connected)
        self._new_sessions.put_nowait(session)
        return session

    def open_sessions(self) -> int:
        """Transport sockets currently open."""
        return sum(1 for s in self.sessions.values() if s.is_open)

    def prune(self) -> int:
        """Forget sessions whose socket has closed (long runs); returns how many."""
        gone = [k for k, s in self.sessions.items() if s.closed]
        for k in gone:
            del self.sessions[k]
        return len(gone)

    async def wait_session(self, timeout: float) -> VapiSession:
        """The next session created (the first call returns the first one ever created)."""
        return await asyncio.wait_for(self._new_sessions.get(), timeout)

    # -- ticker ------------------------------------------------------------------------------

    def _activate(self, session: VapiSession) -> None:
        self._active.add(session)
        self._wake.set()

    async def _ticker(self) -> None:
        """One clock for the downlink of every session: wakes every `tick_s` while any speaks."""
        next_at = time.monotonic()
        while True:
            if not self._active:
                self._wake.clear()
                await self._wake.wait()
                next_at = time.monotonic()
            now = time.monotonic()
            for session in list(self._active):
                try:
                    keep = session._tick(now)
                except Exception:
                    log.exception("vapi sim: tick failed for call %s", session.id)
                    keep = False
                if not keep:
                    self._active.discard(session)
            next_at += self.tick_s
            delay = next_at - time.monotonic()
            if delay < -0.2:  # fell far behind (loop stalled): resynchronise
                next_at = time.monotonic()
                delay = 0.0
            await asyncio.sleep(max(0.0, delay))

