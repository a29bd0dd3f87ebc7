"""The playout pacer as a pure state machine on a virtual clock."""

from __future__ import annotations

import pytest

from worker.playback import FRAME_BYTES, Playout, unsent


def frames_until(
    p: Playout, start: float, end: float, step: float = 0.005
) -> list[tuple[float, bytes, str | None]]:
    out = []
    t = start
    while t <= end + 1e-9:
        for f in p.due(t):
            out.append((t, f.audio, f.mark))
        t += step
    return out


def test_burst_is_paced_with_a_fixed_lead() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=100)
    audio = bytes(range(256)) * 25 + bytes(100)  # 6500 bytes, ~0.81 s, not frame aligned
    p.push(audio, now=0.0)
    sent = frames_until(p, 0.0, 2.0)
    # Lead: 0.1 s worth (5 frames) plus the first at t=0 go out at once, then one per 20 ms.
    assert sum(1 for t, _, _ in sent if t == 0.0) == 6
    times = [t for t, _, _ in sent]
    for i, t in enumerate(times):
        assert t >= i * 0.020 - 0.1 - 1e-9, "never more than `lead` ahead of real time"
    assert all(len(a) == FRAME_BYTES for _, a, _ in sent)
    joined = b"".join(a for _, a, _ in sent)
    assert joined[: len(audio)] == audio and set(joined[len(audio):]) == {0xFF}  # tail padded with silence


def test_marks_every_interval_and_at_the_end() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=100)
    p.push(bytes(FRAME_BYTES * 12), now=0.0)  # 240 ms
    marks = [m for _, _, m in frames_until(p, 0.0, 1.0) if m]
    assert marks == ["0:100", "0:200", "0:240"]


def streamed(p: Playout, frames: int, start: float = 0.0) -> list[tuple[float, bytes, str | None]]:
    """Audio that arrives in real time, a frame every 20 ms, each sent as it comes (the buffer
    is empty after every frame), then the pacer's clock runs on for half a second."""
    out = []
    t = start
    for _ in range(frames):
        p.push(bytes(FRAME_BYTES), now=t)
        out += [(t, f.audio, f.mark) for f in p.due(t)]
        t = round(t + 0.02, 6)
    return out + frames_until(p, t, t + 0.5)


def test_audio_streamed_in_real_time_is_marked_every_interval_and_once_at_its_end() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=100)
    sent = streamed(p, 12)  # 240 ms, the buffer empty after each frame
    marks = [(t, m, a) for t, a, m in sent if m]
    assert [m for _, m, _ in marks] == ["0:100", "0:200", "0:240"]  # not one per frame
    assert [bool(a) for _, _, a in marks] == [True, True, False]  # the end mark comes alone
    last_push = 0.22
    assert marks[-1][0] >= last_push + p.tail_wait_s  # once no more audio came
    assert sum(1 for _, a, _ in sent if a) == 12
    assert p.on_mark("0:240") and p.turns[0].heard_ms == 240


def test_audio_that_goes_on_within_the_tail_wait_cancels_the_end_mark() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=1000)
    p.push(bytes(FRAME_BYTES), now=0.0)
    assert [f.mark for f in p.due(0.0)] == [None]
    assert p.active(0.035) and p.next_due(0.03) == 0.040001  # its end mark is still to come
    p.push(bytes(FRAME_BYTES), now=0.035)  # within the tail wait: the same utterance goes on
    marks = [f.mark for t in (0.035, 0.05, 0.2) for f in p.due(t) if f.mark]
    assert marks == ["0:40"] and p.on_mark("0:40") and not p.active(1.0)


def test_a_pause_takes_back_an_end_mark_whose_audio_had_not_played() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=1000)
    p.push(bytes(FRAME_BYTES * 3), now=0.0)
    assert [f.mark for f in p.due(0.0)] == [None, None, None]  # more may follow at once
    assert [(f.audio, f.mark) for f in p.due(0.05)] == [(b"", "0:60")]  # nothing did
    p.pause(0.03)  # the last frame plays 0.04-0.06: not over, so its end mark is taken back
    assert p.awaiting_marks == 0 and not p.on_mark("0:60")  # its echo is the flush's
    p.resume(0.05)
    # The frame taken back goes again, and its mark with it (no more audio is coming).
    assert [(len(f.audio), f.mark) for f in p.due(0.05)] == [(FRAME_BYTES, "0:60")]
    # A pause after the last frame began to play takes nothing back: its end mark still goes.
    q = Playout(lead_s=0.1, mark_every_ms=1000)
    q.push(bytes(FRAME_BYTES), now=0.0)
    q.due(0.0)  # plays 0.00-0.02; its end mark waits for the tail (0.04)
    q.pause(0.01)
    assert q.due(0.05) == [] and q.active(0.05)  # paused: nothing goes out
    q.resume(0.05)
    assert [(f.audio, f.mark) for f in q.due(0.05)] == [(b"", "0:20")]
    assert q.on_mark("0:20") and q.turns[0].heard_ms == 20


def test_mark_echoes_record_heard_audio() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=100)
    p.push(bytes(FRAME_BYTES * 10), now=0.0)
    frames_until(p, 0.0, 0.3)
    assert p.awaiting_marks == 2
    assert p.on_mark("0:100")
    assert p.turns[0].heard_ms == 100 and p.awaiting_marks == 1
    assert not p.on_mark("9:999")  # unknown marks are ignored
    assert p.on_mark("0:200") and p.turns[0].heard_ms == 200 and not p.active(10.0)


def test_interrupt_drops_unsent_audio_and_ignores_flushed_marks() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=100)
    p.push(bytes(FRAME_BYTES * 100), now=0.0)  # 2 s
    frames_until(p, 0.0, 0.5)
    p.on_mark("0:100")
    dropped = p.interrupt(now=0.5)
    assert dropped > 1000 and p.idle
    assert p.turns[0].interrupted and p.turn == 1
    # Twilio echoes the marks `clear` flushed: they do not count as heard.
    for name in ("0:200", "0:300", "0:400", "0:500", "0:600"):
        p.on_mark(name)
    assert p.turns[0].heard_ms == 100
    # The next turn plays normally, starting right away.
    p.push(bytes(FRAME_BYTES * 5), now=0.6)
    sent = frames_until(p, 0.6, 1.0)
    assert len(sent) == 5 and sent[-1][2] == "1:100"


def test_underrun_restarts_the_clock_instead_of_bursting() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=1000)
    p.push(bytes(FRAME_BYTES * 2), now=0.0)
    frames_until(p, 0.0, 0.1)
    p.push(bytes(FRAME_BYTES * 20), now=5.0)  # long gap: Twilio's buffer is empty again
    sent = frames_until(p, 5.0, 5.0)
    assert len(sent) == 6  # lead again, not 5 s of catch-up


def test_partial_tail_waits_briefly_for_more_audio() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=1000, tail_wait_s=0.04)
    p.push(bytes(FRAME_BYTES + 80), now=0.0)
    assert len(p.due(0.0)) == 1  # the partial frame waits
    p.push(bytes(80), now=0.01)  # the rest of it arrives
    assert [len(f.audio) for f in p.due(0.02)] == [FRAME_BYTES]
    p.push(bytes(10), now=0.03)
    assert p.due(0.05) == []
    assert len(p.due(0.08)) == 1  # padded once the wait is over


def test_a_pause_between_utterances_starts_a_new_turn() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=100)
    p.push(bytes(FRAME_BYTES * 5), now=0.0)
    frames_until(p, 0.0, 0.2)
    p.push(bytes(FRAME_BYTES * 5), now=0.1)  # still streaming the same utterance? no: buffer empty,
    assert p.turn == 0  # but the gap is short, so it is the same turn
    frames_until(p, 0.1, 0.5)
    p.push(bytes(FRAME_BYTES * 5), now=2.0)
    assert p.turn == 1
    assert p.turns[0].sent_ms == 200


def test_prebuffer_gathers_a_jitter_cushion_before_playback_starts() -> None:
    p = Playout(lead_s=0.1, mark_every_ms=1000, prebuffer_s=0.04)
    p.push(bytes(FRAME_BYTES), now=0.0)
    assert p.due(0.0) == []
    p.push(bytes(FRAME_BYTES), now=0.02)
    assert p.due(0.02) == []  # paced audio: wait the cushion out
    p.push(bytes(FRAME_BYTES), now=0.04)
    assert len(p.due(0.04)) == 3  # Twilio now holds 60 ms, 40 ms beyond the frame playing
    # Vapi is 30 ms late with the next frame (due 0.06): Twilio still has audio, no gap.
    p.push(bytes(FRAME_BYTES), now=0.09)
    # (The 30 ms without audio was long enough to mark the end of what had been sent.)
    assert p.queued_s(0.09) > 0.02 and [bool(f.audio) for f in p.due(0.09)] == [False, True]
    # A burst needs no waiting, and a lone short sound does not wait forever.
    b = Playout(prebuffer_s=0.04)
    b.push(bytes(FRAME_BYTES * 10), now=0.0)
    assert len(b.due(0.0)) == 6
    q = Playout(prebuffer_s=0.04)
    q.push(bytes(FRAME_BYTES), now=0.0)
    assert q.due(0.01) == [] and len(q.due(0.041)) == 1


def test_a_burst_beyond_the_bound_is_dropped_not_buffered() -> None:
    p = Playout(max_buffer_s=2.0)
    assert p.push(b"\x7f" * 8000, now=0.0) == 0
    assert p.push(b"\x7f" * 16000, now=0.0) == 8000, "only one more second fits"
    assert p.buffered_s == 2.0
    assert p.push(b"\x7f" * 160, now=0.0) == 160
    sent = frames_until(p, 0.0, 3.0)
    assert len(sent) == 100 and p.idle, "what was kept plays whole"


def test_marks_carry_the_owner_prefix_and_only_ours_count() -> None:
    p = Playout(mark_every_ms=100, mark_prefix="7.")
    p.push(b"\x7f" * 1600, now=0.0)
    marks = [m for _, _, m in frames_until(p, 0.0, 1.0) if m]
    assert marks == ["7.0:100", "7.0:200"]
    assert not p.on_mark("0:100") and not p.on_mark("6.0:100"), "a previous owner's echo"
    assert p.on_mark("7.0:200") and p.turns[0].heard_ms == 200


def test_unsent_sums_and_takes_the_largest_held_audio() -> None:
    """The worker's scrape-time gauges: audio not yet handed to Twilio, per call and in all."""
    idle, talking, bursting = Playout(), Playout(), Playout()
    talking.push(b"\xff" * 800, now=0.0)  # 100 ms
    bursting.push(b"\xff" * 8000, now=0.0)  # 1 s
    assert unsent([]) == (0.0, 0.0)
    assert unsent([idle, talking, bursting]) == (pytest.approx(1.1), 1.0)
    # The frame that starts playing now and the lead's worth behind it (100 ms) go at once.
    assert len(bursting.due(now=0.0)) == 6
    assert unsent([idle, talking, bursting]) == (pytest.approx(0.98), pytest.approx(0.88))
