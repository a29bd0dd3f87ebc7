"""Fast barge-in: Playout.pause/resume and the local voice detector, pure and on a virtual clock."""

from __future__ import annotations

import numpy as np
import pytest

from callbridge.bench_vad import (
    F64,
    FLOOR_DBFS,
    breath,
    espeak,
    have_espeak,
    onset_s,
    pink_noise,
    run,
    to_ulaw,
    ulaw_frames,
    vowel,
    white_noise,
)
from worker.playback import FRAME_BYTES, Playout
from worker.vad import FRAME_S, Action, FastBargeIn, VoiceDetector

# Playout.pause / resume --------------------------------------------------------------------------


def numbered(frames: int, start: int = 0) -> bytes:
    """Audio whose every frame is distinguishable: a frame index in each 4-byte word."""
    return b"".join((start + i).to_bytes(4, "big") * (FRAME_BYTES // 4) for i in range(frames))


def drive(p: Playout, start: float, end: float, step: float = 0.005) -> list[tuple[float, bytes, str | None]]:
    out = []
    for i in range(round((end - start) / step) + 1):
        t = start + i * step
        out += [(t, f.audio, f.mark) for f in p.due(t)]
    return out


def test_pause_puts_unplayed_frames_back_in_order_and_resume_loses_nothing() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=100)
    audio = numbered(50)
    p.push(audio, now=0.0)
    before = drive(p, 0.0, 0.31)
    assert len(before) == 21  # frames 0..20: frame k plays at 20k ms and leaves `lead` earlier
    p.pause(now=0.31)
    assert p.paused and not p.idle
    # Frames 0..15 started playing before 0.31 s; 16..20 were only in Twilio's buffer: taken back.
    assert p.buffered_s == pytest.approx((50 - 16) * 0.02)
    assert p.turns[0].sent_ms == 16 * 20
    assert drive(p, 0.31, 1.0) == []  # nothing while paused ...
    more = numbered(10, start=50)
    p.push(more, now=0.5)  # ... but Vapi's audio keeps being buffered
    assert p.turn == 0 and p.active(1.0)
    p.resume(now=1.0)
    assert not p.paused
    after = drive(p, 1.0, 3.0)
    assert sum(1 for t, _, _ in after if t == 1.0) == 6  # the lead refills at once, then real time
    played = b"".join(a for _, a, _ in before[:16])
    assert played + b"".join(a for _, a, _ in after) == audio + more
    assert p.turns[0].sent_ms == 60 * 20


def test_marks_flushed_by_a_pause_do_not_count_as_heard() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=100)
    p.push(numbered(50), now=0.0)
    sent_marks = [m for _, _, m in drive(p, 0.0, 0.31) if m]
    assert sent_marks == ["0:100", "0:200", "0:300", "0:400"]
    p.pause(now=0.31)  # 0:400 follows frame 19 (plays at 0.38 s): flushed by `clear`
    assert p.awaiting_marks == 3
    for name in ("0:100", "0:200", "0:300"):
        assert p.on_mark(name)  # played before the pause
    assert not p.on_mark("0:400")  # Twilio's echo for the flushed mark
    assert p.turns[0].heard_ms == 300
    p.resume(now=0.5)
    resent = [m for _, _, m in drive(p, 0.5, 0.8) if m]
    assert resent[0] == "0:400"  # same offset, same name: the caller hears it this time
    assert p.on_mark("0:400") and p.turns[0].heard_ms == 400


def test_pause_with_nothing_in_flight_and_repeated_calls() -> None:
    p = Playout(lead_s=0.1)
    p.push(numbered(5), now=0.0)
    drive(p, 0.0, 1.0)
    p.pause(now=1.0)  # everything already played: nothing comes back
    p.pause(now=1.1)  # idempotent
    assert p.idle and p.paused and p.turns[0].sent_ms == 100
    p.resume(now=1.2)
    p.resume(now=1.3)
    assert not p.paused and drive(p, 1.3, 1.5) == []


def test_interrupt_while_paused_drops_everything() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=100)
    p.push(numbered(50), now=0.0)
    drive(p, 0.0, 0.31)
    p.pause(now=0.31)
    p.push(numbered(10, start=50), now=0.4)
    dropped = p.interrupt(now=0.5)
    assert dropped == (34 + 10) * 20
    assert p.idle and not p.paused and p.turns[0].interrupted and p.turn == 1
    assert not p.on_mark("0:400")  # flushed by the pause, still not heard
    # A pause right after the interrupt must not bring the dropped frames back.
    p.pause(now=0.5)
    assert p.idle
    p.resume(now=0.5)
    p.push(numbered(5), now=0.6)
    sent = drive(p, 0.6, 1.0)
    assert len(sent) == 5 and sent[-1][2] == "1:100"


# Signals -----------------------------------------------------------------------------------------

LEAD_S = 1.0  # quiet line before the caller speaks: the detector warms up


def on_line(x: F64, tail_s: float = 1.5, seed: int = 0) -> F64:
    """`x` after LEAD_S of line noise and before `tail_s` more, with the noise under it too."""
    rng = np.random.default_rng(seed)
    full = np.concatenate([np.zeros(round(LEAD_S * 8000)), x, np.zeros(round(tail_s * 8000))])
    return full + pink_noise(len(full) / 8000, FLOOR_DBFS, rng)


def feed(fb: FastBargeIn, x: F64, active: bool = True, confirm_at: float | None = None
         ) -> list[tuple[float, Action]]:
    """Frame k is complete at (k+1)·20 ms; `confirmed()` is called once at `confirm_at`."""
    out = []
    for k, frame in enumerate(ulaw_frames(to_ulaw(x))):
        now = (k + 1) * FRAME_S
        if confirm_at is not None and now >= confirm_at:
            fb.confirmed()
            confirm_at = None
        if (act := fb.frame(frame, now, active)) is not None:
            out.append((now, act))
    return out


@pytest.fixture(params=["vowel", "espeak"])
def speech(request: pytest.FixtureRequest) -> F64:
    """Half a second of speech: a synthetic vowel always, espeak-ng when it is installed."""
    if request.param == "espeak":
        if not have_espeak():
            pytest.skip("espeak-ng/sox not installed (apt-get install -y espeak-ng sox)")
        return espeak("hey wait a second")[:4000]
    return vowel(0.5, pitch_hz=140)


# FastBargeIn -------------------------------------------------------------------------------------


def test_speech_over_the_assistant_pauses_within_the_onset_window(speech: F64) -> None:
    acts = feed(FastBargeIn(), on_line(speech))
    assert acts and acts[0][1] is Action.PAUSE
    delay = acts[0][0] - LEAD_S - onset_s(speech)
    assert 0.06 <= delay <= 0.20, f"onset->PAUSE {delay * 1000:.0f} ms"  # 4 of 6 voiced frames
    assert [a for _, a in acts].count(Action.PAUSE) == 1


def test_no_pause_when_the_assistant_is_idle(speech: F64) -> None:
    assert feed(FastBargeIn(), on_line(speech), active=False) == []


def test_resume_after_the_window_once_the_caller_is_quiet(speech: F64) -> None:
    fb = FastBargeIn(confirm_window_s=0.6)
    acts = feed(fb, on_line(speech))
    assert [a for _, a in acts] == [Action.PAUSE, Action.RESUME]
    paused, resumed = acts[0][0], acts[1][0]
    speech_end = LEAD_S + len(speech) / 8000
    assert resumed >= paused + 0.6 and resumed >= speech_end
    assert resumed <= max(paused + 0.6, speech_end + 0.25) + FRAME_S  # release: 10 quiet frames
    assert not fb.holding


def test_no_resume_while_the_caller_keeps_talking() -> None:
    long_speech = vowel(1.5, pitch_hz=120)
    acts = feed(FastBargeIn(confirm_window_s=0.6), on_line(long_speech))
    assert [a for _, a in acts] == [Action.PAUSE, Action.RESUME]
    assert acts[1][0] >= LEAD_S + 1.5


def test_tick_resumes_when_inbound_frames_stop() -> None:
    fb = FastBargeIn(confirm_window_s=0.6)
    x = np.concatenate([np.zeros(8000), vowel(0.5)])  # the stream ends mid-word
    acts = feed(fb, x)
    assert [a for _, a in acts] == [Action.PAUSE]
    last = len(x) / 8000
    assert fb.tick(acts[0][0] + 0.3) is None  # inside the window
    assert fb.tick(last + 0.1) is None  # the caller may still be talking
    assert fb.tick(last + 0.25) is Action.RESUME  # no frames for a release time: quiet
    assert fb.tick(last + 1.0) is None


def test_no_resume_after_confirmation(speech: F64) -> None:
    fb = FastBargeIn()
    acts = feed(fb, on_line(speech), confirm_at=LEAD_S + 0.3)
    assert [a for _, a in acts] == [Action.PAUSE]
    assert not fb.holding and fb.tick(100.0) is None


def test_confirmation_rearms_for_the_next_utterance() -> None:
    fb = FastBargeIn()
    x = np.concatenate([vowel(0.4), np.zeros(4000), vowel(0.4)])
    acts = feed(fb, on_line(x), confirm_at=LEAD_S + 0.3)
    assert [a for _, a in acts] == [Action.PAUSE, Action.PAUSE, Action.RESUME]


@pytest.mark.parametrize("kind", ["white", "pink", "breaths"])
def test_noise_and_breaths_do_not_pause(kind: str) -> None:
    rng = np.random.default_rng(3)
    if kind == "breaths":
        x = np.concatenate([np.concatenate([breath(rng, lv), np.zeros(4000)]) for lv in (-40, -30, -25)])
        x = on_line(x)
    else:
        x = (white_noise if kind == "white" else pink_noise)(10.0, -30.0, rng)
    assert run(FastBargeIn(), x) == []


def test_steady_noise_that_looks_like_speech_is_held_at_most_max_hold() -> None:
    # Without the pitch gate, loud white noise is "speech" to webrtcvad for as long as it lasts.
    fb = FastBargeIn(VoiceDetector(min_periodicity=0.0), max_hold_s=2.0)
    acts = run(fb, white_noise(8.0, -20.0, np.random.default_rng(1)))
    assert [a for _, a in acts] == [Action.PAUSE, Action.RESUME]  # one hold, no pause storm
    assert acts[1][0] - acts[0][0] == pytest.approx(2.0, abs=FRAME_S + 1e-9)


def test_detector_reframes_odd_chunk_sizes() -> None:
    ulaw = to_ulaw(on_line(vowel(0.5)))
    whole, odd = VoiceDetector(), VoiceDetector()
    onsets_whole = [i for i, f in enumerate(ulaw_frames(ulaw)) if whole.frame(f)]
    onsets_odd = [i * 80 // 160 for i in range(0, len(ulaw) // 80) if odd.frame(ulaw[i * 80 : (i + 1) * 80])]
    assert onsets_whole == onsets_odd and len(onsets_whole) == 1


def test_detector_validates_its_onset() -> None:
    with pytest.raises(ValueError):
        VoiceDetector(onset_frames=7, window_frames=6)
