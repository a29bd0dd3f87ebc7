"""Observation points on the Twilio stand-in, for benches and tests.

A bench times every frame where it crosses the socket and a test checks what the stand-in did;
without hooks both would have to wrap private SimCall methods. :class:`TwilioObserver` names
those moments instead. Every method is a no-op: subclass it, override what you need, and pass an
instance as ``TwilioSim(observer=...)`` (or set ``TwilioSim.observer``). With no observer the
stand-in pays one ``is None`` test per event.

Calls are synchronous, on the event loop, at the moment of the event, for every call: keep them
short (the bench runs 100+ calls at 50 frames/s each way) and do not drive the call from them.
``at`` is always ``time.monotonic()`` (``call.t0 + call time`` converts the call's own records).
An exception raised by an observer propagates into the stand-in's handling of that event (for a
caller frame: the shared ticker logs it and stops that stream's media), so observers should not
raise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sim.twilio.call import SimCall


class TwilioObserver:
    """No-op base for watching a :class:`~sim.twilio.sim.TwilioSim` (see the module docstring)."""

    def caller_frame_sent(self, call: SimCall, frame: bytes, at: float, pos: int) -> None:
        """A caller `media` frame (160 μ-law bytes) was written to the call's socket; ``at`` is
        just after the write (later than the ticker pass in ``call.sent_frames``). ``pos`` is its
        sample offset on the call clock: ``call.sent[pos:pos + 160] == frame``."""

    def assistant_media_received(self, call: SimCall, audio: bytes, at: float) -> None:
        """A valid `media` message from the gateway was read (decoded payload, possibly empty),
        before it was queued for playout; ``at`` is its arrival."""

    def mark_echoed(self, call: SimCall, name: str, at: float, cause: str) -> None:
        """A `mark` went back to the gateway; ``at`` is just after the write. ``cause``: "played"
        (the audio queued before it has played, or nothing was queued) or "clear"."""

    def clear_received(self, call: SimCall, at: float, dropped: int) -> None:
        """A `clear` from the gateway was read; it dropped ``dropped`` samples (μ-law bytes at
        8 kHz) of queued audio that had not played. The marks it releases follow, each reported
        by :meth:`mark_echoed` with cause "clear"."""

    def outbound_call_created(self, call: SimCall, at: float) -> None:
        """`POST /Calls.json` created an outbound call (status queued); ``at`` is its creation.
        The call has not been dialled yet: watch it with ``call.wait_for`` / ``wait_streams``
        (or take it with ``TwilioSim.wait_outbound``)."""
