"""Placing a call through Twilio's REST API (the `twilio` library), for `POST /v1/calls`.

Vapi cannot place a websocket-transport call on a phone number, so the bridge dials: Twilio
creates the call and, once answered, fetches our voice webhook, whose `<Connect><Stream>` brings
the call into the same path as an inbound one. The request id in that URL finds the API
request's parameters (assistant, variables, voicemail policy) before a worker claims the call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from twilio.base.exceptions import TwilioRestException

from shared.settings import Settings
from shared.twilio_client import TwilioClient

log = logging.getLogger("callbridge.gateway.outbound")


@dataclass(frozen=True, slots=True)
class DialRequest:
    to: str
    from_: str
    url: str  # our voice webhook, with the request id
    status_callback: str
    amd: bool
    amd_mode: str  # "Enable" (hang up at the first verdict) or "DetectMessageEnd" (wait for the beep)
    amd_callback: str


class DialRefused(Exception):
    """Twilio did not create the call: `status` is what the API answers, `detail` says why and
    names Twilio's error (never our credentials)."""

    def __init__(self, status: int, detail: dict[str, object]) -> None:
        super().__init__(f"{status}: {detail.get('error')}")
        self.status = status
        self.detail = detail


def refusal(exc: TwilioRestException) -> DialRefused:
    """How a Twilio error reaches the API caller: their request's fault (a 4xx on a number or a
    parameter) → 400 naming Twilio's code; ours (credentials, account) → 502; Twilio busy → 503."""
    code = exc.code if isinstance(exc.code, int) else None
    text = str(exc.msg or "")[:300]
    body: dict[str, object] = {"error": "twilio_refused", "twilio_status": exc.status,
                               "twilio_code": code, "message": text}
    if exc.status in (401, 403):
        body["message"] = "Twilio refused callbridge's credentials (check TWILIO_ACCOUNT_SID and " \
                          "TWILIO_AUTH_TOKEN)"
        return DialRefused(502, body)
    if exc.status == 429:
        return DialRefused(503, body)
    if 400 <= exc.status < 500:
        return DialRefused(400, body)
    return DialRefused(502, body)


class Dialer:
    """One Twilio client per gateway process, created in the running loop (aiohttp needs it)."""

    def __init__(self, settings: Settings) -> None:
        self._twilio = TwilioClient(settings, timeout=10)
        self._get = self._twilio.get

    async def dial(self, req: DialRequest) -> tuple[str, str]:
        """The new call's (CallSid, Twilio status), or DialRefused."""
        kwargs: dict[str, object] = {
            "to": req.to, "from_": req.from_, "url": req.url, "method": "POST",
            "status_callback": req.status_callback, "status_callback_method": "POST",
            "status_callback_event": ["initiated", "ringing", "answered", "completed"],
        }
        if req.amd:
            kwargs.update(machine_detection=req.amd_mode, async_amd="true",
                          async_amd_status_callback=req.amd_callback,
                          async_amd_status_callback_method="POST")
        try:
            call = await self._get().calls.create_async(**kwargs)
        except TwilioRestException as exc:
            log.warning("twilio refused to create a call",
                        extra={"twilio_status": exc.status, "twilio_code": exc.code})
            raise refusal(exc) from None
        except Exception as exc:  # network, TLS, a malformed answer
            log.warning("could not reach twilio to create a call", extra={"error": type(exc).__name__})
            detail = f"Twilio could not be reached ({type(exc).__name__})"
            raise DialRefused(502, {"error": "twilio_unreachable", "message": detail}) from None
        return str(call.sid), str(call.status)

    async def end(self, call_sid: str, answered: bool) -> str:
        """End a call at Twilio: cancel one not answered yet, complete one in progress.
        'ended', 'already-ended' (Twilio: unknown or over) or 'failed'."""
        try:
            await self._get().calls(call_sid).update_async(
                status="completed" if answered else "canceled")
            return "ended"
        except TwilioRestException as exc:
            if exc.status == 404 or exc.code == 20404:
                return "already-ended"
            log.warning("twilio refused to end a call", extra={"twilio_status": exc.status,
                                                               "twilio_code": exc.code})
            return "failed"
        except Exception as exc:
            log.warning("could not reach twilio to end a call", extra={"error": type(exc).__name__})
            return "failed"

    async def aclose(self) -> None:
        await self._twilio.aclose()
