"""Request authenticity: Twilio signatures and the per-call stream token.

Twilio signs every webhook and the Media Stream upgrade with HMAC-SHA1 over the URL it was
given; we validate against the configured public URL (never the Host header, which a proxy
rewrites). The stream token is defence in depth: an HMAC over the CallSid that any gateway replica
can verify, so a leaked stream URL alone cannot open a paid Vapi session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence

from twilio.request_validator import RequestValidator


def webhook_signature_ok(
    auth_token: str, url: str, params: Mapping[str, str | Sequence[str]], signature: str | None
) -> bool:
    """Validate a signed form POST. Fails closed on any error."""
    if not signature or not auth_token:
        return False
    try:
        return bool(RequestValidator(auth_token).validate(url, dict(params), signature))
    except Exception:
        return False


def ws_signature_ok(auth_token: str, stream_url: str, signature: str | None) -> bool:
    """Validate a Media Stream upgrade: Twilio signs the TwiML's URL, sometimes with a trailing /."""
    if not signature or not auth_token:
        return False
    validator = RequestValidator(auth_token)
    candidates = (stream_url, stream_url.rstrip("/") + "/")
    try:
        return any(validator.validate(u, {}, signature) for u in candidates)
    except Exception:
        return False


def _mac(secret: bytes, call_sid: str, expires: int) -> str:
    digest = hmac.new(secret, f"{call_sid}.{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode()


def make_stream_token(secret: bytes, call_sid: str, ttl_s: int, now: float | None = None) -> str:
    expires = int((time.time() if now is None else now) + ttl_s)
    return f"{expires}.{_mac(secret, call_sid, expires)}"


def verify_stream_token(secret: bytes, call_sid: str, token: str, now: float | None = None) -> bool:
    """True when `token` was minted for `call_sid` and has not expired."""
    try:
        exp_s, mac = token.split(".", 1)
        expires = int(exp_s)
    except (ValueError, AttributeError):
        return False
    if expires < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(mac, _mac(secret, call_sid, expires))
