"""Vapi WebSocket-transport wire messages: the create-call body we send and the JSON control
messages we receive, as pure functions and dataclasses. What each relies on, with sources:
docs/protocols.md, "Vapi websocket transport"."""

from __future__ import annotations

import re
from collections.abc import Mapping
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
    "model-output",  # the text of a response before it is spoken: what a takeover resumes from
]

# How a session created by a takeover begins (TAKEOVER_RESUME).
RESUME_SPEAK = "speak"  # the model speaks first, from the conversation so far
RESUME_WAIT = "wait"  # no greeting; the history as a system note; the caller speaks next
# Vapi's first-message modes (assistant.firstMessageMode).
FIRST_MESSAGE_MODEL_GENERATED = "assistant-speaks-first-with-model-generated-message"
FIRST_MESSAGE_WAIT = "assistant-waits-for-user"


@dataclass(frozen=True, slots=True)
class AssistantModel:
    """The saved assistant's LLM (GET /assistant/{id}): an override of `model.messages` must
    name the same provider and model, or Vapi replaces the whole model object."""

    provider: str
    model: str


@dataclass(frozen=True, slots=True)
class Resume:
    """How a taken-over call's new session begins (see worker/resume.py)."""

    mode: str  # RESUME_SPEAK or RESUME_WAIT
    messages: list[dict[str, str]]  # user/assistant history, oldest first
    model: AssistantModel | None = None  # required for RESUME_SPEAK
    heard_ms: int = 0  # how much of the cut response the caller heard

# Client-side tool names the bridge treats as "transfer the phone call".
TRANSFER_TOOLS = frozenset({"transferCall", "transfer_call", "transfer", "transferToHuman"})


def create_call_body(
    *, assistant_id: str, audio_format: str, sample_rate: int, call_sid: str, from_: str, to: str,
    resume: Resume | None = None, variables: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`POST /call` body for a websocket-transport call (CreateCallDTO). A resumed call (taken
    over mid-conversation) must not greet the caller a second time: with RESUME_SPEAK the model
    speaks first from the history given in `model.messages` (Vapi's
    assistant-speaks-first-with-model-generated-message); with RESUME_WAIT it waits for the
    caller. `variables`/`metadata` are the call's own (`call_options`); ours win on a clash, so
    the prompt's phone numbers and our correlation ids cannot be spoofed through them."""
    body: dict[str, Any] = {
        "assistantId": assistant_id,
        "assistantOverrides": {
            "variableValues": {**(variables or {}), "callerNumber": from_, "calledNumber": to,
                               "twilioCallSid": call_sid},
            "metadata": {**(metadata or {}), "twilioCallSid": call_sid, "from": from_, "to": to},
            "clientMessages": CLIENT_MESSAGES,
        },
        "transport": {
            "provider": "vapi.websocket",
            "audioFormat": {"format": audio_format, "container": "raw", "sampleRate": sample_rate},
        },
    }
    overrides = body["assistantOverrides"]
    if resume is not None and resume.mode == RESUME_SPEAK and resume.model is not None:
        overrides["firstMessageMode"] = FIRST_MESSAGE_MODEL_GENERATED
        # Same provider and model: Vapi merges, keeping the saved system prompt and tools, and
        # adds these messages (docs/protocols.md, "Creating the call").
        overrides["model"] = {"provider": resume.model.provider, "model": resume.model.model,
                              "messages": resume.messages}
    elif resume is not None:
        overrides["firstMessageMode"] = FIRST_MESSAGE_WAIT
    return body


def conversation_so_far(messages: list[dict[str, str]], limit: int = 6000) -> str:
    """An `add-message` that hands a resumed session the conversation before the takeover,
    without triggering a response (the caller speaks next)."""
    lines = [f"{'Caller' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
    history = "\n".join(lines)[-limit:]
    content = ("This phone call moved to a new session in the middle of the conversation. "
               "Do not greet the caller again; continue from here. The conversation so far:\n"
               + history)
    return add_message("system", content, respond=False)

def assistant_model(data: Any) -> AssistantModel | None:
    """`model.provider` and `model.model` from a GET /assistant/{id} response, if both are there."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        return None
    provider, name = model.get("provider"), model.get("model")
    if isinstance(provider, str) and isinstance(name, str) and provider and name:
        return AssistantModel(provider=provider[:100], model=name[:200])
    return None


END_CALL = orjson.dumps({"type": "end-call"}).decode()


def add_message(role: str, content: str, *, respond: bool) -> str:
    """Live Call Control `add-message` (spec `ClientInboundMessageAddMessage`): the message joins
    the conversation; with `respond` (`triggerResponseEnabled`, Vapi's default true) the
    assistant answers it, without it is added silently."""
    return orjson.dumps({"type": "add-message", "message": {"role": role, "content": content},
                         "triggerResponseEnabled": respond}).decode()


def say(content: str, *, end_call_after: bool = False, interrupt_assistant: bool = False) -> str:
    """Live Call Control `say` (spec `ClientInboundMessageSay`): the assistant speaks `content`
    as is, no model involved; `endCallAfterSpoken` makes Vapi end the call once it is spoken;
    `interruptAssistantEnabled` replaces what the assistant is saying (default: queued after)."""
    msg: dict[str, Any] = {"type": "say", "content": content, "endCallAfterSpoken": end_call_after}
    if interrupt_assistant:
        msg["interruptAssistantEnabled"] = True
    return orjson.dumps(msg).decode()


def control(action: str) -> str:
    """Live Call Control `control` (spec `ClientInboundMessageControl`): `mute-assistant`,
    `unmute-assistant`, `mute-customer`, `unmute-customer`, `say-first-message`."""
    return orjson.dumps({"type": "control", "control": action}).decode()


MUTE_ASSISTANT = control("mute-assistant")
UNMUTE_ASSISTANT = control("unmute-assistant")


def keypad_entry(digits: str) -> str:
    """The exact user message Vapi's own keypadInputPlan produces (docs/protocols.md, "Transfer
    and keypad")."""
    return add_message("user", f"User's Keypad Entry: {digits}", respond=True)


# A call's own assistant and template data, from the call record (written by the call API,
# so untrusted): what does not fit is left out, and the call goes on with the defaults.
MAX_ASSISTANT_ID = 100
_ASSISTANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")  # UUIDs and slugs, nothing to escape
MAX_RECORD_JSON = 4096  # bytes of `variables` / `metadata` as stored
MAX_VARIABLE_NAME = 100


@dataclass(frozen=True, slots=True)
class CallOptions:
    """The call's own Vapi settings: `assistant_id` (None: VAPI_ASSISTANT_ID), `variables` for
    `assistantOverrides.variableValues`, `metadata` for `assistantOverrides.metadata`;
    `ignored` names the record fields (or variables) left out, for a warning."""

    assistant_id: str | None = None
    variables: dict[str, str | int | float | bool] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()


def _json_object(raw: str | None) -> dict[str, Any] | None:
    if raw is None or len(raw.encode()) > MAX_RECORD_JSON:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def call_options(record: Mapping[str, str]) -> CallOptions:
    """Read `assistant_id`, `variables` (a JSON object of strings, numbers and booleans) and
    `metadata` (a JSON object) from the call record. Both live in the hash, so a worker taking
    the call over creates its Vapi call with the same ones."""
    ignored: list[str] = []
    assistant_id = record.get("assistant_id") or None
    if assistant_id is not None and not _ASSISTANT_ID.fullmatch(assistant_id):
        ignored.append("assistant_id")
        assistant_id = None
    variables: dict[str, str | int | float | bool] = {}
    if "variables" in record:
        raw_vars = _json_object(record["variables"])
        if raw_vars is None:
            ignored.append("variables")
        for name, value in (raw_vars or {}).items():
            if len(name) <= MAX_VARIABLE_NAME and isinstance(value, str | int | float | bool):
                variables[name] = value
            else:
                ignored.append(f"variables.{name[:MAX_VARIABLE_NAME]}")
    metadata: dict[str, Any] = {}
    if "metadata" in record:
        raw_meta = _json_object(record["metadata"])
        if raw_meta is None:
            ignored.append("metadata")
        metadata = raw_meta or {}
    return CallOptions(assistant_id=assistant_id, variables=variables, metadata=metadata,
                       ignored=tuple(ignored))


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
class ModelOutput:
    text: str


@dataclass(frozen=True, slots=True)
class Other:
    type: str
    raw: dict[str, Any] = field(repr=False)


VapiMessage = StatusUpdate | UserInterrupted | SpeechUpdate | Transcript | ToolCalls | ModelOutput | Other

# Bounds on what a Vapi message may hand the worker. Every field is untrusted: parsed values end
# up in events, logs, Redis and the transfer allow-list check, so each has its declared type and a
# size, or the message is refused (BadMessage) or the field falls back to its default.
MAX_TYPE = 128  # message type names are short
MAX_WORD = 200  # status, role, endedReason, ids, tool names
MAX_TEXT = 8000  # one transcript
MAX_TOOL_CALLS = 64
MAX_ARGUMENTS = 64 * 1024  # a tool call's arguments as a JSON string
MAX_TARGET = 256  # a transfer destination (E.164 number or SIP URI)


class BadMessage(ValueError):
    """A control message we cannot act on; `cause` is a bounded metric label."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


def _word(value: Any) -> str | None:
    """A short string, else None (a number, object, list, null or huge string is not a word)."""
    return value if isinstance(value, str) and len(value) <= MAX_WORD else None


def _required_word(msg: dict[str, Any], key: str) -> str:
    value = _word(msg.get(key))
    if value is None:
        raise BadMessage("bad_field")
    return value


def _arguments(raw: Any) -> dict[str, Any]:
    """Arguments arrive as an object or as a JSON string of one (docs/protocols.md)."""
    if isinstance(raw, str):
        if len(raw) > MAX_ARGUMENTS:
            return {}
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return {}
    return raw if isinstance(raw, dict) else {}


def _tool_call(item: dict[str, Any]) -> ToolCall:
    """Tool calls come as {id, function:{name, arguments}} (spec) or {id, name, parameters}."""
    raw_fn = item.get("function")
    fn: dict[str, Any] = raw_fn if isinstance(raw_fn, dict) else {}
    name = _word(fn.get("name")) or _word(item.get("name")) or ""
    if "arguments" in fn:
        args = fn["arguments"]
    else:
        args = item.get("parameters", item.get("arguments"))
    return ToolCall(id=_word(item.get("id")) or "", name=name, arguments=_arguments(args))


def parse(text: str | bytes) -> VapiMessage:
    """Parse a JSON text frame from Vapi. Raises ValueError (BadMessage for a known type with
    unusable fields) when there is nothing to act on; optional fields of the wrong type or size
    are dropped to their default instead of refusing the message."""
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError("not json") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ValueError("no type")
    kind: str = msg["type"]
    if len(kind) > MAX_TYPE:
        raise BadMessage("bad_type")
    if kind == "status-update":
        return StatusUpdate(status=_required_word(msg, "status"), ended_reason=_word(msg.get("endedReason")))
    if kind == "user-interrupted":
        return UserInterrupted(turn_id=_word(msg.get("turnId")))
    if kind == "speech-update":
        turn = msg.get("turn")
        return SpeechUpdate(role=_required_word(msg, "role"), status=_required_word(msg, "status"),
                            turn=turn if type(turn) is int and 0 <= turn < 2**31 else None)
    if kind.startswith("transcript"):
        text_ = msg.get("transcript")
        if not isinstance(text_, str):
            raise BadMessage("bad_field")
        final = msg.get("transcriptType") == "final" or 'transcriptType="final"' in kind
        return Transcript(role=_required_word(msg, "role"), final=final, text=text_[:MAX_TEXT])
    if kind == "model-output":
        output = msg.get("output")
        return ModelOutput(text=output[:MAX_TEXT] if isinstance(output, str) else "")
    if kind == "tool-calls":
        items = msg.get("toolCallList")
        if not isinstance(items, list):
            raise BadMessage("bad_field")
        return ToolCalls(calls=[_tool_call(i) for i in items[:MAX_TOOL_CALLS] if isinstance(i, dict)])
    return Other(type=kind, raw=msg)


def transfer_target(call: ToolCall) -> str | None:
    """The number or SIP URI a transfer tool call names, if any: the first candidate that is a
    non-empty string of a plausible size (anything else names no destination)."""
    if call.name not in TRANSFER_TOOLS:
        return None
    args = call.arguments
    dest = args.get("destination")
    candidates: tuple[Any, ...]
    if isinstance(dest, dict):
        candidates = (dest.get("number"), dest.get("sipUri"))
    else:
        candidates = (dest, args.get("number"), args.get("phoneNumber"), args.get("sipUri"))
    for value in candidates:
        if isinstance(value, str) and value.strip() and len(value) <= MAX_TARGET:
            return value
    return None
