"""The gateway socket's decisions on a virtual clock: the watchdog's verdicts and why a socket
closed (what the metric says and what the worker is told)."""

from __future__ import annotations

from gateway.state import (
    CHECK_OWNER,
    CLOSE_IDLE,
    WORKER_SEEN,
    SocketInfo,
    closing_cause,
    watchdog_verdict,
)

LIMITS = {"idle_timeout": 5.0, "no_worker_timeout": 15.0}


def verdict(info: SocketInfo, now: float, redis_back_at: float = 0.0) -> str | None:
    return watchdog_verdict(info, now, redis_back_at=redis_back_at, **LIMITS)


def test_a_silent_socket_is_closed_once_and_a_talking_one_never() -> None:
    info = SocketInfo(last_rx=100.0, attached=100.0)
    assert verdict(info, 104.9) is None
    assert verdict(info, 105.1) == CLOSE_IDLE
    info.idle = True  # the watchdog closed it
    assert verdict(info, 130.0) is None, "decided once"
    talking = SocketInfo(last_rx=200.0, attached=100.0, owner_ok_since=100.0)
    assert verdict(talking, 200.02) is None


def test_no_worker_is_asked_about_only_after_the_window_and_only_once_per_window() -> None:
    info = SocketInfo(last_rx=0.0, attached=100.0)
    info.last_rx = 114.0
    assert verdict(info, 114.9) is None, "within NO_WORKER_TIMEOUT_S of attach"
    info.last_rx = 115.1
    assert verdict(info, 115.2) == CHECK_OWNER
    info.owner_ok_since = 100.0  # Redis said a worker owns it
    info.last_rx = 130.0
    assert verdict(info, 130.1) is None


def test_a_worker_writing_to_the_call_counts_as_alive_without_asking_redis() -> None:
    info = SocketInfo(last_rx=116.0, attached=100.0, last_out=110.0)
    assert verdict(info, 116.1) == WORKER_SEEN


def test_redis_coming_back_restarts_the_window() -> None:
    """After an empty restart there is no `owner` until the worker re-asserts it: the window
    counts from Redis's return, and audio written before it does not count."""
    info = SocketInfo(last_rx=200.0, attached=100.0, last_out=150.0, owner_ok_since=100.0)
    assert verdict(info, 200.1, redis_back_at=190.0) is None, "15 s from the return"
    info.last_rx = 205.5
    assert verdict(info, 205.6, redis_back_at=190.0) == CHECK_OWNER
    info.last_out = 195.0
    assert verdict(info, 205.6, redis_back_at=190.0) == WORKER_SEEN


def test_why_a_socket_closed() -> None:
    assert closing_cause("stop", hung_up=False, draining=False) == ("stop", None)
    assert closing_cause("stop", hung_up=True, draining=True) == ("stop", None), "Twilio said so"
    assert closing_cause("closed", hung_up=True, draining=True) == ("hangup", b"hangup")
    assert closing_cause("closed", hung_up=False, draining=True) == ("drain", b"drain")
    assert closing_cause("closed", hung_up=False, draining=False) == ("lost", b"lost")
    for watchdog in ("idle_timeout", "no_worker", "error"):
        assert closing_cause(watchdog, hung_up=False, draining=False) == (watchdog, b"lost")
