"""The gateway's ownership fence, pure."""

from __future__ import annotations

from gateway.fence import OwnerFence, epoch_of
from shared import streams as S


def media(epoch: bytes | None) -> dict[bytes, bytes]:
    fields = {b"k": S.OUT_MEDIA, b"a": b"\xff" * 160}
    if epoch is not None:
        fields[b"e"] = epoch
    return fields


def test_a_replaced_owner_is_dropped_once_the_new_one_announced_itself() -> None:
    fence = OwnerFence()
    assert fence.admit(media(b"1")) is True
    assert fence.admit({b"k": S.OUT_OWN, b"e": b"2"}) is None, "flush Twilio's buffer"
    assert fence.admit(media(b"1")) is False, "the frozen worker woke up"
    assert fence.admit(media(b"2")) is True
    assert fence.admit({b"k": S.OUT_OWN, b"e": b"2"}) is False, "a repeated marker changes nothing"
    assert fence.admit({b"k": S.OUT_HANGUP, b"e": b"1"}) is False, "nor can it hang up"


def test_the_floor_from_the_record_applies_before_any_marker() -> None:
    fence = OwnerFence(epoch=3)  # attached after the takeover: the marker is behind us
    assert fence.admit(media(b"2")) is False
    assert fence.admit(media(b"3")) is True


def test_entries_without_a_valid_epoch_pass_as_an_older_writer_wrote_them() -> None:
    fence = OwnerFence(epoch=5)
    assert fence.admit(media(None)) is True
    for bad in (b"", b"-1", b"x", b"1" * 40, b"2.5"):
        assert epoch_of(media(bad)) is None
    assert fence.admit({b"k": S.OUT_OWN, b"e": b"junk"}) is False
