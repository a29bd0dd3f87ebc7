"""Twilio's HTTP webhooks: answer the call, decide what follows a stream, record status."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from fastapi import APIRouter, Request, Response

from gateway import twiml
from gateway.records import ENSURE_TTL, ensure_ttl
from gateway.state import GatewayState
from shared import metrics
from shared.logs import call_sid_var, mask_number
from shared.redisio import TRANSIENT, retry_for
from shared.security import make_stream_token, webhook_signature_ok
from shared.streams import STATUS_ENDED, STATUS_RINGING, entry

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
    form = await request.form()
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


# KEYS: call hash. ARGV: ttl s, created, status, from, to, account sid. Creates the record once
# (Twilio retries webhooks), always with a TTL; returns {1 if created now, the `queued` flag}.
# A script rather than MULTI: one slot either way, and no reliance on cluster transactions.
RECORD_CALL = """
local first = redis.call('HSETNX', KEYS[1], 'created', ARGV[2])
if first == 1 then
  redis.call('HSET', KEYS[1], 'status', ARGV[3], 'from', ARGV[4], 'to', ARGV[5],
             'account_sid', ARGV[6])
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return {first, redis.call('HGET', KEYS[1], 'queued')}
"""


async def _record_and_queue(st: GatewayState, sid: str, form: dict[str, str]) -> None:
    """Write the call record and queue its job, once per call however often Twilio retries.

    Two steps: on a cluster the call's hash and the job queue live in different slots. The
    `queued` flag, set after the job is in, makes a retry (ours or Twilio's) re-queue a call whose
    job did not make it; a job queued twice is harmless (the claim script lets one worker win)."""
    key = st.keys.call(sid)
    got: Any = await st.redis.eval(
        RECORD_CALL, 1, key, st.settings.call_ttl_s, str(time.time()), STATUS_RINGING,
        form.get("From", ""), form.get("To", ""), form.get("AccountSid", ""))
    if isinstance(got, list) and len(got) == 2 and got[1]:
        return
    await st.redis.xadd(st.keys.calls, {
        b"sid": sid.encode(),
        b"from": form.get("From", "").encode(),
        b"to": form.get("To", "").encode(),
        b"t": str(time.time_ns()).encode(),
    }, maxlen=100_000, approximate=True)
    await st.redis.hset(key, "queued", "1")
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
    try:
        within = CLUSTER_VOICE_RETRY_S if st.settings.redis_cluster else 0.0
        await retry_for(within, lambda: _record_and_queue(st, sid, form))
    except TRANSIENT:
        log.error("redis unavailable while answering a call")
        return _unavailable("voice")
    metrics.WEBHOOKS.labels("voice", "ok").inc()
    return Response(_connect_twiml(st, sid), media_type=XML)


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
    st.writer.xadd(events, entry(b"twilio-status", value=f"{kind} {detail}".strip()[:500]), maxlen=1000)
    ensure_ttl(st.writer, st.settings.call_ttl_s, events)  # the callback may come first
    metrics.WEBHOOKS.labels("status", "ok").inc()
    return Response(status_code=204)
