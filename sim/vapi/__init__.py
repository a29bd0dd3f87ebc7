"""Vapi stand-in (the implementation lives in :mod:`sim.vapi.session` for now)."""

from sim.vapi.session import (
    AssistantScript,
    CallerTurn,
    Spoken,
    VapiSession,
    VapiSim,
    greeter,
    interrupter,
    silent,
    validate_create_call,
)

__all__ = [
    "AssistantScript",
    "CallerTurn",
    "Spoken",
    "VapiSession",
    "VapiSim",
    "greeter",
    "interrupter",
    "silent",
    "validate_create_call",
]
