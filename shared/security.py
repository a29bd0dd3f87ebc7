"""Request authenticity: Twilio signatures and the per-call stream token.

Twilio signs every webhook and the Media Stream upgrade with HMAC-SHA1 over the URL it was
given; we validate against the configured public URL (never the Host header, which a proxy
rewrites). The stream token is defence in depth: an HMAC over the CallSid that any gateway replica
can verify, so a leaked stream URL alone cannot open a paid Vapi session; each token carries a
random nonce so it is single-use on its own, not per call and second.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
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


def _mac(secret: bytes, call_sid: str, expires: int, nonce: str) -> str:
    digest = hmac.new(secret, f"{call_sid}.{expires}.{nonce}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode()


def make_stream_token(secret: bytes, call_sid: str, ttl_s: int, now: float | None = None) -> str:
    """`{expires}.{nonce}.{mac}`. The random nonce makes every token distinct: the gateway marks
    a token used by its MAC (`tok:{mac}`), and two tokens for one call minted in the same second
    (an answer and a quick re-attach) must not look like a replay of each other."""
    expires = int((time.time() if now is None else now) + ttl_s)
    nonce = base64.urlsafe_b64encode(secrets.token_bytes(9)).decode()
    return f"{expires}.{nonce}.{_mac(secret, call_sid, expires, nonce)}"


def verify_stream_token(secret: bytes, call_sid: str, token: str, now: float | None = None) -> bool:
    """True when `token` was minted for `call_sid` and has not expired."""
    try:
        exp_s, nonce, mac = token.split(".")
        expires = int(exp_s)
    except (ValueError, AttributeError):
        return False
    if expires < (time.time() if now is None else now) or len(nonce) > 32:
        return False
    return hmac.compare_digest(mac, _mac(secret, call_sid, expires, nonce))
