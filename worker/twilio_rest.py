"""Ending a call over Twilio's REST API, the fallback when no gateway can close the stream."""

from __future__ import annotations

import logging

from twilio.base.exceptions import TwilioRestException

from shared.settings import Settings
from shared.twilio_client import TwilioClient

log = logging.getLogger("callbridge.twilio")


class TwilioRest:
    def __init__(self, settings: Settings) -> None:
        self._enabled = bool(settings.twilio_account_sid and settings.auth_token)
        self._twilio = TwilioClient(settings, timeout=5)
        self._get_client = self._twilio.get

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
        await self._twilio.aclose()
