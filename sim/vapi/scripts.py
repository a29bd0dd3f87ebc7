"""Scripted assistants: what the stand-in's assistant says and when, instead of a model.

A script is plain data so a test or the bench can tune it per run; ``POST /call`` copies it per
call (:mod:`sim.vapi.callspec`), so changing ``VapiSim.assistant`` never affects calls already made.

Every utterance also has a text (:func:`utterance_text`): the model's words for the tone, sent as
``model-output`` and as the final transcript, so a bridge that keeps what was said (and hands it
to a new session on failover) can be checked word by word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class AssistantScript:
    """What a simulated assistant says and when.

    Attributes:
        greeting_s: length of the first message spoken on connect (None: wait for the caller).
        answers: how many answers it has; one is spoken per caller turn (or keypad entry).
        end_after: when the answers are used up, speak a goodbye and end the call
            (``assistant-ended-call``); otherwise stay silent until the client ends.
        first_message_interruptible / interruptible: may the caller barge in on the first
            message / on later utterances.
        reply_delay_s: pause between the end of a caller turn and the answer.
        greeting_delay_s: pause between the socket opening and the first message.
        tool_call_after: after answer number ``k`` (0-based) has been spoken, send a
            ``tool-calls`` message for ``tool_call_name(**tool_call_arguments)``.
        resume_s: length of the ``resume`` utterance spoken first when the call asks for
            ``assistant-speaks-first-with-model-generated-message`` (None: say nothing).
    """

    name: str = "greeter"
    greeting_s: float | None = 1.0
    answers: int = 2
    answer_s: float = 1.2
    end_after: bool = False
    goodbye_s: float = 0.8
    say_s: float = 0.6
    first_message_interruptible: bool = False
    interruptible: bool = True
    reply_delay_s: float = 0.0
    greeting_delay_s: float = 0.0
    tool_call_after: int | None = None
    tool_call_name: str = "transfer_call"
    tool_call_arguments: dict[str, Any] = field(default_factory=dict)
    resume_s: float | None = 1.0


def greeter(
    answers: int = 2,
    end_after: bool = False,
    greeting_s: float = 1.0,
    answer_s: float = 1.2,
    **kwargs: Any,
) -> AssistantScript:
    """Greets on connect, answers each caller turn, optionally says goodbye and hangs up."""
    return AssistantScript(
        name="greeter",
        greeting_s=greeting_s,
        answers=answers,
        answer_s=answer_s,
        end_after=end_after,
        **kwargs,
    )


def interrupter(
    long_s: float = 6.0,
    answers: int = 2,
    end_after: bool = False,
    answer_s: float = 1.2,
    **kwargs: Any,
) -> AssistantScript:
    """Starts with a long, interruptible utterance (the ``greeting`` tone) to provoke barge-in."""
    kwargs.setdefault("first_message_interruptible", True)
    return AssistantScript(
        name="interrupter",
        greeting_s=long_s,
        answers=answers,
        answer_s=answer_s,
        end_after=end_after,
        **kwargs,
    )


def silent() -> AssistantScript:
    """Never speaks (still records, detects caller turns and sends transcripts)."""
    return AssistantScript(name="silent", greeting_s=None, answers=0, resume_s=None)


#: words per second of the stand-in's "speech" (about 150 words per minute).
WORDS_PER_S = 2.5


def utterance_text(label: str, seconds: float) -> str:
    """``"{label} w1 … wN"`` with N = round(seconds × 2.5): the label says which tone it is, the
    word count how long it lasts, so a share of the words is a share of the audio."""
    n = round(seconds * WORDS_PER_S)
    return " ".join([label, *(f"w{i}" for i in range(1, n + 1))])


def resume_text(history: tuple[tuple[str, str], ...]) -> str:
    """The model-generated first message of a taken-over call: ``"resume"`` followed by the words
    of the last assistant message of the history it was given, so a test can see the stand-in
    resumed from that history (a real model would continue from it)."""
    last = next((text for role, text in reversed(history) if role == "assistant"), "")
    return " ".join(["resume", *last.split()])
