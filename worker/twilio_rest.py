"""Ending a call over Twilio's REST API, the fallback when no gateway can close the stream."""

from __future__ import annotations

import logging

from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from shared.settings import Settings

log = logging.getLogger("callbridge.twilio")


class TwilioRest:
    def __init__(self, settings: Settings) -> None:
        self._enabled = bool(settings.twilio_account_sid and settings.auth_token)
        self._http = AsyncTwilioHttpClient(timeout=5)
        self._client = Client(settings.twilio_account_sid, settings.auth_token, http_client=self._http)
        if settings.twilio_api_base_url:
            self._client.api.base_url = settings.twilio_api_base_url.rstrip("/")

    async def complete(self, call_sid: str) -> str:
        """Hang up: 'completed', 'already-ended' (404/20404), 'disabled' or 'failed'."""
        if not self._enabled:
            return "disabled"
        try:
            await self._client.calls(call_sid).update_async(status="completed")
            return "completed"
        except TwilioRestException as exc:
            if exc.status == 404 or exc.code == 20404:
                return "already-ended"
            log.warning("twilio hang-up failed", extra={"status": exc.status, "code": exc.code})
            return "failed"
        except Exception as exc:
            log.warning("twilio hang-up failed", extra={"error": type(exc).__name__})
            return "failed"

    async def aclose(self) -> None:
        session = getattr(self._http, "session", None)
        if session is not None:
            await session.close()
