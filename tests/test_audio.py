"""Tests for shared.audio: codec, streaming resamplers, transcoders and helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from callbridge.bench_audio import (
    alias_db,
    filter_response_db,
    imaging_db,
    measured_delays_ms,
    roundtrip_snr_db,
    speech_signal,
)
from shared.audio import (
    DOWNSAMPLE_DELAY_MS,
    FRAME_MS,
    NTAPS,
    SILENCE_FRAME,
    ULAW_FRAME_BYTES,
    ULAW_SILENCE,
    UPSAMPLE_DELAY_MS,
    Downlink,
    Downsampler2x,
    Uplink,
    Upsampler2x,
    dominant_frequency,
    pcm16_to_ulaw,
    prepare_uplinks,
    rms_dbfs,
    tone,
    ulaw_to_pcm16,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


def _pcm(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<i2")


def _test_pcm16(seconds: float, rate: int) -> bytes:
    """Speech-band signal plus loud noise bursts, so saturation is exercised too."""
    x = speech_signal(seconds, rate).astype(np.int32)
    noise = np.random.default_rng(7).integers(-32768, 32768, x.size)
    x[x.size // 3 : x.size // 3 + 400] += noise[:400]
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


def _random_chunks(data: bytes, rng: np.random.Generator, step: int, most: int) -> list[bytes]:
    """Split data at random multiples of `step` bytes, with plenty of tiny chunks."""
    chunks, i = [], 0
    while i < len(data):
        n = int(rng.choice([0, 1, 1, 2, 3, 7, int(rng.integers(1, most))])) * step
        chunks.append(data[i : i + n])
        i += n
    return chunks


# 1. μ-law codec and constants


def test_ulaw_codec_matches_audioop_and_constants() -> None:
    codes = bytes(range(256))
    assert ulaw_to_pcm16(codes) == audioop.ulaw2lin(codes, 2)
    every_int16 = np.arange(-32768, 32768, dtype="<i2").tobytes()
    assert pcm16_to_ulaw(every_int16) == audioop.lin2ulaw(every_int16, 2)
    round_trip = pcm16_to_ulaw(ulaw_to_pcm16(codes))
    assert [c for c in range(256) if round_trip[c] != c] == [0x7F]  # "−0" re-encodes as +0

    assert ULAW_SILENCE == 0xFF
    assert _pcm(ulaw_to_pcm16(bytes([ULAW_SILENCE]))).tolist() == [0]
    assert abs(int(_pcm(ulaw_to_pcm16(b"\x00"))[0])) > 30000  # 0x00 is near full scale
    assert SILENCE_FRAME == b"\xff" * 160
    assert FRAME_MS == 20
    assert ULAW_FRAME_BYTES == 8000 * FRAME_MS // 1000 == len(SILENCE_FRAME)
    assert rms_dbfs(ulaw_to_pcm16(SILENCE_FRAME)) == -120.0


# 2. Round-trip quality


def test_roundtrip_snr() -> None:
    snr, lag = roundtrip_snr_db()
    print(f"\nround-trip SNR vs μ-law alone: {snr:.1f} dB (chain lag {lag} samples at 8 kHz)")
    assert lag == NTAPS // 2 - 1
    assert snr >= 30.0


def test_frame_sizes() -> None:
    assert len(Uplink("pcm_s16le").convert(SILENCE_FRAME)) == 640
    down = Downlink("pcm_s16le")
    assert down.convert(bytes(640)) == SILENCE_FRAME
    assert down.convert(bytes(642)) == SILENCE_FRAME  # odd sample held back...
    assert down.convert(bytes(2)) == b"\xff"  # ...and used with the next one
    assert down.convert(b"\x00") == b""  # odd byte held back
    assert down.convert(b"\x00\x00\x00") == b"\xff"


def test_dc_gain_is_exactly_one() -> None:
    """Each polyphase branch sums to exactly 1, so a constant passes bit-exact."""
    up = _pcm(Upsampler2x().process(np.full(200, 1234, dtype="<i2").tobytes()))
    assert set(up[NTAPS:].tolist()) == {1234}
    down = _pcm(Downsampler2x().process(np.full(400, -4321, dtype="<i2").tobytes()))
    assert set(down[NTAPS:].tolist()) == {-4321}


# 3. Chunked == one-shot (bit-exact)

Factory = Callable[[], Callable[[bytes], bytes]]
CASES: dict[str, tuple[Factory, int, int]] = {
    # name: (factory of a convert function, input rate, chunk step in bytes)
    "Upsampler2x": (lambda: Upsampler2x().process, 8000, 2),
    "Downsampler2x": (lambda: Downsampler2x().process, 16000, 1),
    "Uplink": (lambda: Uplink("pcm_s16le").convert, 8000, 1),
    "Downlink": (lambda: Downlink("pcm_s16le").convert, 16000, 1),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_equals_one_shot(name: str, seed: int) -> None:
    factory, rate, step = CASES[name]
    data = _test_pcm16(0.7, rate)
    if name == "Uplink":
        data = pcm16_to_ulaw(data)
    chunks = _random_chunks(data, np.random.default_rng(seed), step, 700)
    assert b"".join(chunks) == data
    assert any(len(c) == step for c in chunks)
    if step == 1:
        assert any(len(c) % 2 for c in chunks)  # odd byte counts
    one_shot = factory()(data)
    convert = factory()
    chunked = b"".join(convert(c) for c in chunks)
    assert chunked == one_shot
    assert len(one_shot) > 0


def test_reset_behaves_like_a_fresh_instance() -> None:
    pcm16, ulaw = _test_pcm16(0.2, 16000), pcm16_to_ulaw(_test_pcm16(0.2, 8000))
    up, down = Uplink("pcm_s16le"), Downlink("pcm_s16le")
    up.convert(ulaw)
    down.convert(pcm16 + b"\x01")  # leaves an odd byte pending
    up.reset()
    down.reset()
    assert up.convert(ulaw) == Uplink("pcm_s16le").convert(ulaw)
    assert down.convert(pcm16) == Downlink("pcm_s16le").convert(pcm16)


# 4. No clicks at frame boundaries


def test_no_clicks_at_frame_boundaries() -> None:
    x8 = tone(1000, 1.0, 8000)
    up = Upsampler2x()
    out = np.concatenate(
        [_pcm(up.process(x8[i : i + 160].tobytes())) for i in range(0, x8.size, 160)]
    ).astype(np.int32)
    # Largest step of the continuous 1 kHz sine sampled at 16 kHz: 2·A·sin(π·f/fs).
    limit = 2 * 0.3 * 32767 * np.sin(np.pi * 1000 / 16000)
    worst = int(np.abs(np.diff(out)).max())
    assert worst <= limit * 1.01 + 4, (worst, limit)
    assert worst >= limit * 0.95  # the check is live: the tone really is there


# 5. Anti-aliasing, 6. imaging


def test_anti_aliasing() -> None:
    ours, theirs = alias_db()
    ripple, stop = filter_response_db()
    print(
        f"\nalias (4.5/5.5/7 kHz → 8 kHz): ours {ours:.1f} dB, audioop.ratecv {theirs:.1f} dB;"
        f" FIR ripple {ripple:.3f} dB ≤ 3.4 kHz, stopband -{stop:.1f} dB ≥ 4.5 kHz"
    )
    assert ours <= -30.0
    assert ripple <= 0.1
    assert stop >= 50.0


def test_imaging() -> None:
    clean, via_ulaw = imaging_db(), imaging_db(via_ulaw=True)
    print(f"\nimaging 4–8 kHz: {clean:.1f} dB (PCM in), {via_ulaw:.1f} dB (μ-law in)")
    assert clean <= -40.0
    assert via_ulaw <= -40.0


# 7. Delay


def test_group_delay() -> None:
    assert UPSAMPLE_DELAY_MS == pytest.approx((NTAPS - 1) / 2 / 16)
    assert UPSAMPLE_DELAY_MS <= 2.0
    assert DOWNSAMPLE_DELAY_MS <= 2.0
    up_ms, down_ms = measured_delays_ms()
    print(
        f"\ndelay up {UPSAMPLE_DELAY_MS:.3f} ms (measured {up_ms:.3f}),"
        f" down {DOWNSAMPLE_DELAY_MS:.3f} ms (measured {down_ms:.3f})"
    )
    assert up_ms == pytest.approx(UPSAMPLE_DELAY_MS, abs=0.05)
    assert down_ms == pytest.approx(DOWNSAMPLE_DELAY_MS, abs=0.05)
    _, lag = roundtrip_snr_db(1.0)
    assert lag / 8 == pytest.approx(UPSAMPLE_DELAY_MS + DOWNSAMPLE_DELAY_MS)


# 8. Passthrough and format validation


def test_mulaw_mode_is_passthrough() -> None:
    rng = np.random.default_rng(3)
    up, down = Uplink("mulaw"), Downlink("mulaw")
    for n in (0, 1, 159, 160, 161, 641):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert up.convert(data) == data
        assert down.convert(data) == data
    up.reset()
    down.reset()
    assert up.convert(b"\x7f" * 160) == b"\x7f" * 160, "still a passthrough after a barge-in reset"
    assert down.convert(b"\xff" * 3) == b"\xff" * 3


@pytest.mark.parametrize("cls", [Uplink, Downlink])
@pytest.mark.parametrize("fmt", ["pcm", "PCM_S16LE", "", "linear16"])
def test_unknown_format_raises(cls: type[Uplink] | type[Downlink], fmt: str) -> None:
    with pytest.raises(ValueError, match="unknown audio format"):
        cls(fmt)


def test_prepared_uplinks_are_bit_exact_across_calls() -> None:
    """One read's frames of several calls converted in one pass give exactly what each call's
    Uplink gives frame by frame, whatever the mix of calls, frame counts and odd sizes."""
    rng = np.random.default_rng(11)
    ref = [Uplink("pcm_s16le") for _ in range(4)]
    got = [Uplink("pcm_s16le") for _ in range(4)]
    for _ in range(30):
        batch = [[rng.integers(0, 256, int(rng.choice([160, 160, 80, 1])), dtype=np.uint8).tobytes()
                  for _ in range(int(rng.integers(0, 4)))] for _ in range(4)]
        prepare_uplinks(list(zip(got, batch, strict=True)))
        for r, g, frames in zip(ref, got, batch, strict=True):
            for frame in frames:
                assert g.convert(frame) == r.convert(frame)
                assert g._up is not None and g._up._hist.base is None, \
                    "the history owns its samples: a view would keep the whole read alive"


def test_prepared_uplink_gives_way_to_what_the_call_does_first() -> None:
    """What was prepared holds only from the state it was prepared in: a different frame first
    (silence fill, a held frame), or a reset (barge-in), and the Uplink converts afresh."""
    rng = np.random.default_rng(12)
    frames = [rng.integers(0, 256, 160, dtype=np.uint8).tobytes() for _ in range(3)]
    other = rng.integers(0, 256, 160, dtype=np.uint8).tobytes()
    ref, got = Uplink("pcm_s16le"), Uplink("pcm_s16le")
    prepare_uplinks([(got, frames)])
    assert got.convert(frames[0]) == ref.convert(frames[0])
    assert got.convert(other) == ref.convert(other)  # not prepared: the rest is dropped
    assert got.convert(frames[1]) == ref.convert(frames[1])
    prepare_uplinks([(got, frames)])
    got.reset()
    ref.reset()
    assert got.convert(frames[0]) == ref.convert(frames[0])
    mulaw = Uplink("mulaw")
    prepare_uplinks([(mulaw, frames), (got, [])])
    assert mulaw.convert(frames[0]) == frames[0]


def test_upsampler_rejects_partial_samples() -> None:
    with pytest.raises(ValueError, match="whole int16 samples"):
        Upsampler2x().process(b"\x00\x00\x00")


# Helpers


def test_tone_rms_and_dominant_frequency() -> None:
    x = tone(1234.5, 0.5, 16000, amplitude=0.5)
    assert x.dtype == np.int16 and x.size == 8000
    assert abs(int(x[0])) <= 1 and abs(int(x[-1])) <= 200  # faded in and out
    assert rms_dbfs(x.tobytes()) == pytest.approx(20 * np.log10(0.5 / np.sqrt(2)), abs=0.1)
    assert dominant_frequency(x.tobytes(), 16000) == pytest.approx(1234.5, abs=1.0)
    assert rms_dbfs(b"") == -120.0
    assert rms_dbfs(bytes(320)) == -120.0
    assert dominant_frequency(b"", 8000) == 0.0
    out = Downlink("pcm_s16le").convert(tone(700, 0.5, 16000).tobytes())
    assert dominant_frequency(ulaw_to_pcm16(out), 8000) == pytest.approx(700, abs=2.0)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                    reason="counts threads in /proc; OpenBLAS starts extra ones only with 2+ cores")
@pytest.mark.parametrize("entry", ["worker.main", "gateway.app", "callbridge.bench", "sim.vapi.sim"])
def test_numpy_blas_stays_on_one_thread(entry: str) -> None:
    """Importing any entry point first keeps OpenBLAS from starting (and spinning) its threads.

    The matrix product is the shape of a 100-call batched upsample, which OpenBLAS threads when
    it may; the process must still have one thread after it.
    """
    code = (
        f"import {entry}, os, numpy as np\n"
        "x = np.ones((96000, 25)); taps = np.ones((25, 2))\n"
        "for _ in range(5): np.dot(x, taps)\n"
        "print(os.environ.get('OPENBLAS_NUM_THREADS'), len(os.listdir('/proc/self/task')))\n"
    )
    env = {k: v for k, v in os.environ.items() if "NUM_THREADS" not in k}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["1", "1"], (run.stdout, run.stderr[-2000:])
