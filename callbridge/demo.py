"""`callbridge demo`: the whole product on one machine, no phone and no accounts.

Runs the gateway and a worker (as `dev` does), the Vapi stand-in with a greeter assistant and the
Twilio simulator, places one call with two caller turns (with `--outbound`, through the call
API: the simulator dials it and the callee talks), prints a report and writes the call as
a stereo WAV (caller left, assistant right). Always uses the stand-ins, never real services.

With `--console` it keeps the stack up until Ctrl-C (or SIGTERM) instead, places a simulated
call every 20-40 s (inbound and outbound, a few caller turns each, now and then a barge-in or a
keypress) and prints the console's address and API key, so the console (`GET /console`) has
something to show.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from callbridge.dev import embedded_redis
from callbridge.redis_server import free_port
from shared.logs import setup_logging
from shared.serving import stop_on_signals
from shared.settings import Settings

if TYPE_CHECKING:
    from sim.twilio import SimCall, TwilioSim
    from sim.vapi import VapiSim

DEMO_ACCOUNT = "AC" + "d" * 32
DEMO_TOKEN = "demo-auth-token"
DEMO_KEY = "demo-vapi-key"
DEMO_API_KEY = "demo-api-key"
DEMO_FROM, DEMO_TO = "+15550001111", "+15550002222"
# demo --console: the numbers callers dial, each routed to an assistant of its own.
CONSOLE_LINES = {"+15550002222": "asst-reception", "+15550003333": "asst-support"}


async def _until(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _poll(pred: Callable[[], bool], timeout: float) -> bool:
    """`_until` at a slower pace: the console demo's callers share the loop with the stack."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def _api(public: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import httpx

    async with httpx.AsyncClient(base_url=public, timeout=10, headers={
            "Authorization": f"Bearer {DEMO_API_KEY}"}) as client:
        return await client.request(method, path, json=body)


async def _standins(vapi: VapiSim, settings: Settings, port: int) -> tuple[TwilioSim, str]:
    """Start the Vapi stand-in and a Twilio simulator pointed at the gateway on `port`, and point
    the settings at both."""
    from sim.twilio import TwilioSim

    await vapi.start()
    public = f"http://127.0.0.1:{port}"
    twilio = TwilioSim(gateway_url=public, public_url=public, account_sid=DEMO_ACCOUNT,
                       auth_token=DEMO_TOKEN)
    await twilio.start()
    settings.vapi_base_url = vapi.base_url
    settings.twilio_api_base_url = twilio.rest_base_url
    return twilio, public


async def _demo(args: argparse.Namespace, settings: Settings, port: int) -> int:
    from callbridge.dev import run_dev
    from sim import voices
    from sim.vapi import VapiSim, greeter

    vapi = VapiSim(api_key=DEMO_KEY, assistant=greeter(answers=2, end_after=True))
    twilio, public = await _standins(vapi, settings, port)
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


async def _console(settings: Settings, port: int) -> int:
    """`demo --console`: the stack and a stream of simulated calls until SIGINT/SIGTERM."""
    from callbridge.dev import run_dev
    from sim.vapi import VapiSim, greeter, interrupter

    # Each assistant says goodbye and hangs up after its third answer (a caller who has said
    # less by then hangs up, or is hung up on through the call API).
    vapi = VapiSim(api_key=DEMO_KEY, assistant=greeter(answers=3, end_after=True, answer_s=2.0),
                   assistants={
                       "asst-reception": greeter(answers=3, end_after=True, answer_s=2.0),
                       "asst-support": interrupter(long_s=4.0, answers=3, end_after=True,
                                                   answer_s=2.5),
                       "asst-outreach": greeter(answers=3, end_after=True, answer_s=1.6),
                   })
    twilio, public = await _standins(vapi, settings, port)
    quit_, dev_stop, ready = asyncio.Event(), asyncio.Event(), asyncio.Event()
    stop_on_signals(quit_)
    dev = asyncio.create_task(run_dev(settings, "127.0.0.1", port, dev_stop, ready))
    calls: list[SimCall] = []
    tasks: set[asyncio.Task[None]] = set()
    try:
        started = asyncio.create_task(ready.wait())
        await asyncio.wait({started, dev}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if not ready.is_set():
            started.cancel()
            print("callbridge demo: the gateway did not start", file=sys.stderr)
            return 1
        print(f"console:  {public}/console", flush=True)
        print(f"API key:  {DEMO_API_KEY}", flush=True)
        print("placing a simulated call every 20-40 s; Ctrl-C stops", flush=True)
        rng = random.Random()
        n = 0
        while not quit_.is_set() and not dev.done():
            n += 1
            task = asyncio.create_task(_console_call(n, public, twilio, rng, calls))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            # Two calls early so the list is busy from the start, then one every 20-40 s.
            pause = 6.0 if n == 1 else rng.uniform(20, 40)
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(quit_.wait(), pause)
        if dev.done() and not quit_.is_set():
            print("callbridge demo: the gateway and worker stopped", file=sys.stderr)
            return 1
        print("stopping…", flush=True)
        return 0
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for call in calls:
            if not call.ended.is_set():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(call.hangup(), 2)
        dev_stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(dev, 15)
        await twilio.stop()
        await vapi.stop()


async def _console_call(n: int, public: str, twilio: TwilioSim, rng: random.Random,
                        calls: list[SimCall]) -> None:
    """One call for the console to show: the assistant greets, the caller talks a few times
    (thinking a few seconds first; now and then talking over the answer, or pressing a key),
    and the assistant says goodbye and hangs up (or the caller hangs up first)."""
    from sim import voices
    from sim.twilio import Callee

    try:
        if n % 3 == 0:  # an outbound call, placed through the call API
            to = f"+1555010{rng.randrange(1000):04d}"
            twilio.callees[to] = Callee(kind="human", hello_s=0.0, ring_s=rng.uniform(0.5, 2.0))
            r = await _api(public, "POST", "/v1/calls", {"to": to, "assistant_id": "asst-outreach",
                                                           "variables": {"demo": n}})
            r.raise_for_status()
            call = await twilio.wait_outbound(10, to=to)
        else:
            caller = f"+1555{rng.randrange(10**7):07d}"
            line = rng.choice(list(CONSOLE_LINES))
            call = await twilio.place_call(from_=caller, to=line)
        calls.append(call)
        print(f"call {n}: {call.call_sid} {'outbound' if call.outbound else 'inbound'} "
              f"{call.from_} -> {call.to}", flush=True)

        def segments() -> int:
            return len(call.heard_segments())

        def answered(before: int) -> Callable[[], bool]:
            """Something new was heard since `before` segments, and it has finished."""
            def check() -> bool:
                segs = call.heard_segments()
                return len(segs) > before and call.now() - segs[-1][1] > 0.5
            return check

        def started(before: int) -> Callable[[], bool]:
            return lambda: segments() > before

        await _poll(answered(0), 20)
        for turn in range(rng.randint(2, 4)):
            if call.ended.is_set():
                break
            await asyncio.sleep(rng.uniform(1.0, 4.0))  # the caller thinks
            if rng.random() < 0.15:
                for digit in rng.choice(["1", "42#", "7"]):
                    call.send_dtmf(digit)
                    await asyncio.sleep(0.3)
            before = segments()
            call.say_pcm(voices.utterance("caller", turn, rng.uniform(0.7, 1.6), 8000))
            if rng.random() < 0.25:  # talk over the answer a moment after it starts
                await _poll(started(before), 10)
                await asyncio.sleep(0.5)
                before = segments()
                call.say_pcm(voices.utterance("caller", turn + 3, 0.8, 8000))
            await _poll(answered(before), 20)
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await call.wait_ended(rng.uniform(2.0, 4.0))  # the assistant's goodbye, perhaps
        if not call.ended.is_set():
            if rng.random() < 0.5:
                await call.hangup()
            else:  # as an operator would, from the console
                await _api(public, "POST", f"/v1/calls/{call.call_sid}/hangup")
                with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                    await call.wait_ended(5)
                if not call.ended.is_set():
                    await call.hangup()
        print(f"call {n}: {call.call_sid} ended ({call.end_reason})", flush=True)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # one call going wrong does not stop the demo
        print(f"call {n}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def run_demo(args: argparse.Namespace) -> int:
    console = bool(getattr(args, "console", False))
    settings = Settings.model_validate({
        "REDIS_PREFIX": f"demo-{uuid.uuid4().hex[:6]}:",
        "TWILIO_ACCOUNT_SID": DEMO_ACCOUNT, "TWILIO_AUTH_TOKEN": DEMO_TOKEN,
        "VAPI_API_KEY": DEMO_KEY, "VAPI_ASSISTANT_ID": "demo-assistant",
        "API_KEYS": DEMO_API_KEY, "TWILIO_FROM_NUMBER": DEMO_FROM,
        **({"ASSISTANT_ROUTES": orjson.dumps(CONSOLE_LINES).decode(), "TRANSFER_ALLOW": "+1555*"}
           if console else {}),
    })
    env = Settings()
    settings.redis_url = env.redis_url
    settings.vapi_audio_format = args.format or env.vapi_audio_format
    settings.log_level = "WARNING"
    settings.log_format = "text"
    setup_logging(settings.log_level, settings.log_format, role="demo")
    port = getattr(args, "port", None) or free_port()
    settings.public_url = f"http://127.0.0.1:{port}"
    redis_server = embedded_redis(settings)
    try:
        if console:
            return asyncio.run(_console(settings, port))
        return asyncio.run(_demo(args, settings, port))
    except KeyboardInterrupt:
        return 130
    finally:
        if redis_server is not None:
            redis_server.stop()


if __name__ == "__main__":
    sys.exit(run_demo(argparse.Namespace(wav="callbridge-demo.wav", format=None, outbound=False,
                                         console=False, port=None)))
