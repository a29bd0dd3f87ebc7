"""Caller turns found by energy, the way the stand-in's assistant "hears" the caller.

Pure (no clock, no I/O): the session feeds it the received audio as 16-bit PCM and acts on the
edges it yields. Energy only on purpose: the bridge under test forwards audio, it does not judge
speech, so anything above −40 dBFS is speech and the tests control exactly what is.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from sim import voices

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

#: −40 dBFS RMS: a 20 ms window above this is "voiced".
VOICED_RMS = voices.VOICED_RMS
#: voiced audio needed before a caller turn starts (also Vapi's interruption voiceSeconds 0.2).
ONSET_MS = 200
#: unvoiced audio that ends a caller turn.
HANGOVER_MS = 400
#: an unvoiced gap this long during onset restarts the onset count.
ONSET_GAP_MS = 100


@dataclass(frozen=True, slots=True)
class TurnEdge:
    """A caller turn started (``started``) or ended; ``audio_s`` is where, in the received audio."""

    started: bool
    audio_s: float


class TurnDetector:
    """Onset/hangover detector over 20 ms windows of one call's received audio."""

    def __init__(self, sample_rate: int) -> None:
        samples = voices.frame_samples(sample_rate)
        self.window_bytes = samples * 2
        self.in_turn = False
        self._win_ms = 1000.0 * samples / sample_rate
        self._buf = bytearray()
        self._audio_ms = 0.0
        self._onset_ms = 0.0
        self._gap_ms = 0.0
        self._silence_ms = 0.0

    def feed(self, pcm: bytes) -> Iterator[TurnEdge]:
        """The edges ``pcm`` completes, in order.

        Lazy on purpose: a window is judged only when the previous edge has been acted on, so a
        caller that stops iterating (the call ended) leaves the rest of the audio unjudged.
        """
        win = self.window_bytes
        if not self._buf and len(pcm) == win:  # the usual case: one 20 ms frame, no copy
            edge = self._step(audioop.rms(pcm, 2) > VOICED_RMS)
            if edge is not None:
                yield edge
            return
        buf = self._buf
        buf += pcm
        while len(buf) >= win:
            voiced = audioop.rms(buf[:win], 2) > VOICED_RMS
            del buf[:win]
            edge = self._step(voiced)
            if edge is not None:
                yield edge

    def _step(self, voiced: bool) -> TurnEdge | None:
        ms = self._win_ms
        self._audio_ms += ms
        if not self.in_turn:
            if voiced:
                self._onset_ms += ms
                self._gap_ms = 0.0
                if self._onset_ms >= ONSET_MS - 1e-6:
                    start_ms = self._audio_ms - self._onset_ms
                    self.in_turn = True
                    self._onset_ms = self._gap_ms = self._silence_ms = 0.0
                    return TurnEdge(True, start_ms / 1000.0)
            elif self._onset_ms:
                self._gap_ms += ms
                if self._gap_ms >= ONSET_GAP_MS - 1e-6:
                    self._onset_ms = 0.0
                    self._gap_ms = 0.0
        elif voiced:
            self._silence_ms = 0.0
        else:
            self._silence_ms += ms
            if self._silence_ms >= HANGOVER_MS - 1e-6:
                end_ms = self._audio_ms - self._silence_ms
                self.in_turn = False
                self._silence_ms = 0.0
                return TurnEdge(False, end_ms / 1000.0)
        return None
