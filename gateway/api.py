"""The call API: place, watch, steer calls over HTTP (`/v1`, bearer keys, OpenAPI-described).

Any gateway answers any request: a call's state is in Redis, and steering a call means appending
a control entry (`ctl`) to its `:in` stream, which the worker that owns it acts on, wherever it
runs. Requests are validated by their pydantic models (422 names the field); Twilio's refusals
come back as 400/502/503 naming Twilio's error, never as a 500.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from gateway import admission
from gateway import calls as views
from gateway.outbound import DialRefused, DialRequest
from gateway.state import GatewayState
from shared import metrics
from shared import streams as S
from shared.logs import call_sid_var, mask_number
from shared.redisio import TRANSIENT

log = logging.getLogger("callbridge.gateway.api")

def _utf8(v: str) -> str:
    """JSON can carry lone surrogates, which no UTF-8 store or socket takes: refuse them here."""
    try:
        v.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return v


Text = Annotated[str, AfterValidator(_utf8)]
E164 = Annotated[str, StringConstraints(pattern=r"^\+[1-9][0-9]{6,14}$")]
SID = Annotated[str, Path(pattern=r"^CA[0-9a-fA-F]{32}$", description="Twilio CallSid")]
MAX_JSON_BYTES = 4096
MAX_SCAN = 2000  # call records one listing request reads at most

_bearer = HTTPBearer(auto_error=False, description="one of API_KEYS")


def _state(request: Request) -> GatewayState:
    st: GatewayState = request.app.state.gw
    return st


def key_ok(st: GatewayState, given: bytes) -> bool:
    """`given` is one of API_KEYS: compared in constant time, never logged."""
    ok = False
    for key in st.settings.api_key_list():  # no early exit: the time does not tell which came close
        ok |= hmac.compare_digest(given, key)
    return ok


def require_key(request: Request,
                creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Every /v1 request carries one of API_KEYS."""
    if not key_ok(_state(request), creds.credentials.encode() if creds is not None else b""):
        metrics.API_REQUESTS.labels("unauthorized").inc()
        raise HTTPException(401, "missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})


class Problem(BaseModel):
    detail: Any


def _clean(v: Any) -> Any:
    return v.encode(errors="replace").decode() if isinstance(v, str) else v


async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """422 naming each bad field, without echoing the input back: the input may not be
    encodable (a lone surrogate), and need not be repeated to the sender anyway."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": [_clean(p) for p in e.get("loc", ())], "msg": _clean(e.get("msg", "")),
               "type": _clean(e.get("type", ""))} for e in errors[:50]]
    return JSONResponse({"detail": detail}, status_code=422)


router = APIRouter(prefix="/v1", tags=["calls"], dependencies=[Depends(require_key)],
                   responses={400: {"model": Problem, "description": "a body that is not JSON"},
                              401: {"model": Problem, "description": "missing or wrong API key"},
                              503: {"model": Problem, "description": "Redis unavailable"}})


def _small_json(v: dict[str, Any], name: str) -> dict[str, Any]:
    try:
        size = len(orjson.dumps(v))
    except orjson.JSONEncodeError:  # a lone surrogate, nesting too deep
        raise ValueError(f"{name} must be plain JSON of valid Unicode text") from None
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{name} must be at most {MAX_JSON_BYTES} bytes as JSON")
    return v


class CallCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    to: E164
    from_: E164 | None = Field(default=None, alias="from",
                               description="caller id; default TWILIO_FROM_NUMBER")
    assistant_id: Annotated[str, StringConstraints(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")] | None = None
    variables: dict[Annotated[Text, StringConstraints(max_length=64)],
                    Annotated[Text, StringConstraints(max_length=1000)] | int | float | bool] = {}
    metadata: dict[Annotated[Text, StringConstraints(max_length=64)], Any] = {}
    machine_detection: Literal["off", "hangup", "message"] = "off"
    voicemail_message: Annotated[Text, StringConstraints(min_length=1, max_length=1000)] | None = None

    @field_validator("variables", "metadata")
    @classmethod
    def _bounded(cls, v: dict[str, Any], info: Any) -> dict[str, Any]:
        return _small_json(v, info.field_name)


class CallCreated(BaseModel):
    call_sid: str
    status: str


class Say(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Annotated[Text, StringConstraints(min_length=1, max_length=2000)]
    respond: bool = Field(default=False, description="true: the assistant responds to the text "
                          "(Vapi add-message) instead of saying it verbatim (Vapi say)")


class Transfer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: Annotated[str, StringConstraints(pattern=r"^(\+[1-9][0-9]{6,14}|sip:[^\s<>\"]{3,200})$")]


class Accepted(BaseModel):
    call_sid: str
    status: str
    action: str


class Turn(BaseModel):
    turn: int
    latency_ms: float | None
    sent_ms: float | None
    heard_ms: float | None
    interrupted: bool


class Line(BaseModel):
    role: Literal["user", "assistant"]
    text: str


class Event(BaseModel):
    kind: str
    at: float
    data: dict[str, Any]


class CallSummary(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    call_sid: str
    direction: Literal["inbound", "outbound"]
    from_: str | None = Field(alias="from")
    to: str | None
    status: Literal["queued", "ringing", "live", "ended"]
    assistant_id: str | None
    started_at: float | None
    ended_at: float | None
    end_reason: str | None
    answered_by: str | None
    worker: str | None


class CallView(CallSummary):
    transcript: list[Line]
    turns: list[Turn]
    events: list[Event]


class CallList(BaseModel):
    calls: list[CallSummary]
    next_before: float | None = Field(description="pass as `before` for the next page")


async def _record(st: GatewayState, sid: str) -> dict[bytes, bytes]:
    try:
        record: Any = await st.redis.hgetall(st.keys.call(sid))
    except TRANSIENT:
        raise HTTPException(503, "redis unavailable") from None
    if not record:
        raise HTTPException(404, f"unknown call {sid}")
    return dict(record)


def _control(st: GatewayState, sid: str, op: dict[str, Any]) -> None:
    """Append a control entry for the call's owner (it reads `:in`, wherever it runs)."""
    st.writer.xadd(st.keys.inbound(sid), S.entry(S.IN_CONTROL, value=orjson.dumps(op)),
                   st.settings.stream_maxlen)


@router.post("/calls", status_code=201, response_model=CallCreated,
             responses={400: {"model": Problem}, 429: {"model": Problem}, 502: {"model": Problem},
                        503: {"model": Problem}})
async def create_call(body: CallCreate, request: Request, response: Response) -> CallCreated:
    """Place an outbound call: Twilio dials `to`; once answered, the call is bridged to the
    assistant like an inbound one. Over OUTBOUND_CPS or MAX_ACTIVE_CALLS: 429 with Retry-After
    (the client keeps the queue: callbridge holds no state between requests)."""
    st = _state(request)
    s = st.settings
    caller = body.from_ or s.twilio_from_number
    if not caller:
        raise HTTPException(422, [{"loc": ["body", "from"], "msg": "no `from` given and "
                                   "TWILIO_FROM_NUMBER is not set", "type": "missing"}])
    if body.voicemail_message is None and body.machine_detection == "message":
        raise HTTPException(422, [{"loc": ["body", "voicemail_message"],
                                   "msg": "required when machine_detection is `message`",
                                   "type": "missing"}])
    try:
        wait = await admission.take_token(st.redis, st.keys, s.outbound_cps)
        full = s.max_active_calls and await admission.active_count(st.redis, st.keys, time.time()) \
            >= s.max_active_calls
    except TRANSIENT:
        raise HTTPException(503, "redis unavailable") from None
    if wait or full:
        metrics.API_REQUESTS.labels("over_limit").inc()
        retry = max(1, round(wait)) if wait else 5
        raise HTTPException(429, "over OUTBOUND_CPS" if wait else "over MAX_ACTIVE_CALLS",
                            headers={"Retry-After": str(retry)})
    rid = uuid.uuid4().hex
    params: dict[Any, Any] = {"direction": "outbound", "from": caller, "to": body.to,
              "assistant_id": body.assistant_id or "",
              "variables": orjson.dumps(body.variables).decode(),
              "metadata": orjson.dumps(body.metadata).decode(),
              "amd_policy": body.machine_detection,
              "voicemail_message": body.voicemail_message or ""}
    if body.machine_detection != "off":
        params["amd_pending"] = "1"
    base = s.public_url
    try:
        pipe = st.redis.pipeline(transaction=False)
        pipe.hset(st.keys.dial(rid), mapping=params)
        pipe.expire(st.keys.dial(rid), 600)
        await pipe.execute()
    except TRANSIENT:
        raise HTTPException(503, "redis unavailable") from None
    amd_mode = "DetectMessageEnd" if body.machine_detection == "message" else "Enable"
    try:
        sid, tw_status = await request.app.state.dialer.dial(DialRequest(
            to=body.to, from_=caller, url=f"{base}/twilio/voice?rid={rid}",
            status_callback=f"{base}/twilio/status", amd=body.machine_detection != "off",
            amd_mode=amd_mode, amd_callback=f"{base}/twilio/amd"))
    except DialRefused as exc:
        metrics.API_REQUESTS.labels("twilio_refused").inc()
        raise HTTPException(exc.status, exc.detail) from None
    call_sid_var.set(sid)
    status = "queued" if tw_status in ("queued", "initiated", "") else "ringing"
    try:  # the record exists before Twilio asks for the TwiML, as far as Twilio allows
        await st.redis.eval(OUTBOUND_RECORD, 1, st.keys.call(sid), s.call_ttl_s, str(time.time()),
                            status, *[x for kv in params.items() for x in kv])
        await st.redis.zadd(st.keys.index, {sid: time.time()})
        st.writer.xadd(st.keys.feed, S.feed_entry("created", sid), S.FEED_MAXLEN)
    except TRANSIENT:
        log.warning("outbound call placed but not recorded yet (redis)")
    metrics.API_REQUESTS.labels("call_created").inc()
    log.info("outbound call placed", extra={"to": mask_number(body.to)})
    response.headers["Location"] = f"/v1/calls/{sid}"
    return CallCreated(call_sid=sid, status=status)


# KEYS: call hash. ARGV: ttl, created, status, then field/value pairs. Creates the record (the
# voice webhook may have been first: then `created` and `status` stay as they are).
OUTBOUND_RECORD = """
redis.call('HSETNX', KEYS[1], 'created', ARGV[2])
redis.call('HSETNX', KEYS[1], 'status', ARGV[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return 1
"""


@router.get("/calls/{call_sid}", response_model=CallView, response_model_by_alias=True,
            responses={404: {"model": Problem}})
async def get_call(call_sid: SID, request: Request) -> dict[str, Any]:
    """One call: its record, transcript, turns and recent events (while its record is kept:
    CALL_RECORD_TTL_S after it ended)."""
    st = _state(request)
    record = await _record(st, call_sid)
    try:
        events: Any = await st.redis.xrevrange(st.keys.events(call_sid), count=2000)
    except TRANSIENT:
        raise HTTPException(503, "redis unavailable") from None
    return views.view(call_sid, record, list(reversed(events or [])))


@router.get("/calls", response_model=CallList, response_model_by_alias=True)
async def list_calls(request: Request,
                     status: Literal["queued", "ringing", "live", "ended"] | None = None,
                     limit: Annotated[int, Query(ge=1, le=200)] = 50,
                     before: Annotated[float | None, Query(ge=0, le=1e11)] = None) -> dict[str, Any]:
    """Calls newest first, `limit` at a time; `status` filters (e.g. `live`). One request reads
    at most MAX_SCAN records: a filter that matches few of a day's calls answers a short page
    with `next_before` rather than reading the whole index."""
    st = _state(request)
    out: list[dict[str, Any]] = []
    scanned = 0
    cursor = before if before is not None else float("inf")
    horizon = time.time() - st.settings.call_record_ttl_s - st.settings.call_ttl_s
    try:
        await st.redis.zremrangebyscore(st.keys.index, "-inf", horizon)
        while len(out) < limit and scanned < MAX_SCAN:
            page: Any = await st.redis.zrevrangebyscore(
                st.keys.index, f"({cursor}" if cursor != float("inf") else "+inf", "-inf",
                start=0, num=200, withscores=True)
            if not page:
                cursor = 0.0
                break
            pipe = st.redis.pipeline(transaction=False)
            for member, _score in page:
                pipe.hgetall(st.keys.call(member.decode(errors="replace")))
            records = await pipe.execute()
            scanned += len(page)
            for (member, score), record in zip(page, records, strict=True):
                cursor = float(score)
                if not record:
                    continue  # expired: its index entry goes at the next pruning
                item = views.summary(member.decode(errors="replace"), record)
                if status is None or item["status"] == status:
                    out.append(item)
                    if len(out) >= limit:
                        break
    except TRANSIENT:
        raise HTTPException(503, "redis unavailable") from None
    more = (len(out) >= limit or scanned >= MAX_SCAN) and cursor > 0
    return {"calls": out, "next_before": cursor if more else None}


async def _live(st: GatewayState, sid: str) -> dict[bytes, bytes]:
    record = await _record(st, sid)
    if views.api_status(record) == S.STATUS_ENDED:
        raise HTTPException(409, f"call {sid} has ended")
    return record


@router.post("/calls/{call_sid}/hangup", status_code=202, response_model=Accepted,
             responses={404: {"model": Problem}, 409: {"model": Problem}})
async def hangup(call_sid: SID, request: Request) -> Accepted:
    """End the call: its worker tells Vapi `end-call` and closes the Twilio side (within 2 s).
    A call not answered yet is cancelled at Twilio."""
    st = _state(request)
    record = await _live(st, call_sid)
    status = views.api_status(record)
    action = "hangup"
    if status in ("queued", "ringing") and not record.get(b"owner"):
        outcome = await request.app.state.dialer.end(call_sid, answered=False)
        action = "cancelled" if outcome != "failed" else "cancel_failed"
    _control(st, call_sid, {"op": "hangup"})  # answered meanwhile: its worker ends it
    await st.writer.flush()
    metrics.API_REQUESTS.labels("hangup").inc()
    return Accepted(call_sid=call_sid, status=status, action=action)


@router.post("/calls/{call_sid}/say", status_code=202, response_model=Accepted,
             responses={404: {"model": Problem}, 409: {"model": Problem}})
async def say(call_sid: SID, body: Say, request: Request) -> Accepted:
    """The assistant says `text` (or, with `respond`, answers it)."""
    st = _state(request)
    record = await _live(st, call_sid)
    _control(st, call_sid, {"op": "say", "text": body.text, "respond": body.respond})
    await st.writer.flush()
    metrics.API_REQUESTS.labels("say").inc()
    return Accepted(call_sid=call_sid, status=views.api_status(record), action="say")


@router.post("/calls/{call_sid}/transfer", status_code=202, response_model=Accepted,
             responses={403: {"model": Problem}, 404: {"model": Problem}, 409: {"model": Problem}})
async def transfer(call_sid: SID, body: Transfer, request: Request) -> Accepted:
    """Transfer the caller to `to` (a number or SIP URI allowed by TRANSFER_ALLOW)."""
    st = _state(request)
    if not st.settings.transfer_allowed(body.to):
        raise HTTPException(403, f"{body.to} is not allowed by TRANSFER_ALLOW")
    record = await _live(st, call_sid)
    _control(st, call_sid, {"op": "transfer", "to": body.to})
    await st.writer.flush()
    metrics.API_REQUESTS.labels("transfer").inc()
    return Accepted(call_sid=call_sid, status=views.api_status(record), action="transfer")
