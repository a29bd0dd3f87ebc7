"""The life of an outbound call placed through `POST /Calls.json`, as Twilio runs it.

queued → initiated → ringing → answered (in-progress), or busy / no-answer / failed; on the
answer the callee starts talking (its script: a human's hello, a machine's greeting and beep),
answering machine detection runs (blocking the TwiML, or in the background with `AsyncAmd`),
then the first document (`Url`, fetched signed with `AnsweredBy` when AMD blocked, or `Twiml`)
runs with the same machinery as an inbound call's. Status callbacks for the events asked for go
out signed, in order, one call's at a time; the `completed` one carries the final status.

What is decided (statuses, AMD answers and their timing, callback parameters) is in outbound.py;
this module only waits and sends. Docs: docs/protocols.md, section "Twilio Media Streams",
"Outbound calls and answering machine detection".
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from . import wire as w
from .outbound import (
    AmdDecision,
    CallbackCounter,
    Callee,
    CreateCall,
    amd_callback_params,
    amd_decision,
    callee_script,
    final_status,
    resource_status,
    status_callback_params,
)

if TYPE_CHECKING:
    from .call import SimCall

_mono = time.monotonic
_EVENT_OF = {"initiated": "initiated", "ringing": "ringing", "in-progress": "answered"}
ERR_NO_AMD_CALLBACK = "21262"


class Outbound:
    """What an outbound SimCall adds: the request, the callee, and where the call stands."""

    def __init__(self, request: CreateCall, callee: Callee) -> None:
        self.request = request
        self.callee = callee
        self.script = callee_script(callee)
        self.status = "queued"  # queued, initiated, ringing, in-progress (final: see status())
        self.answered_mono: float | None = None
        self.amd: AmdDecision | None = None
        self.callbacks = CallbackCounter()
        self._last_callback: asyncio.Task[None] | None = None
        self._script_queued = False

    def resource_status(self, call: SimCall) -> str:
        if call.end_reason is not None:
            return final_status(call.end_reason, self.answered_mono is not None)
        return resource_status(self.status)


async def dial(call: SimCall) -> None:
    """The call's driver (run by `SimCall._drive`, so the sim's time limit and error handling
    apply); cancelled when the call ends another way."""
    ob = call.outbound
    assert ob is not None
    req, callee = ob.request, ob.callee
    await asyncio.sleep(0)  # the create request is answered (queued) first
    _set_status(call, "initiated")
    if callee.kind == "failed":
        await call._finish("failed")
        return
    if callee.kind == "busy":
        await asyncio.sleep(callee.ring_s)
        await call._finish("busy")
        return
    _set_status(call, "ringing")
    if not callee.answers or callee.ring_s >= req.timeout_s:
        await asyncio.sleep(req.timeout_s)
        await call._finish("no-answer")
        return
    await asyncio.sleep(callee.ring_s)
    answered = _answer(call)
    extra: dict[str, str] = {}
    if req.machine_detection is not None:
        decision = amd_decision(callee, req, ob.script)
        if req.async_amd:
            call._spawn(_detect_async(call, decision, answered), "amd")
        else:  # AMD blocks the call's TwiML until it decides
            await _sleep_until(answered + decision.delay_s)
            _decided(call, decision)
            extra["AnsweredBy"] = decision.answered_by
    if req.url is not None:
        doc = (await call._fetch(req.url, req.method, "in-progress", extra), req.url)
    else:
        assert req.twiml is not None
        call.twiml_log.append(req.twiml)
        call._event("twiml", url=None, twiml=req.twiml)
        doc = (req.twiml, call._sim.public_url + "/")
    await call._drive_documents(doc)


def stream_started(call: SimCall, now: float) -> None:
    """The call's first stream started at `now`: the callee's script plays on from where it is
    (what it said before the stream existed is lost, as on a real line)."""
    ob = call.outbound
    if ob is None or ob._script_queued or ob.answered_mono is None:
        return
    ob._script_queued = True
    offset = max(0, int((now - ob.answered_mono) * w.SAMPLE_RATE))
    rest = ob.script.audio[offset:]
    if rest:
        call._say_first(rest)


def call_ended(call: SimCall) -> None:
    """The call ended (any way): its final status, and the `completed` callback if asked for."""
    ob = call.outbound
    assert ob is not None and call.end_reason is not None
    status = call.status
    call._event("call-status", status=status)
    duration = 0
    if ob.answered_mono is not None and call.answered_wall is not None:
        duration = max(0, round((call.ended_wall or time.time()) - call.answered_wall))
    if ob.request.wants("completed"):
        _callback(call, "completed", status, duration_s=duration)


# --- internals -------------------------------------------------------------------------------


async def _sleep_until(deadline: float) -> None:
    delay = deadline - _mono()
    if delay > 0:
        await asyncio.sleep(delay)


def _set_status(call: SimCall, status: str) -> None:
    ob = call.outbound
    assert ob is not None
    ob.status = status
    call._event("call-status", status=status)
    call._notify()
    event = _EVENT_OF.get(status)
    if event is not None and ob.request.wants(event):
        _callback(call, event, status)


def _answer(call: SimCall) -> float:
    ob = call.outbound
    assert ob is not None
    now = _mono()
    ob.answered_mono = now
    call.answered_wall = time.time()
    after = ob.callee.hangup_after_s
    if after is not None:
        call._spawn(_hang_up_at(call, now + after), "callee-hangup")
    _set_status(call, "in-progress")
    return now


async def _hang_up_at(call: SimCall, deadline: float) -> None:
    await _sleep_until(deadline)
    await call._finish("callee-hangup")


def _decided(call: SimCall, decision: AmdDecision) -> None:
    ob = call.outbound
    assert ob is not None
    ob.amd = decision
    call.answered_by = decision.answered_by
    call._event("amd", answered_by=decision.answered_by, duration_ms=decision.duration_ms)
    call._notify()


async def _detect_async(call: SimCall, decision: AmdDecision, answered: float) -> None:
    """`AsyncAmd`: the call runs on; the decision goes to `AsyncAmdStatusCallback`."""
    await _sleep_until(answered + decision.delay_s)
    _decided(call, decision)
    ob = call.outbound
    assert ob is not None
    req = ob.request
    url = req.async_amd_status_callback
    if url is None:  # Twilio's warning: the result is only on the call resource
        call._event("warning", code=ERR_NO_AMD_CALLBACK, detail="no AsyncAmdStatusCallback")
        return
    params = amd_callback_params(
        account_sid=call.account_sid, call_sid=call.call_sid, decision=decision
    )
    call._sim._webhooks.fire(
        call,
        url,
        req.async_amd_status_callback_method,
        params,
        kind="amd-callback",
        answered_by=decision.answered_by,
    )


def _callback(call: SimCall, event: str, status: str, duration_s: int | None = None) -> None:
    ob = call.outbound
    assert ob is not None
    req = ob.request
    assert req.status_callback is not None
    params = status_callback_params(
        account_sid=call.account_sid,
        call_sid=call.call_sid,
        req=req,
        call_status=status,
        sequence=ob.callbacks.take(event),
        timestamp=time.time(),
        duration_s=duration_s,
        answered_by=call.answered_by,
    )
    task = call._sim._webhooks.fire(
        call,
        req.status_callback,
        req.status_callback_method,
        params,
        kind="call-status-callback",
        after=ob._last_callback,
        event=event,
        status=status,
    )
    if task is not None:
        ob._last_callback = task
