"""What the caller sent and heard, on the call clock, and the analysis tests run on it.

Both directions are μ-law byte timelines at 8 kHz indexed by call time (byte i = call time
i/8000 s; gaps are 0xFF silence), so "when did the caller hear the reply to what it said" is a
subtraction. The heard timeline is kept by the playout model (playout.py); the sent one, with the
time every frame went out, here.
"""

from __future__ import annotations

import bisect
import warnings
import wave
from array import array

import numpy as np

from .wire import FRAME_BYTES, SAMPLE_RATE

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


class SentTimeline:
    """Every media frame the caller sent: its bytes at its call-time position, and when it went
    out (call time of the ticker pass that sent it)."""

    __slots__ = ("audio", "positions", "times")

    def __init__(self) -> None:
        self.audio = bytearray()
        self.times: array[float] = array("d")
        self.positions: array[int] = array("q")

    def record(self, t: float, pos: int, frame: bytes) -> None:
        s = self.audio
        n = len(s)
        if n == pos:
            s += frame
        elif n < pos:
            s += b"\xff" * (pos - n)
            s += frame
        else:
            s[pos : pos + FRAME_BYTES] = frame
        self.times.append(t)
        self.positions.append(pos)

    def frames(self) -> list[tuple[float, int]]:
        return list(zip(self.times, self.positions, strict=True))

    def time_at(self, t: float) -> float | None:
        """When the frame holding call time `t` went out (None if no frame holds it)."""
        pos = int(t * SAMPLE_RATE)
        offs = self.positions
        i = bisect.bisect_right(offs, pos) - 1
        if i < 0 or pos >= offs[i] + FRAME_BYTES:
            return None
        return self.times[i]


def ulaw_to_pcm16(ulaw: bytes) -> bytes:
    return audioop.ulaw2lin(ulaw, 2)


def pcm16_to_ulaw(pcm16: bytes) -> bytes:
    return audioop.lin2ulaw(pcm16, 2)


def segments(ulaw: bytes, threshold: int, min_silence_s: float) -> list[tuple[float, float]]:
    """(start_s, end_s) runs of audio louder than `threshold` (|PCM16|); a run ends after at
    least `min_silence_s` of quiet. μ-law 0xFF and 0x7F both decode to 0."""
    if not ulaw:
        return []
    pcm = np.frombuffer(audioop.ulaw2lin(ulaw, 2), dtype=np.int16).astype(np.int32)
    loud = np.flatnonzero(np.abs(pcm) > threshold)
    if loud.size == 0:
        return []
    gap = round(min_silence_s * SAMPLE_RATE)
    breaks = np.flatnonzero(np.diff(loud) > gap)
    starts = np.concatenate((loud[:1], loud[breaks + 1]))
    ends = np.concatenate((loud[breaks], loud[-1:])) + 1
    sr = float(SAMPLE_RATE)
    return [(int(s) / sr, int(e) / sr) for s, e in zip(starts, ends, strict=True)]


def write_wav(path: str, sent: bytes, heard: bytes) -> None:
    """Stereo 16-bit 8 kHz WAV of two μ-law timelines: left = sent, right = heard."""
    left = np.frombuffer(audioop.ulaw2lin(sent, 2), dtype=np.int16)
    right = np.frombuffer(audioop.ulaw2lin(heard, 2), dtype=np.int16)
    n = max(left.size, right.size)
    out = np.zeros(2 * n, dtype="<i2")
    out[0 : 2 * left.size : 2] = left
    out[1 : 2 * right.size : 2] = right
    with wave.open(path, "wb") as wf:
        wf.setnchannels(2)
        wf.setsampwidth(2)
        wf.setframerate(SAMPLE_RATE)
        wf.writeframes(out.tobytes())
