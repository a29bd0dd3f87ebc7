"""Twilio stand-in: places phone calls against the gateway the way Twilio does.

What it does (wire details: docs/protocols.md, section "Twilio Media Streams"):

* signed voice webhook (`POST {public}/twilio/voice`, form-encoded standard params) → TwiML;
* executes TwiML: `<Say>`, `<Play>`, `<Pause>`, `<Hangup>`, `<Reject>`, `<Dial>`, `<Redirect>`,
  `<Connect action><Stream url><Parameter/></Stream></Connect>`;
* Media Stream: signed WebSocket handshake, `connected`, `start`, then 160-byte μ-law `media`
  frames every 20 ms (silence when the caller is quiet), `dtmf`, `stop`; all calls share ONE
  20 ms ticker task (deadline based, never `sleep(0.02)` drift);
* Twilio's outbound playout buffer: gateway `media` is queued and "played" at 8000 B/s on the
  sim's monotonic clock; `mark`s echo when the audio before them has played (or at once when
  nothing is buffered); `clear` drops unplayed audio and echoes pending marks at once;
* validates what the gateway sends (31950 binary frame, 31951 invalid message) and ignores bad
  messages, recording them in `SimCall.protocol_errors`;
* when the gateway closes the socket: follows `<Connect action>` (Hangup / Dial / Say /
  a fresh `<Connect><Stream>`), or continues the document, or ends the call;
* a REST stand-in (`POST /2010-04-01/Accounts/{AC}/Calls/{CA}.json`, Basic auth) for
  `Status=completed` hang-ups and `Twiml=`/`Url=` redirects;
* outbound calls (`POST /2010-04-01/Accounts/{AC}/Calls.json`, what `client.calls.create` sends):
  validated like Twilio, dialled to a configurable `Callee` (human, answering machine with a
  greeting and a beep, busy, no-answer, ...), signed status callbacks (initiated, ringing,
  answered, completed), answering machine detection (blocking or `AsyncAmd`), then `Url`/`Twiml`
  run like an inbound call's TwiML, so `<Connect><Stream>` opens a Media Stream the same way;
* observer hooks (`TwilioObserver`) for a bench or test that times audio at the socket.

Clock and recordings (per call): call time t=0 is the moment the first stream's `start` was
sent; earlier events have negative times. `heard` and `sent` are **μ-law** byte timelines at
8 kHz indexed by call time (byte i = t of i/8000 s; gaps filled with 0xFF silence).

Modules, one job each: wire (messages, signatures, URLs), twiml (documents → verbs),
playout (the outbound buffer), recording (timelines, segments, WAV), stream (one socket and its
pacing), call (SimCall), webhooks (signed requests to the app), rest (the REST stand-in),
outbound (create requests, callees, AMD decisions, callback parameters: pure), dialer (an
outbound call's lifecycle), sim (TwilioSim: server, ticker, place_call, wait_outbound), hooks
(TwilioObserver).

Typical use::

    async with TwilioSim(gateway_url=gw, public_url=pub, account_sid=ac, auth_token=tok) as sim:
        call = await sim.place_call()
        call.say_pcm(pcm16_8k)
        await call.wait_speaking_done()
        reason = await call.wait_ended(timeout=10)

An outbound call, placed by the gateway with `client.calls.create(...)` against
`sim.rest_base_url`::

    sim.callees["+15550009999"] = Callee(kind="machine", greeting_s=3.0)
    ...  # the gateway creates the call
    call = await sim.wait_outbound(timeout=10)
    await call.wait_streams(1, timeout=10)
    await call.wait_for(lambda: call.answered_by is not None, timeout=10)
    call.heard_after_beep  # what the machine recorded
"""

from .call import SimCall
from .errors import TwilioSimError
from .hooks import TwilioObserver
from .outbound import Callee
from .sim import TwilioSim

__all__ = ["Callee", "SimCall", "TwilioObserver", "TwilioSim", "TwilioSimError"]
