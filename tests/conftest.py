"""Shared fixtures: a real Redis, isolated key prefixes, and real gateway/worker processes.

Redis: `REDIS_URL` if set (tests then isolate themselves by key prefix), else a testcontainers
Redis when a Docker engine answers, else a private `redis-server` on a free port.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from twilio.request_validator import RequestValidator

from callbridge.procs import ManagedProcess
from callbridge.redis_server import free_port, start_redis
from callbridge.stack_env import stand_in_env

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "test-auth-token-" + "x" * 16
VAPI_KEY = "test-vapi-key"
ASSISTANT_ID = "asst-test-0001"
ROOT = Path(__file__).resolve().parent.parent


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    if _docker_answers():
        from testcontainers.redis import RedisContainer  # type: ignore[import-untyped]

        with RedisContainer("redis:7-alpine") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    server = start_redis()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own: tests never collide, even on a shared Redis."""
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def sign(url: str, params: dict[str, str] | None = None, token: str = AUTH_TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(url, params or {}))


def call_sid() -> str:
    return "CA" + uuid.uuid4().hex


def base_env(redis_url: str, prefix: str, **extra: Any) -> dict[str, str]:
    return stand_in_env(redis_url, prefix, account_sid=ACCOUNT_SID, auth_token=AUTH_TOKEN,
                        vapi_key=VAPI_KEY, assistant_id=ASSISTANT_ID, **extra)


class Proc(ManagedProcess):
    """A real `callbridge` process started from the repo root (tests/ need not be installed)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str],
                 health_url: str | None = None, program: list[str] | None = None) -> None:
        super().__init__(name, args, env, health_url=health_url, cwd=ROOT)
        if program is not None:
            self.program = program


def gateway_proc(env: dict[str, str], port: int) -> Proc:
    return Proc("gateway", ["gateway", "--host", "127.0.0.1", "--port", str(port)], env,
                health_url=f"http://127.0.0.1:{port}/readyz")


def worker_proc(env: dict[str, str], http_port: int | None = None) -> Proc:
    http_port = http_port or free_port()
    return Proc("worker", ["worker", "--http-port", str(http_port)], env,
                health_url=f"http://127.0.0.1:{http_port}/readyz")


@pytest.fixture
def procs(request: pytest.FixtureRequest) -> Iterator[list[Proc]]:
    """Processes started by a test; stopped after it, logs printed when it failed."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for p in started:
            print(f"----- {p.name} log -----\n{p.logs()[-6000:]}")


# Every test module belongs to one tier, so a developer can run the fast one alone
# (`pytest -m unit`, about a minute). unit: in-process, real Redis and loopback sockets;
# e2e: real `callbridge` processes, signals and the stand-ins; ops: the deployment files and
# the tools that check them (compose schema, promtool, a real Prometheus).
TIERS = {
    "unit": {"test_audio", "test_call_core", "test_feed", "test_fence", "test_gateway", "test_ownership",
             "test_cancel", "test_doorbell", "test_playback", "test_readme", "test_redisio", "test_resume",
             "test_security", "test_sender", "test_session", "test_sim_twilio", "test_sim_vapi",
             "test_socket_state", "test_standalone", "test_twilio_proto", "test_vad", "test_vapi_proto",
             "test_twilio_socket", "test_vapi_socket"},
    "e2e": {"test_api", "test_bench", "test_call_control", "test_cli", "test_cluster", "test_console",
            "test_console_browser", "test_conversation", "test_demo", "test_e2e", "test_failover",
            "test_lifecycle", "test_multiprocess", "test_redis_outage"},
    "ops": {"test_ops"},
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        tier = next((t for t, modules in TIERS.items() if module in modules), None)
        if tier is None:
            raise pytest.UsageError(f"{module} is in no test tier: add it to TIERS in tests/conftest.py")
        item.add_marker(tier)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
