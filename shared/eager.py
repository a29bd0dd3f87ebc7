"""Run a coroutine at once, up to its first wait, and hand what is left to a task.

Why: a socket's messages are written by one task per socket, so that a send that has to wait
(back-pressure) holds up the ones behind it, in order. Handing every 20 ms frame to that task
costs a task switch, an event and a future per frame, yet a send almost never waits: Starlette's
and uvicorn's `send` write to the transport and return without suspending. `start` runs the send
in the caller's turn of the loop; only when it does suspend does the caller get an awaitable that
finishes it, for its task to await (docs/performance.md, "Against a direct bridge").

asyncio's eager tasks (Python 3.12+) do the same with a Task per call; this needs no Task and
runs on 3.11.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = ["Rest", "start"]

T = TypeVar("T")


class Rest(Generic[T]):
    """The part of a coroutine after its first wait: awaiting it drives the coroutine on, passing
    each value the coroutine yields (the future it waits for) to the awaiting task and the task's
    answers (and cancellation) back. Await it once; `close()` it if it will not be awaited."""

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, T], yielded: Any) -> None:
        self._coro = coro
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, T]:
        coro, value = self._coro, self._yielded
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation too: the coroutine's handlers decide
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value

    def close(self) -> None:
        self._coro.close()


def start(coro: Coroutine[Any, Any, Any]) -> Rest[Any] | None:
    """Run `coro` now: None when it finished without waiting (its result is dropped; what it
    raised is raised here), else the `Rest` to await."""
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return Rest(coro, yielded)
