"""The stand-in's REST side: ``POST /call``, ``GET /call/{id}``, ``GET /assistant/{id}``,
``POST /{id}/control``.

``docs/protocols.md``, "Vapi websocket transport" / "Creating the call" and "Control messages".
Errors are NestJS-shaped like Vapi's; the Call object is the ``vapi.websocketCall`` the bridge
reads its ``transport.websocketCallUrl`` from; the Assistant object is what a worker reads the
saved provider and model from before it overrides ``model.messages``. Test knobs
(``create_delay``, ``fail_status``, ``assistant_fail_status``, ``api_key``, the saved model) are
read from the sim on every request so a test can change them mid-run.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sim.vapi.validate import RUNNERS, validate_create_call

if TYPE_CHECKING:
    from sim.vapi.session import VapiSession
    from sim.vapi.sim import VapiSim

UNAUTHORIZED_MESSAGE = (
    "Invalid Key. Hot tip, you may be using the private key instead of the public key, "
    "or vice versa."
)
#: body fields the Call object echoes back.
ECHOED = (*RUNNERS, "assistantOverrides", "name", "customer", "customerId", "metadata")


def build_app(sim: VapiSim) -> Starlette:
    """The routes, bound to ``sim``."""

    saved_at = _iso(datetime.now(UTC))

    def authorized(request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and token.strip() == sim.api_key

    async def create_call(request: Request) -> Response:
        raw = await request.body()
        try:
            body: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        entry: dict[str, Any] = {"status": 0, "body": body, "at": time.monotonic()}
        sim.create_log.append(entry)
        if not authorized(request):
            entry["status"] = 401
            return error(401, UNAUTHORIZED_MESSAGE)
        if sim.create_delay > 0:
            await asyncio.sleep(sim.create_delay)
        fail = sim.fail_status
        if fail is not None:
            entry["status"] = fail
            if fail == 400:
                return error(400, ["Over Concurrency Limit."])
            if fail == 429:
                return error(429, "Rate limit exceeded")
            return error(fail, None)
        if isinstance(body, str):
            entry["status"] = 400
            return error(400, f"Unexpected token in JSON: {body[:40]!r}")
        errors = validate_create_call(body)
        if errors:
            entry["status"] = 400
            return error(400, errors)
        session = sim.create_session(body)
        entry["status"] = 201
        entry["call_id"] = session.id
        return JSONResponse(session.call_json(), 201)

    async def get_call(request: Request) -> Response:
        if not authorized(request):
            return error(401, UNAUTHORIZED_MESSAGE)
        session = sim.sessions.get(request.path_params["call_id"])
        if session is None:
            return error(404, "Not Found")
        return JSONResponse(session.call_json())

    async def get_assistant(request: Request) -> Response:
        """The saved assistant (any id: the stand-in does not look ids up, as for POST /call)."""
        assistant_id = request.path_params["assistant_id"]
        entry: dict[str, Any] = {"status": 0, "id": assistant_id, "at": time.monotonic()}
        sim.assistant_log.append(entry)
        if not authorized(request):
            entry["status"] = 401
            return error(401, UNAUTHORIZED_MESSAGE)
        fail = sim.assistant_fail_status
        if fail is not None:
            entry["status"] = fail
            return error(fail, None)
        entry["status"] = 200
        return JSONResponse(assistant_object(sim, assistant_id, saved_at))

    async def control(request: Request) -> Response:
        """Live Call Control: the same messages as the socket, no auth (like Vapi's URL)."""
        session = sim.sessions.get(request.path_params["call_id"])
        if session is None:
            return error(404, "Not Found")
        try:
            msg = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return error(400, ["body must be a JSON object"])
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            return error(400, ["type must be a string"])
        if not session.live:
            return error(400, ["call is not active"])
        session._receive_control(msg)
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/call", create_call, methods=["POST"]),
            Route("/call/{call_id}", get_call, methods=["GET"]),
            Route("/assistant/{assistant_id}", get_assistant, methods=["GET"]),
            Route("/{call_id}/control", control, methods=["POST"]),
        ]
    )


def call_object(session: VapiSession) -> dict[str, Any]:
    """The Call object as ``POST /call`` / ``GET /call/{id}`` return it."""
    sim = session.sim
    created = _iso(session.created_at)
    call: dict[str, Any] = {
        "id": session.id,
        "orgId": sim.org_id,
        "type": "vapi.websocketCall",
        "createdAt": created,
        "updatedAt": _iso(datetime.now(UTC)) if session.status != "queued" else created,
        "status": session.status,
        "cost": 0,
        "transport": {
            "provider": "vapi.websocket",
            "websocketCallUrl": f"{sim.ws_base_url}/{session.id}/transport",
            "audioFormat": {
                "format": session.audio_format,
                "container": "raw",
                "sampleRate": session.sample_rate,
            },
        },
        "monitor": {"controlUrl": f"{sim.base_url}/{session.id}/control"},
    }
    for key in ECHOED:
        if key in session.body:
            call[key] = session.body[key]
    if session.ended_reason is not None:
        call["endedReason"] = session.ended_reason
    return call


def assistant_object(sim: VapiSim, assistant_id: str, saved_at: str) -> dict[str, Any]:
    """The Assistant object as ``GET /assistant/{id}`` returns it: the fields a bridge reads
    (``model.provider``, ``model.model``) plus enough of the rest to look like Vapi's. Its
    ``firstMessageMode`` says what the script does on connect."""
    script = sim.assistants.get(assistant_id, sim.assistant)
    mode = "assistant-speaks-first" if script.greeting_s else "assistant-waits-for-user"
    return {
        "id": assistant_id,
        "orgId": sim.org_id,
        "name": script.name,
        "firstMessageMode": mode,
        "model": {
            "provider": sim.assistant_provider,
            "model": sim.assistant_model,
            "messages": [{"role": "system", "content": sim.system_prompt}],
        },
        "createdAt": saved_at,
        "updatedAt": saved_at,
    }


def error(status: int, message: Any) -> JSONResponse:
    """NestJS-shaped error body (500 has no "error" field, as NestJS's default)."""
    if status == 500:
        return JSONResponse({"statusCode": 500, "message": "Internal server error"}, 500)
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body = {"message": phrase if message is None else message, "error": phrase, "statusCode": status}
    return JSONResponse(body, status)


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
