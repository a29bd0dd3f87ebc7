"""What the call API shows of a call, built from its Redis record and event stream (pure).

Everything read here was written by other processes, perhaps by another version: each field is
checked, bounded and dropped when malformed, so one odd record can never fail a listing.
"""

from __future__ import annotations

from typing import Any

import orjson

from shared import streams as S

MAX_EVENTS = 200  # the newest events a call view carries
MAX_TEXT = 2000


def _s(fields: dict[bytes, bytes], name: str, limit: int = 200) -> str | None:
    raw = fields.get(name.encode())
    if not isinstance(raw, bytes) or not raw:
        return None
    return raw[:limit].decode(errors="replace")


def _f(fields: dict[bytes, bytes], name: str) -> float | None:
    raw = _s(fields, name, 32)
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value < 1e11 else None


def api_status(record: dict[bytes, bytes]) -> str:
    """queued | ringing | live | ended, from the record's `status` (anything else: ringing)."""
    status = _s(record, "status", 16)
    return status if status in ("queued", "ringing", S.STATUS_LIVE, S.STATUS_ENDED) else "ringing"


def _value(fields: dict[bytes, bytes]) -> dict[str, Any]:
    raw = fields.get(b"v")
    if not isinstance(raw, bytes) or len(raw) > 64_000:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:  # plain text (an older gateway's `twilio-status`)
        return {"value": raw[:500].decode(errors="replace")}
    return data if isinstance(data, dict) else {}


def _num(data: dict[str, Any], name: str) -> float | None:
    v = data.get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def transcript(events: list[tuple[bytes, dict[bytes, bytes]]]) -> list[dict[str, str]]:
    """The final transcripts in order: what the caller said and what the assistant said."""
    out = []
    for _id, fields in events:
        if fields.get(b"k") == b"transcript":
            data = _value(fields)
            role, text = data.get("role"), data.get("text")
            if role in ("user", "assistant") and isinstance(text, str):
                out.append({"role": role, "text": text[:MAX_TEXT]})
    return out


def turns(events: list[tuple[bytes, dict[bytes, bytes]]]) -> list[dict[str, Any]]:
    """Per assistant turn: how long the caller waited for it, how much was sent and heard, and
    whether the caller talked over it (from `turn-latency`, `barge-in`, `assistant-turns`)."""
    by_turn: dict[int, dict[str, Any]] = {}

    def turn(data: dict[str, Any]) -> dict[str, Any] | None:
        t = data.get("turn")
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < 100_000:
            return None
        return by_turn.setdefault(t, {"turn": t, "latency_ms": None, "sent_ms": None,
                                      "heard_ms": None, "interrupted": False})

    for _id, fields in events:
        kind = fields.get(b"k")
        if kind == b"turn-latency":
            data = _value(fields)
            if (rec := turn(data)) is not None:
                rec["latency_ms"] = _num(data, "ms")
        elif kind == b"barge-in":
            data = _value(fields)
            if (rec := turn(data)) is not None:
                rec["interrupted"] = True
                rec["sent_ms"], rec["heard_ms"] = _num(data, "sent_ms"), _num(data, "heard_ms")
        elif kind == b"assistant-turns":
            listed = _value(fields).get("turns")
            for item in listed if isinstance(listed, list) else []:
                if isinstance(item, dict) and (rec := turn(item)) is not None:
                    rec["sent_ms"], rec["heard_ms"] = _num(item, "sent_ms"), _num(item, "heard_ms")
                    rec["interrupted"] = rec["interrupted"] or item.get("interrupted") is True
    return [by_turn[t] for t in sorted(by_turn)][:1000]


def event_list(events: list[tuple[bytes, dict[bytes, bytes]]]) -> list[dict[str, Any]]:
    """The newest MAX_EVENTS events: kind, time (s) and their fields."""
    out = []
    for _id, fields in events[-MAX_EVENTS:]:
        kind = fields.get(b"k")
        if not isinstance(kind, bytes) or len(kind) > 64:
            continue
        t = S.entry_time_s(fields)
        out.append({"kind": kind.decode(errors="replace"), "at": round(t, 3), "data": _value(fields)})
    return out


def summary(sid: str, record: dict[bytes, bytes]) -> dict[str, Any]:
    """A call as listed: what its record says, without the event stream."""
    direction = _s(record, "direction", 16)
    return {
        "call_sid": sid,
        "direction": direction if direction in ("inbound", "outbound") else "inbound",
        "from": _s(record, "from", 64),
        "to": _s(record, "to", 64),
        "status": api_status(record),
        "assistant_id": _s(record, "assistant_id", 100),
        "started_at": _f(record, "created"),
        "ended_at": _f(record, "ended_at"),
        "end_reason": _s(record, "end_reason", 64),
        "answered_by": _s(record, "answered_by", 32),
        "worker": _s(record, "owner", 200),
    }


def row(sid: str, record: dict[bytes, bytes]) -> dict[str, Any]:
    """A call as the console lists it: its summary, the last turn's latency and the barge-ins."""
    count = _f(record, "barge_ins")
    return {**summary(sid, record), "last_turn_ms": _f(record, "last_turn_ms"),
            "barge_ins": int(count) if count is not None and count < 1e6 else 0}


def view(sid: str, record: dict[bytes, bytes],
         events: list[tuple[bytes, dict[bytes, bytes]]]) -> dict[str, Any]:
    """A call in full: its summary, transcript, turns and recent events."""
    return {**summary(sid, record), "transcript": transcript(events), "turns": turns(events),
            "events": event_list(events)}
