"""The console's pure parts (feed entries, row merging, the per-viewer bound, SSE framing, audio
health, listen-in frames) and the list's hub on a real Redis, in process."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.audio_watch import ASSISTANT, CALLER, AudioHealth, listen_frame
from gateway.feed import FeedEntry, FeedHub, Viewer, merge, parse_entry, sse
from shared import streams as S
from shared.audio import pcm16_to_ulaw, tone

SID = "CA" + "1f" * 16


def row(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"call_sid": SID, "status": "live", "worker": "w1", "end_reason": None,
                               "answered_by": None, "last_turn_ms": None, "barge_ins": 0}
    return {**base, **over}


def test_feed_entries_are_checked_field_by_field() -> None:
    good = S.feed_entry("turn-latency", SID, orjson.dumps({"ms": 812.5}))
    assert parse_entry(good) == FeedEntry(SID, "turn-latency", {"ms": 812.5})
    assert parse_entry(S.feed_entry("call-ended", SID)) == FeedEntry(SID, "call-ended", {})
    for bad in (S.feed_entry("transcript", SID),  # not a feed kind: transcripts stay per call
                S.feed_entry("turn-latency", "CA123"),  # not a CallSid
                S.feed_entry("turn-latency", "CA/" + SID[3:]),
                {b"k": b"turn-latency"}, {}):
        assert parse_entry(bad) is None, bad
    # A value that is not a JSON object is dropped, the entry kept.
    for value in (b"[1]", b"{bad", b"x" * 70_000):
        assert parse_entry({**good, b"v": value}) == FeedEntry(SID, "turn-latency", {})


def test_merge_applies_what_the_entry_says_and_an_ended_call_stays_ended() -> None:
    e = lambda kind, **data: FeedEntry(SID, kind, data)  # noqa: E731
    assert merge(row(status="queued"), e("ringing"))["status"] == "ringing"
    assert merge(row(status="ringing"), e("stream-start"))["status"] == "live"
    assert merge(row(), e("turn-latency", ms=640))["last_turn_ms"] == 640
    assert merge(row(), e("turn-latency", ms="fast"))["last_turn_ms"] is None
    assert merge(row(barge_ins=3), e("barge-in", count=2))["barge_ins"] == 3  # the record ran ahead
    assert merge(row(barge_ins=1), e("barge-in", count=2))["barge_ins"] == 2
    assert merge(row(), e("takeover", worker="w2"))["worker"] == "w2"
    ended = merge(row(), e("call-ended", reason="caller-hangup"))
    assert ended["status"] == "ended" and ended["end_reason"] == "caller-hangup"
    assert merge(ended, e("stream-start"))["status"] == "ended"
    assert merge(row(), e("twilio-ended", status="no-answer"))["end_reason"] == "no-answer"
    assert merge(row(end_reason="api-hangup"), e("call-ended", reason="x"))["end_reason"] == "api-hangup"


def test_a_viewer_keeps_the_newest_row_per_call_and_is_cut_past_its_limit() -> None:
    v = Viewer(limit=3)
    for ms in range(100):  # one call moving fast: one row waits, the newest
        v.offer("turn-latency", row(last_turn_ms=ms))
    assert v.take() == ("turn-latency", row(last_turn_ms=99)) and v.take() is None
    for i in range(3):
        v.offer("created", row(call_sid=f"CA{i:032x}"))
    v.offer("live", row(call_sid=f"CA{0:032x}"))  # moved again: goes to the back
    assert [v.take()[1]["call_sid"] for _ in range(3)] == [f"CA{i:032x}" for i in (1, 2, 0)]  # type: ignore[index]
    assert not v.cut
    for i in range(4):  # a fourth call waiting: cut off, and nothing is kept for it
        v.offer("created", row(call_sid=f"CA{i:032x}"))
    assert v.cut and v.take() is None
    v.offer("created", row())
    assert v.take() is None


def test_a_viewer_never_sees_an_ended_call_come_back() -> None:
    v = Viewer(limit=10)
    assert v.message("ended", row(status="ended")) is not None
    assert v.message("live", row(status="live")) is None
    other = row(call_sid="CA" + "2" * 32)
    assert v.message("live", other) == sse("call", {"kind": "live", "call": other})


def test_sse_messages_are_one_line_of_json() -> None:
    text = "line one\nline two\r\n: not a comment"
    msg = sse("event", {"kind": "transcript", "data": {"text": text}})
    assert msg.startswith(b"event: event\ndata: ") and msg.endswith(b"\n\n") and msg.count(b"\n") == 3
    assert orjson.loads(msg.split(b"data: ", 1)[1])["data"]["text"] == text


def frames(pcm: bytes) -> list[bytes]:
    ulaw = pcm16_to_ulaw(pcm)
    return [ulaw[i:i + 160] for i in range(0, len(ulaw) - 159, 160)]


def test_audio_health_counts_frames_levels_and_holes_in_assistant_speech() -> None:
    h = AudioHealth()
    speech = frames(tone(300, 1.0, 8000, amplitude=0.3).tobytes())
    silence = b"\xff" * 160
    t = 1000.0
    for i, f in enumerate(speech):  # one second each way; the assistant's has a 100 ms hole
        h.frame(CALLER, f, t + i * 0.02)
        gap = 0.1 if i == 25 else 0.0
        h.frame(ASSISTANT, f, t + i * 0.02 + gap + (0.1 if i > 25 else 0.0))
    for i in range(10):  # a pause between phrases is not a hole
        h.frame(ASSISTANT, silence, t + 2 + i * 0.02)
    w = h.window(1.0, time.time())
    assert w["frames_in_per_s"] == 50 and w["frames_out_per_s"] == 60 and w["underruns"] == 1
    level = w["caller_level_dbfs"]
    assert isinstance(level, float) and math.isclose(level, 20 * math.log10(0.3 / math.sqrt(2)), abs_tol=1.0)
    nothing = h.window(1.0, time.time())  # a new window starts empty
    assert nothing["frames_in_per_s"] == 0 and nothing["caller_level_dbfs"] is None
    assert nothing["underruns"] == 0
    h.frame(CALLER, b"", t)
    h.frame(CALLER, b"\x00" * 5000, t)  # malformed: ignored
    assert h.window(1.0, t)["frames_in_per_s"] == 0


def test_listen_frames_carry_the_direction_first() -> None:
    assert listen_frame(CALLER, b"\x7f" * 160) == b"\x00" + b"\x7f" * 160
    assert listen_frame(ASSISTANT, b"\x7f")[0] == 1


@pytest.fixture
async def hub(redis_url: str, prefix: str) -> AsyncIterator[tuple[FeedHub, aioredis.Redis]]:
    r = aioredis.Redis.from_url(redis_url)
    h = FeedHub(r, S.Keys(prefix), limit=50)
    yield h, r
    await h.close()
    keys = [k async for k in r.scan_iter(f"{prefix}*")]
    if keys:
        await r.delete(*keys)
    await r.aclose()


async def next_row(v: Viewer, timeout: float = 5.0) -> tuple[str, dict[str, object]]:
    async with asyncio.timeout(timeout):
        while (item := v.take()) is None:
            await v.wake.wait()
        return item


async def test_the_hub_tails_the_feed_for_every_viewer_with_one_read(
        hub: tuple[FeedHub, aioredis.Redis]) -> None:
    h, r = hub
    k = h.keys
    await r.hset(k.call(SID), mapping={"status": "live", "from": "+15550001111", "created": "1"})
    await r.zadd(k.index, {SID: 1.0})
    old = "CA" + "0" * 32
    await r.hset(k.call(old), mapping={"status": "ended"})
    await r.zadd(k.index, {old: 0.5})
    # Written before anyone watched: not replayed (the snapshot has the state).
    await r.xadd(k.feed, S.feed_entry("turn-latency", SID, orjson.dumps({"ms": 1})))
    a, b = await h.join(), await h.join()
    snap = await h.snapshot()
    assert [c["call_sid"] for c in snap] == [SID]  # ended calls are not in the live snapshot
    await r.xadd(k.feed, S.feed_entry("turn-latency", SID, orjson.dumps({"ms": 512})))
    for v in (a, b):
        kind, got = await next_row(v)
        assert kind == "turn-latency" and got["last_turn_ms"] == 512 and got["from"] == "+15550001111"
    # Junk on the feed, and an entry for a call with no record, are skipped; the next is served.
    await r.xadd(k.feed, {b"k": b"turn-latency", b"c": b"not-a-sid"})
    await r.xadd(k.feed, S.feed_entry("stream-start", "CA" + "9" * 32))
    await r.xadd(k.feed, S.feed_entry("call-ended", SID, orjson.dumps({"reason": "caller-hangup"})))
    kind, got = await next_row(a)
    assert kind == "ended" and got["status"] == "ended" and got["end_reason"] == "caller-hangup"
    h.leave(a)
    h.leave(b)
    async with asyncio.timeout(5):  # nobody watches: the read stops
        while h._task is not None and not h._task.done():
            await asyncio.sleep(0.05)
