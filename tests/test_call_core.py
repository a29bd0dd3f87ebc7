"""The call state machine (worker/call.py) on a virtual clock: every path, no I/O.

A `Call` drives one CallCore: inputs at the virtual time `t`, timers run by following
`next_deadline()` exactly as the adapter does, and every command kept in order for the asserts.
Vapi's audio is μ-law (passthrough) except where conversion itself is under test, so the bytes
the caller hears can be compared with the bytes Vapi sent.
"""

from __future__ import annotations

import dataclasses
import math
import random
import warnings
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import pytest

from shared import streams as S
from shared import vapi_proto as V
from worker.call import (
    AMD_VERDICT_WAIT_S,
    MAX_BACKLOG_FRAMES,
    MESSAGE_END_WAIT_S,
    VOICEMAIL_MAX_S,
    AnsweredBy,
    ApiHangup,
    ApiSay,
    ApiTransfer,
    BadControl,
    CallConfig,
    CallCore,
    CloseVapi,
    Command,
    Done,
    Event,
    Metric,
    Phase,
    RestHangup,
    SendVapiAudio,
    SendVapiText,
    UpdateCall,
    WriteOut,
    parse_control,
)
from worker.playback import FRAME_BYTES
from worker.vad import FastBargeIn

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

CFG = CallConfig(worker_id="w-test", audio_format="mulaw", transfer_allow="+1415*",
                 unavailable_message="Sorry.")
WALL = 1_700_000_000.0  # wall clock minus monotonic, as the adapter measures it
QUIET = b"\xff" * FRAME_BYTES
T = TypeVar("T")


def numbered(frames: int, start: int = 0) -> bytes:
    """Audio whose every frame can be told apart: the frame's index in each 4-byte word."""
    return b"".join((start + i).to_bytes(4, "big") * (FRAME_BYTES // 4) for i in range(frames))


def tone(seconds: float = 0.02, hz: float = 440.0) -> bytes:
    """A loud μ-law tone (the end-of-speech detector calls it voiced)."""
    n = int(seconds * 8000)
    pcm = b"".join(int(12000 * math.sin(2 * math.pi * hz * i / 8000)).to_bytes(2, "little", signed=True)
                   for i in range(n))
    return audioop.lin2ulaw(pcm, 2)


class Call:
    def __init__(self, cfg: CallConfig = CFG, *, record: dict[str, str] | None = None, epoch: int = 1,
                 fast: FastBargeIn | None = None) -> None:
        self.t = 0.0
        self.core = CallCore(cfg, "CA1", epoch=epoch, record=record or {"status": "ringing"},
                             call_from="+15550001", call_to="+15550002", now=self.t, wall_offset=WALL,
                             fast=fast)
        self.out: list[tuple[float, Command]] = []
        self._seq = 0

    def do(self, commands: list[Command]) -> list[Command]:
        self.out += [(self.t, c) for c in commands]
        return commands

    def run_until(self, end: float) -> None:
        """Tick wherever the core asks, up to `end` (what an adapter's timer does)."""
        for _ in range(100_000):
            d = self.core.next_deadline()
            if d is None or d > end:
                break
            self.t = max(self.t, d)
            self.do(self.core.tick(self.t))
        else:
            raise AssertionError("the core keeps asking for ticks without progress")
        self.t = max(self.t, end)

    def wait(self, seconds: float) -> None:
        self.run_until(self.t + seconds)

    # Inputs at the current time.
    def start(self) -> list[Command]:
        return self.do(self.core.start(self.t))

    def connect(self) -> list[Command]:
        return self.do(self.core.vapi_connected(self.t, 0.2))

    def live(self, stream_sid: str = "MZ1") -> list[Command]:
        """start(), Vapi connected and Twilio's socket attached."""
        self.start()
        self.connect()
        return self.stream_start(stream_sid)

    def stream_start(self, stream_sid: str = "MZ1") -> list[Command]:
        return self.do(self.core.stream_start(self._id(), stream_sid, self.t, stream_sid))

    def frame(self, audio: bytes = QUIET) -> list[Command]:
        return self.do(self.core.caller_frame(self._id(), audio, self.t + WALL, self.t))

    def talk(self, frames: int, audio: bytes = QUIET) -> None:
        """Caller frames every 20 ms, timers running in between."""
        for _ in range(frames):
            self.frame(audio)
            self.wait(0.02)

    def say(self, audio: bytes) -> list[Command]:
        return self.do(self.core.vapi_audio(audio, self.t))

    def msg(self, raw: dict[str, Any]) -> list[Command]:
        return self.do(self.core.vapi_message(V.parse(orjson.dumps(raw)), self.t))

    def mark(self, name: str) -> list[Command]:
        return self.do(self.core.mark(self._id(), name, self.t))

    def echo_marks(self) -> None:
        """Twilio echoes every mark it was sent (it played them all)."""
        for m in self.marks():
            self.mark(m)

    def dtmf(self, digit: str) -> list[Command]:
        return self.do(self.core.dtmf(self._id(), digit, self.t))

    def stop(self, stream_sid: str = "MZ1") -> list[Command]:
        return self.do(self.core.stream_stop(self._id(), stream_sid, self.t))

    def detach(self, why: str = "lost", stream_sid: str = "MZ1") -> list[Command]:
        return self.do(self.core.stream_detach(self._id(), stream_sid, why, self.t))

    def ctl(self, op: dict[str, Any] | bytes) -> list[Command]:
        """A `ctl` entry of the call API, parsed as the adapter does."""
        raw = op if isinstance(op, bytes) else orjson.dumps(op)
        return self.do(self.core.control(self._id(), parse_control(raw), self.t))

    def _id(self) -> str:
        self._seq += 1
        return f"{self._seq}-0"

    # Views of what came out.
    def of(self, kind: type[T], since: float = -1.0) -> list[T]:
        return [c for t, c in self.out if isinstance(c, kind) and t >= since]

    def writes(self, kind: bytes, since: float = -1.0) -> list[WriteOut]:
        return [c for c in self.of(WriteOut, since) if c.kind == kind]

    def heard(self, since: float = -1.0) -> bytes:
        return b"".join(c.audio or b"" for c in self.writes(S.OUT_MEDIA, since))

    def marks(self) -> list[str]:
        return [c.value or "" for c in self.writes(S.OUT_MARK)]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [c.data for c in self.of(Event) if c.kind == kind]

    def kinds(self) -> list[str]:
        return [c.kind for c in self.of(Event)]

    def texts(self, since: float = -1.0) -> list[dict[str, Any]]:
        """The control messages sent to Vapi, parsed."""
        return [orjson.loads(c.text) for c in self.of(SendVapiText, since)]

    def updates(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for c in self.of(UpdateCall):
            merged.update(c.fields)
        return merged

    def index(self, pred: Any) -> int:
        return next(i for i, (_t, c) in enumerate(self.out) if pred(c))


def is_write(kind: bytes) -> Any:
    return lambda c: isinstance(c, WriteOut) and c.kind == kind


# The assistant speaks ---------------------------------------------------------------------------


def test_greeting_plays_paced_whole_and_its_mark_echoes_count_as_heard() -> None:
    call = Call()
    call.live()
    assert call.updates() == {"status": "live", "stream_sid": "MZ1"}
    assert call.events("stream-start") == [{"stream_sid": "MZ1"}]
    greeting = numbered(50)  # 1 s
    call.say(greeting)
    at_once = len(call.heard())
    assert 0 < at_once <= 8 * FRAME_BYTES, "only the lead and a prebuffer leave on arrival"
    call.wait(2.0)
    assert call.heard() == greeting, "every frame, in order, once"
    sends = [t for t, c in call.out if isinstance(c, WriteOut) and c.kind == S.OUT_MEDIA]
    for i, t in enumerate(sends):
        assert t >= i * 0.02 - 0.1 - 1e-9, "never more than the lead ahead of real time"
    assert call.marks() == [f"1.0:{ms}" for ms in range(100, 1001, 100)], "epoch-prefixed marks"
    assert not call.core.playing
    call.echo_marks()
    assert call.core.playout.turns[0].heard_ms == 1000


def test_audio_waits_for_the_stream_then_plays_at_once() -> None:
    call = Call()
    call.start()
    call.connect()
    call.say(numbered(10))
    call.wait(1.0)
    assert call.heard() == b"" and not call.core.playing, "no socket yet: held, and no ticking"
    call.stream_start()
    assert call.core.playing
    call.wait(0.5)
    assert call.heard() == numbered(10)


def test_vapi_pcm_is_converted_both_ways() -> None:
    call = Call(CallConfig(audio_format="pcm_s16le"))
    call.live()
    call.frame(QUIET)
    (sent,) = call.of(SendVapiAudio)
    assert len(sent.audio) == 4 * FRAME_BYTES, "160 μ-law bytes up to 640 bytes of 16 kHz PCM"
    call.say(b"\x00\x00" * 16000)  # 1 s of 16 kHz silence
    call.wait(2.0)
    assert len(call.heard()) == 8000 and set(call.heard()) <= {0xFF, 0x7F}


# The caller speaks ------------------------------------------------------------------------------


def test_caller_frames_reach_vapi_in_order_with_their_stamps() -> None:
    call = Call()
    call.live()
    frames = [numbered(1, start=i) for i in range(20)]
    for f in frames:
        call.frame(f)
        call.wait(0.02)
    sent = call.of(SendVapiAudio)
    assert [s.audio for s in sent] == frames
    assert all(s.sent_at is not None and abs(s.sent_at - WALL - t) < 1e-6
               for (t, c), s in zip([(t, c) for t, c in call.out if isinstance(c, SendVapiAudio)],
                                    sent, strict=True))
    assert call.core.in_pos == f"{call._seq}-0"


def test_caller_audio_before_vapi_connects_is_held_in_order_and_bounded() -> None:
    call = Call()
    call.start()
    frames = [numbered(1, start=i) for i in range(MAX_BACKLOG_FRAMES + 50)]
    for f in frames:
        call.frame(f)
    assert call.of(SendVapiAudio) == []
    dropped = [m for m in call.of(Metric) if m.name == "dropped" and m.label == "inbound_overflow"]
    assert len(dropped) == 50, "beyond 15 s the oldest audio goes"
    call.connect()
    assert [s.audio for s in call.of(SendVapiAudio)] == frames[50:], "the rest, in order, at once"
    call.frame(QUIET)
    assert call.of(SendVapiAudio)[-1].audio == QUIET, "then live frames behind them"


def test_the_end_of_the_callers_speech_to_the_first_answer_frame_is_the_turn_latency() -> None:
    call = Call()
    call.live()
    call.talk(20, tone())  # 0.4 s of speech
    voiced_until = call.t - 0.02
    call.talk(10)  # 0.2 s of quiet
    call.wait(0.3)
    call.say(numbered(10))
    (latency,) = call.events("turn-latency")
    assert latency["turn"] == 0
    assert abs(latency["ms"] - (call.t - voiced_until) * 1000) < 1.0
    assert [m.value for m in call.of(Metric) if m.name == "turn_latency"] == [
        pytest.approx(latency["ms"] / 1000, abs=1e-3)]


# Barge-in ---------------------------------------------------------------------------------------


def playing_call(seconds: float = 2.0, fast: FastBargeIn | None = None) -> tuple[Call, bytes]:
    call = Call(fast=fast)
    call.live()
    audio = numbered(int(seconds / 0.02))
    call.say(audio)
    call.wait(0.5)
    return call, audio


def test_a_hold_then_user_interrupted_drops_the_held_audio_and_the_cut_turns_late_audio() -> None:
    call, _audio = playing_call()
    call.msg({"type": "speech-update", "role": "user", "status": "started"})
    assert len(call.writes(S.OUT_CLEAR)) == 1 and call.events("hold") == [{"turn": 0}]
    held_at = call.t
    call.wait(0.2)
    assert call.heard(since=held_at) == b"", "held: nothing plays"
    call.msg({"type": "user-interrupted"})
    assert len(call.writes(S.OUT_CLEAR)) == 1, "the hold already cleared Twilio"
    (barge,) = call.events("barge-in")
    assert barge["source"] == "user-interrupted" and barge["dropped_ms"] > 1000
    late = numbered(20, start=500)  # Vapi's audio of the cut turn, still in flight
    call.say(late)
    call.wait(1.0)
    assert call.heard(since=held_at) == b"", "the cut turn's late audio is dropped"
    assert any(m.label == "stale_after_barge_in" for m in call.of(Metric))
    call.msg({"type": "speech-update", "role": "assistant", "status": "started"})
    answer = numbered(10, start=900)
    call.say(answer)
    call.wait(1.0)
    assert call.heard(since=held_at) == answer, "the next turn plays whole"
    assert call.marks()[-1] == "1.1:200"
    assert call.core.playout.turns[0].interrupted


def test_a_hold_vapi_does_not_confirm_plays_on_after_interrupt_confirm_ms() -> None:
    call, audio = playing_call()
    call.msg({"type": "speech-update", "role": "user", "status": "started"})
    held_at = call.t
    before = call.heard()
    call.run_until(held_at + CFG.interrupt_confirm_s - 0.01)
    assert call.heard(since=held_at) == b"" and call.events("hold-released") == []
    call.wait(0.02)
    assert call.events("hold-released") == [{"turn": 0}]
    call.wait(3.0)
    after = call.heard(since=held_at)
    assert audio.endswith(after) and len(before) + len(after) >= len(audio), \
        "held, not dropped: it goes on from what Twilio had not played"
    assert call.events("barge-in") == []


@dataclass
class StubDetector:
    """A voice detector that calls a tone speech: speech starts on the first loud frame."""

    speaking: bool = False
    release_frames: int = 10

    def frame(self, ulaw: bytes) -> bool:
        loud = ulaw != QUIET
        onset = loud and not self.speaking
        self.speaking = loud
        return onset


def fast() -> FastBargeIn:
    return FastBargeIn(StubDetector(), confirm_window_s=0.6, max_hold_s=2.0)  # type: ignore[arg-type]


def test_fast_barge_in_pauses_at_once_and_vapi_confirms() -> None:
    call, _audio = playing_call(fast=fast())
    call.frame(tone())
    assert call.events("fast-pause") == [{"turn": 0}] and len(call.writes(S.OUT_CLEAR)) == 1
    paused_at = call.t
    call.talk(10, tone())
    call.msg({"type": "user-interrupted"})
    call.talk(100)
    assert call.heard(since=paused_at) == b""
    assert call.events("barge-in")[0]["source"] == "user-interrupted"
    assert call.events("fast-resume") == [], "confirmed: nothing comes back"
    assert len(call.writes(S.OUT_CLEAR)) == 1


def test_fast_barge_in_resumes_when_vapi_does_not_confirm() -> None:
    call, audio = playing_call(fast=fast())
    call.frame(tone())  # a cough
    paused_at = call.t
    call.talk(50)  # quiet again
    (resume,) = [t for t, c in call.out if isinstance(c, Event) and c.kind == "fast-resume"]
    assert abs(resume - (paused_at + 0.6)) < 0.03
    call.wait(3.0)
    assert audio.endswith(call.heard(since=paused_at)), "held audio resumes where it stopped"


def test_fast_barge_in_resumes_by_the_clock_when_the_callers_frames_stop() -> None:
    call, _audio = playing_call(fast=fast())
    call.frame(tone())
    paused_at = call.t
    call.wait(1.0)  # no frames at all: nobody is talking over the assistant
    (resume,) = [t for t, c in call.out if isinstance(c, Event) and c.kind == "fast-resume"]
    assert abs(resume - (paused_at + 0.6)) < 1e-3


# Keypad and transfer ------------------------------------------------------------------------------


def test_keypad_entries_end_with_hash_or_a_pause() -> None:
    call = Call()
    call.live()
    for d in "123#":
        call.dtmf(d)
    assert [c.text for c in call.of(SendVapiText)] == [V.keypad_entry("123")]
    call.dtmf("4")
    call.wait(1.0)
    call.dtmf("5")
    pressed = call.t
    call.run_until(pressed + CFG.keypad_timeout_s - 0.01)
    assert len(call.of(SendVapiText)) == 1, "not before the pause is over"
    call.wait(0.02)
    assert [c.text for c in call.of(SendVapiText)][1] == V.keypad_entry("45")
    assert [e["digits"] for e in call.events("keypad-entry")] == ["123", "45"]
    assert len(call.events("dtmf")) == 6


def test_keypad_digits_are_bounded() -> None:
    call = Call()
    call.live()
    for _ in range(64):
        call.dtmf("1")
    assert [c.text for c in call.of(SendVapiText)] == [V.keypad_entry("1" * 64)]


def transfer(target: str) -> dict[str, Any]:
    return {"type": "tool-calls", "toolCallList": [
        {"id": "t1", "function": {"name": "transferCall", "arguments": {"destination": target}}}]}


def test_an_allowed_transfer_ends_the_call_with_the_target_after_the_last_words() -> None:
    call, audio = playing_call(1.0)
    call.msg(transfer("+14155550100"))
    assert call.events("transfer-requested") == [{"target": "+14155550100"}]
    assert call.writes(S.OUT_HANGUP) == [], "the last words play first"
    call.wait(1.0)
    call.echo_marks()
    call.wait(0.2)
    assert call.heard() == audio
    assert call.updates()["end_reason"] == "transfer" and call.updates()["transfer_to"] == "+14155550100"
    assert call.index(is_write(S.OUT_HANGUP)) > call.index(
        lambda c: c is call.writes(S.OUT_MEDIA)[-1])
    assert call.of(CloseVapi) == [CloseVapi(send_end=True)]
    call.detach("hangup")  # the gateway closed the socket: Twilio asks <Connect action>
    assert call.of(Done) == [Done(completed=True)] and call.of(RestHangup) == []
    assert call.events("call-ended")[0]["reason"] == "transfer"


def test_a_transfer_to_a_target_not_allowed_is_refused_and_the_call_goes_on() -> None:
    call = Call()
    call.live()
    call.msg(transfer("+19005550199"))
    assert call.events("transfer-refused") == [{"target": "+19005550199"}]
    assert Metric("dropped", "transfer_refused") in call.of(Metric)
    assert call.core.ending is None and call.writes(S.OUT_HANGUP) == []
    call.frame()
    assert call.of(SendVapiAudio), "the caller still reaches Vapi"


# Endings ----------------------------------------------------------------------------------------


def test_caller_hangup_tells_vapi_and_completes() -> None:
    call, _audio = playing_call()
    call.stop()
    assert call.of(CloseVapi) == [CloseVapi(send_end=True)], "Vapi gets end-call"
    assert call.of(Done) == [Done(completed=True)]
    assert call.writes(S.OUT_HANGUP) == [] and call.of(RestHangup) == []
    assert call.events("call-ended") == [{"reason": "caller-hangup", "side": "caller", "detail": ""}]
    assert call.updates()["status"] == "ended" and call.updates()["end_reason"] == "caller-hangup"
    assert call.events("assistant-turns")[0]["turns"][0]["turn"] == 0
    assert call.core.next_deadline() is None and call.frame() == []


def test_caller_hangup_during_vapi_setup_abandons_the_setup() -> None:
    call = Call()
    call.start()
    call.stop()
    assert call.of(CloseVapi) == [CloseVapi(send_end=True)] and call.of(Done) == [Done(completed=True)]
    assert call.connect() == [CloseVapi(send_end=True)], "a socket that opens after that is closed"


def test_assistant_ending_drains_the_playout_then_hangs_up() -> None:
    call, audio = playing_call(1.0)
    call.msg({"type": "status-update", "status": "ended", "endedReason": "assistant-ended-call"})
    assert call.events("vapi-ended") == [{"ended_reason": "assistant-ended-call"}]
    call.wait(1.0)
    assert call.heard() == audio and call.writes(S.OUT_HANGUP) == [], "sent, but not heard yet"
    call.echo_marks()
    call.wait(0.2)
    assert len(call.writes(S.OUT_HANGUP)) == 1
    assert call.updates()["end_reason"] == "assistant-ended" and "say" not in call.updates()
    assert float(call.updates()["ended_at"]) > WALL
    call.detach("hangup")
    assert call.of(Done) == [Done(completed=True)] and call.of(RestHangup) == []


def test_a_drain_whose_marks_never_echo_ends_after_what_was_queued_and_a_margin() -> None:
    call, _audio = playing_call(1.0)
    ended_at = call.t
    call.msg({"type": "status-update", "status": "ended"})
    call.wait(5.0)
    (hung,) = [t for t, c in call.out if isinstance(c, WriteOut) and c.kind == S.OUT_HANGUP]
    assert abs(hung - (ended_at + 0.5 + 2.0)) < 0.03, "what was still to play (0.5 s) + 2 s"


def test_no_close_from_the_gateway_falls_back_to_a_rest_hangup() -> None:
    call = Call()
    call.live()
    call.msg({"type": "status-update", "status": "ended"})
    ended_at = call.t
    assert len(call.writes(S.OUT_HANGUP)) == 1
    call.wait(CFG.hangup_grace_s + 0.1)
    (rest,) = [t for t, c in call.out if isinstance(c, RestHangup)]
    assert abs(rest - (ended_at + CFG.hangup_grace_s)) < 1e-6
    assert call.of(Done) == []
    call.do(call.core.rest_hangup_done("completed", call.t))
    assert call.events("rest-hangup") == [{"outcome": "completed"}]
    assert call.of(Done) == [Done(completed=True)]


def test_vapi_setup_failure_ends_the_call_with_the_unavailable_message() -> None:
    call = Call()
    call.start()
    call.stream_start()
    call.do(call.core.vapi_setup_failed(call.t, "vapi-rejected", "http_4xx", "HTTP 400"))
    assert Metric("vapi_error", "http_4xx") in call.of(Metric)
    fields = call.updates()
    assert fields["end_reason"] == "vapi-rejected" and fields["say"] == "Sorry."
    assert len(call.writes(S.OUT_HANGUP)) == 1 and call.of(CloseVapi)
    call.detach("hangup")
    assert call.of(Done) == [Done(completed=True)]
    assert call.events("call-ended")[0]["detail"] == "HTTP 400"


def test_vapi_setup_failure_before_any_stream_hangs_up_over_rest_after_the_grace() -> None:
    call = Call()
    call.start()
    call.do(call.core.vapi_setup_failed(call.t, "vapi-unreachable", "connect"))
    call.wait(CFG.hangup_grace_s + 0.1)
    assert len(call.of(RestHangup)) == 1


@pytest.mark.parametrize(("error", "reason"), [(False, "vapi-socket-closed"), (True, "error")])
def test_vapi_socket_closing_ends_the_call_with_the_unavailable_message(error: bool, reason: str) -> None:
    call = Call()
    call.live()
    call.do(call.core.vapi_closed(call.t, error))
    assert call.updates()["end_reason"] == reason and call.updates()["say"] == "Sorry."
    assert len(call.writes(S.OUT_HANGUP)) == 1


def test_vapi_closing_after_we_closed_it_is_not_an_ending() -> None:
    call = Call()
    call.live()
    call.stop()
    call.do(call.core.vapi_closed(call.t))
    assert call.core.ending is not None and call.core.ending.reason == "caller-hangup"
    assert len(call.of(Done)) == 1


def test_stream_lost_and_not_reattached_ends_as_stream_lost_over_rest() -> None:
    call, _audio = playing_call()
    call.detach("lost")
    lost_at = call.t
    assert call.events("stream-lost") == [{}] and not call.core.playing
    call.run_until(lost_at + CFG.reattach_timeout_s - 0.01)
    assert call.core.ending is None and call.heard(since=lost_at) == b"", "held, not played"
    call.wait(0.02)
    assert call.updates()["end_reason"] == "stream-lost"
    assert len(call.of(RestHangup)) == 1, "no socket to close: straight to REST"


def test_a_reattach_within_the_timeout_goes_on_with_the_held_audio() -> None:
    call, audio = playing_call()
    call.detach("drain")
    call.wait(3.0)
    call.say(numbered(10, start=200))
    call.stream_start("MZ2")
    back = call.t
    assert call.core.playing
    call.wait(CFG.reattach_timeout_s)
    assert call.core.ending is None
    assert call.heard(since=back).endswith(numbered(10, start=200))
    assert call.heard() == audio + numbered(10, start=200), "nothing held was lost or repeated"
    assert len(call.events("stream-start")) == 2


def test_a_stale_stop_or_detach_of_an_old_socket_is_ignored() -> None:
    call = Call()
    call.live("MZ1")
    call.detach("drain", "MZ1")
    call.stream_start("MZ2")
    call.detach("lost", "MZ1")  # the old socket's late close
    call.stop("MZ1")
    assert call.core.stream_live and call.core.ending is None
    assert len(call.events("stream-lost")) == 1
    call.wait(CFG.reattach_timeout_s + 1)
    assert call.core.ending is None


def test_a_stream_that_attaches_after_we_hung_up_is_told_again() -> None:
    call = Call()
    call.start()
    call.do(call.core.vapi_setup_failed(call.t, "vapi-error", "http_5xx"))
    call.stream_start("MZ1")
    assert len(call.writes(S.OUT_HANGUP)) == 2 and call.events("stream-start") == []


def test_a_call_that_is_already_over_is_skipped() -> None:
    call = Call(record={"status": "ended"})
    assert call.start() == [Done(completed=True)]
    assert call.frame() == [] and call.core.next_deadline() is None


def test_silence_keeps_vapi_fed_and_a_dead_gateway_counts_as_a_lost_stream() -> None:
    call = Call()
    call.live()
    call.talk(5)
    call.run_until(call.t - 0.02 + CFG.silence_fill_after_s)
    assert len(call.of(SendVapiAudio)) == 5, "nothing yet: frames can be late"
    call.wait(1.0)
    fill = [c for c in call.of(SendVapiAudio)[5:]]
    assert 45 <= len(fill) <= 51 and all(c.sent_at is None and c.audio == QUIET for c in fill)
    call.frame()
    last = call.t
    n = len(call.of(SendVapiAudio))
    call.wait(0.5)
    assert len(call.of(SendVapiAudio)) == n, "real audio stops the fill"
    call.wait(30)
    (lost,) = [t for t, c in call.out if isinstance(c, Event) and c.kind == "stream-lost"]
    assert abs(lost - (last + CFG.silence_fill_after_s + CFG.reattach_timeout_s)) < 0.05
    (ended,) = [t for t, c in call.out if isinstance(c, UpdateCall) and "end_reason" in c.fields][:1]
    assert abs(ended - (lost + CFG.reattach_timeout_s)) < 1e-6
    assert call.updates()["end_reason"] == "stream-lost"


# Takeover, progress, ownership ----------------------------------------------------------------


def takeover_record(turn: dict[str, Any] | None = None) -> dict[str, str]:
    record = {"status": "live", "stream_sid": "MZ9", "owner": "w-dead", "epoch": "2"}
    if turn is not None:
        record["turn"] = orjson.dumps(turn).decode()
    return record


def test_a_takeover_plays_at_once_and_resumes_from_what_the_caller_heard() -> None:
    cut = {"text": "one two three four five six seven eight", "heard_ms": 1000, "audio_ms": 4000,
           "done": False}
    call = Call(record=takeover_record(cut), epoch=2)
    call.start()
    assert call.events("takeover") == [{"worker": "w-test", "epoch": 2}] and call.core.stream_live
    resume = call.core.takeover_context([("assistant", "hello"), ("user", "a question")],
                                        V.AssistantModel("openai", "gpt-4o"))
    assert resume.mode == V.RESUME_SPEAK and resume.heard_ms == 1000
    assert resume.messages[-1] == {"role": "assistant", "content": "one two…"}
    call.frame(numbered(1, start=7))  # the caller talks during the setup: held
    call.connect()
    assert call.events("history-handed-over") == [{"turns": 3, "mode": "speak", "heard_ms": 1000}]
    assert [c.audio for c in call.of(SendVapiAudio)] == [numbered(1, start=7)]
    call.say(numbered(10))
    call.wait(0.5)
    assert call.heard() == numbered(10), "the socket is there: no stream-start needed"
    assert call.marks()[0].startswith("2."), "marks carry the new epoch"


def test_a_takeover_without_the_assistants_model_hands_the_history_over_as_a_note() -> None:
    call = Call(record={"status": "ringing", "epoch": "2"}, epoch=2)  # no stream attached
    call.start()
    assert call.events("takeover") == [{"worker": "w-test", "epoch": 2}] and not call.core.stream_live
    resume = call.core.takeover_context([("user", "hi"), ("assistant", "hello")], None)
    assert resume.mode == V.RESUME_WAIT
    call.frame()
    call.connect()
    sends = [c for _t, c in call.out if isinstance(c, SendVapiText | SendVapiAudio)]
    assert isinstance(sends[0], SendVapiText) and sends[0].text == V.conversation_so_far(resume.messages)
    assert isinstance(sends[1], SendVapiAudio), "the note first, then the held audio"


def test_progress_is_saved_only_when_it_changed() -> None:
    call = Call()
    call.live()
    call.talk(10)
    call.wait(0.3)
    assert [u.fields for u in call.of(UpdateCall) if "in_pos" in u.fields][-1]["in_pos"] == call.core.in_pos
    saved = len(call.of(UpdateCall))
    call.wait(2.0)
    assert len(call.of(UpdateCall)) == saved, "nothing new: nothing written"
    call.msg({"type": "model-output", "output": "Hello there"})
    call.say(numbered(25))
    call.wait(0.3)
    turns = [orjson.loads(u.fields["turn"]) for u in call.of(UpdateCall) if "turn" in u.fields]
    assert turns and turns[-1]["text"] == "Hello there" and turns[-1]["audio_ms"] == 500
    call.echo_marks()
    call.wait(0.3)
    assert orjson.loads(call.of(UpdateCall)[-1].fields["turn"])["heard_ms"] > 0
    n = len(call.of(UpdateCall))
    call.wait(1.0)
    assert len(call.of(UpdateCall)) == n
    call.do(call.core.reasserted(call.t))
    assert set(call.of(UpdateCall)[-1].fields) == {"in_pos", "turn"}, "Redis lost it: all again"


def test_after_ownership_is_lost_nothing_is_written() -> None:
    call, _audio = playing_call()
    call.core.ownership_lost()
    before = len(call.out)
    call.talk(10)
    call.msg({"type": "user-interrupted"})
    call.msg({"type": "transcript", "role": "user", "transcriptType": "final", "transcript": "hi"})
    call.do(call.core.release(call.t))
    after = [c for _t, c in call.out[before:]]
    assert not any(isinstance(c, WriteOut | UpdateCall | Event) for c in after)
    assert after[-2:] == [CloseVapi(send_end=True), Done(completed=False)]


def test_a_release_for_a_takeover_records_the_turns_but_not_an_ending() -> None:
    call, _audio = playing_call()
    call.do(call.core.release(call.t))
    assert call.events("assistant-turns") and call.events("call-ended") == []
    assert call.of(Done) == [Done(completed=False)] and "end_reason" not in call.updates()


def test_record_fields_are_what_a_restarted_redis_needs_back() -> None:
    call = Call()
    assert call.core.record_fields() == {"status": "ringing", "from": "+15550001", "to": "+15550002"}
    call.live()
    call.frame()
    assert call.core.record_fields() == {"status": "live", "stream_sid": "MZ1", "from": "+15550001",
                                         "to": "+15550002", "in_pos": call.core.in_pos}
    call.stop()
    assert call.core.record_fields()["status"] == "ended"


def test_a_burst_beyond_the_playout_bound_is_dropped_and_counted() -> None:
    call = Call()
    call.live()
    call.say(b"\x7f" * (60 * 8000 + 800))
    assert Metric("dropped", "playout_overflow", 5) in call.of(Metric)


def test_ticking_follows_the_deadlines_and_every_phase_is_reached() -> None:
    call = Call()
    assert call.core.phase is Phase.NEW
    call.start()
    assert call.core.phase is Phase.SETUP
    call.connect()
    call.stream_start()
    assert call.core.phase is Phase.CONNECTED
    call.say(numbered(20))
    call.msg({"type": "status-update", "status": "ended"})
    assert call.core.phase is Phase.DRAINING
    call.wait(6.0)
    assert call.core.phase is Phase.REST
    call.do(call.core.rest_hangup_done("already-ended", call.t))
    assert call.core.phase is Phase.DONE and call.core.next_deadline() is None


# The call API (`ctl` entries) ----------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "parsed"), [
    (b'{"op": "hangup"}', ApiHangup()),
    (b'{"op": "say", "text": "One moment"}', ApiSay("One moment", False)),
    (b'{"op": "say", "text": "Greet", "respond": true}', ApiSay("Greet", True)),
    (b'{"op": "transfer", "to": " +14155550100 "}', ApiTransfer("+14155550100")),
    (b'{"op": "answered_by", "value": "human"}', AnsweredBy("human")),
    (b'{"op": "answered_by", "value": "machine_end_beep", "policy": "message", "message": "Hi"}',
     AnsweredBy("machine_end_beep", "message", "Hi")),
    (b'{"op": "answered_by", "value": "fax", "message": ""}', AnsweredBy("fax")),
    (b'{"op": "answered_by", "value": "fax", "policy": "off"}', AnsweredBy("fax", "off")),
    (b"not json", BadControl("not_json")),
    (b"\xff\xfe", BadControl("not_json")),
    (b"[1]", BadControl("not_object")),
    (b'{"op": 1}', BadControl("no_op")),
    (b"{}", BadControl("no_op")),
    (b'{"op": "reboot"}', BadControl("unknown_op", "reboot")),
    (b'{"op": "' + b"x" * 100 + b'"}', BadControl("unknown_op", "x" * 32)),
    (b'{"op": "say"}', BadControl("bad_field", "say")),
    (b'{"op": "say", "text": "  "}', BadControl("bad_field", "say")),
    (b'{"op": "say", "text": 5}', BadControl("bad_field", "say")),
    (b'{"op": "say", "text": "hi", "respond": "yes"}', BadControl("bad_field", "say")),
    (orjson.dumps({"op": "say", "text": "x" * 2001}), BadControl("bad_field", "say")),
    (orjson.dumps({"op": "say", "text": "x" * 20_000}), BadControl("oversized")),
    (b'{"op": "transfer", "to": ["+1"]}', BadControl("bad_field", "transfer")),
    (orjson.dumps({"op": "transfer", "to": "+1" * 200}), BadControl("bad_field", "transfer")),
    (b'{"op": "answered_by", "value": ["human"]}', BadControl("bad_field", "answered_by")),
    (b'{"op": "answered_by", "value": "robot"}', BadControl("bad_field", "answered_by")),
    (b'{"op": "answered_by", "value": "human", "policy": "shout"}', BadControl("bad_field", "answered_by")),
    (b'{"op": "answered_by", "value": "human", "message": 7}', BadControl("bad_field", "answered_by")),
])
def test_control_entries_are_parsed_field_by_field(raw: bytes, parsed: object) -> None:
    assert parse_control(raw) == parsed


def test_control_parsing_never_raises() -> None:
    rng = random.Random(7)
    samples = [bytes(rng.randrange(256) for _ in range(rng.randrange(40))) for _ in range(500)]
    values: tuple[Any, ...] = (None, 1, 1.5, True, [], {}, "", "x", {"a": [1]})
    samples += [orjson.dumps({"op": op, k: v}) for op in ("say", "transfer", "answered_by")
                for k in ("text", "to", "value", "respond", "policy", "message") for v in values]
    for raw in samples:
        assert isinstance(parse_control(raw), ApiHangup | ApiSay | ApiTransfer | AnsweredBy | BadControl)


def test_a_bad_control_entry_is_counted_and_changes_nothing() -> None:
    call, audio = playing_call(1.0)
    before = len(call.out)
    call.ctl(b'{"op": "say", "text": 5}')
    pos = f"{call._seq}-0"
    assert [c for _t, c in call.out[before:]] == [
        Metric("dropped", "bad_control"),
        UpdateCall({"in_pos": pos})], "handled, and saved: a successor does not read it again"
    call.wait(1.5)
    assert call.heard() == audio and call.core.ending is None


def test_api_hangup_stops_vapi_at_once_and_hangs_up_within_a_second_of_queued_audio() -> None:
    call, _audio = playing_call(3.0)  # 2.5 s still queued
    asked = call.t
    call.ctl({"op": "hangup"})
    assert call.events("api-hangup") == [{}]
    assert call.of(CloseVapi, since=asked) == [CloseVapi(send_end=True)], "Vapi told end-call at once"
    call.wait(2.0)
    (hung,) = [t for t, c in call.out if isinstance(c, WriteOut) and c.kind == S.OUT_HANGUP]
    assert hung - asked <= 1.0 + 1e-6
    assert call.updates()["end_reason"] == "api-hangup" and "say" not in call.updates()
    call.detach("hangup")
    assert call.of(Done) == [Done(completed=True)]
    assert call.events("call-ended")[0]["reason"] == "api-hangup"
    assert call.ctl({"op": "hangup"}) == [], "the session is over"


def test_api_hangup_before_vapi_is_connected_ends_the_call_at_once() -> None:
    call = Call()
    call.start()
    call.stream_start()
    call.ctl({"op": "hangup"})
    assert call.writes(S.OUT_HANGUP) and call.updates()["end_reason"] == "api-hangup"
    assert call.of(CloseVapi) == [CloseVapi(send_end=True)], "a setup under way is given up"


def test_api_say_speaks_the_text_or_has_the_assistant_answer_it() -> None:
    call = Call()
    call.start()
    call.ctl({"op": "say", "text": "Early words"})  # before Vapi is there: sent once it is
    assert call.of(SendVapiText) == []
    call.connect()
    assert call.texts() == [{"type": "say", "content": "Early words", "endCallAfterSpoken": False}]
    call.ctl({"op": "say", "text": "The caller is a VIP", "respond": True})
    assert call.of(UpdateCall)[-1].fields["in_pos"] == call.core.in_pos, "saved at once"
    assert call.texts()[-1] == {"type": "add-message", "triggerResponseEnabled": True,
                                "message": {"role": "system", "content": "The caller is a VIP"}}
    assert call.events("api-say") == [{"text": "Early words", "respond": False},
                                      {"text": "The caller is a VIP", "respond": True}]


def test_api_transfer_takes_the_assistants_transfer_path_and_its_allow_list() -> None:
    call = Call()
    call.live()
    call.ctl({"op": "transfer", "to": "+19005550199"})
    assert call.events("api-transfer") == [{"target": "+19005550199"}]
    assert call.events("transfer-refused") == [{"target": "+19005550199"}]
    assert call.core.ending is None and call.of(CloseVapi) == []
    call.ctl({"op": "transfer", "to": "+14155550100"})
    assert call.events("transfer-requested") == [{"target": "+14155550100"}]
    assert call.of(CloseVapi) == [CloseVapi(send_end=True)]
    call.wait(0.1)
    assert call.updates()["end_reason"] == "transfer" and call.updates()["transfer_to"] == "+14155550100"
    assert call.writes(S.OUT_HANGUP)
    call.ctl({"op": "say", "text": "late"})
    assert call.events("api-say") == [], "nothing is acted on once the call is ending"


AMD = {"status": "ringing", "amd_pending": "1", "amd_policy": "message",
       "voicemail_message": "Please call us back."}


def amd_call(record: dict[str, str] | None = None, epoch: int = 1, cfg: CallConfig = CFG) -> Call:
    call = Call(cfg, record=record or AMD, epoch=epoch)
    call.live()
    return call


def test_waiting_for_the_verdict_the_assistant_starts_muted_and_a_human_hears_it_after() -> None:
    call = amd_call()
    assert call.texts()[0] == {"type": "control", "control": "mute-assistant"}, "first thing"
    greeting = numbered(50)
    call.say(greeting)  # what Vapi sends anyway (before the mute landed) is held here
    call.wait(2.0)
    assert call.heard() == b"" and not call.core.playing
    call.ctl({"op": "answered_by", "value": "human"})
    assert call.events("answered-by") == [{"value": "human", "policy": "message", "action": "unmute"}]
    assert call.texts()[-1] == {"type": "control", "control": "unmute-assistant"}
    assert call.updates()["answered_by"] == "human"
    call.wait(1.5)
    assert call.heard() == greeting, "held, not lost: the human hears all of it"


def test_with_the_hangup_policy_nothing_waits_and_a_machine_is_hung_up_on() -> None:
    call = amd_call(dict(AMD, amd_policy="hangup"))
    assert call.texts() == [], "not muted: a human hears the greeting at once"
    call.say(numbered(100))
    call.wait(0.5)
    heard = len(call.heard())
    call.ctl({"op": "answered_by", "value": "machine_start"})
    assert call.events("answered-by")[0]["action"] == "hangup"
    assert call.of(CloseVapi) == [CloseVapi(send_end=True)]
    assert call.writes(S.OUT_HANGUP), "no goodbye, no drain"
    assert call.updates()["end_reason"] == "machine" and len(call.heard()) == heard


@pytest.mark.parametrize(("op", "reason"), [
    ({"value": "fax"}, "machine"),
    ({"value": "machine_end_beep", "policy": "hangup"}, "machine"),
    ({"value": "machine_end_silence", "message": ""}, None),  # the record's message is used
])
def test_fax_or_a_machine_under_hangup_ends_the_call(op: dict[str, str], reason: str | None) -> None:
    call = amd_call()
    call.ctl({"op": "answered_by", **op})
    if reason is None:
        assert call.events("answered-by")[0]["action"] == "voicemail"
    else:
        assert call.updates()["end_reason"] == reason and call.writes(S.OUT_HANGUP)


@pytest.mark.parametrize("op", [{"value": "fax"}, {"value": "machine_end_beep", "policy": "off"}])
def test_without_a_policy_or_with_off_a_verdict_changes_nothing(op: dict[str, str]) -> None:
    call, audio = playing_call(1.0)
    call.ctl({"op": "answered_by", **op})
    (verdict,) = call.events("answered-by")
    assert verdict["action"] == "none" and verdict["policy"] == "off"
    call.wait(1.5)
    assert call.heard() == audio and call.core.ending is None and call.of(SendVapiText) == []


def test_a_machine_under_the_message_policy_without_a_message_is_hung_up_on() -> None:
    call = amd_call(dict(AMD, voicemail_message=""))
    call.ctl({"op": "answered_by", "value": "machine_end_beep"})
    assert call.updates()["end_reason"] == "machine"


def test_the_message_policy_mutes_at_machine_start_and_leaves_the_message_at_the_beep() -> None:
    call = amd_call(dict(AMD, amd_pending="0"))  # not muted from the start
    assert call.texts() == []
    greeting = numbered(100)
    call.say(greeting)
    call.wait(0.5)
    call.ctl({"op": "answered_by", "value": "machine_start"})
    assert call.events("answered-by")[-1]["action"] == "wait"
    assert call.texts() == [{"type": "control", "control": "mute-assistant"}]
    assert call.writes(S.OUT_CLEAR), "what Twilio had not played is taken back"
    muted_at = call.t
    call.wait(3.0)
    assert call.heard(since=muted_at + 0.01) == b""
    beep = call.t
    call.ctl({"op": "answered_by", "value": "machine_end_beep"})
    assert call.events("answered-by")[-1] == {"value": "machine_end_beep", "policy": "message",
                                               "action": "voicemail"}
    assert call.texts(since=beep) == [
        {"type": "say", "content": "Please call us back.", "endCallAfterSpoken": True,
         "interruptAssistantEnabled": True},
        {"type": "control", "control": "unmute-assistant"}], "the say first: no greeting plays on"
    call.say(numbered(10, start=500))  # the greeting's tail, before Vapi took the say: dropped
    call.wait(0.2)
    assert call.heard(since=beep) == b""
    call.msg({"type": "speech-update", "role": "assistant", "status": "started"})
    message = numbered(50, start=1000)
    call.say(message)
    call.msg({"type": "speech-update", "role": "user", "status": "started"})  # the machine hums
    assert call.events("hold") == [], "a voicemail message plays whole"
    call.msg({"type": "status-update", "status": "ended",
              "endedReason": "assistant-ended-call-after-message-spoken"})
    assert call.writes(S.OUT_HANGUP) == [], "the message plays out first"
    call.wait(1.2)
    call.echo_marks()
    call.wait(0.1)
    assert call.heard(since=beep) == message
    assert call.updates()["end_reason"] == "voicemail" and "say" not in call.updates()
    assert call.writes(S.OUT_HANGUP)
    call.detach("hangup")
    assert call.events("call-ended")[0]["reason"] == "voicemail"


def test_vapi_closing_while_the_message_is_left_ends_as_voicemail_without_an_apology() -> None:
    call = amd_call()
    call.ctl({"op": "answered_by", "value": "machine_end_other"})
    call.do(call.core.vapi_closed(call.t))
    call.wait(0.1)
    assert call.updates()["end_reason"] == "voicemail" and "say" not in call.updates()


def test_a_vapi_that_never_ends_after_the_message_is_ended_by_us() -> None:
    # (a caller that sends nothing would end as stream-lost first: not what is under test here)
    call = amd_call(cfg=dataclasses.replace(CFG, reattach_timeout_s=1000.0))
    call.ctl({"op": "answered_by", "value": "machine_end_other"})
    call.wait(VOICEMAIL_MAX_S - 1)
    assert call.core.ending is None
    call.wait(1.1)
    assert call.updates()["end_reason"] == "voicemail" and call.of(CloseVapi)


def test_no_verdict_in_time_unmutes_and_no_beep_in_time_leaves_the_message_anyway() -> None:
    call = amd_call(cfg=dataclasses.replace(CFG, reattach_timeout_s=1000.0))
    call.wait(AMD_VERDICT_WAIT_S + 0.1)
    assert call.events("amd-timeout") == [{"waited": "verdict"}]
    assert call.texts()[-1] == {"type": "control", "control": "unmute-assistant"}
    call = amd_call(dict(AMD, voicemail_message=""), cfg=dataclasses.replace(CFG, reattach_timeout_s=1000.0))
    call.ctl({"op": "answered_by", "value": "machine_start", "message": "From the verdict."})
    call.wait(MESSAGE_END_WAIT_S + 0.1)
    assert call.events("amd-timeout") == [{"waited": "message-end"}]
    assert call.texts()[-2]["content"] == "From the verdict." and call.core.ending is None


def test_a_takeover_keeps_waiting_for_the_beep_or_leaves_the_message_again() -> None:
    waiting = amd_call(dict(AMD, answered_by="machine_start", stream_sid="MZ1"), epoch=2)
    assert waiting.texts()[0] == {"type": "control", "control": "mute-assistant"}
    leaving = amd_call(dict(AMD, answered_by="machine_end_beep", stream_sid="MZ1"), epoch=2)
    assert leaving.texts()[0]["type"] == "say" and leaving.texts()[0]["endCallAfterSpoken"] is True
    human = amd_call(dict(AMD, answered_by="human"), epoch=2)
    assert human.texts() == []


def test_an_api_hangup_while_muted_drops_the_held_audio() -> None:
    call = amd_call()
    call.say(numbered(100))
    call.ctl({"op": "hangup"})
    call.wait(0.1)
    assert call.heard() == b"" and call.writes(S.OUT_HANGUP)
