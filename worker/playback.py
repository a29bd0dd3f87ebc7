"""Playout pacing for one call: assistant audio leaves as 20 ms μ-law frames on a clock.

Twilio plays whatever we send in order and only `clear` can take it back, so sending Vapi's
bursts straight through would park seconds of audio in Twilio's buffer, out of reach of barge-in.
We keep only `lead` of audio ahead of real time there, and follow the audio with `mark`s named
`{turn}:{ms}` so the echoes tell us what the caller has actually heard.

Pure state machine: the caller passes `now` (monotonic seconds) and writes what `due()` returns.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

FRAME_S = 0.020
FRAME_BYTES = 160  # 20 ms of μ-law at 8 kHz
SILENCE = 0xFF


@dataclass(slots=True)
class Frame:
    audio: bytes
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

    def push(self, ulaw: bytes, now: float) -> None:
        if not ulaw:
            return
        rec = self.turns.get(self.turn)
        if not self._buf and rec is not None and rec.sent_ms and now - self._last_push > self.turn_gap_s:
            self.turn += 1
        self._buf += ulaw
        self._last_push = now
        self.turns.setdefault(self.turn, TurnRecord())

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
        """Assistant audio is queued here or still playing at Twilio."""
        return bool(self._buf) or bool(self._pending_marks) or self._play_at > now

    def due(self, now: float) -> list[Frame]:
        """Frames whose send time has come: each frame goes out `lead` before it plays."""
        out: list[Frame] = []
        if not self._buf:
            return out
        if self._play_at < now:
            self._play_at = now  # Twilio's buffer ran dry: playback restarts now
        rec = self.turns.setdefault(self.turn, TurnRecord())
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
            if rec.sent_ms // self.mark_every_ms != before // self.mark_every_ms or not self._buf:
                mark = f"{self.turn}:{rec.sent_ms}"
                self._pending_marks.append(mark)
            out.append(Frame(chunk, mark, first=before == 0))
        return out

    def interrupt(self, now: float) -> int:
        """Barge-in: forget unsent audio; the caller's `clear` empties Twilio. Returns ms dropped."""
        dropped = len(self._buf) // 8
        self._buf.clear()
        self._flushed.update(self._pending_marks)
        self._pending_marks.clear()
        self._play_at = now
        if self.turn in self.turns:
            self.turns[self.turn].interrupted = True
        self.turn += 1
        return dropped

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
        turn_s, _, ms_s = name.partition(":")
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
        self._play_at = now
