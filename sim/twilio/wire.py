"""What goes over the wire between the Twilio stand-in and a gateway, as pure functions.

Constants of the audio format, Twilio's error codes, URL mapping and request signing, the
standard webhook parameters, builders for the Media Streams messages we (as Twilio) send and the
validator for what a gateway sends back. No sockets, no tasks.

Docs: docs/protocols.md, section "Twilio Media Streams" ("Signatures", "Messages Twilio sends",
"Messages we send"); why the builders are string templates: docs/performance.md, "JSON and
base64".
"""

from __future__ import annotations

import binascii
import secrets
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import orjson
from twilio.request_validator import RequestValidator

# --- audio constants -------------------------------------------------------------------------

SAMPLE_RATE = 8000
FRAME_BYTES = 160  # 20 ms of 8 kHz μ-law: what Twilio sends per `media` message
FRAME_S = 0.02
ULAW_SILENCE = 0xFF  # μ-law 0xFF decodes to 0; 0x00 is near full scale ("Limits and known problems")
SILENCE_FRAME = bytes([ULAW_SILENCE]) * FRAME_BYTES
SILENCE_FRAME_B64 = binascii.b2a_base64(SILENCE_FRAME, newline=False).decode("ascii")

DTMF_DIGITS = frozenset("0123456789*#ABCD")

# Twilio error/warning codes the stand-in reports (docs/protocols.md, "Messages we send",
# "Limits and known problems").
ERR_BINARY_FRAME = "31950"
ERR_INVALID_MESSAGE = "31951"
ERR_HANDSHAKE = "31920"
ERR_CONNECT = "31902"
ERR_SCHEME = "31922"
ERR_TRACK = "31941"
ERR_HTTP_RETRIEVAL = "11200"
ERR_DOCUMENT_PARSE = "12100"

TWILIO_WEBHOOK_USER_AGENT = "TwilioProxy/1.1"
TWILIO_WS_USER_AGENT = "Twilio.TmeWs/1.0"


def new_sid(prefix: str) -> str:
    """A Twilio-style SID: two-letter prefix + 32 lowercase hex digits."""
    return prefix + secrets.token_hex(16)


# --- URLs and signatures ---------------------------------------------------------------------


def strip_fragment(url: str) -> str:
    """Twilio uses `#ct=…&rc=…` fragments as connection overrides; they are never sent."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))


def signing_url(url: str) -> str:
    """The URL string Twilio signs for an HTTP webhook.

    Voice callbacks over HTTPS drop an explicit port before signing (docs/protocols.md,
    "Signatures");
    everything else is signed exactly as given.
    """
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.port is not None:
        host = parts.hostname or ""
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{host}" if userinfo else host
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


def sign(auth_token: str, url: str, params: dict[str, str] | None) -> str:
    return str(RequestValidator(auth_token).compute_signature(url, params or {}))


def map_to_gateway(url: str, public_url: str, gateway_url: str) -> str:
    """Map a public URL (as written in TwiML) onto where the gateway really listens.

    https→http / wss→ws follow the gateway's scheme, host:port is replaced by the gateway's,
    a path prefix of `public_url` is replaced by the gateway's path prefix; query kept,
    fragment dropped.
    """
    p = urlsplit(url)
    pub = urlsplit(public_url)
    gw = urlsplit(gateway_url)
    is_ws = p.scheme in ("ws", "wss")
    if is_ws:
        scheme = "wss" if gw.scheme == "https" else "ws"
    else:
        scheme = gw.scheme or "http"
    path = p.path or "/"
    pub_prefix = pub.path.rstrip("/")
    gw_prefix = gw.path.rstrip("/")
    if pub_prefix and p.hostname == pub.hostname and (
        path == pub_prefix or path.startswith(pub_prefix + "/")
    ):
        path = path[len(pub_prefix) :] or "/"
    path = gw_prefix + path
    return urlunsplit((scheme, gw.netloc, path, p.query, ""))


def resolve_url(ref: str, base: str) -> str:
    """Resolve a (possibly relative) TwiML URL against the document's URL."""
    return urljoin(base, ref.strip())


def url_with_query(url: str, params: dict[str, str]) -> str:
    sep = "&" if urlsplit(url).query else "?"
    return url + sep + urlencode(params)


# --- standard webhook parameters ("TwiML and webhooks") -------------------------------------


def call_params(
    *,
    account_sid: str,
    call_sid: str,
    from_: str,
    to: str,
    status: str,
    direction: str = "inbound",
) -> dict[str, str]:
    """Twilio's standard voice request parameters (`direction`: inbound, or outbound-api for a
    call placed through the REST API).

    Geographic fields Twilio cannot resolve arrive as empty strings; country is "US" here.
    """
    return {
        "AccountSid": account_sid,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": status,
        "Called": to,
        "CalledCity": "",
        "CalledCountry": "US",
        "CalledState": "",
        "CalledZip": "",
        "Caller": from_,
        "CallerCity": "",
        "CallerCountry": "US",
        "CallerState": "",
        "CallerZip": "",
        "Direction": direction,
        "From": from_,
        "FromCity": "",
        "FromCountry": "US",
        "FromState": "",
        "FromZip": "",
        "To": to,
        "ToCity": "",
        "ToCountry": "US",
        "ToState": "",
        "ToZip": "",
    }


# --- messages the stand-in sends ("Messages Twilio sends") ----------------------------------

CONNECTED_MSG = '{"event":"connected","protocol":"Call","version":"1.0.0"}'


def start_msg(
    *, account_sid: str, stream_sid: str, call_sid: str, custom_parameters: dict[str, str]
) -> str:
    # Key order exactly as in Twilio's docs; sequenceNumber "1" (the first numbered message).
    doc = {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": account_sid,
            "streamSid": stream_sid,
            "callSid": call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": custom_parameters,
        },
        "streamSid": stream_sid,
    }
    return orjson.dumps(doc).decode()


def media_msg_parts(stream_sid: str) -> tuple[str, str, str, str, str]:
    """String-template pieces for an inbound `media` message of one stream.

    media text = A + seq + B + chunk + C + timestamp + D + payload_b64 + E
    """
    return (
        '{"event":"media","sequenceNumber":"',
        '","media":{"track":"inbound","chunk":"',
        '","timestamp":"',
        '","payload":"',
        '"},"streamSid":"' + stream_sid + '"}',
    )


def dtmf_msg(stream_sid: str, seq: int, digit: str) -> str:
    return (
        '{"event":"dtmf","streamSid":"' + stream_sid + '","sequenceNumber":"' + str(seq)
        + '","dtmf":{"track":"inbound_track","digit":"' + digit + '"}}'
    )


def mark_echo_msg(stream_sid: str, seq: int, name: str) -> str:
    return (
        '{"event":"mark","sequenceNumber":"' + str(seq) + '","streamSid":"' + stream_sid
        + '","mark":{"name":' + orjson.dumps(name).decode() + "}}"
    )


def stop_msg(stream_sid: str, seq: int, account_sid: str, call_sid: str) -> str:
    return (
        '{"event":"stop","sequenceNumber":"' + str(seq) + '","stop":{"accountSid":"'
        + account_sid + '","callSid":"' + call_sid + '"},"streamSid":"' + stream_sid + '"}'
    )


# --- messages a gateway may send ("Messages we send") ---------------------------------------


class ProtocolViolation(ValueError):
    """A message Twilio would reject (and ignore) with a 3195x warning."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code} {detail}")
        self.code = code
        self.detail = detail


_ALLOWED_KEYS: dict[str, frozenset[str]] = {
    "media": frozenset(("event", "streamSid", "media")),
    "mark": frozenset(("event", "streamSid", "mark")),
    "clear": frozenset(("event", "streamSid")),
}


def parse_server_message(text: str, stream_sid: str) -> tuple[str, Any]:
    """Validate one text frame from the gateway like Twilio does.

    Returns ("media", payload_bytes) | ("mark", name) | ("clear", None); raises
    ProtocolViolation (code 31951) for non-JSON, unknown event, missing/extra field,
    wrong streamSid, invalid base64.
    """
    try:
        msg = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolViolation(ERR_INVALID_MESSAGE, f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolViolation(ERR_INVALID_MESSAGE, "not a JSON object")
    event = msg.get("event")
    allowed = _ALLOWED_KEYS.get(event) if isinstance(event, str) else None
    if allowed is None:
        raise ProtocolViolation(ERR_INVALID_MESSAGE, f"unknown event {event!r}")
    sid = msg.get("streamSid")
    if sid is None:
        raise ProtocolViolation(ERR_INVALID_MESSAGE, f"{event}: missing streamSid")
    if sid != stream_sid:
        raise ProtocolViolation(ERR_INVALID_MESSAGE, f"{event}: wrong streamSid {sid!r}")
    if len(msg) > len(allowed) or not allowed.issuperset(msg):
        extra = sorted(set(msg) - allowed)
        raise ProtocolViolation(ERR_INVALID_MESSAGE, f"{event}: extra field(s) {extra}")
    if event == "media":
        media = msg.get("media")
        if not isinstance(media, dict) or "payload" not in media:
            raise ProtocolViolation(ERR_INVALID_MESSAGE, "media: missing media.payload")
        if len(media) != 1:
            extra = sorted(set(media) - {"payload"})
            raise ProtocolViolation(ERR_INVALID_MESSAGE, f"media: extra field(s) {extra}")
        payload = media["payload"]
        if not isinstance(payload, str):
            raise ProtocolViolation(ERR_INVALID_MESSAGE, "media: payload is not a string")
        try:
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolViolation(ERR_INVALID_MESSAGE, f"media: invalid base64: {exc}") from None
        return "media", audio
    if event == "mark":
        mark = msg.get("mark")
        if not isinstance(mark, dict) or not isinstance(mark.get("name"), str):
            raise ProtocolViolation(ERR_INVALID_MESSAGE, "mark: missing mark.name")
        if len(mark) != 1:
            extra = sorted(set(mark) - {"name"})
            raise ProtocolViolation(ERR_INVALID_MESSAGE, f"mark: extra field(s) {extra}")
        return "mark", mark["name"]
    return "clear", None
