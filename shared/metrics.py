"""Prometheus metrics for both tiers, named by Prometheus conventions.

Label sets are bounded by construction: causes, hops and end reasons come from the fixed sets
below, never from caller input, and a CallSid is never a label.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# `_created` series double the exposition for no operational value.
disable_created_metrics()

# Latency buckets sized for a real-time audio path: sub-millisecond to a couple of seconds.
_LAT = (0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01,
        0.015, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SETUP = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

END_REASONS = frozenset(
    {
        "caller-hangup",
        "assistant-ended",
        "transfer",
        "vapi-rejected",
        "vapi-rate-limited",
        "vapi-error",
        "vapi-unreachable",
        "vapi-socket-closed",
        "twilio-socket-timeout",
        "stream-lost",
        "worker-shutdown",
        "error",
    }
)


def end_reason_label(reason: str) -> str:
    return reason if reason in END_REASONS else "error"


# Gateway -------------------------------------------------------------------------------------
API_REQUESTS = Counter(
    "callbridge_api_requests_total",
    "Call API (/v1) requests by outcome: call_created, hangup, say, transfer, unauthorized, "
    "over_limit (429), twilio_refused.",
    ["outcome"],
)
ADMISSIONS = Counter(
    "callbridge_admissions_total",
    "Inbound calls at admission (MAX_ACTIVE_CALLS) by outcome: admitted, held (waiting for a "
    "free place), turned_away.",
    ["outcome"],
)
CONSOLE_STREAMS = Gauge(
    "callbridge_console_streams", "Open console streams, by kind: list (the calls feed), call "
    "(one call's feed), listen (listen-in).", ["kind"], multiprocess_mode="livesum")
CONSOLE_CUT = Counter(
    "callbridge_console_streams_cut_total",
    "Console streams ended by the gateway because the browser stopped reading (queue full or a "
    "write waited CONSOLE_SEND_TIMEOUT_S), by kind.",
    ["kind"],
)
CONSOLE_REFUSED = Counter(
    "callbridge_console_streams_refused_total",
    "Console streams refused, by cause: busy (CONSOLE_MAX_STREAMS), unauthorized, unknown_call.",
    ["cause"],
)
CONSOLE_DROPPED_FRAMES = Counter(
    "callbridge_console_listen_frames_dropped_total",
    "Listen-in audio frames dropped because the browser fell behind.",
)
WEBHOOKS = Counter(
    "callbridge_gateway_webhooks_total",
    "Twilio webhook requests by route and outcome.",
    ["route", "outcome"],
)
STREAMS_FOLLOWED = Gauge(
    "callbridge_redis_streams_followed", "Call streams this process reads, by mode: rung (their "
    "writer rings this process's wake stream) or blocked (named in its blocked XREAD: a writer "
    "that does not ring yet, another version, or Redis Cluster).", ["mode"],
    multiprocess_mode="livesum")


def streams_followed(rung: int, following: int) -> None:
    STREAMS_FOLLOWED.labels("rung").set(rung)
    STREAMS_FOLLOWED.labels("blocked").set(following - rung)


MEDIA_SOCKETS = Gauge("callbridge_gateway_media_sockets", "Open Twilio Media Stream sockets.",
                      multiprocess_mode="livesum")
MEDIA_REJECTED = Counter(
    "callbridge_gateway_media_rejected_total",
    "Media Stream sockets refused before audio flowed, by cause.",
    ["cause"],
)
MEDIA_CLOSED = Counter(
    "callbridge_gateway_media_closed_total",
    "Media Stream sockets ended, by cause: stop (caller hung up), hangup (worker asked), "
    "drain, idle_timeout (Twilio went silent), no_worker (no worker took the call), lost, "
    "error (a failure in either direction; closed with 1011 so Twilio re-attaches).",
    ["cause"],
)
CALLS_ANSWERED = Counter("callbridge_gateway_calls_answered_total", "Calls answered with TwiML.")

# Both tiers ----------------------------------------------------------------------------------
FRAMES = Counter(
    "callbridge_frames_total",
    "Audio frames moved, by direction (in = caller to assistant) and hop.",
    ["direction", "hop"],
)
AUDIO_BYTES = Counter(
    "callbridge_audio_bytes_total", "Audio payload bytes moved, by direction and hop.", ["direction", "hop"]
)
DROPPED = Counter(
    "callbridge_messages_dropped_total",
    "Messages dropped, by cause (not_json, oversized, binary, bad_base64, unknown_event, ...).",
    ["cause"],
)


def dropped(cause: str) -> None:
    """One message dropped, for `cause`."""
    DROPPED.labels(cause).inc()
HOP_LATENCY = Histogram(
    "callbridge_hop_latency_seconds",
    "Latency per hop, from the sender's stamp: twilio_to_redis (gateway receive -> XADD acked), "
    "twilio_to_vapi (gateway receive -> worker send to Vapi, i.e. through Redis), worker_to_redis "
    "(worker playout -> XADD acked), worker_to_twilio (worker playout -> gateway send to Twilio). "
    "One audio frame in 8 is timed.",
    ["hop"],
    buckets=_LAT,
)
REDIS_ERRORS = Counter("callbridge_redis_errors_total", "Redis command failures, by operation.", ["op"])
REDIS_RECONNECTS = Counter(
    "callbridge_redis_reconnects_total", "Redis recovered after failures (first success after errors)."
)

# Worker --------------------------------------------------------------------------------------
CALLS_ACTIVE = Gauge("callbridge_worker_calls_active", "Calls this worker currently owns.",
                     multiprocess_mode="livesum")
CALLS_STARTED = Counter("callbridge_worker_calls_started_total", "Calls a worker began to serve.")
CALLS_ENDED = Counter(
    "callbridge_worker_calls_ended_total", "Calls ended, by end reason.", ["reason"]
)
CLAIMS = Counter(
    "callbridge_worker_claims_total",
    "Call jobs claimed: new (first claim), takeover (from an idle worker), or lost (taken over "
    "from us while we stalled; we released it).",
    ["kind"],
)
VAPI_SOCKETS = Gauge("callbridge_worker_vapi_sockets", "Open Vapi transport sockets.",
                     multiprocess_mode="livesum")
PLAYOUT_UNSENT = Gauge(
    "callbridge_worker_playout_unsent_seconds",
    "Assistant audio this worker holds unsent, summed over its calls, read at scrape: audio waits "
    "here for its pacing slot (only PLAYOUT_LEAD_MS is handed to Twilio ahead). Vapi's bursts "
    "raise it for a moment; over callbridge_worker_calls_active, a level that stays up while "
    "assistants speak is how late their audio is.",
    multiprocess_mode="livesum")
PLAYOUT_UNSENT_MAX = Gauge(
    "callbridge_worker_playout_unsent_max_seconds",
    "The most assistant audio any one call of this worker holds unsent, read at scrape.",
    multiprocess_mode="livemax")


def set_playout_unsent(held: tuple[float, float]) -> None:
    """The playout gauges, from `worker.playback.unsent` (total, most), at a scrape."""
    PLAYOUT_UNSENT.set(held[0])
    PLAYOUT_UNSENT_MAX.set(held[1])


VAPI_SETUP = Histogram(
    "callbridge_vapi_setup_seconds",
    "Vapi call setup: POST /call plus transport socket connect.",
    buckets=_SETUP,
)
VAPI_ERRORS = Counter(
    "callbridge_vapi_errors_total",
    "Vapi failures by kind (http_4xx, http_429, http_5xx, connect, socket, bad_response).",
    ["kind"],
)
TURN_LATENCY = Histogram(
    "callbridge_turn_latency_seconds",
    "Bridge view of voice-to-voice latency: end of caller speech (detected on the inbound audio) "
    "to the first assistant frame sent to Twilio. Includes Vapi's own time.",
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0),
)
CLEAR_LATENCY = Histogram(
    "callbridge_barge_in_clear_seconds",
    "From the interruption reaching the worker to `clear` leaving the gateway for Twilio.",
    buckets=_LAT,
)
FAST_BARGE_INS = Counter(
    "callbridge_fast_barge_in_total",
    "Local-detector barge-in actions: pause (caller talked over the bot) and resume (Vapi did "
    "not confirm, so the held audio played on). resume/pause is the false-trigger ratio.",
    ["action"],
)
BARGE_INS = Counter("callbridge_barge_ins_total", "Assistant audio cleared because the caller spoke.")


class Tally:
    """A counter on the per-frame path: counted here as a plain int, added to the Prometheus
    counter every `every` counts and at every scrape of this process. A Prometheus `inc()`
    takes a lock and costs ~1.2 µs; a frame made four or five of them in each tier."""

    __slots__ = ("__weakref__", "_calls", "_child", "_every", "_n")

    def __init__(self, child: Any, every: int = 50) -> None:
        self._child = child
        self._every = every
        self._calls = 0
        self._n = 0.0
        _TALLIES.add(self)

    def inc(self, amount: float = 1) -> None:
        self._n += amount
        self._calls += 1
        if self._calls >= self._every:
            self.flush()

    def flush(self) -> None:
        """Hand what was counted to Prometheus."""
        if self._calls:
            self._child.inc(self._n)
            self._n = 0.0
            self._calls = 0


_TALLIES: weakref.WeakSet[Tally] = weakref.WeakSet()

# The hop histograms time one audio frame in this many (each tier made two observations a frame,
# ~1.5 µs each with the stamp's parsing; 2 % of a worker): their counts are frames / HOP_SAMPLE.
HOP_SAMPLE = 8


class Sample:
    """Which frames a per-frame histogram times: one in `every`, counted across the process."""

    __slots__ = ("_every", "_n")

    def __init__(self, every: int = HOP_SAMPLE) -> None:
        self._every = every
        self._n = 0

    def due(self) -> bool:
        self._n += 1
        if self._n < self._every:
            return False
        self._n = 0
        return True


def flush_tallies() -> None:
    """Every tally of this process, now: at a scrape, and as the process ends (with several
    processes their counts outlive them)."""
    for t in list(_TALLIES):
        t.flush()


def exposition() -> tuple[bytes, str]:
    """The /metrics body. Under several server processes (PROMETHEUS_MULTIPROC_DIR set, as
    prometheus-client requires), the values of all of them are aggregated; another process's
    per-frame tallies are then up to 50 counts behind."""
    flush_tallies()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def process_exit(pid: int) -> None:
    """Drop a finished process's live gauges from the multiprocess files."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
