"""Redis -> Twilio for one media socket: `out` entries become `media` / `mark` / `clear`
messages, or a deliberate close on `hangup`.

An entry that is not one we can send is counted and dropped; the audio after it goes on.
Entries of a replaced owner are dropped (gateway/fence.py). `info` learns that the owner wrote
(it is alive) and sent audio or marks (the call went live).

The socket has one sender task, so a send that has to wait (back-pressure) holds up the entries
behind it, in order. But most entries never need the task: while it waits for entries, the hub
hands them to `_direct` in the reader's turn of the loop, and each send starts there at once:
written straight to the socket (gateway/twilio_socket.py), else through ASGI started eagerly
(shared/eager.py). Only what cannot finish at once (a send that suspended, the entries behind
it, a hang-up's close) goes to the task, which saves a task switch per frame
(docs/performance.md, "Against a direct bridge").
"""

from __future__ import annotations

import time

from starlette.websockets import WebSocket

from gateway import twilio_socket
from gateway.doorbell import Doorbell
from gateway.fence import OwnerFence
from gateway.hub import OutQueue
from gateway.state import SocketInfo
from shared import eager, metrics
from shared import streams as S
from shared.redisio import Entries
from shared.twilio_proto import Outbound

__all__ = ["MAX_OUT_AUDIO", "MAX_OUT_MARK", "NORMAL", "TwilioSender"]

_FRAMES_OUT = metrics.Tally(metrics.FRAMES.labels("out", "twilio"))
_HOP_SAMPLE = metrics.Sample()
_LATENCY = metrics.HOP_LATENCY.labels("worker_to_twilio")

NORMAL = 1000  # the close code of a hang-up (and of every deliberate close: gateway/media.py)
# Bounds on what an `out` entry may carry: entries are untrusted like any Redis data.
MAX_OUT_AUDIO = 16_000  # bytes of μ-law in one entry (2 s); the worker writes 160 (20 ms)
MAX_OUT_MARK = 256  # a mark name; the worker's are `{epoch}.{turn}:{ms}`


def _age_s(fields: dict[bytes, bytes], now_ns: int) -> float | None:
    """Seconds since the sender stamped the entry, or None when the stamp is not a number."""
    t = fields.get(b"t")
    if t is None or not 0 < len(t) <= 20 or not t.isdigit():
        return None
    return (now_ns - int(t)) / 1e9


def _mark_name(value: bytes | None) -> str | None:
    if not value or len(value) > MAX_OUT_MARK:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


class TwilioSender:
    def __init__(self, ws: WebSocket, queue: OutQueue, out: Outbound, fence: OwnerFence,
                 info: SocketInfo, bell: Doorbell) -> None:
        self._ws = ws
        self._send_text = ws.send_text
        proto = twilio_socket.taps(ws)
        self._send_now = proto.send_text_now if proto is not None else None
        self._queue = queue
        self._out = out
        self._fence = fence
        self._info = info
        self._bell = bell
        self._rest: eager.Rest[None] | None = None  # a send that suspended, for the task to finish
        self._failed: Exception | None = None  # what a send started outside the task raised
        self._hangup = False
        queue.direct = self._direct

    async def run(self) -> bool:
        """The sender task. Returns True when the worker asked us to hang up (socket closed);
        raises what a send raised, wherever it started."""
        try:
            while True:
                entries: Entries | None = await self._queue.get()
                while True:
                    if self._rest is not None:
                        rest, self._rest = self._rest, None
                        await rest
                    if self._failed is not None:
                        raise self._failed
                    if self._hangup:
                        await self._ws.close(code=NORMAL)
                        return True
                    if not entries:
                        break
                    entries = self._carry_out(entries)
        finally:
            self._queue.direct = None
            if self._rest is not None:
                self._rest.close()

    def _direct(self, entries: Entries) -> Entries | None:
        """Entries from the hub while the task waits for some: None when all were carried out,
        else what is left for the task (it is woken even when that is empty)."""
        if self._rest is not None or self._failed is not None or self._hangup:
            return entries
        try:
            return self._carry_out(entries)
        except Exception as exc:  # the task raises it, as if its own send had
            self._failed = exc
            return []

    def _carry_out(self, entries: Entries) -> Entries | None:
        """Send what `entries` ask, in order, up to a send that suspends (the rest of the entries
        are returned) or a hang-up (noted; what follows it is moot). None: all done."""
        now, mono = time.time_ns(), time.monotonic()
        fence, out, info, send = self._fence, self._out, self._info, self._send
        for i, (_id, f) in enumerate(entries):
            admitted = fence.admit(f)
            if not admitted:
                if admitted is None:  # a new owner: drop what the old one left in Twilio's buffer
                    self._bell.new_owner(f)
                    send(out.clear())
                else:
                    metrics.dropped("stale_owner")
            else:
                info.last_out = mono
                kind = f.get(b"k")
                if kind == S.OUT_MEDIA:
                    audio = f.get(b"a")
                    if not audio or len(audio) > MAX_OUT_AUDIO:
                        metrics.dropped("bad_out_entry")
                        continue
                    send(out.media(audio))
                    info.live = True
                    _FRAMES_OUT.inc()
                    if _HOP_SAMPLE.due() and (age := _age_s(f, now)) is not None:
                        _LATENCY.observe(age)
                elif kind == S.OUT_MARK:
                    name = _mark_name(f.get(b"v"))
                    if name is None:
                        metrics.dropped("bad_out_entry")
                        continue
                    send(out.mark(name))
                    info.live = True
                elif kind == S.OUT_CLEAR:
                    send(out.clear())
                    if (age := _age_s(f, now)) is not None:
                        metrics.CLEAR_LATENCY.observe(age)
                elif kind == S.OUT_RING:
                    self._bell.rung(f)
                elif kind == S.OUT_HANGUP:
                    self._hangup = True
                    return []
                else:
                    metrics.dropped("bad_out_entry")
            if self._rest is not None:
                return entries[i + 1:]
        return None

    def _send(self, text: str) -> None:
        """Only called with nothing in flight (`_carry_out` stops at a send that suspended)."""
        if self._send_now is not None and self._send_now(text):
            return  # written to the socket in this turn: no coroutine (gateway/twilio_socket.py)
        self._rest = eager.start(self._send_text(text))
