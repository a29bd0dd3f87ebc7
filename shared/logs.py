"""Structured logs: one JSON object per line, carrying call_sid / stream_sid / worker_id.

Context travels in contextvars so every line logged while handling a call names it without
threading ids through every call. Secrets never reach here: settings hold them as SecretStr and
Vapi's websocketCallUrl is never passed to a logger.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
import traceback
from typing import Any

import orjson

call_sid_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("call_sid", default=None)
stream_sid_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("stream_sid", default=None)
_process_fields: dict[str, str] = {}

_STD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_process_fields,
        }
        if (sid := call_sid_var.get()) is not None:
            out["call_sid"] = sid
        if (ssid := stream_sid_var.get()) is not None:
            out["stream_sid"] = ssid
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(
            f"{k}={v}"
            for k, v in (("call_sid", call_sid_var.get()), ("stream_sid", stream_sid_var.get()))
            if v
        )
        extra = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STD and not k.startswith("_")
        )
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{ts} {record.levelname:<7} {record.name}: {record.getMessage()} {ctx} {extra}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: str = "INFO", fmt: str = "json", **process_fields: str) -> None:
    """Configure the root logger once per process; `process_fields` go on every line."""
    _process_fields.update({k: v for k, v in process_fields.items() if v})
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "websockets", "uvicorn.access", "twilio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def error_fields(exc: BaseException | None) -> dict[str, str]:
    """What to log about a failure: its type and file:line:function. Enough to find the bug, and
    unlike the exception's message or traceback it cannot carry a token, a key or a URL."""
    if exc is None:
        return {}
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}:{last.name}"
    return {"error": type(exc).__name__, "at": where}


def mask_number(number: str) -> str:
    """A phone number or dial target for INFO logs: the last four characters tell calls apart
    for an operator without putting numbers into log storage (whole ones only at DEBUG)."""
    return "***" + number[-4:] if len(number) > 4 else "***"
