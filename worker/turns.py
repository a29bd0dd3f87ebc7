"""Caller-side turn bookkeeping, pure: keypad gathering and the end-of-speech detector.

Both run on the worker's view of the caller's audio, so the bridge can measure its own share of
voice-to-voice latency and forward keypad input the way Vapi's keypadInputPlan would.
"""

from __future__ import annotations

import audioop
from dataclasses import dataclass, field


@dataclass
class KeypadGather:
    """Digits gathered until `#` or `timeout_s` of no key, then sent as one entry (Vapi's rule)."""

    timeout_s: float = 2.0
    terminator: str = "#"
    max_digits: int = 64  # a longer entry is sent as it stands: keys pressed forever stay bounded
    _digits: list[str] = field(default_factory=list)
    _last: float = 0.0

    def press(self, digit: str, now: float) -> str | None:
        """Returns the finished entry when this key completes one."""
        if digit == self.terminator:
            return self.flush()
        self._digits.append(digit)
        self._last = now
        return self.flush() if len(self._digits) >= self.max_digits else None

    def due(self, now: float) -> str | None:
        """The entry, once the caller stopped pressing keys for `timeout_s`."""
        if self._digits and now - self._last >= self.timeout_s:
            return self.flush()
        return None

    @property
    def pending(self) -> bool:
        return bool(self._digits)

    @property
    def deadline(self) -> float:
        return self._last + self.timeout_s

    def flush(self) -> str | None:
        entry = "".join(self._digits)
        self._digits.clear()
        return entry or None


@dataclass
class SpeechEnd:
    """Energy detector on 20 ms μ-law frames: when did the caller last stop talking?

    Phone audio is band-limited and the assistant's own voice is not on this leg (Twilio sends
    only the inbound track), so a plain energy gate with a minimum duration is a fair detector of
    "caller speech ended" for latency accounting; it does not make turn-taking decisions.
    """

    threshold_dbfs: float = -40.0
    min_speech_s: float = 0.2
    _voiced_s: float = 0.0
    speaking: bool = False
    last_voiced_at: float | None = None  # time of the last voiced frame of the last utterance
    utterances: int = 0

    def __post_init__(self) -> None:
        self._threshold = int(32768 * 10 ** (self.threshold_dbfs / 20))

    def frame(self, ulaw: bytes, at: float) -> bool:
        """Feed one frame received at `at`; True when it ends an utterance (first quiet frame)."""
        voiced = audioop.rms(audioop.ulaw2lin(ulaw, 2), 2) > self._threshold if ulaw else False
        if voiced:
            self._voiced_s += len(ulaw) / 8000
            if self._voiced_s >= self.min_speech_s:
                self.speaking = True
            self.last_voiced_at = at if self.speaking else self.last_voiced_at
            return False
        self._voiced_s = 0.0
        if self.speaking:
            self.speaking = False
            self.utterances += 1
            return True
        return False
