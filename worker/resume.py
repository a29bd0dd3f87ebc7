"""What a worker taking a call over tells the new assistant session: the conversation so far,
ending with what the caller actually heard of the response that was cut.

The old owner keeps, in the call record, the text of the assistant response being spoken (Vapi's
`model-output` tokens, then its final transcript) and how many ms of its audio the caller heard
(the mark echoes) against how many ms Vapi had sent. The new owner truncates that response to
the share the caller heard, so the model resumes from the caller's point of view, not from
words that never reached the line. Pure: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from worker.playback import Playout

MAX_TEXT = 4000  # a response's text kept in the call record
MAX_HISTORY = 12000  # characters of history handed to a new session (newest kept)
CUT = "…"


@dataclass
class Response:
    """The assistant response being spoken now, as the old owner tracks it."""

    text: str = ""
    done: bool = False  # its final transcript arrived
    first_turn: int | None = None  # the playout turn its audio started in (None: no audio yet)
    _next_is_new: bool = True

    def output(self, token: str, playout: Playout) -> None:
        """A `model-output` token. The first one after a finished response (or after the caller
        spoke) starts a new response."""
        if self._next_is_new or self.done:
            self.text, self.done, self._next_is_new = "", False, False
            self.first_turn = None  # its text comes before its audio: the turn is set by audio()
        if len(self.text) < MAX_TEXT:
            self.text += token

    def audio(self, playout: Playout) -> None:
        """Assistant audio was just queued: the first after a response's text starts it."""
        if self.first_turn is None and self.text and not self._next_is_new:
            self.first_turn = playout.turn

    def final(self, text: str) -> None:
        self.text = text[:MAX_TEXT]
        self.done = True
        self._next_is_new = True

    def user_spoke(self) -> None:
        self._next_is_new = True

    def snapshot(self, playout: Playout) -> str:
        """JSON for the call record's `turn` field ('' before any response)."""
        if not self.text or self.first_turn is None:
            return ""
        turns = [r for t, r in playout.turns.items() if t >= self.first_turn]
        heard = sum(r.heard_ms for r in turns)
        audio = sum(r.sent_ms for r in turns) + int(playout.buffered_s * 1000)
        return orjson.dumps({"text": self.text, "heard_ms": heard, "audio_ms": audio,
                             "done": self.done}).decode()


def _turn(raw: str) -> tuple[str, int, int] | None:
    """(text, heard_ms, audio_ms) from the record's `turn`, or None. Written by another process
    (maybe another version): every field is checked."""
    try:
        data: Any = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    text, heard, audio = data.get("text"), data.get("heard_ms"), data.get("audio_ms")
    if not isinstance(text, str) or not text.strip():
        return None
    if not isinstance(heard, int) or not isinstance(audio, int) or isinstance(heard, bool) \
            or isinstance(audio, bool) or heard < 0 or audio <= 0:
        return None
    return text[:MAX_TEXT], min(heard, audio), audio


def heard_part(text: str, heard_ms: int, audio_ms: int) -> str:
    """The words the caller heard, assuming speech spreads evenly over the audio."""
    words = text.split()
    if heard_ms >= audio_ms:
        return " ".join(words)
    keep = int(len(words) * heard_ms / audio_ms)
    return " ".join(words[:keep])


def history(transcripts: list[tuple[str, str]], turn: str) -> tuple[list[dict[str, str]], int]:
    """Messages for the new session (user/assistant, oldest first) and the ms of the cut response
    the caller heard (0 when nothing was cut)."""
    messages = [{"role": role, "content": text.strip()} for role, text in transcripts
                if role in ("user", "assistant") and text.strip()]
    cut = _turn(turn)
    heard_ms = 0
    if cut is not None:
        text, heard_ms, audio_ms = cut
        if heard_ms < audio_ms:
            if messages and messages[-1]["role"] == "assistant" and messages[-1]["content"] == text.strip():
                messages.pop()  # its final transcript says more than the caller heard
            part = heard_part(text, heard_ms, audio_ms)
            if part:
                messages.append({"role": "assistant", "content": part + CUT})
        elif not (messages and messages[-1]["role"] == "assistant"
                  and messages[-1]["content"] == text.strip()):
            messages.append({"role": "assistant", "content": text.strip()})  # heard in full
            heard_ms = 0
        else:
            heard_ms = 0
    total, kept = 0, []
    for m in reversed(messages):
        total += len(m["content"])
        if total > MAX_HISTORY:
            break
        kept.append(m)
    return kept[::-1], heard_ms
