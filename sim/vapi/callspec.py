"""What a valid ``POST /call`` body asks of the call, read once when the call is created.

``docs/protocols.md``, "Vapi websocket transport" / "Creating the call" and "Audio formats". Pure:
:mod:`sim.vapi.validate` has already rejected malformed bodies, so this only interprets. The
session acts on a :class:`CallSpec` rather than digging in the body, which keeps each body field's
meaning in one place: ``firstMessageMode`` (:func:`_first_message`) and the ``model`` override
merged into the saved assistant's model (:func:`_model`), which is how a taking-over worker hands
the conversation so far to the new session.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sim.vapi.scripts import AssistantScript

#: Vapi's default when the body names no ``transport.audioFormat``.
DEFAULT_AUDIO_FORMAT = ("pcm_s16le", 16000)
FIRST_MESSAGE_MODE_DEFAULT = "assistant-speaks-first"
MODEL_GENERATED = "assistant-speaks-first-with-model-generated-message"
WAITS_FOR_USER = "assistant-waits-for-user"

Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True, slots=True)
class SavedModel:
    """The saved assistant's ``model`` (what ``GET /assistant/{id}`` shows): the object a
    ``model`` override is merged into."""

    provider: str = "openai"
    model: str = "gpt-4o-mini"
    system_prompt: str = "You are a test assistant."


@dataclass(frozen=True, slots=True)
class CallSpec:
    """The body, interpreted.

    Attributes:
        script: this call's own copy of the assistant script, overrides applied.
        client_messages: the message types the socket may carry (None: every type).
        max_duration_s: ``maxDurationSeconds`` (None: unlimited; the range is not checked).
        first_message_mode: ``firstMessageMode`` as given, or Vapi's default.
        first_message: the utterance kind spoken on connect: ``"greeting"``, ``"resume"`` (the
            model-generated first message) or None (wait for the caller).
        history: the ``model`` override's user/assistant messages, in order: the conversation
            the session was handed.
        messages: the model's messages at call start once the override is applied (the saved
            system prompt first unless it was replaced or dropped).
        model_replaced: the override names another provider or model than the saved one. Another
            provider makes Vapi drop the whole saved model (prompt and tools); another model of the
            same provider runs a different LLM. Either way a failover must not do it.
        system_replaced: the override carries a system message, which replaces the saved prompt.
    """

    audio_format: str
    sample_rate: int
    script: AssistantScript
    client_messages: frozenset[str] | None
    max_duration_s: float | None
    first_message_mode: str = FIRST_MESSAGE_MODE_DEFAULT
    first_message: str | None = "greeting"
    history: tuple[Message, ...] = ()
    messages: tuple[Message, ...] = ()
    model_replaced: bool = False
    system_replaced: bool = False


def call_spec(
    body: dict[str, Any], script: AssistantScript, saved: SavedModel | None = None
) -> CallSpec:
    """Interpret a validated body; ``script`` is the assistant picked for it (not modified),
    ``saved`` its saved model (defaults: :class:`SavedModel`)."""
    overrides = body.get("assistantOverrides")
    if not isinstance(overrides, dict):
        overrides = {}
    fmt, rate = audio_format(body)
    mode = overrides.get("firstMessageMode")
    mode = mode if isinstance(mode, str) else FIRST_MESSAGE_MODE_DEFAULT
    script = _first_message(dataclasses.replace(script), mode)
    messages, history, model_replaced, system_replaced = _model(
        overrides.get("model"), saved or SavedModel()
    )
    return CallSpec(
        audio_format=fmt,
        sample_rate=rate,
        script=script,
        client_messages=client_messages(body),
        max_duration_s=_max_duration(overrides),
        first_message_mode=mode,
        first_message=_first_kind(script, mode),
        history=history,
        messages=messages,
        model_replaced=model_replaced,
        system_replaced=system_replaced,
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

    ``assistant-waits-for-user`` has no first message, as Vapi documents (so ``say-first-message``
    has nothing to say either). The other modes keep the script's greeting.
    """
    if mode == WAITS_FOR_USER:
        script.greeting_s = None
    return script


def _first_kind(script: AssistantScript, mode: str) -> str | None:
    """What is spoken on connect: the model-generated mode speaks ``resume`` (the model's reply
    to the history it was given) instead of the saved greeting."""
    if mode == MODEL_GENERATED:
        return "resume" if script.resume_s else None
    return "greeting" if script.greeting_s else None


def _model(
    override: Any, saved: SavedModel
) -> tuple[tuple[Message, ...], tuple[Message, ...], bool, bool]:
    """(messages at call start, history, model_replaced, system_replaced) for a ``model``
    override, by Vapi's documented rules (docs/protocols.md, "Creating the call"): the same
    provider merges (only the fields sent change), another provider replaces the whole model;
    ``messages`` replace the saved message of the same role. Where the added messages go is
    inferred: after the saved system prompt."""
    base: tuple[Message, ...] = (("system", saved.system_prompt),)
    if not isinstance(override, dict):
        return base, (), False, False
    provider, name = override.get("provider"), override.get("model")
    model_replaced = provider != saved.provider or name != saved.model
    if provider != saved.provider:
        base = ()  # a different provider: the saved prompt and tools are gone
    raw = override.get("messages")
    if not isinstance(raw, list):
        return base, (), model_replaced, False
    given = tuple((str(m["role"]), str(m["content"])) for m in raw if isinstance(m, dict))
    roles = {role for role, _ in given}
    messages = tuple(m for m in base if m[0] not in roles) + given
    history = tuple(m for m in given if m[0] in ("user", "assistant"))
    return messages, history, model_replaced, "system" in roles
