"""A throwaway Redis Cluster on loopback: N primaries with a replica each, for tests and the bench.

Built exactly as an operator would (`redis-server --cluster-enabled yes` per node, then
`redis-cli --cluster create … --cluster-replicas 1`), so what the tests prove holds for a cluster
made by hand. Nothing is persisted; `kill()` SIGKILLs a node to exercise a replica's promotion.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import redis


def _binaries() -> tuple[str, str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not server or not cli:
        raise RuntimeError("a Redis Cluster needs redis-server and redis-cli on PATH "
                           "(Debian: apt-get install redis-server)")
    return server, cli


def cluster_available() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    try:
        _binaries()
    except RuntimeError as exc:
        return str(exc)
    return None


@dataclass
class Node:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Cluster:
    nodes: list[Node]
    tmpdir: tempfile.TemporaryDirectory[str]
    node_timeout_ms: int
    killed: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        """REDIS_URL for callbridge: any one node (the first live one)."""
        node = next(n for n in self.nodes if n.alive())
        return f"redis://127.0.0.1:{node.port}/0"

    def client(self, port: int) -> redis.Redis:
        """A new client of one node (bounded: 2 s per reply); close it (`with`) when done."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1)

    def slot_owner(self, slot: int) -> Node:
        """The node a live node's view of the cluster says serves `slot` as primary."""
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                with self.client(node.port) as c:
                    slots = c.execute_command("CLUSTER SLOTS")
            except redis.RedisError:
                continue
            for start, end, primary, *_ in slots:
                if int(start) <= slot <= int(end):
                    port = int(primary[1])
                    return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no live node knows who serves slot {slot}")

    def key_slot(self, key: str) -> int:
        node = next(n for n in self.nodes if n.alive())
        with self.client(node.port) as c:
            return int(c.execute_command("CLUSTER KEYSLOT", key))

    def kill(self, node: Node) -> float:
        """SIGKILL a node; returns the monotonic time of the kill."""
        node.proc.kill()
        node.proc.wait(5)
        self.killed.append(node)
        return time.monotonic()

    def wait_promoted(self, slot: int, dead: Node, timeout: float = 15.0) -> float:
        """Block until a live node serves `slot` as primary and the cluster says ok; returns the
        monotonic time that was first seen (polled every 20 ms)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                owner = self.slot_owner(slot)
                if owner is not dead and owner.alive():
                    with self.client(owner.port) as c:
                        if _cluster_ok(c):
                            return time.monotonic()
            except (RuntimeError, redis.RedisError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"slot {slot} was not taken over within {timeout} s")

    def stop(self) -> None:
        """SIGTERM every node, SIGKILL after 5 s; never raises, so every node gets its turn."""
        for node in self.nodes:
            if node.alive():
                node.proc.terminate()
        for node in self.nodes:
            try:
                node.proc.wait(5)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(5)
        with contextlib.suppress(OSError):
            self.tmpdir.cleanup()


def _port_pair_free(port: int) -> bool:
    for p in (port, port + 10000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, which Redis fixes) is free too; Redis
    refuses ports above 55535 for that reason, so the ephemeral range is out."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 45000)
        if _port_pair_free(port):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _node_args(server: str, port: int, workdir: str, node_timeout_ms: int) -> list[str]:
    return [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
            "--cluster-config-file", f"nodes-{port}.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            # Only the dead primary's slots stop while its replica takes over (the default, yes,
            # refuses every slot meanwhile): see README, "Redis Cluster".
            "--cluster-require-full-coverage", "no",
            "--save", "", "--appendonly", "no", "--dir", workdir, "--loglevel", "warning"]


def _wait_ping(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=0.5)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server on {port} exited with {proc.returncode}")
        try:
            if client.ping():
                return
        except redis.RedisError:
            time.sleep(0.02)
    raise RuntimeError(f"redis-server on {port} did not start in time")


def start_cluster(primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                  timeout: float = 30.0) -> Cluster:
    """Start primaries*(1+replicas) nodes and join them; returns once every slot is served and
    every node reports `cluster_state:ok`."""
    server, cli = _binaries()
    tmp = tempfile.TemporaryDirectory(prefix="callbridge-cluster-")
    nodes: list[Node] = []
    cluster = Cluster(nodes, tmp, node_timeout_ms)
    deadline = time.monotonic() + timeout
    try:
        for _ in range(primaries * (1 + replicas)):
            port = cluster_port()
            proc = subprocess.Popen(_node_args(server, port, tmp.name, node_timeout_ms),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            nodes.append(Node(port, proc))
        for node in nodes:
            _wait_ping(node.port, node.proc, deadline)
        subprocess.run([cli, "--cluster", "create", *[n.addr for n in nodes],
                        "--cluster-replicas", str(replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=max(1.0, deadline - time.monotonic()))
        _wait_ok(cluster, deadline)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _cluster_ok(client: redis.Redis) -> bool:
    info = client.cluster("INFO")
    return bool(isinstance(info, dict) and info.get("cluster_state") == "ok")


def _wait_ok(cluster: Cluster, deadline: float) -> None:
    """Every node agrees the cluster is ok and every replica has synced with its primary."""
    while time.monotonic() < deadline:
        ready = 0
        for node in cluster.nodes:
            try:
                with cluster.client(node.port) as c:
                    repl = c.info("replication")
                    synced = repl.get("role") == "master" or repl.get("master_link_status") == "up"
                    if _cluster_ok(c) and synced:
                        ready += 1
            except redis.RedisError:
                pass
        if ready == len(cluster.nodes):
            return
        time.sleep(0.05)
    raise RuntimeError("the cluster did not become ready in time")
