"""Synthetic, deterministic "speech" for the simulators.

Every utterance is a steady sine tone at a frequency that names it, so a listener can tell which
utterance it heard from the dominant frequency of any 20 ms+ slice, and can check that one
utterance has no gap inside it:

| kind       | index | frequency            | label        |
|------------|-------|----------------------|--------------|
| greeting   | -     | 400 Hz               | ``greeting`` |
| goodbye    | -     | 350 Hz               | ``goodbye``  |
| say        | -     | 450 Hz               | ``say``      |
| resume     | -     | 300 Hz               | ``resume``   |
| answer     | k     | 500 + 100·(k mod 5)  | ``answer:k`` |
| caller     | k     | 1000 + 100·(k mod 6) | ``caller:k`` |

Tones are 0.3 of full scale with 5 ms raised-cosine fades at both ends (no clicks). Audio is
generated directly at the rate it is needed (16 kHz for ``pcm_s16le``/16000, 8 kHz for
``mulaw``/8000, ...), never resampled.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = [
    "AMPLITUDE",
    "FADE_S",
    "FORMATS",
    "LABELS",
    "decode",
    "dominant_frequency",
    "frame_bytes",
    "frame_samples",
    "frames",
    "frequency",
    "identify",
    "label",
    "render",
    "silence",
    "to_format",
    "utterance",
]

AMPLITUDE = 0.3
FADE_S = 0.005
FRAME_S = 0.02
FORMATS = ("pcm_s16le", "mulaw")
#: RMS of a 16-bit frame above which it counts as "voiced" (−40 dBFS).
VOICED_RMS = 32768 * 10 ** (-40 / 20)
IDENTIFY_TOLERANCE_HZ = 20.0

#: ``resume`` (the first message of a taken-over call) sits below ``goodbye`` with the same 50 Hz
#: spacing as the other fixed tones, so it is more than 2 tolerances away from every label.
_FIXED = {"greeting": 400.0, "goodbye": 350.0, "say": 450.0, "resume": 300.0}
_ANSWER_SLOTS = 5
_CALLER_SLOTS = 6


def frequency(kind: str, index: int = 0) -> float:
    """The tone frequency (Hz) of utterance ``kind``/``index``."""
    if kind == "answer":
        return 500.0 + 100.0 * (index % _ANSWER_SLOTS)
    if kind == "caller":
        return 1000.0 + 100.0 * (index % _CALLER_SLOTS)
    try:
        return _FIXED[kind]
    except KeyError:
        raise ValueError(f"unknown utterance kind {kind!r}") from None


def label(kind: str, index: int = 0) -> str:
    """The label :func:`identify` returns for utterance ``kind``/``index``."""
    if kind == "answer":
        return f"answer:{index % _ANSWER_SLOTS}"
    if kind == "caller":
        return f"caller:{index % _CALLER_SLOTS}"
    frequency(kind)  # validates the kind
    return kind


#: frequency (Hz) -> label, for every distinct utterance.
LABELS: dict[float, str] = {
    **{f: k for k, f in _FIXED.items()},
    **{frequency("answer", k): label("answer", k) for k in range(_ANSWER_SLOTS)},
    **{frequency("caller", k): label("caller", k) for k in range(_CALLER_SLOTS)},
}


@lru_cache(maxsize=512)
def utterance(kind: str, index: int, seconds: float, rate: int) -> bytes:
    """``seconds`` of the tone for ``kind``/``index`` as PCM16 LE mono at ``rate`` Hz."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    n = max(0, round(seconds * rate))
    if n == 0:
        return b""
    f = frequency(kind, index)
    t = np.arange(n, dtype=np.float64) / rate
    x = AMPLITUDE * 32767.0 * np.sin(2.0 * math.pi * f * t)
    fade = min(round(FADE_S * rate), n // 2)
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(math.pi * np.arange(fade, dtype=np.float64) / fade)
        x[:fade] *= ramp
        x[n - fade :] *= ramp[::-1]
    return np.rint(x).astype("<i2").tobytes()


def to_format(pcm16: bytes, rate: int, fmt: str, out_rate: int | None = None) -> bytes:
    """Encode PCM16 LE at ``rate`` into ``fmt`` (``pcm_s16le`` or ``mulaw``).

    Generate audio at the negotiated rate and leave ``out_rate`` unset; if ``out_rate`` differs
    from ``rate`` the audio is resampled with :func:`audioop.ratecv` (linear, one shot).
    """
    if out_rate is not None and out_rate != rate:
        pcm16, _ = audioop.ratecv(pcm16, 2, 1, rate, out_rate, None)
    if fmt == "pcm_s16le":
        return pcm16
    if fmt == "mulaw":
        return audioop.lin2ulaw(pcm16, 2)
    raise ValueError(f"unknown audio format {fmt!r}")


def decode(data: bytes, fmt: str) -> bytes:
    """Negotiated-format audio back to PCM16 LE (same rate)."""
    if fmt == "pcm_s16le":
        return data[: len(data) - (len(data) % 2)]
    if fmt == "mulaw":
        return audioop.ulaw2lin(data, 2)
    raise ValueError(f"unknown audio format {fmt!r}")


def frame_samples(rate: int) -> int:
    """Samples in one 20 ms frame at ``rate`` (rounded down)."""
    return max(1, int(rate * FRAME_S))


def frame_bytes(rate: int, fmt: str) -> int:
    """Bytes in one 20 ms frame: 640 for pcm_s16le/16000, 160 for mulaw/8000."""
    return frame_samples(rate) * (2 if fmt == "pcm_s16le" else 1)


def render(kind: str, index: int, seconds: float, rate: int, fmt: str) -> bytes:
    """The utterance in the negotiated format, generated at ``rate``."""
    return to_format(utterance(kind, index, seconds, rate), rate, fmt)


@lru_cache(maxsize=512)
def frames(kind: str, index: int, seconds: float, rate: int, fmt: str) -> tuple[bytes, ...]:
    """The utterance cut into 20 ms frames of the negotiated format (cached).

    The last frame is padded with silence to a whole frame.
    """
    pcm = utterance(kind, index, seconds, rate)
    step = frame_samples(rate) * 2
    if len(pcm) % step:
        pcm += b"\x00" * (step - len(pcm) % step)
    data = to_format(pcm, rate, fmt)
    fb = frame_bytes(rate, fmt)
    return tuple(data[i : i + fb] for i in range(0, len(data), fb))


def silence(seconds: float, rate: int, fmt: str) -> bytes:
    """Digital silence in the negotiated format."""
    return to_format(b"\x00\x00" * max(0, round(seconds * rate)), rate, fmt)


def dominant_frequency(pcm16: bytes, rate: int) -> float | None:
    """Dominant frequency (Hz) of PCM16 LE audio, or None if it is silent (< −40 dBFS RMS)."""
    n = len(pcm16) // 2
    if n < 16:
        return None
    x = np.frombuffer(pcm16[: n * 2], dtype="<i2").astype(np.float64)
    if math.sqrt(float(np.mean(x * x))) < VOICED_RMS:
        return None
    nfft = 1 << max(n, rate).bit_length()  # bins of at most 1 Hz, interpolated below
    spec = np.abs(np.fft.rfft(x * np.hanning(n), nfft))
    spec[0] = 0.0
    k = int(np.argmax(spec))
    shift = 0.0
    if 0 < k < len(spec) - 1:
        a, b, c = float(spec[k - 1]), float(spec[k]), float(spec[k + 1])
        den = a - 2.0 * b + c
        if den != 0.0:
            shift = 0.5 * (a - c) / den
    return (k + shift) * rate / nfft


def identify(pcm16: bytes, rate: int) -> str | None:
    """Which utterance this PCM16 LE audio is, by dominant frequency (±20 Hz), or None."""
    f = dominant_frequency(pcm16, rate)
    if f is None:
        return None
    best = min(LABELS, key=lambda g: abs(g - f))
    return LABELS[best] if abs(best - f) <= IDENTIFY_TOLERANCE_HZ else None
