"""Twilio's HTTP requests to the application: signed webhooks, stream status callbacks, and an
outbound call's status and AMD callbacks.

Every request is signed over the public URL (what the gateway was configured with) and sent to
where the gateway really listens; GET parameters go into the signed URL, POST parameters into
the signed form. Status callbacks are fire-and-forget, as in Twilio: their outcome only shows up
in the call's events.

Docs: docs/protocols.md, section "Twilio Media Streams", "TwiML and webhooks" and "Signatures".
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx

from . import wire as w

if TYPE_CHECKING:
    from .call import SimCall
    from .stream import MediaStream


class Webhooks:
    """One HTTP client for all calls of a sim, and the callbacks still in flight."""

    def __init__(self, *, auth_token: str, public_url: str, gateway_url: str) -> None:
        self.auth_token = auth_token
        self.public_url = public_url
        self.gateway_url = gateway_url
        self.pending: set[asyncio.Task[Any]] = set()
        self._http: httpx.AsyncClient | None = None

    def open(self) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(15.0, connect=5.0),  # Twilio's webhook defaults
                limits=httpx.Limits(max_connections=500, max_keepalive_connections=100),
                trust_env=False,
                follow_redirects=False,
            )

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def request(self, url: str, method: str, params: dict[str, str]) -> httpx.Response:
        """A signed request to `url` (a public URL), sent to the gateway."""
        assert self._http is not None
        url = w.strip_fragment(url)
        headers = {"User-Agent": w.TWILIO_WEBHOOK_USER_AGENT}
        if method == "GET":
            full = w.url_with_query(url, params)
            headers["X-Twilio-Signature"] = w.sign(self.auth_token, w.signing_url(full), {})
            target = w.map_to_gateway(full, self.public_url, self.gateway_url)
            return await self._http.get(target, headers=headers)
        headers["X-Twilio-Signature"] = w.sign(self.auth_token, w.signing_url(url), params)
        target = w.map_to_gateway(url, self.public_url, self.gateway_url)
        return await self._http.post(target, data=params, headers=headers)

    def fire(
        self,
        call: SimCall,
        url: str,
        method: str,
        params: dict[str, str],
        *,
        kind: str,
        after: asyncio.Task[None] | None = None,
        **note: Any,
    ) -> asyncio.Task[None] | None:
        """Fire-and-forget signed request (a call status or AMD callback). `after`: send once
        that earlier request has finished (bounded), so one call's callbacks arrive in order.
        The outcome is recorded as a call event `kind` with `note`."""
        if self._http is None:
            return None

        async def send() -> None:
            if after is not None and not after.done():
                await asyncio.wait({after}, timeout=15.0)
            try:
                resp = await asyncio.wait_for(self.request(url, method, params), 15.0)
                call._event(kind, url=url, http=resp.status_code, **note)
            except Exception as exc:
                call._event(kind, url=url, error=repr(exc), **note)

        task = asyncio.ensure_future(send())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return task

    def stream_status(self, call: SimCall, st: MediaStream, event: str) -> None:
        """Fire-and-forget `<Stream statusCallback>` request (stream-started/stopped)."""
        if st.status_callback is None or self._http is None:
            return
        url, method = st.status_callback
        params = {
            "AccountSid": call.account_sid,
            "CallSid": call.call_sid,
            "StreamSid": st.sid,
            "StreamName": st.name or st.sid,
            "StreamEvent": event,
            "Timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }

        async def send() -> None:
            try:
                resp = await asyncio.wait_for(self.request(url, method, params), 15.0)
                call._event("status-callback", event=event, http=resp.status_code)
            except Exception as exc:
                call._event("status-callback", event=event, error=repr(exc))

        task = asyncio.ensure_future(send())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
