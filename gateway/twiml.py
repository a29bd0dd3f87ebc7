"""TwiML documents the gateway answers with, built by the `twilio` library (pure functions)."""

from __future__ import annotations

from twilio.twiml.voice_response import Connect, VoiceResponse


def connect_stream(*, stream_url: str, action_url: str, status_url: str, token: str) -> str:
    """`<Connect action><Stream url><Parameter token/></Stream></Connect>`.

    Nothing follows `</Connect>`: when our socket closes, Twilio requests `action` and we decide
    then between hang-up, transfer and re-attaching the stream.
    """
    resp = VoiceResponse()
    connect = Connect(action=action_url, method="POST")
    stream = connect.stream(
        url=stream_url, status_callback=status_url, status_callback_method="POST"
    )
    stream.parameter(name="token", value=token)
    resp.append(connect)
    return str(resp)


def hangup(say: str | None = None) -> str:
    resp = VoiceResponse()
    if say:
        resp.say(say)
    resp.hangup()
    return str(resp)


def dial(target: str, caller_id: str | None = None) -> str:
    """Transfer to a phone number or a SIP URI."""
    resp = VoiceResponse()
    d = resp.dial(caller_id=caller_id) if caller_id else resp.dial()
    if target.startswith("sip:"):
        d.sip(target)
    else:
        d.number(target)
    return str(resp)


def hold(message: str | None, pause_s: int, redirect_url: str) -> str:
    """Admission: keep a caller waiting for a free place (a message the first time, then quiet
    pauses), asking us again after each pause."""
    resp = VoiceResponse()
    if message:
        resp.say(message)
    resp.pause(length=pause_s)
    resp.redirect(redirect_url, method="POST")
    return str(resp)
