"""Vapi's control plane: create a websocket-transport call and open its transport socket.

`websocketCallUrl` is a bearer secret (the bare URL joins the live call), so it never leaves
this module in a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from shared.settings import Settings

log = logging.getLogger("callbridge.vapi")
USER_AGENT = "callbridge/0.1 (+https://github.com/callbridge)"


class VapiError(Exception):
    """Setup failed; `reason` is the call's end reason, `kind` a bounded metric label."""

    def __init__(self, reason: str, kind: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({kind}) {detail}".strip())
        self.reason = reason
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class VapiCall:
    id: str
    websocket_url: str

    def __repr__(self) -> str:  # keep the secret URL out of reprs and tracebacks
        return f"VapiCall(id={self.id!r})"


class VapiClient:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._http = httpx.AsyncClient(
            base_url=settings.vapi_base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {settings.vapi_key}", "User-Agent": USER_AGENT},
            timeout=httpx.Timeout(10.0, connect=5.0),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def create_call(self, body: dict[str, Any]) -> VapiCall:
        """POST /call. One quick retry on 5xx and on connection failures; 4xx are final."""
        last: VapiError | None = None
        for attempt in range(2):
            if attempt:
                await asyncio.sleep(0.3)
            try:
                resp = await self._http.post("/call", json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = VapiError("vapi-unreachable", "connect", type(exc).__name__)
                continue  # the request never arrived: safe to retry
            except httpx.HTTPError as exc:
                # It may have arrived: a retry could create a second, orphaned Vapi call.
                raise VapiError("vapi-unreachable", "connect", type(exc).__name__) from None
            if resp.status_code in (200, 201):
                try:
                    data = resp.json()
                    return VapiCall(id=str(data.get("id", "")),
                                    websocket_url=str(data["transport"]["websocketCallUrl"]))
                except (ValueError, KeyError, TypeError):
                    raise VapiError("vapi-error", "bad_response", "no transport.websocketCallUrl") from None
            detail = f"HTTP {resp.status_code}: {resp.text[:200]}"
            if resp.status_code == 429:
                raise VapiError("vapi-rate-limited", "http_429", detail)
            if 400 <= resp.status_code < 500:
                raise VapiError("vapi-rejected", "http_4xx", detail)
            last = VapiError("vapi-error", "http_5xx", detail)
        assert last is not None
        raise last

    async def connect(self, call: VapiCall) -> ClientConnection:
        s = self._settings
        try:
            return await connect(
                call.websocket_url,
                additional_headers={"Authorization": f"Bearer {s.vapi_key}"},
                user_agent_header=USER_AGENT,
                open_timeout=s.vapi_connect_timeout_s,
                ping_interval=s.vapi_ping_interval_s,
                ping_timeout=s.vapi_ping_timeout_s,
                close_timeout=2,
                max_size=2**20,
                compression=None,
            )
        except Exception as exc:  # never echo the URL: some exceptions embed it
            status = getattr(getattr(exc, "response", None), "status_code", None)
            raise VapiError("vapi-unreachable", "socket",
                            f"{type(exc).__name__}" + (f" HTTP {status}" if status else "")) from None
