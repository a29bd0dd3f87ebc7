"""``POST /call`` body validation, with the messages Vapi's NestJS validator gives.

``docs/protocols.md``, "Vapi websocket transport" / "Creating the call". Pure: the REST route turns
the list into a 400 ``{"message": [...], "error": "Bad Request", "statusCode": 400}``. What a valid
body then means for the call is read by :mod:`sim.vapi.callspec`; a new body field is checked here
and interpreted there.
"""

from __future__ import annotations

from typing import Any

from sim import voices

RUNNERS = ("assistantId", "assistant", "squadId", "squad", "workflowId", "workflow")
ALLOWED_PROPERTIES = frozenset(
    {
        *RUNNERS,
        "assistantOverrides",
        "assistantVersion",
        "squadOverrides",
        "workflowOverrides",
        "transport",
        "name",
        "customer",
        "customerId",
        "metadata",
    }
)
PHONE_PROPERTIES = ("phoneNumberId", "phoneNumber")
TRANSPORT_PROPERTIES = frozenset({"provider", "conversationType", "audioFormat"})
AUDIO_FORMAT_PROPERTIES = frozenset({"format", "container", "sampleRate"})
#: ``firstMessageMode``'s documented values (API reference, AssistantOverrides).
FIRST_MESSAGE_MODES = (
    "assistant-speaks-first",
    "assistant-speaks-first-with-model-generated-message",
    "assistant-waits-for-user",
)
#: ``role`` of a message in ``model.messages`` (OpenAIMessage in the OpenAPI spec).
MESSAGE_ROLES = ("system", "user", "assistant", "tool", "function")


def validate_create_call(body: Any) -> list[str]:
    """Vapi-style (NestJS class-validator) messages for a ``POST /call`` body; [] if valid."""
    if not isinstance(body, dict):
        return ["body must be an object"]
    errors: list[str] = []
    for key in body:
        if key not in ALLOWED_PROPERTIES and key not in PHONE_PROPERTIES:
            errors.append(f"property {key} should not exist")
    present = [key for key in RUNNERS if body.get(key) is not None]
    if not present:
        errors.append(
            "Exactly one of assistantId, assistant, squadId, squad, workflowId or workflow "
            "must be provided."
        )
    elif len(present) > 1:
        errors.append(
            "Only one of assistantId, assistant, squadId, squad, workflowId or workflow may be "
            f"provided (got {', '.join(present)})."
        )
    for key in ("assistantId", "squadId", "workflowId", "customerId"):
        if key in body and (not isinstance(body[key], str) or not body[key]):
            errors.append(f"{key} must be a string")
    for key in ("assistant", "squad", "workflow", "assistantOverrides", "customer", "metadata"):
        if key in body and not isinstance(body[key], dict):
            errors.append(f"{key} must be an object")
    if "name" in body:
        if not isinstance(body["name"], str):
            errors.append("name must be a string")
        elif len(body["name"]) > 40:
            errors.append("name must be shorter than or equal to 40 characters")
    overrides = body.get("assistantOverrides")
    if isinstance(overrides, dict):
        errors.extend(_validate_overrides(overrides))
    for key in PHONE_PROPERTIES:
        if key in body:
            errors.append(
                f"{key} is not allowed with the vapi.websocket transport "
                "(phoneNumberId/phoneNumber and websocket transport are mutually exclusive)"
            )
    errors.extend(_validate_transport(body.get("transport")))
    return errors


def _validate_overrides(overrides: dict[str, Any]) -> list[str]:
    """``assistantOverrides``: only the fields the stand-in reads are checked."""
    errors = [
        f"assistantOverrides.{key} must be an object"
        for key in ("variableValues", "metadata")
        if key in overrides and not isinstance(overrides[key], dict)
    ]
    cm = overrides.get("clientMessages")
    if cm is not None and not (isinstance(cm, list) and all(isinstance(m, str) for m in cm)):
        errors.append("assistantOverrides.clientMessages must be an array of strings")
    if "firstMessageMode" in overrides and overrides["firstMessageMode"] not in FIRST_MESSAGE_MODES:
        errors.append(
            "assistantOverrides.firstMessageMode must be one of the following values: "
            + ", ".join(FIRST_MESSAGE_MODES)
        )
    if "model" in overrides:
        errors.extend(_validate_model(overrides["model"], "assistantOverrides.model"))
    return errors


def _validate_model(model: Any, path: str) -> list[str]:
    """A ``model`` object. Vapi's model is a union discriminated by ``provider``: without a
    provider the validator cannot pick a class, so the whole object is refused. Provider names
    are not checked against Vapi's list (the stand-in runs no model)."""
    if not isinstance(model, dict):
        return [f"{path} must be an object"]
    errors: list[str] = []
    for key in ("provider", "model"):
        value = model.get(key)
        if not isinstance(value, str):
            errors.append(f"{path}.{key} must be a string")
        elif not value:
            errors.append(f"{path}.{key} should not be empty")
    if "messages" not in model:
        return errors
    messages = model["messages"]
    if not isinstance(messages, list):
        errors.append(f"{path}.messages must be an array")
        return errors
    for i, message in enumerate(messages):
        where = f"{path}.messages.{i}"
        if not isinstance(message, dict):
            errors.append(f"{where} must be an object")
            continue
        if message.get("role") not in MESSAGE_ROLES:
            errors.append(
                f"{where}.role must be one of the following values: {', '.join(MESSAGE_ROLES)}"
            )
        if not isinstance(message.get("content"), str):
            errors.append(f"{where}.content must be a string")
    return errors


def _validate_transport(transport: Any) -> list[str]:
    if transport is None:
        return ["transport.provider must be one of the following values: vapi.websocket"]
    if not isinstance(transport, dict):
        return ["transport must be an object"]
    errors = [
        f"transport.property {key} should not exist"
        for key in transport
        if key not in TRANSPORT_PROPERTIES
    ]
    if transport.get("provider") != "vapi.websocket":
        errors.append("transport.provider must be one of the following values: vapi.websocket")
    if "conversationType" in transport and transport["conversationType"] != "voice":
        errors.append("transport.conversationType must be one of the following values: voice")
    audio = transport.get("audioFormat")
    if audio is None:
        return errors
    if not isinstance(audio, dict):
        errors.append("transport.audioFormat must be an object")
        return errors
    errors.extend(
        f"transport.audioFormat.property {key} should not exist"
        for key in audio
        if key not in AUDIO_FORMAT_PROPERTIES
    )
    if audio.get("format") not in voices.FORMATS:
        errors.append(
            "transport.audioFormat.format must be one of the following values: pcm_s16le, mulaw"
        )
    if "container" in audio and audio["container"] != "raw":
        errors.append("transport.audioFormat.container must be one of the following values: raw")
    rate = audio.get("sampleRate")
    if not isinstance(rate, int | float) or isinstance(rate, bool):
        errors.append(
            "transport.audioFormat.sampleRate must be a number conforming to the specified "
            "constraints"
        )
    elif rate > 192000:
        errors.append("transport.audioFormat.sampleRate must not be greater than 192000")
    elif rate < 1000 or rate != int(rate):
        # Vapi allows 0..192000 and resamples; the stand-in generates audio at the given rate.
        errors.append("transport.audioFormat.sampleRate must be an integer >= 1000 (stand-in)")
    return errors
