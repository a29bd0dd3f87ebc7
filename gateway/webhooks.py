"""Twilio's HTTP webhooks: answer the call, decide what follows a stream, record status."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from starlette.requests import ClientDisconnect

from gateway import admission, twiml
from gateway.records import ENSURE_TTL, ensure_ttl
from gateway.state import GatewayState
from shared import metrics
from shared.logs import call_sid_var, mask_number
from shared.redisio import TRANSIENT, retry_for
from shared.security import make_stream_token, webhook_signature_ok
from shared.streams import FEED_MAXLEN, IN_CONTROL, STATUS_ENDED, STATUS_RINGING, entry, feed_entry

log = logging.getLogger("callbridge.gateway")
router = APIRouter()

CALL_SID_RE = re.compile(r"^CA[0-9a-fA-F]{32}$")
XML = "application/xml"


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gw
    return state


async def _signed_form(request: Request, route: str) -> dict[str, str] | Response:
    """The form if Twilio signed it for our public URL + path (+ query), else a 403."""
    st = _state(request)
    try:
        form = await request.form()
    except ClientDisconnect:  # Twilio (or a probe) went away mid-request: nothing to answer
        metrics.WEBHOOKS.labels(route, "client_gone").inc()
        return Response(status_code=499)
    params = {k: str(v) for k, v in form.multi_items()}
    url = f"{st.settings.public_url}{request.url.path}"
    if request.url.query:
        url += f"?{request.url.query}"
    if not webhook_signature_ok(
        st.settings.auth_token, url, params, request.headers.get("x-twilio-signature")
    ):
        metrics.WEBHOOKS.labels(route, "forbidden").inc()
        log.warning("rejected unsigned or wrongly signed webhook", extra={"route": route})
        return Response("invalid Twilio signature\n", status_code=403, media_type="text/plain")
    sid = params.get("CallSid", "")
    if not CALL_SID_RE.match(sid):
        metrics.WEBHOOKS.labels(route, "bad_request").inc()
        return Response("missing or malformed CallSid\n", status_code=400, media_type="text/plain")
    call_sid_var.set(sid)
    return params


def _connect_twiml(st: GatewayState, sid: str) -> str:
    base = st.settings.public_url
    return twiml.connect_stream(
        stream_url=st.settings.stream_url,
        action_url=f"{base}/twilio/stream-ended",
        status_url=f"{base}/twilio/status",
        token=make_stream_token(st.settings.token_secret, sid, st.settings.stream_token_ttl_s),
    )


def _unavailable(route: str) -> Response:
    metrics.WEBHOOKS.labels(route, "redis_error").inc()
    return Response("service unavailable\n", status_code=503, media_type="text/plain")


# Twilio waits 15 s for the voice webhook; a cluster promotes a replica in ~2.5 s. Riding through
# that costs the caller a longer ring instead of a failed call. One Redis that is down stays down
# for longer than a caller should ring, so there the answer is an immediate 503.
CLUSTER_VOICE_RETRY_S = 5.0


# KEYS: call hash. ARGV: ttl s, created, status, from, to, account sid, then field/value pairs
# (direction, assistant, an outbound call's parameters). Creates the record once (Twilio retries
# webhooks), always with a TTL; `queued` (an outbound call the API recorded) becomes `ringing`.
# Returns {1 if created now, the `queued` flag}.
# A script rather than MULTI: one slot either way, and no reliance on cluster transactions.
RECORD_CALL = """
local first = redis.call('HSETNX', KEYS[1], 'created', ARGV[2])
if first == 1 then
  redis.call('HSET', KEYS[1], 'from', ARGV[4], 'to', ARGV[5], 'account_sid', ARGV[6])
end
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'queued' then redis.call('HSET', KEYS[1], 'status', ARGV[3]) end
if #ARGV > 6 then redis.call('HSET', KEYS[1], unpack(ARGV, 7)) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {first, redis.call('HGET', KEYS[1], 'queued')}
"""


async def _record_and_queue(st: GatewayState, sid: str, form: dict[str, str],
                            extra: dict[str, str]) -> None:
    """Write the call record and queue its job, once per call however often Twilio retries.

    Two steps: on a cluster the call's hash and the job queue live in different slots. The
    `queued` flag, set after the job is in, makes a retry (ours or Twilio's) re-queue a call whose
    job did not make it; a job queued twice is harmless (the claim script lets one worker win)."""
    key = st.keys.call(sid)
    got: Any = await st.redis.eval(
        RECORD_CALL, 1, key, st.settings.call_ttl_s, str(time.time()), STATUS_RINGING,
        form.get("From", ""), form.get("To", ""), form.get("AccountSid", ""),
        *[x for kv in extra.items() for x in kv])
    if isinstance(got, list) and len(got) == 2 and got[1]:
        return
    await st.redis.zadd(st.keys.index, {sid: time.time()})
    await st.redis.xadd(st.keys.calls, {
        b"sid": sid.encode(),
        b"from": form.get("From", "").encode(),
        b"to": form.get("To", "").encode(),
        b"t": str(time.time_ns()).encode(),
    }, maxlen=100_000, approximate=True)
    await st.redis.hset(key, "queued", "1")
    st.writer.xadd(st.keys.feed, feed_entry("created", sid), FEED_MAXLEN)
    metrics.CALLS_ANSWERED.inc()
    caller, called = form.get("From", ""), form.get("To", "")
    log.info("call answered", extra={"from_": mask_number(caller), "to": mask_number(called)})
    log.debug("call answered: numbers", extra={"from_": caller, "to": called})


@router.post("/twilio/voice")
async def voice(request: Request) -> Response:
    """Record the call, queue it for a worker, and answer with `<Connect><Stream>` at once."""
    form = await _signed_form(request, "voice")
    if isinstance(form, Response):
        return form
    st = _state(request)
    sid = form["CallSid"]
    rid = request.query_params.get("rid", "")
    within = CLUSTER_VOICE_RETRY_S if st.settings.redis_cluster else 0.0
    try:
        extra = await retry_for(within, lambda: _call_fields(st, form, rid))
        if not rid and not await retry_for(within, lambda: admission.admit(
                st.redis, st.keys, sid, now=time.time(), ttl_s=st.settings.call_ttl_s,
                limit=st.settings.max_active_calls)):
            return _hold(st, request)
        if rid:  # an outbound call we placed: admitted by the API, never turned away once answered
            await retry_for(within, lambda: admission.admit(
                st.redis, st.keys, sid, now=time.time(), ttl_s=st.settings.call_ttl_s, limit=0))
        await retry_for(within, lambda: _record_and_queue(st, sid, form, extra))
    except TRANSIENT:
        log.error("redis unavailable while answering a call")
        return _unavailable("voice")
    metrics.WEBHOOKS.labels("voice", "ok").inc()
    if st.settings.max_active_calls and not rid:
        metrics.ADMISSIONS.labels("admitted").inc()
    return Response(_connect_twiml(st, sid), media_type=XML)


# Fields an outbound call's request carries from the API to the call record.
DIAL_FIELDS = ("direction", "assistant_id", "variables", "metadata", "amd_policy",
               "voicemail_message", "amd_pending")
HOLD_PAUSE_S = 5


async def _call_fields(st: GatewayState, form: dict[str, str], rid: str) -> dict[str, str]:
    """What the record gets besides Twilio's fields: an outbound call's API parameters (found by
    the request id in our URL), or an inbound call's assistant by the number called."""
    if rid:
        raw: Any = await st.redis.hgetall(st.keys.dial(rid[:64]))
        fields = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
        return {k: fields[k][:4096] for k in DIAL_FIELDS if k in fields} or {"direction": "outbound"}
    extra = {"direction": "inbound"}
    if assistant := st.settings.routes().get(form.get("To", "")):
        extra["assistant_id"] = assistant
    return extra


def _hold(st: GatewayState, request: Request) -> Response:
    """MAX_ACTIVE_CALLS reached: hold the caller (a message, then pauses, asking again) for up to
    ADMISSION_WAIT_S, then turn them away with the unavailable message."""
    try:
        waited = float(request.query_params.get("wait", "0"))
    except ValueError:
        waited = 0.0
    if not 0.0 <= waited <= 86400.0:  # NaN, negative: our own URL, but never a loop without end
        waited = 0.0
    if waited >= st.settings.admission_wait_s:
        metrics.ADMISSIONS.labels("turned_away").inc()
        log.warning("over MAX_ACTIVE_CALLS: turning a caller away", extra={"waited_s": waited})
        return Response(twiml.hangup(st.settings.unavailable_message), media_type=XML)
    metrics.ADMISSIONS.labels("held").inc()
    again = f"{st.settings.public_url}/twilio/voice?wait={waited + HOLD_PAUSE_S:g}"
    message = st.settings.admission_message if waited == 0 else None
    return Response(twiml.hold(message, HOLD_PAUSE_S, again), media_type=XML)


@router.post("/twilio/stream-ended")
async def stream_ended(request: Request) -> Response:
    """`<Connect action>`: hang up, transfer, or re-attach the stream if the call is still live."""
    form = await _signed_form(request, "stream_ended")
    if isinstance(form, Response):
        return form
    st = _state(request)
    sid = form["CallSid"]
    try:
        call: Any = await st.redis.hgetall(st.keys.call(sid))
    except TRANSIENT:
        return _unavailable("stream_ended")
    fields = {k.decode(): v.decode() for k, v in call.items()}
    status = fields.get("status")
    if not fields or status == STATUS_ENDED:
        if target := fields.get("transfer_to"):
            outcome, body = "dial", twiml.dial(target)
        else:
            outcome, body = "hangup", twiml.hangup(fields.get("say") or None)
    else:
        # The socket went away while the call lives (a gateway drained or died): re-attach,
        # a bounded number of times, so a socket that keeps failing cannot loop forever.
        try:
            pipe = st.redis.pipeline(transaction=False)
            pipe.hincrby(st.keys.call(sid), "reattaches", 1)
            pipe.eval(ENSURE_TTL, 1, st.keys.call(sid), st.settings.call_ttl_s)  # expired meanwhile?
            attempts, _ = await pipe.execute()
        except TRANSIENT:
            return _unavailable("stream_ended")
        if attempts > st.settings.max_reattaches:
            outcome, body = "hangup", twiml.hangup(st.settings.unavailable_message)
        else:
            outcome, body = "reconnect", _connect_twiml(st, sid)
    metrics.WEBHOOKS.labels("stream_ended", outcome).inc()
    log.info("stream ended", extra={"outcome": outcome, "call_status": status or "unknown"})
    return Response(body, media_type=XML)


@router.post("/twilio/status")
async def status(request: Request) -> Response:
    """Stream and call status callbacks: recorded on the call's event stream."""
    form = await _signed_form(request, "status")
    if isinstance(form, Response):
        return form
    st = _state(request)
    sid = form["CallSid"]
    kind = form.get("StreamEvent") or form.get("CallStatus") or "unknown"
    detail = form.get("StreamError", "")
    if kind == "stream-error":
        log.warning("twilio reported a stream error", extra={"stream_error": detail})
    events = st.keys.events(sid)
    value = orjson.dumps({"status": kind[:64], **({"detail": detail[:400]} if detail else {})})
    st.writer.xadd(events, entry(b"twilio-status", value=value), maxlen=1000)
    ensure_ttl(st.writer, st.settings.call_ttl_s, events)  # the callback may come first
    if "StreamEvent" not in form and kind in CALL_OVER:
        # The call is over at Twilio. One never answered (busy, no-answer…) has no worker to
        # record its end; one answered has, and its reason (caller-hangup…) is kept.
        st.writer.command("eval", CALL_OVER_SCRIPT, 1, st.keys.call(sid), kind, str(time.time()),
                          st.settings.call_record_ttl_s)
        st.writer.command("zrem", st.keys.active, sid)
        st.writer.xadd(st.keys.feed, feed_entry("twilio-ended", sid, orjson.dumps({"status": kind})),
                       FEED_MAXLEN)
    elif kind == "ringing":
        st.writer.command("eval", RINGING_SCRIPT, 1, st.keys.call(sid))
        st.writer.xadd(st.keys.feed, feed_entry("ringing", sid), FEED_MAXLEN)
    metrics.WEBHOOKS.labels("status", "ok").inc()
    return Response(status_code=204)


CALL_OVER = ("completed", "busy", "no-answer", "failed", "canceled")
# KEYS: call hash. ARGV: Twilio's final CallStatus, now, record TTL. Only an existing record, not
# ended yet; kept for CALL_RECORD_TTL_S from now.
CALL_OVER_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'ended' then return 0 end
local reason = ARGV[1]
if reason == 'completed' then reason = 'twilio-completed' end
redis.call('HSET', KEYS[1], 'status', 'ended', 'end_reason', reason, 'ended_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
RINGING_SCRIPT = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'ringing')
end
return 0
"""
ANSWERED_BY = {"human", "machine_start", "machine_end_beep", "machine_end_silence",
               "machine_end_other", "fax", "unknown"}


@router.post("/twilio/amd")
async def amd(request: Request) -> Response:
    """Answering-machine detection's verdict (AsyncAmd): recorded, and handed to the call's worker
    with the call's policy (hang up on a machine, or leave the voicemail message)."""
    form = await _signed_form(request, "amd")
    if isinstance(form, Response):
        return form
    st = _state(request)
    sid = form["CallSid"]
    answered_by = form.get("AnsweredBy", "")
    if answered_by not in ANSWERED_BY:
        metrics.WEBHOOKS.labels("amd", "bad_request").inc()
        return Response("unknown AnsweredBy\n", status_code=400, media_type="text/plain")
    try:
        record: Any = await st.redis.hmget(st.keys.call(sid), "amd_policy", "voicemail_message")
    except TRANSIENT:
        return _unavailable("amd")
    policy, message = ((v or b"").decode(errors="replace") for v in record)
    st.writer.command("hset", st.keys.call(sid), mapping={"answered_by": answered_by,
                                                          "amd_pending": "0"})
    op = {"op": "answered_by", "value": answered_by, "policy": policy or "off",
          "message": message[:1000]}
    st.writer.xadd(st.keys.inbound(sid), entry(IN_CONTROL, value=orjson.dumps(op)),
                   st.settings.stream_maxlen)
    ensure_ttl(st.writer, st.settings.call_ttl_s, st.keys.inbound(sid))
    metrics.WEBHOOKS.labels("amd", "ok").inc()
    log.info("answering machine detection", extra={"answered_by": answered_by, "policy": policy})
    return Response(status_code=204)
