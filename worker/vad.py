"""Fast barge-in: a local voice detector on the caller's audio pauses the assistant at once.

Vapi's `user-interrupted` arrives a few hundred ms after the caller starts talking over the bot,
and until then the caller hears the bot carry on. With fast barge-in the worker runs its own
detector on the inbound 20 ms μ-law frames, *pauses* playback (holding the audio, see
`Playout.pause`) the moment the caller starts speaking over the bot, and lets Vapi decide: if
Vapi confirms the interruption the session's normal barge-in drops the held audio; if it does not
within `confirm_window_s` (a cough, a door, "mm-hm"), the held audio resumes where it stopped.

A plain energy gate fires on every click and breath of a phone line, so the frame decision is
WebRTC's GMM voice detector (`webrtcvad-wheels`), smoothed by an N-of-M onset. webrtcvad alone
still takes breath-like noise bursts for speech (callbridge/bench_vad.py), so a frame also needs
a pitch: a barge-in starts with a voiced sound within a syllable or two. Both classes are pure:
the caller passes the frames and `now` (monotonic seconds) and acts on what they return.
"""

from __future__ import annotations

import enum
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import webrtcvad

with warnings.catch_warnings():
    # stdlib audioop warns on import in 3.11/3.12; on 3.13+ the audioop-lts package provides it.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

RATE = 8000
FRAME_S = 0.020
FRAME_BYTES = 160  # 20 ms of μ-law at 8 kHz
PITCH_LAGS = np.arange(RATE // 400, RATE // 80 + 1)  # pitch periods of 80-400 Hz, in samples


def periodicity(pcm: npt.NDArray[np.float64]) -> float:
    """Peak normalised autocorrelation over pitch lags of 80-400 Hz: ~0.7-1 for a vowel, under
    ~0.4 for white or breath-like noise. Computed by FFT (~30 µs for 40 ms of audio)."""
    y = pcm - pcm.mean()
    n = len(y)
    spec = np.fft.rfft(y, 2 * n)
    ac = np.fft.irfft(spec * spec.conj(), 2 * n)[:n]
    energy = np.cumsum(y * y)
    head = energy[n - PITCH_LAGS - 1]  # energy of y[:n-lag]
    tail = energy[-1] - energy[PITCH_LAGS - 1]  # energy of y[lag:]
    return float(np.max(ac[PITCH_LAGS] / np.sqrt(head * tail + 1e-9)))


class Action(enum.Enum):
    PAUSE = "pause"  # stop playout, hold its audio, send Twilio `clear`
    RESUME = "resume"  # no confirmation came: play the held audio


@dataclass
class VoiceDetector:
    """webrtcvad on 20 ms μ-law frames, with an N-of-M onset and a quiet-time release.

    Single-frame decisions flicker (plosives, clicks, line noise), so speech *starts* only when
    `onset_frames` of the last `window_frames` frames are voiced (4 of 6 = 80-120 ms of speech)
    and *ends* after `release_frames` unvoiced frames in a row, which bridges the short gaps
    between syllables. webrtcvad marks its first few frames voiced whatever the input, so the
    first `warmup_frames` decisions are ignored. A frame counts as voiced only if webrtcvad says
    speech and the last 40 ms have a pitch (`periodicity` >= `min_periodicity`; 0 turns this off).
    """

    aggressiveness: int = 2  # webrtcvad mode 0-3: higher rejects more noise, and more speech
    onset_frames: int = 4
    window_frames: int = 6
    release_frames: int = 10
    warmup_frames: int = 10
    min_periodicity: float = 0.4
    speaking: bool = False
    _vad: Any = field(init=False, repr=False)
    _recent: deque[bool] = field(init=False, repr=False)
    _quiet: int = field(default=0, init=False, repr=False)
    _seen: int = field(default=0, init=False, repr=False)
    _carry: bytes = field(default=b"", init=False, repr=False)
    _prev: bytes = field(default=b"", init=False, repr=False)  # last frame as PCM16

    def __post_init__(self) -> None:
        if not 1 <= self.onset_frames <= self.window_frames:
            raise ValueError("need 1 <= onset_frames <= window_frames")
        self._vad = webrtcvad.Vad(self.aggressiveness)
        self._recent = deque(maxlen=self.window_frames)

    def frame(self, ulaw: bytes) -> bool:
        """Feed caller audio (normally one 160-byte frame); True when speech starts in it.

        Other lengths are re-framed (webrtcvad accepts only whole 10/20/30 ms frames).
        """
        data = self._carry + ulaw
        whole = len(data) - len(data) % FRAME_BYTES
        self._carry = data[whole:]
        onset = False
        for i in range(0, whole, FRAME_BYTES):
            onset |= self._decide(self._voiced(data[i : i + FRAME_BYTES]))
        return onset

    def _voiced(self, ulaw: bytes) -> bool:
        pcm, prev = audioop.ulaw2lin(ulaw, 2), self._prev
        self._prev = pcm
        self._seen += 1
        if not self._vad.is_speech(pcm, RATE) or self._seen <= self.warmup_frames:
            return False
        if self.min_periodicity <= 0:
            return True
        x = np.frombuffer(prev + pcm, dtype=np.int16).astype(np.float64)
        return periodicity(x) >= self.min_periodicity

    def _decide(self, voiced: bool) -> bool:
        self._recent.append(voiced)
        self._quiet = 0 if voiced else self._quiet + 1
        if not self.speaking and sum(self._recent) >= self.onset_frames:
            self.speaking = True
            return True
        if self.speaking and self._quiet >= self.release_frames:
            self.speaking = False
            self._recent.clear()
        return False


@dataclass
class FastBargeIn:
    """Pause on local speech onset over the assistant; resume unless Vapi confirms in time.

    - `frame()` returns PAUSE on a speech onset while the assistant's audio is queued or playing
      (onsets are edges, so one utterance pauses at most once).
    - `confirmed()`: Vapi said `user-interrupted` (or `speech-update` user started). The
      session's normal barge-in drops the held audio; nothing more comes from here for this
      pause.
    - `tick()` / `frame()` return RESUME once `confirm_window_s` has passed since the pause
      without confirmation and the caller is quiet (Vapi judged it not an interruption: a cough,
      a backchannel). Resuming while the caller still talks would talk over them, but steady
      noise can look like endless speech, so after `max_hold_s` the audio resumes regardless.
    """

    detector: VoiceDetector = field(default_factory=VoiceDetector)
    confirm_window_s: float = 0.6
    max_hold_s: float = 2.0
    paused_at: float | None = None  # set while holding the assistant's audio
    _last_frame_at: float = field(default=float("-inf"), init=False, repr=False)

    @property
    def holding(self) -> bool:
        return self.paused_at is not None

    def frame(self, ulaw: bytes, now: float, assistant_active: bool) -> Action | None:
        """One inbound caller frame received at `now`."""
        onset = self.detector.frame(ulaw)
        self._last_frame_at = now
        if self.paused_at is None:
            if onset and assistant_active:
                self.paused_at = now
                return Action.PAUSE
            return None
        return self.tick(now)

    def confirmed(self) -> None:
        """Vapi confirmed the interruption: the session's barge-in takes it from here."""
        self.paused_at = None

    def deadline(self) -> float | None:
        """When `tick()` could next return RESUME without a new frame (None: not holding)."""
        if self.paused_at is None:
            return None
        quiet = self._last_frame_at + self.detector.release_frames * FRAME_S
        return max(self.paused_at + self.confirm_window_s,
                   min(self.paused_at + self.max_hold_s, quiet)) + 1e-6

    def tick(self, now: float) -> Action | None:
        """Timer path (also run per frame): RESUME when the hold has run out."""
        if self.paused_at is None:
            return None
        held = now - self.paused_at
        if held < self.confirm_window_s:
            return None
        # Frames stopped coming (stream lost)? Then nobody is talking over the bot.
        silent_for = now - self._last_frame_at
        talking = self.detector.speaking and silent_for < self.detector.release_frames * FRAME_S
        if talking and held < self.max_hold_s:
            return None
        self.paused_at = None
        return Action.RESUME
