"""Twilio's REST call resource, as far as a gateway or worker uses it.

Basic auth (account SID : auth token) on every request.
`POST /2010-04-01/Accounts/{AC}/Calls.json` places an outbound call (validated by
outbound.parse_create_call; answered 201 with the resource, `queued`; dialer.py runs it).
`POST /2010-04-01/Accounts/{AC}/Calls/{CA}.json`: `Status=completed` hangs up, `Status=canceled`
cancels a call not yet answered, `Twiml=` / `Url=` (+ `Method=`) redirect the live call (which
tears down its `<Connect><Stream>`); `GET` returns the resource. Errors are Twilio's JSON error
documents (20003 auth, 20404 unknown or ended call, 21218 / 21205 bad parameters, 12100 TwiML,
212xx / 21626 a refused create).

Docs: docs/protocols.md, section "Twilio Media Streams", "Call control" and "Outbound calls and
answering machine detection".
"""

from __future__ import annotations

import binascii
import secrets
import time
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .outbound import CreateCallError, parse_create_call
from .twiml import TwimlError, parse_twiml

if TYPE_CHECKING:
    from .call import SimCall
    from .sim import TwilioSim

CALL_PATH = "/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"
CALLS_PATH = "/2010-04-01/Accounts/{account_sid}/Calls.json"


def rest_app(sim: TwilioSim) -> Starlette:
    """The stand-in's ASGI app; requests are logged in `sim.rest_requests`."""

    async def call_endpoint(request: Request) -> JSONResponse:
        return await _call_request(sim, request)

    async def calls_endpoint(request: Request) -> JSONResponse:
        return await _create_call(sim, request)

    return Starlette(
        routes=[
            Route(CALLS_PATH, calls_endpoint, methods=["POST"]),
            Route(CALL_PATH, call_endpoint, methods=["GET", "POST"]),
        ]
    )


def _auth_ok(sim: TwilioSim, request: Request) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, b64 = header.partition(" ")
    if scheme.lower() != "basic" or not b64:
        return False
    try:
        user, _, password = binascii.a2b_base64(b64).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return secrets.compare_digest(user, sim.account_sid) and secrets.compare_digest(
        password, sim.auth_token
    )


def _error(code: int, message: str, status: int) -> JSONResponse:
    return JSONResponse(error_doc(code, message, status), status_code=status)


def _unauthorized() -> JSONResponse:
    return JSONResponse(
        error_doc(20003, "Authenticate", 401),
        status_code=401,
        headers={"WWW-Authenticate": 'Basic realm="Twilio API"'},
    )


async def _create_call(sim: TwilioSim, request: Request) -> JSONResponse:
    """`POST …/Calls.json`: place an outbound call."""
    account = request.path_params["account_sid"]
    pairs = [(k, str(v)) for k, v in (await request.form()).multi_items()]
    # The log keeps one value per name (the last, like the update log); the call keeps all.
    sim.rest_requests.append((time.monotonic(), request.method, request.url.path, dict(pairs)))
    if not _auth_ok(sim, request):
        return _unauthorized()
    if account != sim.account_sid:
        return _error(20404, f"The requested resource {request.url.path} was not found", 404)
    try:
        req = parse_create_call(
            pairs,
            invalid_numbers=sim.invalid_numbers,
            verified_caller_ids=sim.verified_caller_ids,
            reject_url_with_twiml=sim.reject_url_with_twiml,
        )
    except CreateCallError as exc:
        return _error(exc.code, exc.message, exc.status)
    call = sim._create_outbound(req)
    return JSONResponse(call_resource(call), status_code=201)


async def _call_request(sim: TwilioSim, request: Request) -> JSONResponse:
    account = request.path_params["account_sid"]
    call_sid = request.path_params["call_sid"]
    form: dict[str, str] = {}
    if request.method == "POST":
        form = {k: str(v) for k, v in (await request.form()).items()}
    sim.rest_requests.append((time.monotonic(), request.method, request.url.path, form))
    if not _auth_ok(sim, request):
        return _unauthorized()
    call = sim.calls.get(call_sid)
    if account != sim.account_sid or call is None or (
        request.method == "POST" and call.end_reason is not None
    ):
        msg = f"The requested resource {request.url.path} was not found"
        return _error(20404, msg, 404)
    if request.method == "GET":
        return JSONResponse(call_resource(call))
    status = form.get("Status")
    twiml = form.get("Twiml")
    url = form.get("Url")
    if status not in (None, "completed", "canceled"):
        return _error(21218, f"Invalid value for Status: {status}", 400)
    if twiml is not None and url is not None:
        return _error(21205, "Twiml and Url are mutually exclusive", 400)
    call._event("rest-update", params=form)
    if status == "completed":
        await call._finish("rest-completed")
    elif status == "canceled":
        # `canceled` only affects queued/ringing calls; an in-progress call is unchanged.
        if not call.answered:
            await call._finish("canceled")
    elif twiml is not None:
        try:
            parse_twiml(twiml)
        except TwimlError as exc:
            return _error(12100, str(exc), 400)
        call.twiml_log.append(twiml)
        await call._redirect_now("twiml", twiml, "POST")
    elif url is not None:
        await call._redirect_now("url", url, form.get("Method", "POST").upper())
    return JSONResponse(call_resource(call))


# --- documents -------------------------------------------------------------------------------


def call_status(call: SimCall) -> str:
    """The call resource's `status` (`SimCall.status`)."""
    return call.status


def rfc2822(ts: float | None) -> str | None:
    return None if ts is None else formatdate(ts, usegmt=False)


def call_resource(call: SimCall) -> dict[str, Any]:
    account_sid, call_sid = call.account_sid, call.call_sid
    created, started, ended = call.created_wall, call.answered_wall, call.ended_wall
    duration = None
    if started is not None and ended is not None:
        duration = str(max(0, round(ended - started)))
    uri = f"/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"
    return {
        "sid": call_sid,
        "account_sid": account_sid,
        "parent_call_sid": None,
        "from": call.from_,
        "from_formatted": call.from_,
        "to": call.to,
        "to_formatted": call.to,
        "status": call_status(call),
        "direction": call.direction,
        "api_version": "2010-04-01",
        "answered_by": call.answered_by,
        "caller_name": None,
        "forwarded_from": None,
        "group_sid": None,
        "phone_number_sid": None,
        "price": None,
        "price_unit": "USD",
        "queue_time": "0",
        "trunk_sid": None,
        "date_created": rfc2822(created),
        "date_updated": rfc2822(ended or started or created),
        "start_time": rfc2822(started),
        "end_time": rfc2822(ended),
        "duration": duration,
        "uri": uri,
        "subresource_uris": {
            "notifications": uri[:-5] + "/Notifications.json",
            "recordings": uri[:-5] + "/Recordings.json",
            "streams": uri[:-5] + "/Streams.json",
        },
    }


def error_doc(code: int, message: str, status: int) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
