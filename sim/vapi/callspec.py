"""What a valid ``POST /call`` body asks of the call, read once when the call is created.

``docs/protocols.md``, "Vapi websocket transport" / "Creating the call" and "Audio formats". Pure:
:mod:`sim.vapi.validate` has already rejected malformed bodies, so this only interprets. The
session acts on a :class:`CallSpec` rather than digging in the body, which keeps each body field's
meaning in one place: ``firstMessageMode`` (:func:`_first_message`) and, when the stand-in learns
them, further ``assistantOverrides`` such as the conversation so far belong here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sim.vapi.scripts import AssistantScript

#: Vapi's default when the body names no ``transport.audioFormat``.
DEFAULT_AUDIO_FORMAT = ("pcm_s16le", 16000)
FIRST_MESSAGE_MODE_DEFAULT = "assistant-speaks-first"


@dataclass(frozen=True, slots=True)
class CallSpec:
    """The body, interpreted.

    Attributes:
        script: this call's own copy of the assistant script, overrides applied.
        client_messages: the message types the socket may carry (None: every type).
        max_duration_s: ``maxDurationSeconds`` (None: unlimited; the range is not checked).
        first_message_mode: ``firstMessageMode`` as given, or Vapi's default.
    """

    audio_format: str
    sample_rate: int
    script: AssistantScript
    client_messages: frozenset[str] | None
    max_duration_s: float | None
    first_message_mode: str = FIRST_MESSAGE_MODE_DEFAULT


def call_spec(body: dict[str, Any], script: AssistantScript) -> CallSpec:
    """Interpret a validated body; ``script`` is the assistant picked for it (not modified)."""
    overrides = body.get("assistantOverrides")
    if not isinstance(overrides, dict):
        overrides = {}
    fmt, rate = audio_format(body)
    mode = overrides.get("firstMessageMode")
    mode = mode if isinstance(mode, str) else FIRST_MESSAGE_MODE_DEFAULT
    return CallSpec(
        audio_format=fmt,
        sample_rate=rate,
        script=_first_message(dataclasses.replace(script), mode),
        client_messages=client_messages(body),
        max_duration_s=_max_duration(overrides),
        first_message_mode=mode,
    )


def audio_format(body: dict[str, Any]) -> tuple[str, int]:
    audio = body.get("transport", {}).get("audioFormat")
    if not isinstance(audio, dict):
        return DEFAULT_AUDIO_FORMAT
    return str(audio["format"]), int(audio["sampleRate"])


def client_messages(body: dict[str, Any]) -> frozenset[str] | None:
    """``clientMessages`` from ``assistantOverrides``, else from an inline ``assistant``."""
    for holder in (body.get("assistantOverrides"), body.get("assistant")):
        if isinstance(holder, dict) and isinstance(holder.get("clientMessages"), list):
            return frozenset(m for m in holder["clientMessages"] if isinstance(m, str))
    return None


def _max_duration(overrides: dict[str, Any]) -> float | None:
    max_s = overrides.get("maxDurationSeconds")
    if isinstance(max_s, int | float) and not isinstance(max_s, bool) and max_s > 0:
        return float(max_s)
    return None


def _first_message(script: AssistantScript, mode: str) -> AssistantScript:
    """Apply ``firstMessageMode`` to the call's copy of the script.

    Only ``assistant-waits-for-user`` changes anything today: no first message, as Vapi documents.
    The other modes speak the script's greeting.
    """
    if mode == "assistant-waits-for-user":
        script.greeting_s = None
    return script
