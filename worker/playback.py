"""Playout pacing for one call: assistant audio leaves as 20 ms μ-law frames on a clock.

Twilio plays whatever we send in order and only `clear` can take it back, so sending Vapi's
bursts straight through would park seconds of audio in Twilio's buffer, out of reach of barge-in.
We keep only `lead` of audio ahead of real time there, and follow the audio with `mark`s named
`{epoch}.{turn}:{ms}` (the owner epoch first) so the echoes tell us what the caller has actually
heard.

Pure state machine: the caller passes `now` (monotonic seconds) and writes what `due()` returns.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

FRAME_S = 0.020
FRAME_BYTES = 160  # 20 ms of μ-law at 8 kHz
SILENCE = 0xFF


@dataclass(slots=True)
class Frame:
    audio: bytes  # empty: a mark alone (an utterance's end, once no more audio came)
    mark: str | None = None  # a mark to send right after this frame
    first: bool = False  # the first frame of an assistant turn


@dataclass
class TurnRecord:
    """What was said vs what the caller heard, per assistant turn (ms of audio)."""

    sent_ms: int = 0
    heard_ms: int = 0
    interrupted: bool = False


@dataclass
class Playout:
    lead_s: float = 0.100
    mark_every_ms: int = 100
    # Partial frames wait this long for more audio before being padded and sent.
    tail_wait_s: float = 0.040
    # When playback (re)starts on an empty Twilio buffer, gather this much audio first, so that
    # Vapi's network jitter is absorbed by Twilio's buffer instead of becoming a gap the caller
    # hears. Costs the same in added latency on each turn's first word.
    prebuffer_s: float = 0.0
    # Mark names start with this (the owner's epoch): after a takeover, echoes of the previous
    # owner's marks cannot be taken for ours.
    mark_prefix: str = ""
    # Vapi may hand over a response far faster than it plays: keep at most this much unsent
    # (a minute is 480 KB per call); what comes beyond it is dropped and counted by the caller.
    max_buffer_s: float = 60.0

    turn: int = 0
    turns: dict[int, TurnRecord] = field(default_factory=dict)
    _buf: bytearray = field(default_factory=bytearray)
    _play_at: float = 0.0  # when the next frame will start playing at Twilio
    _last_push: float = 0.0
    _pending_marks: deque[str] = field(default_factory=deque)
    # Marks Twilio will echo because `clear` flushed them, not because they played.
    _flushed: set[str] = field(default_factory=set)

    # A pause this long between pushes, with nothing left to send, starts a new assistant turn.
    turn_gap_s: float = 0.300

    # Fast barge-in (`pause`/`resume`): frames recently handed to Twilio, as (play time, turn,
    # frame), so a pause can take back what Twilio had not played yet. Only the last `lead` + 40 ms
    # can still be unplayed, so the ring stays that short.
    _sent: deque[tuple[float, int, Frame]] = field(default_factory=deque)
    _paused: bool = False
    _fill_started: float = 0.0  # when audio began to gather while Twilio's buffer was empty
    # The buffer ran dry right after audio came in: the utterance may go on, so its end mark
    # waits until `tail_wait` has passed with nothing new (audio that streams in real time
    # empties the buffer after every frame, and a mark per frame doubled the messages both
    # ways: every mark is echoed).
    # (send at, name, turn, when the frame before it starts playing)
    _end_mark: tuple[float, str, int, float] | None = None

    def push(self, ulaw: bytes, now: float) -> int:
        """Queue assistant audio; returns how many bytes did not fit (dropped)."""
        if not ulaw:
            return 0
        room = int(self.max_buffer_s * 8000) - len(self._buf)
        dropped = max(0, len(ulaw) - max(0, room))
        if dropped:
            ulaw = ulaw[:len(ulaw) - dropped]
            if not ulaw:
                return dropped
        rec = self.turns.get(self.turn)
        if not self._buf and rec is not None and rec.sent_ms and now - self._last_push > self.turn_gap_s:
            self.turn += 1
        if not self._buf:
            self._fill_started = now
        if self._end_mark is not None and now < self._end_mark[0]:
            self._end_mark = None  # the utterance goes on: its next frames carry the marks
        self._buf += ulaw
        self._last_push = now
        if self.turn not in self.turns:
            self.turns[self.turn] = TurnRecord()
        return dropped

    @property
    def buffered_s(self) -> float:
        """Audio not yet handed to Twilio."""
        return len(self._buf) / 8000

    def queued_s(self, now: float) -> float:
        """Audio not yet played by Twilio: our buffer plus Twilio's (estimated by the clock)."""
        return self.buffered_s + max(0.0, self._play_at - now)

    @property
    def idle(self) -> bool:
        return not self._buf

    @property
    def awaiting_marks(self) -> int:
        return len(self._pending_marks)

    def active(self, now: float) -> bool:
        """Assistant audio is queued here or still playing at Twilio (or its end mark is due)."""
        return (bool(self._buf) or bool(self._pending_marks) or self._play_at > now
                or self._end_mark is not None)

    @property
    def play_end(self) -> float:
        """When Twilio will have played everything handed to it (by our clock)."""
        return self._play_at

    def next_due(self, now: float) -> float | None:
        """When `due()` will next hand out a frame or an end mark (None while paused, or empty
        with no end mark to come), so a caller can sleep until then instead of polling. Later
        inputs (more audio) can only bring it closer."""
        if self._paused:
            return None
        end = None if self._end_mark is None else self._end_mark[0]
        if not self._buf:
            return end
        if self._play_at <= now:  # dry: at once, unless a jitter cushion is still gathering
            at = now
            if self.prebuffer_s and len(self._buf) < self.prebuffer_s * 8000 + FRAME_BYTES:
                at = max(at, self._fill_started + self.prebuffer_s + 1e-6)
        else:
            at = self._play_at - self.lead_s
        if len(self._buf) < FRAME_BYTES:  # a partial last frame waits for the rest a while
            at = max(at, self._last_push + self.tail_wait_s + 1e-6)
        return at if end is None else min(at, end)

    def due(self, now: float) -> list[Frame]:
        """Frames whose send time has come: each frame goes out `lead` before it plays."""
        out: list[Frame] = []
        if self._paused:
            return out
        if self._end_mark is not None and now >= self._end_mark[0]:
            out.append(self._send_end_mark())
        if not self._buf:
            return out
        if self._play_at <= now:
            # Twilio's buffer is dry: playback (re)starts now, once a jitter cushion is gathered.
            # (Paced audio arrives a frame per 20 ms: the cushion is the wait, or the audio
            # beyond the frame being played, whichever comes first.)
            if (self.prebuffer_s and len(self._buf) < self.prebuffer_s * 8000 + FRAME_BYTES
                    and now - self._fill_started < self.prebuffer_s):
                return out
            self._play_at = now
        rec = self.turns.get(self.turn)
        if rec is None:  # (not setdefault: that builds a record on every call)
            rec = self.turns[self.turn] = TurnRecord()
        while self._buf and self._play_at - self.lead_s <= now:
            if len(self._buf) < FRAME_BYTES:
                if now - self._last_push < self.tail_wait_s:
                    break  # more of this utterance is probably on its way
                self._buf += bytes([SILENCE]) * (FRAME_BYTES - len(self._buf))
            chunk = bytes(self._buf[:FRAME_BYTES])
            del self._buf[:FRAME_BYTES]
            before = rec.sent_ms
            rec.sent_ms += 20
            self._play_at += FRAME_S
            mark = None
            interval = rec.sent_ms // self.mark_every_ms != before // self.mark_every_ms
            if interval or not self._buf:
                name = f"{self.mark_prefix}{self.turn}:{rec.sent_ms}"
                if interval or now - self._last_push >= self.tail_wait_s:
                    mark = name
                    self._pending_marks.append(mark)
                else:  # the buffer ran dry, but more of the utterance may be on its way
                    self._end_mark = (self._last_push + self.tail_wait_s + 1e-6, name, self.turn,
                                      self._play_at - FRAME_S)
            frame = Frame(chunk, mark, first=before == 0)
            self._sent.append((self._play_at - FRAME_S, self.turn, frame))
            out.append(frame)
        keep = math.ceil((self.lead_s + 0.040) / FRAME_S) + 1
        while len(self._sent) > keep:
            self._sent.popleft()
        return out

    def _send_end_mark(self) -> Frame:
        """A mark with no audio after the last frame sent: the utterance ended there."""
        assert self._end_mark is not None
        _, mark, turn, play_at = self._end_mark
        self._end_mark = None
        self._pending_marks.append(mark)
        frame = Frame(b"", mark)
        self._sent.append((play_at, turn, frame))
        return frame

    def interrupt(self, now: float) -> int:
        """Barge-in: forget unsent audio; the caller's `clear` empties Twilio. Returns ms dropped."""
        dropped = len(self._buf) // 8
        self._buf.clear()
        self._flushed.update(self._pending_marks)
        self._pending_marks.clear()
        self._end_mark = None
        self._play_at = now
        self._sent.clear()
        self._paused = False  # the next turn plays as soon as it arrives
        if self.turn in self.turns:
            self.turns[self.turn].interrupted = True
        self.turn += 1
        return dropped

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self, now: float) -> None:
        """Fast barge-in: stop sending and take back what Twilio has not played yet.

        The caller sends Twilio `clear` right after this, which flushes Twilio's buffer: the
        frames whose play time (by our clock) is after `now` go back to the front of our buffer,
        in order, and their marks will echo as flushed, not heard. Their ms come off `sent_ms`,
        so resending them re-creates the same mark names at the same offsets. Twilio plays a
        little behind our clock (network delay), so the caller may miss that much at the seam.
        While paused `due()` sends nothing and `push()` keeps buffering; `resume()` goes on,
        `interrupt()` drops it all.
        """
        if self._paused:
            return
        self._paused = True
        if self._end_mark is not None and self._end_mark[3] >= now - 1e-9:
            self._end_mark = None  # its frame is taken back: resent, it is marked again
        back = [(turn, f) for play_at, turn, f in self._sent if play_at >= now - 1e-9]
        self._sent.clear()
        self._buf[:0] = b"".join(f.audio for _, f in back)
        for turn, f in back:
            if turn in self.turns:
                self.turns[turn].sent_ms -= len(f.audio) // 8
            if f.mark is not None and f.mark in self._pending_marks:
                self._pending_marks.remove(f.mark)
                self._flushed.add(f.mark)
        self._play_at = now  # Twilio's buffer is empty once `clear` lands

    def resume(self, now: float) -> None:
        """No interruption after all: the held audio plays from `now` (lead refilled at once)."""
        if not self._paused:
            return
        self._paused = False
        self._play_at = now

    def on_mark(self, name: str) -> bool:
        """A mark echo: Twilio has played everything before it (unless `clear` flushed it)."""
        if name in self._flushed:
            self._flushed.discard(name)
            return False
        if name in self._pending_marks:
            while self._pending_marks:
                if self._pending_marks.popleft() == name:
                    break
        else:
            return False
        turn_s, _, ms_s = name.removeprefix(self.mark_prefix).partition(":")
        try:
            turn, ms = int(turn_s), int(ms_s)
        except ValueError:
            return False
        rec = self.turns.setdefault(turn, TurnRecord())
        rec.heard_ms = max(rec.heard_ms, ms)
        return True

    def stream_reset(self, now: float) -> None:
        """A new Twilio socket: its buffer is empty and old marks will never echo."""
        self._pending_marks.clear()
        self._flushed.clear()
        self._sent.clear()
        self._end_mark = None
        self._play_at = now


def unsent(playouts: Iterable[Playout]) -> tuple[float, float]:
    """Assistant audio held unsent over these calls, in seconds: the total, and the most any one
    call holds (the worker's scrape-time gauges)."""
    total = most = 0.0
    for p in playouts:
        held = p.buffered_s
        total += held
        most = max(most, held)
    return total, most
