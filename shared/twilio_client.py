"""The `twilio` library's REST client as both tiers use it: async (aiohttp), created in the running
loop, pointed at TWILIO_API_BASE_URL when set (the stand-in in tests and the demo)."""

from __future__ import annotations

from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from shared.settings import Settings


class TwilioClient:
    """Built on first use (aiohttp needs the running loop), closed with `aclose`."""

    def __init__(self, settings: Settings, timeout: float) -> None:
        self._settings = settings
        self._timeout = timeout
        self._http: AsyncTwilioHttpClient | None = None
        self._client: Client | None = None

    def get(self) -> Client:
        if self._client is None:
            s = self._settings
            self._http = AsyncTwilioHttpClient(timeout=self._timeout)
            self._client = Client(s.twilio_account_sid, s.auth_token, http_client=self._http)
            if s.twilio_api_base_url:
                self._client.api.base_url = s.twilio_api_base_url.rstrip("/")
        return self._client

    async def aclose(self) -> None:
        session = getattr(self._http, "session", None)
        if session is not None:
            await session.close()
