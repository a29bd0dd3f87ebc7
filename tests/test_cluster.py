"""callbridge on a real Redis Cluster: 3 primaries and 3 replicas from `redis-server` on loopback,
joined by `redis-cli --cluster create`, with real gateway and worker processes and the stand-ins.

What the caller heard and what Vapi received are checked as the single-Redis tests check them.
Killing a primary is SIGKILL; Redis then promotes its replica (cluster-node-timeout 1000 ms).
How soon audio flows again after the promotion is a `callbridge bench --redis-cluster` figure;
the bounds here only say "within a few seconds", so they hold on a busy machine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from callbridge.redis_cluster import Cluster, cluster_available, start_cluster
from shared.redisio import connect
from shared.streams import CONTROL_TAG, Keys
from sim.twilio import SimCall, TwilioObserver
from sim.vapi import VapiObserver, VapiSession, greeter
from tests.conftest import Proc
from tests.test_e2e import (
    Stack,
    assert_every_frame_delivered,
    assert_keys_expire,
    caller_utterance,
    make_stack,
    two_turns_then_hang_up,
    until,
    wait_heard,
)

pytestmark = pytest.mark.skipif(cluster_available() is not None, reason=str(cluster_available()))

CLUSTER_ENV = {"REDIS_CLUSTER": "true", "REDIS_LANES": "16"}


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[Cluster]:
    cluster = start_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def fresh_cluster() -> Iterator[Cluster]:
    """A cluster of this test's own: it will lose a node."""
    cluster = start_cluster()
    yield cluster
    cluster.stop()


async def cluster_stack(cluster: Cluster, prefix: str, procs: list[Proc],
                        **kw: Any) -> AsyncIterator[tuple[Stack, aioredis.Redis]]:
    client = connect(cluster.url, cluster=True)
    try:
        async for stack in make_stack(cluster.url, prefix, procs, client, **CLUSTER_ENV, **kw):
            yield stack, client
    finally:
        await client.aclose()


def sid_on_another_node(cluster: Cluster, keys: Keys) -> str:
    """A CallSid whose lane is served by a primary that does not hold the leases and job queue,
    so killing one of the two tests one thing."""
    control = cluster.slot_owner(cluster.key_slot(keys.workers))
    while True:
        sid = "CA" + uuid.uuid4().hex
        if cluster.slot_owner(cluster.key_slot(keys.inbound(sid))) is not control:
            return sid


class Arrivals(TwilioObserver, VapiObserver):
    """When audio arrived at each end (monotonic): the caller's at Vapi, the assistant's at the
    caller."""

    def __init__(self) -> None:
        self.up: list[float] = []
        self.down: list[float] = []

    def caller_audio_received(self, session: VapiSession, data: bytes, at: float) -> None:
        self.up.append(at)

    def assistant_media_received(self, call: SimCall, audio: bytes, at: float) -> None:
        self.down.append(at)

    @staticmethod
    def first_after(times: list[float], t: float) -> float | None:
        return next((x for x in times if x > t), None)


async def test_a_call_on_a_cluster_is_bridged_both_ways_and_leaves_nothing(
    shared_cluster: Cluster, prefix: str, procs: list[Proc]
) -> None:
    async for stack, client in cluster_stack(shared_cluster, prefix, procs):
        call = await stack.call()
        session = await stack.vapi.wait_session(10)
        keys = stack.keys
        # Every key of the call in one slot (its lane's), the leases and jobs in another.
        slots = {shared_cluster.key_slot(k) for k in keys.all_call_keys(call.call_sid)}
        assert len(slots) == 1, slots
        assert shared_cluster.key_slot(keys.workers) == shared_cluster.key_slot(keys.calls)
        assert f"{{{CONTROL_TAG}}}" in keys.workers
        assert await client.hget(keys.call(call.call_sid), "status") in (b"ringing", b"live")

        await two_turns_then_hang_up(call)
        await session.wait_closed(2)
        assert session.received_control("end-call")
        assert_every_frame_delivered(call, session, stack.fmt)
        assert stack.vapi.open_sessions() == 0
        record = await client.hgetall(keys.call(call.call_sid))
        assert record.get(b"end_reason") == b"caller-hangup"
        await assert_keys_expire(stack, call.call_sid)


async def test_calls_spread_over_the_lanes_and_every_primary(shared_cluster: Cluster) -> None:
    """The lanes' tags land in equal slices of the slots, so with three primaries each serves a
    third of the lanes (give or take one), and CallSids spread evenly over the lanes."""
    keys = Keys("cb:", 16)
    owners = [shared_cluster.slot_owner(shared_cluster.key_slot(keys.wake("p", lane))).port
              for lane in range(16)]
    per_node = sorted(owners.count(port) for port in set(owners))
    assert len(per_node) == 3 and per_node[-1] - per_node[0] <= 1, per_node
    counts = [0] * 16
    for _ in range(16_000):
        counts[keys.lane("CA" + uuid.uuid4().hex)] += 1
    assert min(counts) > 800 and max(counts) < 1200, counts


async def test_mismatched_lane_counts_are_refused(shared_cluster: Cluster, prefix: str) -> None:
    """Two lane counts would name a call's keys differently in the two tiers: the second process
    to start with another count refuses to, naming the setting."""
    from shared.redisio import check_layout
    from shared.settings import ConfigError

    client = connect(shared_cluster.url, cluster=True)
    try:
        await check_layout(client, Keys(prefix, 16))
        await check_layout(client, Keys(prefix, 16))  # the same count: fine
        with pytest.raises(ConfigError, match="REDIS_LANES"):
            await check_layout(client, Keys(prefix, 32))
    finally:
        await client.aclose()


async def test_a_cluster_node_without_cluster_mode_and_a_plain_redis_with_it_are_refused(
    shared_cluster: Cluster, redis_url: str
) -> None:
    """REDIS_CLUSTER must match what REDIS_URL names: either mismatch would fail every call
    later (MOVED answers, or no cluster to find), so it stops the process at start, naming it."""
    from shared.redisio import check_layout, warm
    from shared.settings import ConfigError

    plain_client_on_a_node = aioredis.Redis.from_url(shared_cluster.url)
    try:
        with pytest.raises(ConfigError, match="REDIS_CLUSTER: false"):
            await check_layout(plain_client_on_a_node, Keys("cb:"))
    finally:
        await plain_client_on_a_node.aclose()
    cluster_client_on_plain = connect(redis_url, cluster=True)
    try:
        with pytest.raises(ConfigError, match="REDIS_CLUSTER: true"):
            await warm(cluster_client_on_plain)
    finally:
        await cluster_client_on_plain.aclose()


async def _answer_playing(stack: Stack, call: SimCall) -> None:
    await wait_heard(call, 1)
    call.say_pcm(caller_utterance(0))

    def answering() -> bool:
        segs = call.heard_segments()
        return len(segs) >= 2 and call.now() - segs[1][0] > 0.5

    await until(answering, 10, "the answer playing")


async def test_the_primary_of_a_live_calls_slot_killed_the_call_goes_on(
    fresh_cluster: Cluster, prefix: str, procs: list[Proc]
) -> None:
    arrivals = Arrivals()
    async for stack, _client in cluster_stack(fresh_cluster, prefix, procs, workers=2,
                                              assistant=greeter(answers=3, answer_s=8.0)):
        stack.vapi.observer = arrivals
        stack.twilio.observer = arrivals
        sid = sid_on_another_node(fresh_cluster, stack.keys)
        call = await stack.twilio.place_call(call_sid=sid)
        session = await stack.vapi.wait_session(10)
        await _answer_playing(stack, call)
        owner = await stack.owner(sid)
        slot = fresh_cluster.key_slot(stack.keys.inbound(sid))
        victim = fresh_cluster.slot_owner(slot)
        killed = fresh_cluster.kill(victim)
        promoted = await asyncio.to_thread(fresh_cluster.wait_promoted, slot, victim)
        up = await _first_after(arrivals.up, promoted)
        down = await _first_after(arrivals.down, promoted)
        print(f"promotion {promoted - killed:.2f} s after the kill; audio again after the "
              f"promotion: to Vapi {up - promoted:+.3f} s, to the caller {down - promoted:+.3f} s")
        assert up - promoted < 5 and down - promoted < 5
        # The call goes on, on the same worker and Vapi session: nothing was taken over.
        await wait_heard(call, 2, timeout=15)
        call.say_pcm(caller_utterance(1))
        await until(lambda s=session: len(s.caller_turns) >= 2, 15, "the next caller turn at Vapi")
        assert await stack.owner(sid) is owner
        assert len(stack.vapi.sessions) == 1
        await call.hangup()
        await session.wait_closed(5)
        assert stack.vapi.open_sessions() == 0
        assert not call.protocol_errors


async def test_the_node_holding_leases_and_jobs_killed_no_call_moves_and_new_calls_are_served(
    fresh_cluster: Cluster, prefix: str, procs: list[Proc]
) -> None:
    """Every lease lapses while that node is away (the promotion takes longer than a lease):
    no worker may take a live call from another for that, and a call that rings meanwhile is
    answered once the replica serves."""
    async for stack, client in cluster_stack(fresh_cluster, prefix, procs, workers=2):
        sid = sid_on_another_node(fresh_cluster, stack.keys)
        call = await stack.twilio.place_call(call_sid=sid)
        session = await stack.vapi.wait_session(10)
        await wait_heard(call, 1)
        owner = await stack.owner(sid)
        epoch = await client.hget(stack.keys.call(sid), "epoch")
        slot = fresh_cluster.key_slot(stack.keys.workers)
        victim = fresh_cluster.slot_owner(slot)
        fresh_cluster.kill(victim)
        second_call = asyncio.create_task(stack.twilio.place_call())  # rings during the failover
        await asyncio.to_thread(fresh_cluster.wait_promoted, slot, victim)
        call.say_pcm(caller_utterance(0))
        await wait_heard(call, 2, timeout=15)
        # Let every survivor scan a few times with a steady lease before judging.
        await asyncio.sleep(3 * 1.5)
        assert await stack.owner(sid) is owner
        assert await client.hget(stack.keys.call(sid), "epoch") == epoch
        second = await second_call
        await wait_heard(second, 1, timeout=15)
        assert len(stack.vapi.sessions) == 2
        await call.hangup()
        await second.hangup()
        await session.wait_closed(5)
        await until(lambda v=stack.vapi: v.open_sessions() == 0, 10, "every Vapi session closed")


async def _first_after(times: list[float], t: float, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while (x := Arrivals.first_after(times, t)) is None:
        assert time.monotonic() < deadline, "no audio after the promotion"
        await asyncio.sleep(0.02)
    return x
