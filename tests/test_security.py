"""Signatures (Twilio's documented vector, proxies, the WSS upgrade), stream tokens, TwiML."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from twilio.request_validator import RequestValidator

from gateway import twiml
from shared.security import (
    make_stream_token,
    verify_stream_token,
    webhook_signature_ok,
    ws_signature_ok,
)
from shared.settings import Settings

DOC_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675310",
    "Digits": "1234",
    "From": "+14158675310",
    "To": "+18005551212",
}


def test_twilio_documented_test_vector() -> None:
    url = "https://example.com/myapp.php?foo=1&bar=2"
    assert webhook_signature_ok("12345", url, DOC_PARAMS, "L/OH5YylLD5NRKLltdqwSvS0BnU=")
    assert not webhook_signature_ok("12345", url, DOC_PARAMS, "L/OH5YylLD5NRKLltdqwSvS0BnX=")
    assert not webhook_signature_ok("12345", url, {**DOC_PARAMS, "Digits": "1235"},
                                    "L/OH5YylLD5NRKLltdqwSvS0BnU=")
    assert not webhook_signature_ok("12345", url, DOC_PARAMS, None)
    assert not webhook_signature_ok("", url, DOC_PARAMS, "L/OH5YylLD5NRKLltdqwSvS0BnU=")


def test_proxied_url_validates_against_public_url_only() -> None:
    token = "secret-token"
    public = "https://cb.example.com/twilio/voice"
    internal = "http://10.0.0.5:8080/twilio/voice"
    sig = RequestValidator(token).compute_signature(public, DOC_PARAMS)
    assert webhook_signature_ok(token, public, DOC_PARAMS, sig)
    assert not webhook_signature_ok(token, internal, DOC_PARAMS, sig)
    # Twilio drops :443 for voice over HTTPS; the validator tries both forms.
    sig_port = RequestValidator(token).compute_signature("https://cb.example.com:443/twilio/voice",
                                                         DOC_PARAMS)
    assert webhook_signature_ok(token, public, DOC_PARAMS, sig_port)


def test_ws_upgrade_signature_with_and_without_trailing_slash() -> None:
    token = "secret-token"
    url = "wss://cb.example.com/twilio/media"
    v = RequestValidator(token)
    assert ws_signature_ok(token, url, v.compute_signature(url, {}))
    assert ws_signature_ok(token, url, v.compute_signature(url + "/", {}))
    assert not ws_signature_ok(token, url, v.compute_signature("wss://evil.example.com/twilio/media", {}))
    assert not ws_signature_ok(token, url, "")
    assert not ws_signature_ok("other-token", url, v.compute_signature(url, {}))


def test_stream_token_roundtrip_expiry_and_binding() -> None:
    secret = b"k" * 32
    sid = "CA" + "a" * 32
    tok = make_stream_token(secret, sid, ttl_s=60, now=1000.0)
    assert verify_stream_token(secret, sid, tok, now=1030.0)
    assert not verify_stream_token(secret, sid, tok, now=1061.0)  # expired
    assert not verify_stream_token(secret, "CA" + "b" * 32, tok, now=1030.0)  # other call
    assert not verify_stream_token(b"x" * 32, sid, tok, now=1030.0)  # other secret
    exp, nonce, mac = tok.split(".")
    assert not verify_stream_token(secret, sid, f"{int(exp) + 1000}.{nonce}.{mac}", now=1030.0)  # extended
    for junk in ("", "abc", "1.2.3", "notanumber.mac"):
        assert not verify_stream_token(secret, sid, junk, now=1030.0)


def test_token_secret_derived_from_auth_token_is_stable_and_distinct() -> None:
    a = Settings(TWILIO_AUTH_TOKEN="one")  # type: ignore[call-arg]
    b = Settings(TWILIO_AUTH_TOKEN="two")  # type: ignore[call-arg]
    assert a.token_secret == Settings(TWILIO_AUTH_TOKEN="one").token_secret  # type: ignore[call-arg]
    assert a.token_secret != b.token_secret
    assert a.token_secret != b"one"


def test_connect_stream_twiml() -> None:
    xml = twiml.connect_stream(stream_url="wss://cb.example.com/twilio/media",
                               action_url="https://cb.example.com/twilio/stream-ended",
                               status_url="https://cb.example.com/twilio/status", token="1.a&b")
    root = ET.fromstring(xml)
    assert root.tag == "Response"
    (connect,) = list(root)
    assert connect.tag == "Connect"
    assert connect.get("action") == "https://cb.example.com/twilio/stream-ended"
    (stream,) = list(connect)
    assert stream.get("url") == "wss://cb.example.com/twilio/media"
    assert stream.get("statusCallback") == "https://cb.example.com/twilio/status"
    (param,) = list(stream)
    assert (param.get("name"), param.get("value")) == ("token", "1.a&b")
    assert len(list(root)) == 1, "nothing may follow </Connect>: the action decides"


def test_hangup_and_dial_twiml() -> None:
    assert [e.tag for e in ET.fromstring(twiml.hangup())] == ["Hangup"]
    said = ET.fromstring(twiml.hangup("Sorry."))
    assert [e.tag for e in said] == ["Say", "Hangup"] and said[0].text == "Sorry."
    dial = ET.fromstring(twiml.dial("+14155550100"))
    assert dial[0].tag == "Dial" and dial[0][0].tag == "Number" and dial[0][0].text == "+14155550100"
    sip = ET.fromstring(twiml.dial("sip:agent@pbx.example.com"))
    assert sip[0][0].tag == "Sip" and sip[0][0].text == "sip:agent@pbx.example.com"


def test_stream_url_follows_public_scheme() -> None:
    assert Settings(PUBLIC_URL="https://cb.example.com/").stream_url == (  # type: ignore[call-arg]
        "wss://cb.example.com/twilio/media")
    assert Settings(PUBLIC_URL="http://127.0.0.1:8080").stream_url == (  # type: ignore[call-arg]
        "ws://127.0.0.1:8080/twilio/media")


def test_transfer_allow_list() -> None:
    none = Settings()  # type: ignore[call-arg]
    assert not none.transfer_allowed("+14155550100")
    s = Settings(TRANSFER_ALLOW="+1415*, sip:desk@pbx.example.com ,+442071234567")  # type: ignore[call-arg]
    assert s.transfer_allowed("+14155550100")
    assert s.transfer_allowed("sip:desk@pbx.example.com")
    assert s.transfer_allowed("+442071234567")
    assert not s.transfer_allowed("+19005550199")
    assert not s.transfer_allowed("sip:desk@pbx.example.com.evil")
    assert Settings(TRANSFER_ALLOW="*").transfer_allowed("+1900")  # type: ignore[call-arg]


def test_two_tokens_for_one_call_in_the_same_second_differ_and_both_verify() -> None:
    """A re-attach minted in the same second as a used token must not collide with it: the
    gateway marks tokens used by their MAC, so equal tokens would refuse the re-attach."""
    secret = b"k" * 32
    sid = "CA" + "a" * 32
    tokens = {make_stream_token(secret, sid, ttl_s=60, now=1000.0) for _ in range(50)}
    assert len(tokens) == 50
    assert len({t[-24:] for t in tokens}) == 50, "the used-token marker (last 24 chars) differs too"
    for tok in tokens:
        assert verify_stream_token(secret, sid, tok, now=1030.0)
        assert len(tok) < 100, "a <Parameter> name + value stays far under Twilio's 500 characters"
    tok = next(iter(tokens))
    exp, nonce, mac = tok.split(".")
    other_nonce = ("A" if nonce[0] != "A" else "B") + nonce[1:]
    assert not verify_stream_token(secret, sid, f"{exp}.{other_nonce}.{mac}", now=1030.0)
    assert not verify_stream_token(secret, sid, f"{exp}.{mac}", now=1030.0)  # nonce stripped
