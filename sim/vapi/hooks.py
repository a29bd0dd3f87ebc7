"""Observation points on the Vapi stand-in, for benches and tests.

A bench times every frame and a test checks what crossed the socket; without hooks both would have
to wrap private session methods and infer from side effects whether something was really sent.
:class:`VapiObserver` names those moments instead. Every method is a no-op: subclass it, override
what you need, and pass an instance as ``VapiSim(observer=...)`` (or set ``VapiSim.observer``).
With no observer the stand-in pays one ``is None`` test per event.

Calls are synchronous, on the event loop, at the moment of the event, for every session: keep them
short (the bench runs 100+ sessions at 50 frames/s each way) and do not drive the session from
them. ``at`` is always ``time.monotonic()``. An exception raised by an observer propagates into
the stand-in's own handling of that event (logged; the event's session may stop speaking), so
observers should not raise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sim.vapi.session import VapiSession


class VapiObserver:
    """No-op base for watching a :class:`~sim.vapi.sim.VapiSim` (see the module docstring)."""

    def assistant_frame_sent(
        self, session: VapiSession, frame: bytes, at: float, turn_id: str, index: int
    ) -> None:
        """An assistant audio frame was written to the socket; ``at`` is just after the write.

        ``turn_id`` is the utterance's (the ``turnId`` a ``user-interrupted`` would name) and
        ``index`` the frame's position in it (0: its first frame). While ``mute-assistant``
        holds the speech no frame is sent, so none is reported.
        """

    def caller_audio_received(self, session: VapiSession, data: bytes, at: float) -> None:
        """A binary message (caller audio, in the call's format) arrived; ``at`` is its arrival."""

    def control_sent(self, session: VapiSession, msg: dict[str, Any], at: float) -> None:
        """A control message went out: one that passed the call's ``clientMessages`` filter, or an
        object a test sent with ``VapiSession.send_json``. ``msg`` carries its ``timestamp``."""

    def control_received(self, session: VapiSession, msg: dict[str, Any], at: float) -> None:
        """A control message arrived, on the socket or through the control URL, before the
        session acts on it. Frames that are not a JSON object with a string ``type`` are not
        control messages (they go to ``VapiSession.invalid``) and are not reported."""
