"""All configuration, from the environment (12-factor), in one pydantic-settings class.

Every field is optional at parse time so one class serves every role; each role calls
`require()` for what it cannot run without, which turns a missing value into a one-line error
that names the variable.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import uuid
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.streams import Keys


class ConfigError(Exception):
    """A setting is missing or invalid; the message is one line and names the variable."""


class Settings(BaseSettings):
    # Compose turns an unset ${VAR} into "": treat empty as unset so `require()` still names it.
    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", env_ignore_empty=True
    )

    # Externally visible names (fixed by the product contract).
    redis_url: str | None = Field(default=None, alias="REDIS_URL")
    public_url: str | None = Field(default=None, alias="PUBLIC_URL")
    twilio_account_sid: str | None = Field(default=None, alias="TWILIO_ACCOUNT_SID")
    twilio_auth_token: SecretStr | None = Field(default=None, alias="TWILIO_AUTH_TOKEN")
    vapi_api_key: SecretStr | None = Field(default=None, alias="VAPI_API_KEY")
    vapi_assistant_id: str | None = Field(default=None, alias="VAPI_ASSISTANT_ID")
    vapi_base_url: str = Field(default="https://api.vapi.ai", alias="VAPI_BASE_URL")
    twilio_api_base_url: str | None = Field(default=None, alias="TWILIO_API_BASE_URL")
    vapi_audio_format: Literal["pcm_s16le", "mulaw"] = Field(
        default="pcm_s16le", alias="VAPI_AUDIO_FORMAT"
    )

    # The call API (gateway/api.py).
    api_keys: SecretStr | None = Field(default=None, alias="API_KEYS")
    twilio_from_number: str | None = Field(default=None, alias="TWILIO_FROM_NUMBER")
    assistant_routes: str = Field(default="", alias="ASSISTANT_ROUTES")
    max_active_calls: int = Field(default=0, ge=0, alias="MAX_ACTIVE_CALLS")
    outbound_cps: float = Field(default=1.0, gt=0, alias="OUTBOUND_CPS")
    admission_wait_s: float = Field(default=30.0, ge=0, alias="ADMISSION_WAIT_S")
    admission_message: str = Field(
        default="All our lines are busy. Please hold.", alias="ADMISSION_MESSAGE")
    call_record_ttl_s: int = Field(default=86400, ge=60, alias="CALL_RECORD_TTL_S")

    # The console (gateway/console.py): per gateway, call feeds + listeners at once; the calls
    # whose rows may wait for one list viewer, and how long one write may wait on a viewer,
    # before it is cut off.
    console_max_streams: int = Field(default=50, ge=1, le=10_000, alias="CONSOLE_MAX_STREAMS")
    console_queue: int = Field(default=1000, ge=4, le=100_000, alias="CONSOLE_QUEUE")
    console_send_timeout_s: float = Field(default=10.0, gt=0, le=600, alias="CONSOLE_SEND_TIMEOUT_S")

    # Tuning knobs, all with safe defaults.
    redis_prefix: str = Field(default="cb:", alias="REDIS_PREFIX")
    # REDIS_URL names any one node of a Redis Cluster (docs/architecture.md, "Redis Cluster").
    redis_cluster: bool = Field(default=False, alias="REDIS_CLUSTER")
    redis_lanes: int = Field(default=16, ge=1, le=1024, alias="REDIS_LANES")
    stream_token_secret: SecretStr | None = Field(default=None, alias="STREAM_TOKEN_SECRET")
    stream_token_ttl_s: int = Field(default=300, alias="STREAM_TOKEN_TTL_S")
    call_ttl_s: int = Field(default=3600, alias="CALL_TTL_S")
    ended_ttl_s: int = Field(default=120, alias="ENDED_TTL_S")
    stream_maxlen: int = Field(default=3000, alias="STREAM_MAXLEN")
    start_timeout_s: float = Field(default=5.0, alias="START_TIMEOUT_S")
    max_message_bytes: int = Field(default=64 * 1024, alias="MAX_MESSAGE_BYTES")
    ws_max_size: int = Field(default=1024 * 1024, alias="WS_MAX_SIZE")
    worker_id: str = Field(default="", alias="WORKER_ID")
    worker_max_calls: int = Field(default=200, alias="WORKER_MAX_CALLS")
    worker_http_port: int = Field(default=9100, alias="WORKER_HTTP_PORT")
    worker_http_host: str = Field(default="0.0.0.0", alias="WORKER_HTTP_HOST")
    claim_lease_s: float = Field(default=1.5, alias="CLAIM_LEASE_S")
    takeover_resume: Literal["speak", "wait"] = Field(default="speak", alias="TAKEOVER_RESUME")
    playout_lead_ms: int = Field(default=100, alias="PLAYOUT_LEAD_MS")
    playout_prebuffer_ms: int = Field(default=40, alias="PLAYOUT_PREBUFFER_MS")
    mark_every_ms: int = Field(default=100, alias="MARK_EVERY_MS")
    vapi_connect_timeout_s: float = Field(default=10.0, alias="VAPI_CONNECT_TIMEOUT_S")
    vapi_ping_interval_s: float = Field(default=5.0, alias="VAPI_PING_INTERVAL_S")
    vapi_ping_timeout_s: float = Field(default=5.0, alias="VAPI_PING_TIMEOUT_S")
    gateway_drain_timeout_s: float = Field(default=10.0, alias="GATEWAY_DRAIN_TIMEOUT_S")
    worker_drain_timeout_s: float = Field(default=30.0, alias="WORKER_DRAIN_TIMEOUT_S")
    reattach_timeout_s: float = Field(default=10.0, alias="REATTACH_TIMEOUT_S")
    interrupt_confirm_ms: int = Field(default=600, alias="INTERRUPT_CONFIRM_MS")
    fast_barge_in: bool = Field(default=False, alias="FAST_BARGE_IN")
    fast_barge_in_confirm_ms: int = Field(default=600, alias="FAST_BARGE_IN_CONFIRM_MS")
    fast_barge_in_aggressiveness: int = Field(default=2, ge=0, le=3, alias="FAST_BARGE_IN_AGGRESSIVENESS")
    silence_fill_after_s: float = Field(default=1.0, alias="SILENCE_FILL_AFTER_S")
    no_worker_timeout_s: float = Field(default=15.0, alias="NO_WORKER_TIMEOUT_S")
    max_reattaches: int = Field(default=5, alias="MAX_REATTACHES")
    transfer_allow: str = Field(default="", alias="TRANSFER_ALLOW")
    keypad_timeout_s: float = Field(default=2.0, alias="KEYPAD_TIMEOUT_S")
    media_idle_timeout_s: float = Field(default=5.0, alias="MEDIA_IDLE_TIMEOUT_S")
    twilio_ping_interval_s: float = Field(default=5.0, alias="TWILIO_PING_INTERVAL_S")
    twilio_ping_timeout_s: float = Field(default=5.0, alias="TWILIO_PING_TIMEOUT_S")
    hangup_grace_s: float = Field(default=3.0, alias="HANGUP_GRACE_S")
    unavailable_message: str = Field(
        default="Sorry, the assistant is not available right now. Please try again later.",
        alias="UNAVAILABLE_MESSAGE",
    )
    log_level: str = Field(default="INFO", alias="LOG_LEVEL")
    log_format: Literal["json", "text"] = Field(default="json", alias="LOG_FORMAT")

    @field_validator("assistant_routes")
    @classmethod
    def _routes_parse(cls, v: str) -> str:
        parse_routes(v)  # fail at start, naming the setting, not at the first call
        return v

    @field_validator("twilio_from_number")
    @classmethod
    def _from_e164(cls, v: str | None) -> str | None:
        if v is not None and not E164.fullmatch(v):
            raise ValueError("TWILIO_FROM_NUMBER must be an E.164 number, e.g. +15550001111")
        return v

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("PUBLIC_URL must be an absolute http(s) URL, e.g. https://cb.example.com")
        return v.rstrip("/")

    def require(self, *names: str) -> None:
        """Fail fast, naming the first missing environment variable."""
        for name in names:
            field = _FIELDS_BY_ALIAS[name]
            value = getattr(self, field)
            if value is None or (isinstance(value, SecretStr) and not value.get_secret_value()):
                raise ConfigError(f"missing required setting: {name}")

    # Derived values ---------------------------------------------------------------------------

    @property
    def auth_token(self) -> str:
        return self.twilio_auth_token.get_secret_value() if self.twilio_auth_token else ""

    @property
    def vapi_key(self) -> str:
        return self.vapi_api_key.get_secret_value() if self.vapi_api_key else ""

    @property
    def token_secret(self) -> bytes:
        """Stream-token key: explicit, else derived from the auth token so no extra secret is needed."""
        if self.stream_token_secret is not None and self.stream_token_secret.get_secret_value():
            return self.stream_token_secret.get_secret_value().encode()
        return hmac.new(self.auth_token.encode(), b"callbridge/stream-token", hashlib.sha256).digest()

    @property
    def stream_url(self) -> str:
        """The exact Media Stream URL written into TwiML (and so the one Twilio signs)."""
        assert self.public_url is not None
        parts = urlsplit(self.public_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}{parts.path}/twilio/media"

    def keys(self) -> Keys:
        """The key layout: hash-tagged lanes on a cluster, today's plain names on one Redis."""
        return Keys(self.redis_prefix, self.redis_lanes if self.redis_cluster else 0)

    @property
    def audio_sample_rate(self) -> int:
        return 16000 if self.vapi_audio_format == "pcm_s16le" else 8000

    def api_key_list(self) -> list[bytes]:
        """The bearer keys the call API accepts (none: every /v1 request is refused)."""
        raw = self.api_keys.get_secret_value() if self.api_keys else ""
        return [k.strip().encode() for k in raw.split(",") if k.strip()]

    def routes(self) -> dict[str, str]:
        return parse_routes(self.assistant_routes)

    def transfer_allowed(self, target: str) -> bool:
        return transfer_allowed(self.transfer_allow, target)

    def effective_worker_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


E164 = re.compile(r"\+[1-9][0-9]{6,14}")
ASSISTANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")


def parse_routes(raw: str) -> dict[str, str]:
    """ASSISTANT_ROUTES: a JSON object, called number (E.164) -> Vapi assistant id."""
    if not raw.strip():
        return {}
    try:
        routes = json.loads(raw)
    except ValueError:
        raise ValueError("ASSISTANT_ROUTES must be a JSON object: number -> assistant id") from None
    if not isinstance(routes, dict):
        raise ValueError("ASSISTANT_ROUTES must be a JSON object: number -> assistant id")
    for number, assistant in routes.items():
        if not E164.fullmatch(str(number)) or not isinstance(assistant, str) \
                or not ASSISTANT_ID.fullmatch(assistant):
            raise ValueError(f"ASSISTANT_ROUTES: {number!r} must be an E.164 number mapped to an "
                             "assistant id")
    return dict(routes)


def transfer_allowed(rules: str, target: str) -> bool:
    """TRANSFER_ALLOW: comma-separated numbers / SIP URIs, `prefix*` patterns, or `*`.
    Empty allows none: an LLM must not be able to dial anywhere a caller talks it into."""
    for rule in (r.strip() for r in rules.split(",")):
        if rule and (rule == "*" or target == rule
                     or (rule.endswith("*") and target.startswith(rule[:-1]))):
            return True
    return False


_FIELDS_BY_ALIAS = {
    (f.alias or name): name for name, f in Settings.model_fields.items()
}


def load_settings() -> Settings:
    """Parse the environment; invalid values become a one-line ConfigError."""
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = err["loc"][0] if err["loc"] else "?"
        raise ConfigError(f"invalid setting {loc}: {err['msg']}") from None
