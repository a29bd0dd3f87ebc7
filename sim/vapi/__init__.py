"""Vapi stand-in: ``POST /call`` plus the ``vapi.websocket`` transport socket, with scripted assistants.

Behaves like Vapi as described in ``docs/protocols.md``, section "Vapi websocket transport", so the
worker, the demo, the end-to-end tests and the load generator can run without a Vapi account:

- ``POST /call`` checks ``Authorization: Bearer <api_key>`` and validates the body the way Vapi's
  NestJS validator does (400 ``{"message": [...], "error": "Bad Request", "statusCode": 400}``), then
  answers 201 with a ``vapi.websocketCall`` Call whose ``transport.websocketCallUrl`` is
  ``ws://HOST:PORT/<id>/transport``. ``GET /call/{id}`` returns the call's current state;
  ``GET /assistant/{id}`` the saved assistant (its ``model.provider``/``model.model``, which a
  ``assistantOverrides.model`` is merged into); ``POST /{id}/control`` is the Live Call Control
  endpoint (same messages as the socket).
- ``WS /{id}/transport``: binary frames are audio in the negotiated format both ways, text frames
  are JSON control messages both ways. Unknown ids are rejected during the handshake (404).
- Scripted assistants speak synthetic tones (:mod:`sim.voices`) so a listener can tell utterances
  apart, detect caller turns with an energy VAD on the received audio, barge-in on a real-time
  playout clock, and end calls the way Vapi does (``status-update`` ended, then close 1000).
  Each utterance has a text (``"answer:0 w1 … wN"``, 2.5 words/s) sent as one ``model-output``
  when it starts and as the final transcript when it ends; with ``firstMessageMode``
  ``assistant-speaks-first-with-model-generated-message`` the first utterance is ``resume``,
  whose text repeats the last assistant message of the history the override handed over.

One module per job:

============== ================================================================================
``validate``   ``POST /call`` body validation with Vapi's messages (pure)
``callspec``   what a valid body asks of the call: format, clientMessages, firstMessageMode (pure)
``scripts``    :class:`AssistantScript` and the greeter / interrupter / silent assistants
``messages``   the control messages sent, and the ``clientMessages`` filter (pure)
``vad``        the energy turn detector (pure)
``session``    :class:`VapiSession`: one call's state machine and its records
``transport``  the websocket server protocol on websockets' sans-I/O core
``rest``       the Starlette routes and the Call object
``sim``        :class:`VapiSim`: the server, the shared downlink ticker, the calls
``hooks``      :class:`VapiObserver`: what a bench or test can watch without patching
============== ================================================================================

Design for load (100 sessions on 2 cores): the transport socket bypasses ASGI, every session
callback is synchronous, one shared ticker (10 ms) paces the downlink of all sessions, and utterance
frames are precomputed and cached.

Inferences about Vapi (``docs/protocols.md``, "Inferred behaviour the stand-in bakes in"):

- The transport URL needs no auth; the ``Authorization`` header of the upgrade is recorded only.
- A call ended by the client's ``end-call`` (or legacy ``hangup``) ends with ``customer-ended-call``;
  the stand-in answers with ``status-update`` ended before closing with 1000.
- A client that closes the socket without ``end-call`` gets ``ended_reason`` =
  ``"transport-closed-by-client"``; a socket lost without a close frame ``"transport-lost"``
  (both stand-in names: Vapi's value is undocumented).
- ``clientMessages`` (in ``assistantOverrides`` or an inline ``assistant``) filters what is sent on
  the socket, as Vapi documents; without it every message type the stand-in produces is sent.
- The first message is not interruptible unless the script says so (Vapi's
  ``firstMessageInterruptionsEnabled`` defaults to false); later answers are.
- ``user-interrupted`` is preceded by ``speech-update`` role=user started and followed by
  ``speech-update`` role=assistant stopped for the cut utterance.
- Downlink frames are 20 ms (640 B pcm_s16le@16k, 160 B mulaw@8k), paced in real time by default.
- An ``assistantOverrides.model`` with the saved provider keeps the saved system prompt and adds
  its user/assistant messages after it; a system message replaces the prompt; another provider
  drops it (recorded as ``CallSpec.model_replaced`` / ``system_replaced``).
- ``model-output`` precedes the utterance's ``speech-update`` started and its audio, whole.
- ``mute-assistant`` holds the assistant's speech where it is (its playout clock stands still, no
  frame is sent) and ``unmute-assistant`` goes on from there; Vapi documents only "mute the
  assistant", not whether speech during a mute is held or skipped.
- A ``say`` utterance's text is its ``content``; an ``add-message`` with ``triggerResponseEnabled``
  (default true, as documented) is answered whatever its role (a user message also becomes a
  final user transcript); with ``false`` it is only recorded (``VapiSession.added_messages``).

Limits: no listenUrl, no server-URL webhooks (end-of-call-report, tool webhooks), no
conversation-update messages; ``model-output`` is one message per utterance, not per token; caller
transcripts are placeholders ("utterance N"), assistant texts are made-up words; the VAD is
energy-only (anything above −40 dBFS is speech); ``maxDurationSeconds`` is honoured but not
range-checked; ``silenceTimeoutSeconds``, concurrency limits and server-side pings are not
modelled; ``assistantId`` is neither checked to be a UUID nor looked up (unknown ids get
``VapiSim.assistant``).
"""

from __future__ import annotations

from sim.vapi.callspec import CallSpec, SavedModel, call_spec
from sim.vapi.hooks import VapiObserver
from sim.vapi.scripts import AssistantScript, greeter, interrupter, silent
from sim.vapi.session import CallerTurn, Spoken, VapiSession
from sim.vapi.sim import Downlink, VapiSim
from sim.vapi.validate import validate_create_call

__all__ = [
    "AssistantScript",
    "CallSpec",
    "CallerTurn",
    "Downlink",
    "SavedModel",
    "Spoken",
    "VapiObserver",
    "VapiSession",
    "VapiSim",
    "call_spec",
    "greeter",
    "interrupter",
    "silent",
    "validate_create_call",
]
