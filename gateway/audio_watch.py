"""What the console shows of a call's audio, from its `:in` and `:out` streams (pure).

Both directions are already in Redis as 20 ms μ-law frames: caller audio the gateway forwarded
(`:in`) and assistant audio the worker paced out (`:out`), each stamped by its writer. A viewer's
gateway reads them like any other reader (plain XREAD, no consumer group, so the call's own
readers are untouched) and needs no help from the worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.audio import ulaw_rms

CALLER, ASSISTANT = 0, 1
FRAME_BYTES = 160  # 20 ms of 8 kHz μ-law
UNDERRUN_GAP_S = 0.060  # a hole this long inside assistant speech is heard
VOICED_RMS = 180  # about -45 dBFS: quieter frames are not speech
MAX_GAP_S = 1.0  # longer: a pause between phrases, not a hole in one


def listen_frame(direction: int, audio: bytes) -> bytes:
    """One listen-in websocket message: the direction byte, then the μ-law frame."""
    return bytes((direction,)) + audio


def _dbfs(sum_sq: float, samples: int) -> float | None:
    if samples == 0:
        return None
    rms = math.sqrt(sum_sq / samples)
    return round(20 * math.log10(rms / 32768), 1) if rms >= 1 else -96.0


@dataclass
class _Side:
    frames: int = 0
    sum_sq: float = 0.0
    samples: int = 0


class AudioHealth:
    """Frames per second each way, holes in the assistant's speech and both levels, per window."""

    def __init__(self) -> None:
        self._caller = _Side()
        self._assistant = _Side()
        self.underruns = 0
        self._last_out_at: float | None = None
        self._last_out_voiced = False

    def frame(self, direction: int, audio: bytes, sent_at: float) -> None:
        """A frame seen on the call's streams; `sent_at` is its writer's stamp (seconds)."""
        if not audio or len(audio) > 8 * FRAME_BYTES:
            return
        rms = ulaw_rms(audio)
        side = self._caller if direction == CALLER else self._assistant
        side.frames += 1
        side.samples += len(audio)
        side.sum_sq += float(rms) * rms * len(audio)
        if direction != ASSISTANT:
            return
        voiced = rms >= VOICED_RMS
        if self._last_out_at is not None and voiced and self._last_out_voiced:
            gap = sent_at - self._last_out_at
            # Frames leave every 20 ms: more than UNDERRUN_GAP_S between two voiced ones is a hole.
            if UNDERRUN_GAP_S < gap < MAX_GAP_S:
                self.underruns += 1
        self._last_out_at, self._last_out_voiced = sent_at, voiced

    def window(self, seconds: float, at: float) -> dict[str, float | int | None]:
        """The figures since the last window (per second), and start a new one."""
        per = 1.0 / seconds if seconds > 0 else 0.0
        out: dict[str, float | int | None] = {
            "at": round(at, 3),
            "frames_in_per_s": round(self._caller.frames * per, 1),
            "frames_out_per_s": round(self._assistant.frames * per, 1),
            "underruns": self.underruns,
            "caller_level_dbfs": _dbfs(self._caller.sum_sq, self._caller.samples),
            "assistant_level_dbfs": _dbfs(self._assistant.sum_sq, self._assistant.samples),
        }
        self._caller, self._assistant, self.underruns = _Side(), _Side(), 0
        return out
