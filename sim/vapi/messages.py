"""The JSON control messages the stand-in sends, and the ``clientMessages`` filter.

``docs/protocols.md``, "Vapi websocket transport" / "Control messages" and "Transfer and keypad".
Pure builders, so the message shapes are in one place and the session reads as behaviour; the
session stamps ``timestamp`` when it sends.
"""

from __future__ import annotations

from typing import Any

import orjson


def status_update(status: str, ended_reason: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "status-update", "status": status}
    if ended_reason is not None:
        msg["endedReason"] = ended_reason
    return msg


def speech_update(status: str, role: str, turn: int) -> dict[str, Any]:
    return {"type": "speech-update", "status": status, "role": role, "turn": turn}


def transcript(role: str, text: str) -> dict[str, Any]:
    return {"type": "transcript", "role": role, "transcriptType": "final", "transcript": text}


def model_output(text: str, turn_id: str) -> dict[str, Any]:
    """The model's text for an utterance, as one ``model-output``.

    Vapi streams ``model-output`` token by token while the model generates (``output`` is "a
    token or tool call"; recent specs add an optional ``turnId`` shared by a response's tokens).
    The stand-in has no model, so it sends the utterance's whole text as one output when the
    utterance starts: a client that concatenates tokens gets the same text either way.
    """
    return {"type": "model-output", "output": text, "turnId": turn_id}


def user_interrupted(turn_id: str) -> dict[str, Any]:
    return {"type": "user-interrupted", "turnId": turn_id}


def tool_calls(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A client-side ``tool-calls`` message for one function call (arguments JSON-encoded)."""
    function = {"name": name, "arguments": orjson.dumps(arguments).decode()}
    return {
        "type": "tool-calls",
        "toolCallList": [{"id": call_id, "type": "function", "function": function}],
        "toolWithToolCallList": [
            {
                "type": "function",
                "function": {"name": name},
                "toolCall": {"id": call_id, "type": "function", "function": function},
            }
        ],
    }


def added_message(msg: dict[str, Any]) -> tuple[str, str, bool] | None:
    """``(role, content, respond)`` of an ``add-message``, or None when its ``message`` is not a
    ``{role, content}`` of strings. ``respond`` is ``triggerResponseEnabled``, whose documented
    default is true (spec ``ClientInboundMessageAddMessage``): only an explicit ``false`` adds the
    message silently. A keypad entry (Vapi's keypadInputPlan text) is a user message like any."""
    message = msg.get("message")
    role = message.get("role") if isinstance(message, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(role, str) or not isinstance(content, str):
        return None
    return role, content, msg.get("triggerResponseEnabled", True) is not False


def allowed(msg: dict[str, Any], client_messages: frozenset[str] | None) -> bool:
    """May ``msg`` go out under ``clientMessages`` (None: everything may)?

    Transcripts can be subscribed by type (``transcript``) or by kind
    (``transcript[transcriptType="final"]``), as Vapi allows.
    """
    if client_messages is None:
        return True
    kind = msg["type"]
    if kind in client_messages:
        return True
    if kind == "transcript":
        return f'transcript[transcriptType="{msg.get("transcriptType")}"]' in client_messages
    return False
