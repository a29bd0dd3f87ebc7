"""The one exception the Twilio stand-in raises to its user."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .call import SimCall


class TwilioSimError(RuntimeError):
    """A call could not be placed/continued the way the test expected (webhook error, no
    `<Connect><Stream>`, rejected WebSocket, …). `call` is the SimCall, if one exists."""

    def __init__(self, message: str, call: SimCall | None = None) -> None:
        super().__init__(message)
        self.call = call
