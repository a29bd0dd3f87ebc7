"""Vapi's control plane: create a websocket-transport call and open its transport socket.

`websocketCallUrl` is a bearer secret (the bare URL joins the live call), so it never leaves
this module in a log line or an exception message. It also names the host we connect to, and
Vapi's answer is not ours to trust with our private key: the key goes only to the host
VAPI_BASE_URL names (see `transport_credentials`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.protocol import State

from shared import vapi_proto as V
from shared.settings import Settings
from worker.vapi_socket import VapiConnection

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


MAX_URL = 2048  # a transport URL is a host and an id, far below this
MAX_ID = 200


class UnusableUrl(ValueError):
    """A transport URL we will not open; the message never contains the URL."""


def created_call(data: Any) -> VapiCall:
    """The call id and transport URL of a `POST /call` answer. Both are untrusted: anything but
    strings of a sane size is refused (ValueError) rather than turned into a URL by str()."""
    transport = data.get("transport") if isinstance(data, dict) else None
    url = transport.get("websocketCallUrl") if isinstance(transport, dict) else None
    call_id = data.get("id", "") if isinstance(data, dict) else None
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        raise ValueError("no usable transport.websocketCallUrl")
    if not isinstance(call_id, str) or len(call_id) > MAX_ID:
        raise ValueError("no usable id")
    return VapiCall(id=call_id, websocket_url=url)


def _origin(url: str) -> tuple[bool, str, int]:
    """(secure, host, port) of an http(s)/ws(s) URL; ValueError for a port out of range."""
    parts = urlsplit(url)
    secure = parts.scheme in ("https", "wss")
    return secure, (parts.hostname or "").lower(), parts.port or (443 if secure else 80)


def transport_credentials(base_url: str, ws_url: str) -> bool:
    """Whether the transport upgrade may carry our API key: only when it goes to the origin
    (scheme, host, port) of VAPI_BASE_URL. Vapi's transport host is its own to choose (its
    sample answer names a host other than api.vapi.ai) and the URL is itself the credential
    there, so another host is opened without the key. Refused (UnusableUrl): a URL that is not
    ws(s), has no host, or is plain ws while the API is https."""
    try:
        scheme = urlsplit(ws_url).scheme
        secure, host, port = _origin(ws_url)
        base = _origin(base_url)
    except ValueError:
        raise UnusableUrl("malformed websocketCallUrl") from None
    if scheme not in ("ws", "wss"):
        raise UnusableUrl("websocketCallUrl is not a ws(s) URL")
    if not host:
        raise UnusableUrl("websocketCallUrl has no host")
    if base[0] and not secure:
        raise UnusableUrl("plain ws:// websocketCallUrl while VAPI_BASE_URL is https")
    return (secure, host, port) == base


MAX_MODELS = 1000  # assistants whose model a worker keeps (the routes' and the API's)


class VapiClient:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._http = httpx.AsyncClient(
            base_url=settings.vapi_base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {settings.vapi_key}", "User-Agent": USER_AGENT},
            timeout=httpx.Timeout(10.0, connect=5.0),
        )
        self._models: dict[str, V.AssistantModel] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def assistant_model(self, assistant_id: str | None = None) -> V.AssistantModel | None:
        """An assistant's provider and model (GET /assistant/{id}; default VAPI_ASSISTANT_ID),
        fetched once and kept: a takeover must not wait for it. None when Vapi does not say (then
        a takeover falls back to waiting for the caller). Ids come from the settings or a call
        record that passed `call_options` (a safe charset); at most MAX_MODELS are kept."""
        aid = assistant_id or self._settings.vapi_assistant_id or ""
        if not aid:
            return None
        if (known := self._models.get(aid)) is not None:
            return known
        try:
            resp = await self._http.get(f"/assistant/{aid}", timeout=3.0)
            if resp.status_code == 200 and (model := V.assistant_model(resp.json())) is not None:
                if len(self._models) >= MAX_MODELS:
                    self._models.clear()
                self._models[aid] = model
                return model
        except (httpx.HTTPError, ValueError):
            pass
        return None

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
                    return created_call(resp.json())
                except ValueError as exc:  # our own message, never the URL
                    raise VapiError("vapi-error", "bad_response", str(exc)) from None
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
            with_key = transport_credentials(s.vapi_base_url, call.websocket_url)
        except UnusableUrl as exc:
            raise VapiError("vapi-error", "bad_response", str(exc)) from None
        if not with_key:
            log.debug("vapi transport is on another host than VAPI_BASE_URL; connecting without the key")
        try:
            return await connect(
                call.websocket_url,
                additional_headers={"Authorization": f"Bearer {s.vapi_key}"} if with_key else None,
                user_agent_header=USER_AGENT,
                open_timeout=s.vapi_connect_timeout_s,
                ping_interval=s.vapi_ping_interval_s,
                ping_timeout=s.vapi_ping_timeout_s,
                close_timeout=2,
                max_size=2**20,
                compression=None,
                create_connection=VapiConnection,
            )
        except Exception as exc:  # never echo the URL: some exceptions embed it
            status = getattr(getattr(exc, "response", None), "status_code", None)
            raise VapiError("vapi-unreachable", "socket",
                            f"{type(exc).__name__}" + (f" HTTP {status}" if status else "")) from None


def send_now(ws: ClientConnection, payload: bytes | str) -> bool:
    """Write one message to the socket now, without awaiting, when nothing could make
    `ws.send` wait: the socket open, no fragmented message in progress, no back-pressure.
    False when something could (the caller then queues it for `ws.send`, in order).

    Why: the worker's shared stream reader must not await one call's socket, so each call has a
    sender task; handing every 20 ms frame to it costs a task switch, an event and `send`'s
    async context per frame (docs/performance.md, "Against a direct bridge"). This writes through
    the connection's sans-I/O protocol exactly as `send` does inside its context."""
    try:
        if (ws.protocol.state is not State.OPEN or ws.send_in_progress is not None or ws.paused
                or ws.transport.is_closing() or not _SEND_DATA):
            return False
    except AttributeError:  # another websockets release: `send` alone is always right
        return False
    if isinstance(payload, bytes):
        ws.protocol.send_binary(payload)
    else:
        ws.protocol.send_text(payload.encode())
    try:
        ws.send_data()
    except Exception:  # as `send` does: the socket is dead, and its reader ends the call
        ws.transport.abort()
    return True


_SEND_DATA = callable(getattr(ClientConnection, "send_data", None))
