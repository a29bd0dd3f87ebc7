"""The call API end to end: real gateway and worker processes, the Twilio stand-in placing the
outbound calls the gateway asks for (POST /Calls.json, status and AMD callbacks), the Vapi
stand-in, a real Redis. What the callee heard and what Vapi was asked are checked, as in the
other end-to-end tests."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from sim.twilio import Callee, SimCall
from sim.vapi import greeter
from tests.conftest import ASSISTANT_ID, ROOT, Proc, gateway_proc
from tests.test_e2e import (
    Stack,
    caller_utterance,
    make_stack,
    until,
    utterances_heard,
    wait_heard,
)

KEY = "test-api-key-0123456789"
ROOT_BIN = Path(sys.executable).parent  # where pip put the schemathesis command
FROM = "+15550001111"
API_ENV = {"API_KEYS": f"other-key,{KEY}", "TWILIO_FROM_NUMBER": FROM, "OUTBOUND_CPS": "50",
           "TRANSFER_ALLOW": "+1555987*"}


def api(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.gateway.env["PUBLIC_URL"], timeout=10,
                             headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture
async def stack(redis_url: str, prefix: str, procs: list[Proc],
                redis: aioredis.Redis) -> AsyncIterator[Stack]:
    async for s in make_stack(redis_url, prefix, procs, redis, assistant=greeter(answers=3),
                              **API_ENV):
        yield s


async def dial(stack: Stack, client: httpx.AsyncClient, **body: Any) -> tuple[str, SimCall]:
    r = await client.post("/v1/calls", json={"to": "+15550003333", **body})
    assert r.status_code == 201, r.text
    sid = r.json()["call_sid"]
    call = await stack.twilio.wait_outbound(10)
    assert call.call_sid == sid
    return sid, call


async def wait_status(client: httpx.AsyncClient, sid: str, status: str,
                      timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = (await client.get(f"/v1/calls/{sid}")).json()
        if view["status"] == status:
            return view
        assert time.monotonic() < deadline, f"{sid} is {view['status']}, not {status}"
        await asyncio.sleep(0.05)


async def test_an_outbound_call_is_bridged_both_ways_listed_steered_and_hung_up(stack: Stack) -> None:
    async with api(stack) as client:
        sid, call = await dial(stack, client, assistant_id="asst-sales-7", variables={"name": "Ada"},
                               metadata={"crm": "42"})
        session = await stack.vapi.wait_session(10)
        assert session.body["assistantId"] == "asst-sales-7"
        overrides = session.body["assistantOverrides"]
        assert overrides["variableValues"]["name"] == "Ada"
        assert overrides["variableValues"]["twilioCallSid"] == sid
        assert overrides["metadata"]["crm"] == "42"
        await wait_heard(call, 1)  # the callee hears the assistant greet
        call.say_pcm(caller_utterance(0))
        await wait_heard(call, 2)  # and answer what it said
        view = await wait_status(client, sid, "live")
        assert view["direction"] == "outbound" and view["from"] == FROM and view["to"] == "+15550003333"
        assert view["assistant_id"] == "asst-sales-7" and view["worker"]

        # A second, inbound call: both are listed live.
        inbound = await stack.call()
        second = await stack.vapi.wait_session(10)
        listed = (await client.get("/v1/calls", params={"status": "live"})).json()["calls"]
        live = {c["call_sid"] for c in listed}
        if inbound.call_sid not in live:  # it goes live when its worker started the stream
            await wait_status(client, inbound.call_sid, "live")
            listed = (await client.get("/v1/calls", params={"status": "live"})).json()["calls"]
            live = {c["call_sid"] for c in listed}
        assert {sid, inbound.call_sid} <= live

        # Steer: say, then a transfer that TRANSFER_ALLOW refuses, then one it allows.
        r = await client.post(f"/v1/calls/{sid}/say", json={"text": "One moment please."})
        assert r.status_code == 202, r.text
        await until(lambda: any(m.get("content") == "One moment please."
                                for m in session.received_control("say")), 5, "Vapi told to say it")
        r = await client.post(f"/v1/calls/{sid}/transfer", json={"to": "+15550001234"})
        assert r.status_code == 403 and "TRANSFER_ALLOW" in r.text
        r = await client.post(f"/v1/calls/{inbound.call_sid}/transfer", json={"to": "+15559870000"})
        assert r.status_code == 202, r.text
        await until(lambda: any("<Dial" in t for t in inbound.twiml_log), 10, "Twilio asked to dial")

        # Hang up through the API: over within 2 s of the request.
        asked = time.monotonic()
        r = await client.post(f"/v1/calls/{sid}/hangup")
        assert r.status_code == 202, r.text
        await call.wait_ended(5)
        assert time.monotonic() - asked < 2.0 + 1.0  # 2 s, plus slack for a loaded machine
        view = await wait_status(client, sid, "ended")
        assert view["end_reason"] == "api-hangup"
        assert [line["role"] for line in view["transcript"]], view  # Vapi's transcripts
        assert view["turns"], view
        await session.wait_closed(5)
        assert session.received_control("end-call")
        await second.wait_closed(10)
        await until(lambda: stack.vapi.open_sessions() == 0, 10, "every Vapi session closed")
        await wait_status(client, inbound.call_sid, "ended")
        assert (await client.get("/v1/calls", params={"status": "live"})).json()["calls"] == []
        assert (await client.post(f"/v1/calls/{sid}/say", json={"text": "x"})).status_code == 409


@pytest.mark.parametrize("policy", ["hangup", "message"])
async def test_a_machine_answers(stack: Stack, policy: str) -> None:
    stack.twilio.callees["+15550004444"] = Callee(kind="machine", greeting_s=2.0)
    async with api(stack) as client:
        body: dict[str, Any] = {"to": "+15550004444", "machine_detection": policy}
        if policy == "message":
            body["voicemail_message"] = "Please call us back."
        sid, call = await dial(stack, client, **body)
        view = await wait_status(client, sid, "ended", timeout=20)
        assert view["answered_by"] in ("machine_start", "machine_end_beep")
        assert view["end_reason"] == ("machine" if policy == "hangup" else "voicemail"), view
        await call.wait_ended(10)
        heard = [label for label, _ in utterances_heard(call)]
        if policy == "message":
            assert call.beep_at is not None
            assert "say" in heard, heard  # the message, after the beep
            assert any(s > call.beep_at for s, _e in call.heard_segments())
        # With `hangup` the assistant is not held back (a person must not wait for the verdict),
        # so a machine may hear the start of the greeting before the call ends.
        await until(lambda: stack.vapi.open_sessions() == 0, 10, "every Vapi session closed")


@pytest.mark.parametrize("policy", ["hangup", "message"])
async def test_a_person_answers_with_voicemail_detection_on(stack: Stack, policy: str) -> None:
    async with api(stack) as client:
        sid, call = await dial(stack, client, machine_detection=policy,
                               voicemail_message="Please call us back.")
        await wait_heard(call, 1, timeout=15)
        deadline = time.monotonic() + 10  # with `hangup` the assistant did not wait for the verdict
        while (view := (await client.get(f"/v1/calls/{sid}")).json())["answered_by"] is None:
            assert time.monotonic() < deadline, "no verdict"
            await asyncio.sleep(0.05)
        assert view["answered_by"] == "human" and view["status"] == "live"
        # Muted until the verdict, then the assistant speaks (to what the person said meanwhile,
        # or its greeting): the person hears it.
        assert utterances_heard(call)
        await client.post(f"/v1/calls/{sid}/hangup")
        await call.wait_ended(5)


async def test_inbound_calls_are_routed_by_the_number_called(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis
) -> None:
    routes = '{"+15550002222": "asst-support-1"}'
    async for stack in make_stack(redis_url, prefix, procs, redis, ASSISTANT_ROUTES=routes, **API_ENV):
        routed = await stack.twilio.place_call(to="+15550002222")
        first = await stack.vapi.wait_session(10)
        assert first.body["assistantId"] == "asst-support-1"
        other = await stack.twilio.place_call(to="+15550009999")
        second = await stack.vapi.wait_session(10)
        assert second.body["assistantId"] == ASSISTANT_ID
        async with api(stack) as client:
            view = (await client.get(f"/v1/calls/{routed.call_sid}")).json()
            assert view["assistant_id"] == "asst-support-1" and view["direction"] == "inbound"
        await routed.hangup()
        await other.hangup()


async def test_admission_over_the_limit(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis
) -> None:
    """MAX_ACTIVE_CALLS=1: a second caller hears the message and holds until the first ends,
    then is bridged; an outbound request meanwhile gets 429 with Retry-After."""
    async for stack in make_stack(redis_url, prefix, procs, redis, MAX_ACTIVE_CALLS=1,
                                  ADMISSION_WAIT_S=30, **API_ENV):
        first = await stack.call()
        await wait_heard(first, 1)
        waiting = asyncio.create_task(stack.twilio.place_call(timeout=40))
        sid2 = await _held(stack)
        async with api(stack) as client:
            r = await client.post("/v1/calls", json={"to": "+15550003333"})
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
        await first.hangup()
        second = await waiting
        assert second.call_sid == sid2
        await wait_heard(second, 1, timeout=15)
        await second.hangup()


async def _held(stack: Stack) -> str:
    """The CallSid of the call that is being held (its TwiML says the admission message)."""
    found: list[str] = []

    def held() -> bool:
        found[:] = [c.call_sid for c in stack.twilio.calls.values()
                    if any("All our lines are busy" in t for t in c.twiml_log)]
        return bool(found)

    await until(held, 10, "a caller held by admission")
    return found[0]


async def test_bad_requests_get_clear_answers(stack: Stack) -> None:
    base = stack.gateway.env["PUBLIC_URL"]
    async with httpx.AsyncClient(base_url=base, timeout=10) as anon:
        assert (await anon.get("/v1/calls")).status_code == 401
        r = await anon.get("/v1/calls", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    async with api(stack) as client:
        r = await client.post("/v1/calls", json={"to": "555"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "to"]
        r = await client.post("/v1/calls", json={"to": "+15550003333", "colour": "red"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "colour"]
        r = await client.post("/v1/calls", json={"to": "+15550003333", "machine_detection": "message"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "voicemail_message"]
        r = await client.post("/v1/calls", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422
        # A lone surrogate is legal JSON but no text: 422, not a 500 from the store behind.
        for raw in (b'{"to": "+15550003333", "metadata": {"\\ud800": 1}}',
                    b'{"to": "+15550003333", "voicemail_message": "\\udfff", "machine_detection": "message"}',
                    b'{"to": "+15550003333", "variables": {"k": "\\ud800x"}}'):
            r = await client.post("/v1/calls", content=raw, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (raw, r.text)
        assert (await client.get("/v1/calls/CA" + "0" * 32)).status_code == 404
        assert (await client.get("/v1/calls/not-a-sid")).status_code == 422
        assert (await client.post("/v1/calls/CA" + "0" * 32 + "/hangup")).status_code == 404
        # Twilio refuses the number: a 400 that names Twilio's error, and nothing was recorded.
        stack.twilio.invalid_numbers.add("+15550000000")
        r = await client.post("/v1/calls", json={"to": "+15550000000"})
        assert r.status_code == 400, r.text
        assert r.json()["detail"]["twilio_code"] == 21211


async def test_twilio_refusing_our_credentials_is_a_502_that_says_so(
    stack: Stack, procs: list[Proc]
) -> None:
    from callbridge.redis_server import free_port

    port = free_port()
    env = dict(stack.gateway.env, TWILIO_ACCOUNT_SID="AC" + "9" * 32,
               PUBLIC_URL=f"http://127.0.0.1:{port}")
    gw = gateway_proc(env, port).start()
    procs.append(gw)
    await gw.wait_ready()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10,
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        r = await client.post("/v1/calls", json={"to": "+15550003333"})
    assert r.status_code == 502, r.text
    detail = r.json()["detail"]
    assert detail["twilio_code"] == 20003 and "credentials" in detail["message"]
    assert env["TWILIO_AUTH_TOKEN"] not in r.text


async def test_without_api_keys_every_request_is_refused(
    redis_url: str, prefix: str, procs: list[Proc], redis: aioredis.Redis
) -> None:
    async for stack in make_stack(redis_url, prefix, procs, redis, workers=0):
        async with httpx.AsyncClient(base_url=stack.gateway.env["PUBLIC_URL"], timeout=10) as anon:
            for headers in ({}, {"Authorization": "Basic eDp4"}, {"Authorization": "Bearer x"}):
                assert (await anon.get("/v1/calls", headers=headers)).status_code == 401


async def test_the_api_fuzzed_from_its_own_openapi_document(stack: Stack, tmp_path: Any) -> None:
    """schemathesis generates requests from GET /openapi.json (valid and invalid), with the key:
    no answer may be a 5xx, and every answer must match the schema the API publishes. The suite
    runs a small deterministic set; `FUZZ_EXAMPLES=200` runs a larger random one."""
    import os
    import shutil
    import subprocess

    exe = shutil.which("schemathesis") or str(ROOT_BIN / "schemathesis")
    base = stack.gateway.env["PUBLIC_URL"]
    cmd = [exe, "run", f"{base}/openapi.json", "-H", f"Authorization: Bearer {KEY}",
           "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                       "response_schema_conformance,response_headers_conformance",
           # The console's feeds stream until the browser leaves: a request would only time
           # out. Their refusals (401, 404, 503) are tested in tests/test_console.py.
           "--exclude-path-regex", "/feed$",
           "--max-examples", os.environ.get("FUZZ_EXAMPLES", "12"), "--request-timeout", "10",
           "--report", "junit", "--report-dir", str(tmp_path)]
    if not os.environ.get("FUZZ_EXAMPLES"):  # the suite's run is the same every time
        cmd.append("--generation-deterministic")
    proc = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=600,
                                   env={"PATH": str(ROOT_BIN), "HOME": str(tmp_path),
                                        "SCHEMATHESIS_TELEMETRY": "false",
                                        "PYTHONPATH": str(ROOT)})
    out = proc.stdout + proc.stderr
    (tmp_path / "out.txt").write_text(out)
    assert proc.returncode == 0, out[-6000:]
    assert "No issues found" in out or "passed" in out, out[-3000:]
    print(out[-1500:], file=sys.stderr)


async def test_a_filtered_listing_reads_a_bounded_slice_and_pages_on(stack: Stack) -> None:
    """A `status=live` listing over a day of ended calls reads at most MAX_SCAN records per
    request, answering a short page with `next_before`; following it finds the live call."""
    from gateway.api import MAX_SCAN

    now = time.time()
    live_sid = "CA" + "1" * 32
    pipe = stack.redis.pipeline(transaction=False)
    for i in range(MAX_SCAN + 100):  # newer than the live call, all ended
        sid = f"CA{i:032x}"
        pipe.hset(stack.keys.call(sid), mapping={"status": "ended", "created": now - i})
        pipe.zadd(stack.keys.index, {sid: now - i})
    pipe.hset(stack.keys.call(live_sid), mapping={"status": "live", "created": now - 10_000})
    pipe.zadd(stack.keys.index, {live_sid: now - 10_000})
    await pipe.execute()
    async with api(stack) as client:
        first = (await client.get("/v1/calls", params={"status": "live"})).json()
        assert first["calls"] == [] and first["next_before"] is not None
        second = (await client.get("/v1/calls", params={"status": "live",
                                                         "before": first["next_before"]})).json()
        assert [c["call_sid"] for c in second["calls"]] == [live_sid]
