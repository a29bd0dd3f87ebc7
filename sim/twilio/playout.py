"""Twilio's outbound playout buffer for one call, as a pure model on the call clock.

Twilio does not play a gateway's `media` as it arrives: it queues the audio and plays it out at
8000 samples/s. A `mark` comes back once the audio queued before it has played (at once when
nothing is queued); a `clear` drops what has not played yet and sends every pending mark back at
once. A gateway's barge-in and pacing logic is only tested if the stand-in keeps that buffer.

Positions are sample indexes on the call clock (sample i = call time i/8000 s; one μ-law byte per
sample). The caller (`SimCall`) turns times into positions and owns the timer that echoes marks
when they fall due; this model decides what is heard and which marks are due.

Docs: docs/protocols.md, section "Twilio Media Streams", "Playout, marks and clear".
"""

from __future__ import annotations

from collections import deque

from .wire import ULAW_SILENCE

MARK_TOLERANCE = 8  # samples (1 ms): timer callbacks may fire a hair early
_SILENCE_BYTE = bytes([ULAW_SILENCE])


class Playout:
    """The buffer of one call (it outlives its streams; a new stream plays on the same clock).

    `heard` is the caller's μ-law timeline: bytes before "now" have played, bytes after it are
    queued. `enabled=False` (TwilioSim(playout_model=False)) echoes marks on arrival and lets
    `clear` drop nothing; audio still queues.
    """

    __slots__ = ("enabled", "heard", "pending", "play_end")

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.heard = bytearray()
        self.play_end = 0  # position where queued audio ends
        self.pending: deque[tuple[int, str]] = deque()  # (position it falls due, mark name)

    def heard_until(self, now_pos: int) -> bytes:
        """What has played by `now_pos`."""
        return bytes(self.heard[: min(len(self.heard), max(0, now_pos))])

    def stream_started(self, pos0: int) -> None:
        """A new stream's audio cannot play before the stream exists."""
        if pos0 > self.play_end:
            self.play_end = pos0

    def media(self, audio: bytes, now_pos: int) -> None:
        """Queue `audio`: it plays from now, or after what is already queued."""
        n = len(audio)
        if not n:
            return
        start = self.play_end if self.play_end > now_pos else now_pos
        h = self.heard
        hn = len(h)
        if hn < start:
            h += _SILENCE_BYTE * (start - hn)
        elif hn > start:
            del h[start:]
        h += audio
        self.play_end = start + n

    def take_due(self, now_pos: int) -> list[str]:
        """Pop the marks whose audio has played by `now_pos`, oldest first."""
        names: list[str] = []
        pm = self.pending
        while pm and pm[0][0] <= now_pos + MARK_TOLERANCE:
            names.append(pm.popleft()[1])
        return names

    def next_due(self) -> int | None:
        """Position at which the oldest pending mark falls due (None: nothing pending)."""
        return self.pending[0][0] if self.pending else None

    def mark(self, name: str, now_pos: int) -> list[str]:
        """A mark arrived: returns the marks to echo now (due ones, then this one if nothing is
        queued before it); otherwise it waits for the end of the queued audio."""
        names = self.take_due(now_pos)
        if not self.enabled or (not self.pending and self.play_end <= now_pos + MARK_TOLERANCE):
            names.append(name)
        else:
            self.pending.append((self.play_end, name))
        return names

    def clear(self, now_pos: int) -> tuple[int, list[str]]:
        """A `clear` arrived: drop unplayed audio. Returns (samples dropped, pending marks to
        echo at once)."""
        dropped = 0
        if self.enabled and self.play_end > now_pos:
            dropped = self.play_end - now_pos
            self._truncate(now_pos)
        names = [n for _, n in self.pending]
        self.pending.clear()
        return dropped, names

    def drop_unplayed(self, now_pos: int) -> list[str]:
        """The stream closed: its unplayed audio is never heard and its pending marks never come
        back. Returns the names of the marks dropped."""
        if self.play_end > now_pos:
            self._truncate(now_pos)
        names = [n for _, n in self.pending]
        self.pending.clear()
        return names

    def _truncate(self, now_pos: int) -> None:
        if len(self.heard) > now_pos:
            del self.heard[now_pos:]
        self.play_end = now_pos
