"""Benchmark and quality figures for shared.audio (run: python -m callbridge.bench_audio).

The measurement functions are also used by tests/test_audio.py, so the numbers printed
here and the thresholds asserted there come from the same code.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from shared.audio import (
    DOWNSAMPLE_DELAY_MS,
    FIR_TAPS,
    FRAME_MS,
    NTAPS,
    ULAW_FRAME_BYTES,
    UPSAMPLE_DELAY_MS,
    Downlink,
    Downsampler2x,
    Uplink,
    Upsampler2x,
    pcm16_to_ulaw,
    tone,
    ulaw_to_pcm16,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

SPEECH_TONES_HZ = (300, 700, 1100, 1500, 1900, 2300, 2700, 3100, 3400)
ALIAS_TONES_HZ = (4500, 5500, 7000)

F64 = npt.NDArray[np.float64]


def speech_signal(seconds: float, rate: int, amplitude: float = 0.45) -> npt.NDArray[np.int16]:
    """Nine telephone-band tones plus a 300→3400 Hz chirp, peak = amplitude × full scale.

    Analytic, so the same signal (up to a tiny scale difference) exists at 8 and 16 kHz.
    """
    n = round(seconds * rate)
    t = np.arange(n) / rate
    x = np.zeros(n)
    for i, f in enumerate(SPEECH_TONES_HZ):
        x += np.sin(2 * np.pi * f * t + 0.7 * i * i)  # spread phases to lower the crest factor
    f0, f1 = 300.0, 3400.0
    x += np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * seconds)))
    x *= amplitude * 32767 / np.abs(x).max()
    k = min(round(0.005 * rate), n // 2)
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)
    x[:k] *= ramp
    x[n - k :] *= ramp[::-1]
    return np.rint(x).astype(np.int16)


def _pcm(b: bytes) -> F64:
    return np.frombuffer(b, dtype="<i2").astype(np.float64)


def _power_db(num: F64, den: F64) -> float:
    return float(10 * np.log10(np.sum(num * num) / np.sum(den * den)))


def best_lag(ref: F64, out: F64, max_lag: int = 64) -> int:
    """Integer lag (out delayed relative to ref) maximising the cross-correlation."""
    n = min(ref.size, out.size) - max_lag
    scores = [float(np.dot(ref[:n], out[lag : lag + n])) for lag in range(max_lag)]
    return int(np.argmax(scores))


def frac_lag(ref: F64, out: F64, max_lag: int = 64) -> float:
    """Lag with parabolic refinement of the cross-correlation peak (for delay checks)."""
    n = min(ref.size, out.size) - max_lag
    c = np.array([float(np.dot(ref[:n], out[lag : lag + n])) for lag in range(max_lag)])
    k = int(np.argmax(c))
    if 0 < k < max_lag - 1:
        a, b, d = c[k - 1 : k + 2]
        return k + 0.5 * (a - d) / (a - 2 * b + d)
    return float(k)


def _frames(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def roundtrip_snr_db(seconds: float = 3.0) -> tuple[float, int]:
    """SNR of μ-law→Uplink(pcm)→Downlink(pcm)→μ-law against μ-law alone, and the chain lag.

    Runs frame by frame like the worker; the constant integer delay is found by
    cross-correlation and removed, so only distortion counts as noise.
    """
    ulaw = pcm16_to_ulaw(speech_signal(seconds, 8000).tobytes())
    up, down = Uplink("pcm_s16le"), Downlink("pcm_s16le")
    out = b"".join(down.convert(up.convert(f)) for f in _frames(ulaw, ULAW_FRAME_BYTES))
    ref, got = _pcm(ulaw_to_pcm16(ulaw)), _pcm(ulaw_to_pcm16(out))
    lag = best_lag(ref, got)
    n = ref.size - lag
    err = ref[:n] - got[lag:]
    return -_power_db(err, ref[:n]), lag


def alias_db(seconds: float = 2.0) -> tuple[float, float]:
    """Output/input power (dB) for 4.5+5.5+7 kHz tones at 16 kHz: (ours, audioop.ratecv)."""
    x16 = sum(tone(f, seconds, 16000, 0.25).astype(np.int32) for f in ALIAS_TONES_HZ)
    pcm = np.asarray(x16, dtype="<i2").tobytes()
    ours = _power_db(_pcm(Downsampler2x().process(pcm)), _pcm(pcm))
    theirs = _power_db(_pcm(audioop.ratecv(pcm, 2, 1, 16000, 8000, None)[0]), _pcm(pcm))
    return ours, theirs


def imaging_db(seconds: float = 2.0, via_ulaw: bool = False) -> float:
    """Energy in 4–8 kHz of the 2x-upsampled speech-band signal, relative to total (dB)."""
    pcm8 = speech_signal(seconds, 8000).tobytes()
    if via_ulaw:
        pcm8 = ulaw_to_pcm16(pcm16_to_ulaw(pcm8))
    y = _pcm(Upsampler2x().process(pcm8))
    spec = np.abs(np.fft.rfft(y * np.hanning(y.size))) ** 2
    freqs = np.fft.rfftfreq(y.size, 1 / 16000)
    return float(10 * np.log10(spec[freqs >= 4000].sum() / spec.sum()))


def measured_delays_ms(seconds: float = 2.0) -> tuple[float, float]:
    """(up, down) delay measured against the analytic signal at the other rate."""
    x8, x16 = speech_signal(seconds, 8000), speech_signal(seconds, 16000)
    up = _pcm(Upsampler2x().process(x8.tobytes()))
    down = _pcm(Downsampler2x().process(x16.tobytes()))
    up_ms = frac_lag(x16.astype(np.float64), up) / 16.0
    down_ms = frac_lag(x8.astype(np.float64), down) / 8.0
    return up_ms, down_ms


def filter_response_db() -> tuple[float, float]:
    """(worst passband deviation 0–3.4 kHz, worst stopband attenuation ≥ 4.5 kHz) of the FIR."""
    mag = np.abs(np.fft.rfft(FIR_TAPS, 32000))
    freqs = np.fft.rfftfreq(32000, 1 / 16000)
    passband = 20 * np.log10(mag[freqs <= 3400])
    stop = -20 * np.log10(mag[freqs >= 4500].max())
    return float(np.abs(passband).max()), float(stop)


def _median_us_per_frame(fn: Callable[[bytes], bytes], frames: list[bytes], reps: int) -> float:
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for f in frames:
            fn(f)
        runs.append((time.perf_counter() - t0) / len(frames) * 1e6)
    return statistics.median(runs)


def timings_us(n_frames: int = 500, reps: int = 9) -> dict[str, float]:
    """Median µs per 20 ms frame for each transcoder and format (fresh state per run)."""
    ulaw = pcm16_to_ulaw(speech_signal(n_frames * FRAME_MS / 1000, 8000).tobytes())
    pcm16 = speech_signal(n_frames * FRAME_MS / 1000, 16000).tobytes()
    ulaw_frames = _frames(ulaw, ULAW_FRAME_BYTES)
    pcm_frames = _frames(pcm16, 4 * ULAW_FRAME_BYTES)
    return {
        "uplink pcm_s16le": _median_us_per_frame(Uplink("pcm_s16le").convert, ulaw_frames, reps),
        "downlink pcm_s16le": _median_us_per_frame(Downlink("pcm_s16le").convert, pcm_frames, reps),
        "uplink mulaw": _median_us_per_frame(Uplink("mulaw").convert, ulaw_frames, reps),
        "downlink mulaw": _median_us_per_frame(Downlink("mulaw").convert, ulaw_frames, reps),
    }


def main() -> None:
    print(f"shared.audio: {NTAPS}-tap polyphase FIR, {FRAME_MS} ms frames")
    print(f"{'transcoder':<22}{'µs/frame (median of 9 × 500)':>30}")
    for name, us in timings_us().items():
        print(f"{name:<22}{us:>30.2f}")
    snr, lag = roundtrip_snr_db()
    ours, audioop_db = alias_db()
    up_ms, down_ms = measured_delays_ms()
    ripple, stop = filter_response_db()
    rows = [
        ("FIR passband ripple ≤ 3.4 kHz", f"{ripple:.3f} dB"),
        ("FIR stopband ≥ 4.5 kHz", f"-{stop:.1f} dB"),
        ("round-trip SNR vs μ-law alone", f"{snr:.1f} dB"),
        ("alias 4.5/5.5/7 kHz (ours)", f"{ours:.1f} dB"),
        ("alias (audioop.ratecv)", f"{audioop_db:.1f} dB"),
        ("imaging 4–8 kHz, clean PCM in", f"{imaging_db():.1f} dB"),
        ("imaging 4–8 kHz, μ-law in", f"{imaging_db(via_ulaw=True):.1f} dB"),
        ("delay up (filter / measured)", f"{UPSAMPLE_DELAY_MS:.3f} / {up_ms:.3f} ms"),
        ("delay down (filter / measured)", f"{DOWNSAMPLE_DELAY_MS:.3f} / {down_ms:.3f} ms"),
        ("chain lag at 8 kHz", f"{lag} samples = {lag / 8:.3f} ms"),
    ]
    print()
    for name, value in rows:
        print(f"{name:<34}{value:>20}")


if __name__ == "__main__":
    main()
