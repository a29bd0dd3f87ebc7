"""False triggers and onset delay of fast barge-in (run: python -m callbridge.bench_vad).

Every clip goes through μ-law at 8 kHz and a fresh `FastBargeIn` with the assistant talking the
whole time, so each PAUSE here is one the caller would hear as the bot stopping. Speech and
backchannels come from espeak-ng (`apt-get install espeak-ng sox`); without it only the noise,
breath and synthetic-vowel rows are measured. The signal generators are shared with
tests/test_vad.py.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import statistics
import subprocess
import tempfile
import warnings
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from worker.vad import FRAME_BYTES, FRAME_S, RATE, Action, FastBargeIn, VoiceDetector

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

F64 = npt.NDArray[np.float64]

SENTENCES = (
    "Sorry, can I stop you there for a second?",
    "No, that is not what I asked for.",
    "Wait, I need to change the delivery address.",
    "Actually, could you repeat the last part?",
    "I'd like to speak to a real person please.",
    "Hold on, my card number is different.",
)
BACKCHANNELS = ("mm-hm", "uh-huh", "yeah", "ok")
VOICES = ("en-us", "en-gb", "en-us+f3", "en-us+m3")
SPEEDS = (150, 190)
SPEECH_DBFS = -26.0  # active speech level of a typical phone call
FLOOR_DBFS = -60.0  # line noise under every speech clip
LEAD_IN_S = 1.0  # quiet before each clip: the detector warms up as it would in a call


# Signals ---------------------------------------------------------------------------------------


def dbfs(x: F64) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(x**2)) + 1e-12))


def scale_to(x: F64, level_dbfs: float) -> F64:
    """Scale so the RMS over the louder half of 20 ms blocks is `level_dbfs` (an active level)."""
    n = len(x) // 160 * 160
    blocks = np.sqrt(np.mean(x[:n].reshape(-1, 160) ** 2, axis=1)) if n else np.array([1e-9])
    active = np.sort(blocks)[len(blocks) // 2 :]
    rms = float(np.sqrt(np.mean(active**2))) or 1e-9
    return x * (10 ** (level_dbfs / 20) / rms)


def white_noise(seconds: float, level_dbfs: float, rng: np.random.Generator) -> F64:
    x = rng.standard_normal(round(seconds * RATE))
    return x * 10 ** (level_dbfs / 20)


def pink_noise(seconds: float, level_dbfs: float, rng: np.random.Generator) -> F64:
    n = round(seconds * RATE)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spec), dtype=np.float64)
    f[0] = 1.0
    y = np.fft.irfft(spec / np.sqrt(f), n)
    return y / np.sqrt(np.mean(y**2)) * 10 ** (level_dbfs / 20)


def band_noise(seconds: float, lo_hz: float, hi_hz: float, rng: np.random.Generator) -> F64:
    n = round(seconds * RATE)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    spec[(f < lo_hz) | (f > hi_hz)] = 0
    y = np.fft.irfft(spec, n)
    return y / (np.sqrt(np.mean(y**2)) + 1e-12)


def breath(rng: np.random.Generator, level_dbfs: float) -> F64:
    """One breath-like burst: 200-2000 Hz noise under a 300-600 ms raised-cosine envelope."""
    seconds = float(rng.uniform(0.3, 0.6))
    x = band_noise(seconds, 200, 2000, rng)
    return scale_to(x * np.hanning(len(x)), level_dbfs)


def vowel(seconds: float, pitch_hz: float = 120.0, level_dbfs: float = SPEECH_DBFS,
          formants: tuple[tuple[float, float], ...] = ((700, 90), (1220, 110), (2600, 160)),
          syllable_s: float = 0.25) -> F64:
    """A vowel-like voiced signal: harmonics of a drifting pitch, shaped by formant resonances,
    with syllable-rate amplitude dips; what webrtcvad keys on, without espeak."""
    n = round(seconds * RATE)
    t = np.arange(n) / RATE
    f0 = pitch_hz * (1 + 0.08 * np.sin(2 * np.pi * 0.7 * t) + 0.02 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    x = np.zeros(n)
    for k in range(1, int(3400 // pitch_hz) + 1):
        fk = k * pitch_hz
        gain = sum(1 / (1 + ((fk - fc) / bw) ** 2) for fc, bw in formants) / np.sqrt(k)
        x += gain * np.sin(k * phase)
    envelope = 0.35 + 0.65 * np.sin(np.pi * (t % syllable_s) / syllable_s) ** 0.5
    ramp = np.minimum(1.0, np.minimum(t, seconds - t) / 0.02)
    return scale_to(x * envelope * np.clip(ramp, 0, 1), level_dbfs)


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


@functools.lru_cache(maxsize=256)
def _espeak(text: str, voice: str, speed: int) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp, "raw.wav"), Path(tmp, "8k.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text],
                       check=True, capture_output=True, timeout=30)
        subprocess.run(["sox", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(out)],
                       check=True, capture_output=True, timeout=30)
        with wave.open(str(out)) as w:
            return w.readframes(w.getnframes())


def espeak(text: str, voice: str = "en-us", speed: int = 170,
           level_dbfs: float = SPEECH_DBFS) -> F64:
    """`text` spoken by espeak-ng at 8 kHz, leading/trailing silence trimmed, at `level_dbfs`."""
    x = np.frombuffer(_espeak(text, voice, speed), dtype=np.int16).astype(np.float64) / 32768
    loud = np.flatnonzero(np.abs(x) > 10 ** (-50 / 20))
    if len(loud):
        x = x[loud[0] : loud[-1] + 1]
    return scale_to(x, level_dbfs)


def onset_s(x: F64, below_peak_db: float = 30.0) -> float:
    """Ground-truth speech start: the first 5 ms block within `below_peak_db` of the loudest."""
    n = len(x) // 40 * 40
    rms = np.sqrt(np.mean(x[:n].reshape(-1, 40) ** 2, axis=1))
    return float(np.argmax(rms >= rms.max() * 10 ** (-below_peak_db / 20)) * 40 / RATE)


def to_ulaw(x: F64) -> bytes:
    pcm = np.clip(np.round(x * 32768), -32768, 32767).astype("<i2").tobytes()
    return audioop.lin2ulaw(pcm, 2)


def ulaw_frames(ulaw: bytes) -> list[bytes]:
    """Whole 20 ms frames (a trailing partial frame is padded with μ-law silence)."""
    if len(ulaw) % FRAME_BYTES:
        ulaw += b"\xff" * (FRAME_BYTES - len(ulaw) % FRAME_BYTES)
    return [ulaw[i : i + FRAME_BYTES] for i in range(0, len(ulaw), FRAME_BYTES)]


# Simulation ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    aggressiveness: int
    onset_frames: int
    window_frames: int
    min_periodicity: float = 0.4

    @property
    def label(self) -> str:
        return f"{self.onset_frames}/{self.window_frames}"

    def barge_in(self) -> FastBargeIn:
        return FastBargeIn(VoiceDetector(self.aggressiveness, self.onset_frames, self.window_frames,
                                         min_periodicity=self.min_periodicity))


def run(fb: FastBargeIn, x: F64, assistant_active: bool = True) -> list[tuple[float, Action]]:
    """Feed `x` frame by frame (frame k is complete at (k+1)·20 ms); never confirms."""
    actions = []
    for k, frame in enumerate(ulaw_frames(to_ulaw(x))):
        now = (k + 1) * FRAME_S
        act = fb.frame(frame, now, assistant_active)
        if act is not None:
            actions.append((now, act))
    return actions


@dataclass
class Tally:
    clips: int = 0
    triggered: int = 0
    pauses: int = 0
    seconds: float = 0.0

    def add(self, actions: list[tuple[float, Action]], seconds: float) -> None:
        n = sum(1 for _, a in actions if a is Action.PAUSE)
        self.clips += 1
        self.triggered += n > 0
        self.pauses += n
        self.seconds += seconds

    @property
    def per_min(self) -> float:
        return self.pauses / self.seconds * 60 if self.seconds else 0.0

    @property
    def pct(self) -> float:
        return 100 * self.triggered / self.clips if self.clips else 0.0


def lead_in(rng: np.random.Generator) -> F64:
    return pink_noise(LEAD_IN_S, FLOOR_DBFS, rng)


def with_floor(x: F64, rng: np.random.Generator) -> F64:
    return np.concatenate([lead_in(rng), x + pink_noise(len(x) / RATE, FLOOR_DBFS, rng),
                           pink_noise(0.5, FLOOR_DBFS, rng)])


def noise_tally(s: Setting, kind: str, level: float, seconds: float = 30.0, clips: int = 3) -> Tally:
    t = Tally()
    gen = white_noise if kind == "white" else pink_noise
    for seed in range(clips):
        rng = np.random.default_rng(seed)
        t.add(run(s.barge_in(), gen(seconds, level, rng)), seconds)
    return t


def breath_tally(s: Setting, clips: int = 40) -> Tally:
    t = Tally()
    rng = np.random.default_rng(7)
    for i in range(clips):
        level = -40 + 15 * i / max(1, clips - 1)  # -40 .. -25 dBFS
        x = with_floor(breath(rng, level), rng)
        t.add(run(s.barge_in(), x), len(x) / RATE)
    return t


def espeak_clips(texts: tuple[str, ...]) -> Iterator[F64]:
    for text in texts:
        for voice in VOICES:
            for speed in SPEEDS:
                yield espeak(text, voice, speed)


def speech_tally(s: Setting, clips: list[F64]) -> tuple[Tally, list[float]]:
    """Detection over `clips` and onset delay (ms from the speech start to the PAUSE)."""
    t, delays = Tally(), []
    rng = np.random.default_rng(11)
    for x in clips:
        full = with_floor(x, rng)
        actions = run(s.barge_in(), full)
        t.add(actions, len(full) / RATE)
        pauses = [at for at, a in actions if a is Action.PAUSE]
        if pauses:
            delays.append((pauses[0] - LEAD_IN_S - onset_s(x)) * 1000)
    return t, delays


def pctl(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def holds_ms(actions: list[tuple[float, Action]]) -> list[float]:
    """How long each PAUSE kept the bot silent before its RESUME."""
    out, start = [], None
    for at, a in actions:
        if a is Action.PAUSE:
            start = at
        elif start is not None:
            out.append((at - start) * 1000)
            start = None
    return out


def clip_tally(s: Setting, clips: list[F64], seed: int) -> tuple[Tally, list[float]]:
    t, holds = Tally(), []
    rng = np.random.default_rng(seed)
    for x in clips:
        full = with_floor(x, rng)
        actions = run(s.barge_in(), full)
        t.add(actions, len(full) / RATE)
        holds += holds_ms(actions)
    return t, holds


def row(s: Setting, speech: list[F64], backch: list[F64]) -> str:
    white = [noise_tally(s, "white", lv).per_min for lv in (-50, -40, -30)]
    pink = [noise_tally(s, "pink", lv).per_min for lv in (-50, -40, -30)]
    br = breath_tally(s)
    bc, holds = clip_tally(s, backch, 5)
    sp, delays = speech_tally(s, speech)
    bc_cell = f"{bc.pct:4.0f}% {pctl(holds, 50):4.0f}" if backch else f"{'n/a':>10}"
    return (f"{s.aggressiveness:>4} {s.label:>5} {s.min_periodicity:>4.2f} | "
            f"{'/'.join(f'{v:.1f}' for v in white):>14} | {'/'.join(f'{v:.1f}' for v in pink):>14} | "
            f"{br.per_min:5.1f} {br.pct:4.0f}% | {bc_cell:>10} | "
            f"{sp.pct:4.0f}% {pctl(delays, 50):4.0f}/{pctl(delays, 90):<4.0f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--onsets", default="4/6,8/10",
                    help="onset settings N/M (N voiced of the last M 20 ms frames)")
    ap.add_argument("--sweep", default="4/6,8/10,12/15,16/20,20/24,25/30",
                    help="onsets for the backchannel trade-off lines")
    args = ap.parse_args(argv)

    def parse(spec: str) -> list[tuple[int, int]]:
        return [(int(n), int(m)) for n, m in (o.split("/") for o in spec.split(","))]

    if have_espeak():
        speech = list(espeak_clips(SENTENCES))
        backch = list(espeak_clips(BACKCHANNELS))
        src = (f"espeak-ng: {len(speech)} sentence clips, {len(backch)} backchannel clips "
               f"({', '.join(BACKCHANNELS)}; {len(VOICES)} voices x {len(SPEEDS)} speeds)")
    else:
        speech = [vowel(1.5, p) for p in (100, 120, 150, 180, 210)]
        backch = []
        src = "espeak-ng/sox not installed: synthetic vowels stand in for speech, no backchannels"
    print("Fast barge-in: false triggers and onset delay. Every clip is 8 kHz mu-law with the "
          "assistant talking throughout and Vapi never confirming.")
    print(f"  {src}; speech at {SPEECH_DBFS:g} dBFS over a {FLOOR_DBFS:g} dBFS pink floor.")
    print("  SHOULD pause: speech. Should NOT: noise, breaths. Backchannels arguably should not "
          "(each PAUSE costs a hold of >= confirm_window_s).")
    print("  noise: PAUSEs/min over 3x30 s at -50/-40/-30 dBFS; breath: 40 bursts at -40..-25 dBFS, "
          "PAUSEs/min and % of clips; backch: % of clips, median hold ms; speech: % detected, "
          "onset->PAUSE ms p50/p90. per=min_periodicity.")
    head = (f"{'aggr':>4} {'onset':>5} {'per':>4} | {'white /min':>14} | {'pink /min':>14} | "
            f"{'breath':>11} | {'backch':>10} | {'speech':>15}")
    print(head)
    print("-" * len(head))
    for per in (0.4, 0.0):
        for a in (1, 2, 3):
            for n, m in parse(args.onsets):
                print(row(Setting(a, n, m, per), speech, backch))
    if backch:
        print("Backchannels vs onset length (aggr 2, per 0.4): % of backchannel clips that PAUSE | "
              "speech onset->PAUSE p50 ms")
        for n, m in parse(args.sweep):
            s = Setting(2, n, m)
            bc, _ = clip_tally(s, backch, 5)
            sp, delays = speech_tally(s, speech)
            print(f"  {n:>2}/{m:<2} ({n * 20:>3} ms voiced): backch {bc.pct:3.0f}% | speech "
                  f"{sp.pct:3.0f}% detected, {pctl(delays, 50):4.0f} ms")
        durations = [len(x) / RATE * 1000 for x in backch]
        print(f"  backchannel clip length ms: median {statistics.median(durations):.0f}, "
              f"min {min(durations):.0f}, max {max(durations):.0f}")


if __name__ == "__main__":
    main()
