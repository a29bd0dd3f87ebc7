"""Vapi WebSocket-transport wire messages: the create-call body we send and the JSON control
messages we receive, as pure functions and dataclasses. What each relies on, with sources:
docs/protocols.md, "Vapi websocket transport"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

# Only what the bridge acts on: each extra type costs Vapi bandwidth and us parsing
# (conversation-update alone carries the whole history every time).
CLIENT_MESSAGES = [
    "status-update",
    "speech-update",
    "user-interrupted",
    "transcript",
    "tool-calls",
    "transfer-update",
    "hang",
]

# Client-side tool names the bridge treats as "transfer the phone call".
TRANSFER_TOOLS = frozenset({"transferCall", "transfer_call", "transfer", "transferToHuman"})


def create_call_body(
    *, assistant_id: str, audio_format: str, sample_rate: int, call_sid: str, from_: str, to: str,
    resumed: bool = False,
) -> dict[str, Any]:
    """`POST /call` body for a websocket-transport call (CreateCallDTO). A `resumed` call (taken
    over mid-conversation) must not greet the caller a second time."""
    body: dict[str, Any] = {
        "assistantId": assistant_id,
        "assistantOverrides": {
            "variableValues": {"callerNumber": from_, "calledNumber": to, "twilioCallSid": call_sid},
            "metadata": {"twilioCallSid": call_sid, "from": from_, "to": to},
            "clientMessages": CLIENT_MESSAGES,
        },
        "transport": {
            "provider": "vapi.websocket",
            "audioFormat": {"format": audio_format, "container": "raw", "sampleRate": sample_rate},
        },
    }
    if resumed:
        body["assistantOverrides"]["firstMessageMode"] = "assistant-waits-for-user"
    return body


def conversation_so_far(turns: list[tuple[str, str]], limit: int = 6000) -> str | None:
    """An `add-message` that hands a resumed session the conversation before the takeover,
    without triggering a response (the caller speaks next)."""
    if not turns:
        return None
    lines = [f"{'Caller' if role == 'user' else 'Assistant'}: {text}" for role, text in turns]
    history = "\n".join(lines)[-limit:]
    content = ("This phone call moved to a new session in the middle of the conversation. "
               "Do not greet the caller again; continue from here. The conversation so far:\n"
               + history)
    return orjson.dumps({"type": "add-message", "message": {"role": "system", "content": content},
                         "triggerResponseEnabled": False}).decode()

END_CALL = orjson.dumps({"type": "end-call"}).decode()


def keypad_entry(digits: str) -> str:
    """The exact user message Vapi's own keypadInputPlan produces (vapi-protocol.md §8)."""
    return orjson.dumps({
        "type": "add-message",
        "message": {"role": "user", "content": f"User's Keypad Entry: {digits}"},
        "triggerResponseEnabled": True,
    }).decode()


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    status: str
    ended_reason: str | None


@dataclass(frozen=True, slots=True)
class UserInterrupted:
    turn_id: str | None


@dataclass(frozen=True, slots=True)
class SpeechUpdate:
    role: str
    status: str
    turn: int | None


@dataclass(frozen=True, slots=True)
class Transcript:
    role: str
    final: bool
    text: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCalls:
    calls: list[ToolCall]


@dataclass(frozen=True, slots=True)
class Other:
    type: str
    raw: dict[str, Any] = field(repr=False)


VapiMessage = StatusUpdate | UserInterrupted | SpeechUpdate | Transcript | ToolCalls | Other


def _tool_call(item: dict[str, Any]) -> ToolCall:
    """Tool calls come as {id, function:{name, arguments}} (spec) or {id, name, parameters}."""
    raw_fn = item.get("function")
    fn: dict[str, Any] = raw_fn if isinstance(raw_fn, dict) else {}
    name = fn.get("name") or item.get("name") or ""
    args: Any = fn.get("arguments", item.get("parameters", item.get("arguments", {})))
    if isinstance(args, str):
        try:
            args = orjson.loads(args)
        except orjson.JSONDecodeError:
            args = {"raw": args}
    arguments = args if isinstance(args, dict) else {}
    return ToolCall(id=str(item.get("id", "")), name=str(name), arguments=arguments)


def parse(text: str | bytes) -> VapiMessage:
    """Parse a JSON text frame from Vapi; raises ValueError when it is not a typed object."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError("not json") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ValueError("no type")
    kind: str = msg["type"]
    if kind == "status-update":
        return StatusUpdate(status=str(msg.get("status", "")), ended_reason=msg.get("endedReason"))
    if kind == "user-interrupted":
        return UserInterrupted(turn_id=msg.get("turnId"))
    if kind == "speech-update":
        turn = msg.get("turn")
        return SpeechUpdate(role=str(msg.get("role", "")), status=str(msg.get("status", "")),
                            turn=turn if isinstance(turn, int) else None)
    if kind.startswith("transcript"):
        final = msg.get("transcriptType") == "final" or 'transcriptType="final"' in kind
        return Transcript(role=str(msg.get("role", "")), final=final, text=str(msg.get("transcript", "")))
    if kind == "tool-calls":
        items = msg.get("toolCallList") or []
        return ToolCalls(calls=[_tool_call(i) for i in items if isinstance(i, dict)])
    return Other(type=kind, raw=msg)


def transfer_target(call: ToolCall) -> str | None:
    """The number or SIP URI a transfer tool call names, if any."""
    if call.name not in TRANSFER_TOOLS:
        return None
    args = call.arguments
    dest = args.get("destination")
    if isinstance(dest, dict):
        value = dest.get("number") or dest.get("sipUri")
    else:
        value = dest or args.get("number") or args.get("phoneNumber") or args.get("sipUri")
    return str(value) if value else None
