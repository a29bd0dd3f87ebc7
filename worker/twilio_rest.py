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
        self._settings = settings
        self._enabled = bool(settings.twilio_account_sid and settings.auth_token)
        self._http: AsyncTwilioHttpClient | None = None
        self._client: Client | None = None

    def _get_client(self) -> Client:
        # aiohttp (under the twilio client) must be created inside the running loop.
        if self._client is None:
            s = self._settings
            self._http = AsyncTwilioHttpClient(timeout=5)
            self._client = Client(s.twilio_account_sid, s.auth_token, http_client=self._http)
            if s.twilio_api_base_url:
                self._client.api.base_url = s.twilio_api_base_url.rstrip("/")
        return self._client

    async def complete(self, call_sid: str) -> str:
        """Hang up: 'completed', 'already-ended' (404/20404), 'disabled' or 'failed'."""
        if not self._enabled:
            return "disabled"
        try:
            await self._get_client().calls(call_sid).update_async(status="completed")
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
