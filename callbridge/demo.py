"""`callbridge demo`: the whole product on one machine, no phone and no accounts.

Runs the gateway and a worker (as `dev` does), the Vapi stand-in with a greeter assistant and the
Twilio simulator, places one call with two caller turns (with `--outbound`, through the call
API: the simulator dials it and the callee talks), prints a report and writes the call as
a stereo WAV (caller left, assistant right). Always uses the stand-ins, never real services.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

from callbridge.dev import embedded_redis
from callbridge.redis_server import free_port
from shared.logs import setup_logging
from shared.settings import Settings

if TYPE_CHECKING:
    from sim.twilio import SimCall, TwilioSim

DEMO_ACCOUNT = "AC" + "d" * 32
DEMO_TOKEN = "demo-auth-token"
DEMO_KEY = "demo-vapi-key"
DEMO_API_KEY = "demo-api-key"
DEMO_FROM, DEMO_TO = "+15550001111", "+15550002222"


async def _until(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _demo(args: argparse.Namespace, settings: Settings, port: int) -> int:
    from callbridge.dev import run_dev
    from sim import voices
    from sim.twilio import TwilioSim
    from sim.vapi import VapiSim, greeter

    vapi = VapiSim(api_key=DEMO_KEY, assistant=greeter(answers=2, end_after=True))
    await vapi.start()
    public = f"http://127.0.0.1:{port}"
    twilio = TwilioSim(gateway_url=public, public_url=public, account_sid=DEMO_ACCOUNT,
                       auth_token=DEMO_TOKEN)
    await twilio.start()
    settings.vapi_base_url = vapi.base_url
    settings.twilio_api_base_url = twilio.rest_base_url
    stop, ready = asyncio.Event(), asyncio.Event()
    dev = asyncio.create_task(run_dev(settings, "127.0.0.1", port, stop, ready))
    try:
        await asyncio.wait_for(ready.wait(), 15)
        print(f"gateway + worker up on {public}; Vapi stand-in {vapi.base_url}; placing a call…")
        if args.outbound:
            call = await _dial(public, twilio)
        else:
            call = await twilio.place_call(from_=DEMO_FROM, to=DEMO_TO)

        def heard_done(n: int) -> object:
            def check() -> bool:
                segs = call.heard_segments()
                return len(segs) >= n and call.now() - segs[n - 1][1] > 0.3
            return check

        ok = await _until(heard_done(1), 10)
        for turn in range(2):
            if not ok:
                break
            call.say_pcm(voices.utterance("caller", turn, 0.8, 8000))
            ok = await _until(heard_done(turn + 2), 10)
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await call.wait_ended(15)
        if not call.ended.is_set():
            await call.hangup()
        call.write_wav(args.wav)

        pcm = call.heard_pcm16()
        print("\ncallbridge demo report")
        print(f"  call            {call.call_sid}  format={settings.vapi_audio_format}")
        print(f"  ended           {call.end_reason}")
        print("  caller heard    ", end="")
        segs = call.heard_segments(min_silence_s=0.015)
        print(", ".join(
            f"{voices.identify(pcm[int(a * 8000) * 2:int(b * 8000) * 2], 8000)} "
            f"{a:.2f}-{b:.2f}s" for a, b in segs) or "nothing")
        sent = call.sent_segments()
        for i, (_start, b) in enumerate(sent):
            reply = next((s for s in segs if s[0] > b), None)
            if reply:
                print(f"  turn {i + 1} latency  {1000 * (reply[0] - b):.0f} ms from end of caller speech "
                      f"to first assistant audio (includes the stand-in's 400 ms end-of-turn wait)")
        session = next(iter(vapi.sessions.values()), None)
        delivered = False
        if session is not None:
            # Frames the caller sent while the assistant's session was open must all arrive.
            offset = time.monotonic() - call.now()
            closed = session.closed_at or time.monotonic()
            due = sum(1 for t, _pos in call.sent_frames if offset + t < closed - 0.05)
            got = len(session.received_frames)
            delivered = got >= due
            print(f"  vapi received   {got} caller frames; {due} were sent while its session was open")
        print(f"  marks echoed    {len(call.marks_echoed)}; protocol errors: {len(call.protocol_errors)}")
        if args.outbound:
            view = await _view(public, call.call_sid)
            print(f"  call API        {view.get('direction')} {view.get('status')} "
                  f"end_reason={view.get('end_reason')}; transcript: {len(view.get('transcript', []))} "
                  f"lines; turns: {len(view.get('turns', []))}")
        print(f"  wav             {args.wav} (left: caller, right: assistant)")
        success = (call.end_reason == "hangup" and len(segs) >= 3 and not call.protocol_errors
                   and delivered)
        print(f"  result          {'OK' if success else 'FAILED'}")
        return 0 if success else 1
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(dev, 15)
        await twilio.stop()
        await vapi.stop()


async def _dial(public: str, twilio: TwilioSim) -> SimCall:
    """Place the call as an operator would: `POST /v1/calls`; the Twilio stand-in dials it."""
    import httpx

    from sim.twilio import Callee

    # The callee answers and listens (a callee saying hello would talk over the greeting).
    twilio.callees[DEMO_TO] = Callee(kind="human", hello_s=0.0)
    async with httpx.AsyncClient(base_url=public, timeout=10,
                                 headers={"Authorization": f"Bearer {DEMO_API_KEY}"}) as client:
        r = await client.post("/v1/calls", json={"to": DEMO_TO, "variables": {"demo": True}})
        r.raise_for_status()
        print(f"POST /v1/calls → {r.status_code} {r.json()}")
    return await twilio.wait_outbound(10)


async def _view(public: str, sid: str) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=public, timeout=10,
                                 headers={"Authorization": f"Bearer {DEMO_API_KEY}"}) as client:
        r = await client.get(f"/v1/calls/{sid}")
        return dict(r.json()) if r.status_code == 200 else {"status": f"HTTP {r.status_code}"}


def run_demo(args: argparse.Namespace) -> int:
    settings = Settings.model_validate({
        "REDIS_PREFIX": f"demo-{uuid.uuid4().hex[:6]}:",
        "TWILIO_ACCOUNT_SID": DEMO_ACCOUNT, "TWILIO_AUTH_TOKEN": DEMO_TOKEN,
        "VAPI_API_KEY": DEMO_KEY, "VAPI_ASSISTANT_ID": "demo-assistant",
        "API_KEYS": DEMO_API_KEY, "TWILIO_FROM_NUMBER": DEMO_FROM,
    })
    env = Settings()
    settings.redis_url = env.redis_url
    settings.vapi_audio_format = args.format or env.vapi_audio_format
    settings.log_level = "WARNING"
    settings.log_format = "text"
    setup_logging(settings.log_level, settings.log_format, role="demo")
    port = free_port()
    settings.public_url = f"http://127.0.0.1:{port}"
    redis_server = embedded_redis(settings)
    try:
        return asyncio.run(_demo(args, settings, port))
    except KeyboardInterrupt:
        return 130
    finally:
        if redis_server is not None:
            redis_server.stop()


if __name__ == "__main__":
    sys.exit(run_demo(argparse.Namespace(wav="callbridge-demo.wav", format=None, outbound=False)))
