"""What a takeover hands the new assistant session: the history, cut where the caller stopped
hearing. Pure functions on a virtual clock."""

from __future__ import annotations

import orjson

from worker.playback import Playout
from worker.resume import CUT, Response, heard_part, history


def _play(playout: Playout, seconds: float, heard_s: float, t0: float = 0.0,
          response: Response | None = None) -> float:
    """Push `seconds` of audio, send all of it, echo the marks up to `heard_s`."""
    playout.push(b"\x7f" * int(seconds * 8000), t0)
    if response is not None:
        response.audio(playout)
    now = t0
    while not playout.idle:
        for frame in playout.due(now):
            if frame.mark:
                ms = int(frame.mark.rsplit(":", 1)[1])
                if ms <= heard_s * 1000:
                    playout.on_mark(frame.mark)
        now += 0.02
    return now


def test_a_cut_response_is_kept_as_far_as_the_caller_heard_it() -> None:
    playout = Playout(mark_prefix="3.")
    response = Response()
    response.output("Your refund of forty dollars ", playout)
    response.output("was approved yesterday and will arrive soon", playout)
    _play(playout, 4.0, heard_s=1.0, response=response)
    snap = orjson.loads(response.snapshot(playout))
    assert snap["text"].startswith("Your refund") and snap["done"] is False
    assert snap["heard_ms"] == 1000 and snap["audio_ms"] == 4000
    messages, heard_ms = history([("user", "Where is my refund?")], response.snapshot(playout))
    assert heard_ms == 1000
    assert messages[0] == {"role": "user", "content": "Where is my refund?"}
    # 13 words over 4 s, a quarter heard: the first 3 words, marked as cut.
    assert messages[-1] == {"role": "assistant", "content": "Your refund of" + CUT}


def test_a_final_transcript_the_caller_did_not_hear_in_full_is_replaced_by_what_was_heard() -> None:
    playout = Playout()
    response = Response()
    response.output("one two three four", playout)
    _play(playout, 2.0, heard_s=1.0, response=response)
    response.final("one two three four")
    transcripts = [("assistant", "Hello"), ("user", "hi"), ("assistant", "one two three four")]
    messages, heard_ms = history(transcripts, response.snapshot(playout))
    assert heard_ms == 1000
    assert [m["content"] for m in messages] == ["Hello", "hi", "one two" + CUT]


def test_a_response_heard_in_full_is_history_as_it_was() -> None:
    playout = Playout()
    response = Response()
    response.output("all of it", playout)
    _play(playout, 1.0, heard_s=1.0, response=response)
    messages, heard_ms = history([("user", "q")], response.snapshot(playout))
    assert heard_ms == 0 and messages[-1] == {"role": "assistant", "content": "all of it"}
    response.final("all of it")
    messages, _ = history([("user", "q"), ("assistant", "all of it")], response.snapshot(playout))
    assert [m["content"] for m in messages] == ["q", "all of it"], "not twice"


def test_nothing_heard_means_nothing_said() -> None:
    playout = Playout()
    response = Response()
    response.output("never reached the line", playout)
    _play(playout, 1.0, heard_s=0.0, response=response)
    messages, heard_ms = history([("user", "q")], response.snapshot(playout))
    assert messages == [{"role": "user", "content": "q"}] and heard_ms == 0


def test_a_response_counts_from_its_own_audio_not_the_turn_before() -> None:
    playout = Playout()
    response = Response()
    _play(playout, 1.0, heard_s=1.0)  # a greeting, heard in full
    response.output("the answer text", playout)  # its text arrives before its audio
    _play(playout, 2.0, heard_s=1.5, t0=5.0, response=response)
    snap = orjson.loads(response.snapshot(playout))
    assert snap["audio_ms"] == 2000 and snap["heard_ms"] == 1500, snap


def test_the_next_response_starts_after_the_caller_speaks_or_a_final_transcript() -> None:
    playout = Playout()
    response = Response()
    response.output("first", playout)
    response.user_spoke()
    response.output("second", playout)
    assert response.text == "second"
    response.final("second answer")
    response.output("third", playout)
    assert response.text == "third" and not response.done


def test_the_turn_field_is_untrusted() -> None:
    for raw in ("", "not json", "[]", '{"text": 5, "heard_ms": 1, "audio_ms": 2}',
                '{"text": "a", "heard_ms": -1, "audio_ms": 2}',
                '{"text": "a", "heard_ms": 1, "audio_ms": 0}',
                '{"text": "a", "heard_ms": true, "audio_ms": 2}',
                '{"text": " ", "heard_ms": 1, "audio_ms": 2}'):
        assert history([("user", "q")], raw) == ([{"role": "user", "content": "q"}], 0), raw
    assert history([("system", "x"), ("user", " ")], "") == ([], 0), "only user/assistant, not empty"


def test_history_keeps_the_newest_messages_within_its_bound() -> None:
    long = [("user", "x" * 5000), ("assistant", "y" * 5000), ("user", "z" * 5000)]
    messages, _ = history(long, "")
    assert [m["content"][0] for m in messages] == ["y", "z"]


def test_heard_part_spreads_words_evenly() -> None:
    assert heard_part("a b c d", 500, 1000) == "a b"
    assert heard_part("a b c d", 1000, 1000) == "a b c d"
    assert heard_part("a b c d", 100, 1000) == ""
