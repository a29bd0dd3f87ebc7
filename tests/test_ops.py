"""Run it like production: ops/Dockerfile, compose.yaml, ops/prometheus.yml + ops/alerts.yml and the
Grafana dashboard, checked against the Compose schema, promtool, the metrics the code exports, a
real Prometheus scraping real processes, and the gateway/worker started exactly as compose would;
compose.cluster.yaml likewise, with its Redis Cluster nodes and init service run as local processes.

Needs the Debian `prometheus` package (promtool + prometheus) for the Prometheus tests; they skip,
saying so, only when those binaries are absent.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import jsonschema
import pytest
import redis.asyncio as aioredis
import yaml
from redis import Redis as SyncRedis
from redis import RedisError

from callbridge.redis_cluster import cluster_available, cluster_port
from callbridge.redis_server import free_port
from shared.redisio import connect
from shared.streams import Keys
from sim import voices
from sim.twilio import SimCall, TwilioSim
from sim.vapi import VapiSim, greeter
from tests.conftest import (
    ACCOUNT_SID,
    ASSISTANT_ID,
    AUTH_TOKEN,
    ROOT,
    VAPI_KEY,
    Proc,
    base_env,
    gateway_proc,
    worker_proc,
)

OPS = ROOT / "ops"
DOCKERFILE = OPS / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
COMPOSE_CLUSTER = ROOT / "compose.cluster.yaml"  # opt-in override: the stack on a Redis Cluster
CLUSTER_INIT = "redis-cluster-init"  # its one-shot service that joins the nodes
PROM_CONFIG = OPS / "prometheus.yml"
ALERTS = OPS / "alerts.yml"
DASHBOARD = OPS / "grafana" / "dashboards" / "callbridge.json"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"  # provenance: tests/data/README.md
PROJECT_SERVICES = ("gateway", "worker")  # built from ops/Dockerfile, run by default
METRIC_RE = re.compile(r"\bcallbridge_[a-z0-9_]+")

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package `prometheus`: apt-get install prometheus)")
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="prometheus binary not installed (Debian package `prometheus`: apt-get install prometheus)")


# Helpers: files ---------------------------------------------------------------------------------

def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)  # SafeLoader resolves anchors and `<<` merge keys, as compose does


@dataclass
class Instruction:
    keyword: str
    args: str


def dockerfile_stages(path: Path = DOCKERFILE) -> list[list[Instruction]]:
    """The Dockerfile's instructions grouped by stage (line continuations joined, comments dropped)."""
    logical: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[list[Instruction]] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        ins = Instruction(keyword.upper(), args.strip())
        if ins.keyword == "FROM":
            stages.append([])
        elif not stages:
            continue  # ARG before the first FROM
        stages[-1].append(ins)
    return stages


def stage_env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for item in shlex.split(ins.args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def dockerignore_excludes(name: str, patterns: list[str]) -> bool:
    """Docker's rule for a top-level path: the last matching pattern wins; `!` re-includes."""
    excluded = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        target = name.rsplit("/", 1)[-1] if pat.startswith("**/") else name
        if fnmatch.fnmatchcase(target, pat.removeprefix("**/")):
            excluded = not negate
    return excluded


_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose variable interpolation: $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["bare"]
        op, arg = m["op"], m["arg"] or ""
        present = name in env
        if op == ":-":
            return env[name] if env.get(name) else arg
        if op == "-":
            return env[name] if present else arg
        if op in (":?", "?") and (not present or (op == ":?" and not env[name])):
            raise ValueError(f"required variable {name} is missing: {arg}")
        return env.get(name, "")

    return _VAR.sub(sub, value)


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", "healthcheck must be exec form: [CMD, ...]"
    return list(test[1:])


def healthcheck_url(service: dict[str, Any]) -> str:
    found = re.findall(r"http://[^'\"\s]+", " ".join(healthcheck_argv(service)))
    assert len(found) == 1, f"expected one URL in the healthcheck, found {found}"
    return str(found[0])


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in panels(dash["panels"]) for t in p.get("targets", []) if t.get("expr")]


def exported_metric_names() -> set[str]:
    """Every series name the code can export, as Prometheus sees it after scraping."""
    from prometheus_client import REGISTRY

    import shared.metrics  # noqa: F401 - registers the metrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "summary": ["", "_sum", "_count"], "gauge": [""], "info": ["_info"]}
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("callbridge_"):
            names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


# Helpers: compose.cluster.yaml -------------------------------------------------------------------

# When a later `-f` file sets one of these, compose replaces the earlier sequence whole. Others
# (ports, volumes, …) it merges element by element; compose.cluster.yaml sets none of those over
# compose.yaml, so compose_merge refuses them rather than guess.
REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def compose_merge(base: Any, override: Any, path: str = "") -> Any:
    """`override` laid over `base` as `docker compose -f base -f override` merges them: mappings
    key by key at every level (services, environment, depends_on, healthcheck…), `command` and
    the like replaced, scalars replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            merged[key] = (compose_merge(base[key], value, f"{path}.{key}") if key in base
                           else copy.deepcopy(value))
        return merged
    where = path.lstrip(".")
    if isinstance(base, dict | list) or isinstance(override, dict | list):
        if type(base) is not type(override):
            raise NotImplementedError(f"{where}: long and short syntax mixed (compose normalizes first)")
        if path.rsplit(".", 1)[-1] not in REPLACED_SEQUENCES:
            raise NotImplementedError(f"{where}: compose merges this sequence element by element")
    return copy.deepcopy(override)


def cluster_compose(env: dict[str, str]) -> dict[str, Any]:
    """The services of `-f compose.yaml -f compose.cluster.yaml`, interpolated with `env`."""
    merged = compose_merge(load_yaml(COMPOSE), load_yaml(COMPOSE_CLUSTER))
    return dict(interpolate(merged, env)["services"])


def option(argv: list[str], name: str) -> str | None:
    """The value after `name` in an argv (`--port 6379`), or None."""
    return argv[argv.index(name) + 1] if name in argv else None


def cluster_nodes(services: dict[str, Any]) -> list[str]:
    """The services that run a Redis Cluster node, in file order."""
    return [name for name, svc in services.items()
            if isinstance(svc.get("command"), list) and option(svc["command"], "--cluster-enabled") == "yes"]


def cluster_create_args(script: str) -> list[str]:
    """What the init script passes to `redis-cli --cluster create`."""
    (line,) = [ln for ln in script.splitlines() if "--cluster create" in ln]
    words = shlex.split(line.split("||")[0])
    return words[words.index("create") + 1:]


def on_loopback(script: str, ports: dict[str, int]) -> str:
    """The init script with each node's compose address (`redis-2:6379`) replaced by the local
    one its stand-in listens on (`127.0.0.1:<port>`), and nothing else changed."""
    names = "|".join(re.escape(name) for name in sorted(ports, key=len, reverse=True))
    local = re.sub(rf"\b({names}):6379\b", lambda m: f"127.0.0.1:{ports[m[1]]}", script)
    assert ":6379" not in local, f"a node address was not mapped:\n{local}"
    return local


@contextlib.contextmanager
def loopback_nodes(services: dict[str, Any], nodes: list[str], tmp_path: Path) -> Iterator[dict[str, int]]:
    """Each node service's command as a local `redis-server`, with only what one host needs
    appended: a port of its own (six nodes cannot all have 6379), loopback, and a directory for
    its nodes.conf. Yields {service: port} once every node answers PING; stops them all after."""
    ports: dict[str, int] = {}
    taken: set[int] = set()
    running: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for name in nodes:
            port = cluster_port()
            while {port, port + 10000} & taken:  # Redis fixes each node's bus port at port + 10000
                port = cluster_port()
            taken |= {port, port + 10000}
            ports[name] = port
            workdir = tmp_path / name
            workdir.mkdir()
            argv = [*services[name]["command"],
                    "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
            with (workdir / "redis.log").open("wb") as log:
                running.append((name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)))
        deadline = time.monotonic() + 10
        for name, proc in running:
            with SyncRedis(host="127.0.0.1", port=ports[name], socket_timeout=1,
                           socket_connect_timeout=0.5) as client:
                while True:
                    log_tail = (tmp_path / name / "redis.log").read_text()[-2000:]
                    assert proc.poll() is None, f"{name} exited:\n{log_tail}"
                    with contextlib.suppress(RedisError):
                        if client.ping():
                            break
                    assert time.monotonic() < deadline, f"{name} did not answer PING:\n{log_tail}"
                    time.sleep(0.02)
        yield ports
    finally:
        for _, proc in running:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in running:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def redis_cli(port: int, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=5)
    return out.stdout


def cluster_state(port: int) -> str | None:
    found = re.search(r"^cluster_state:(\w+)", redis_cli(port, "cluster", "info"), re.M)
    return found[1] if found else None


def cluster_table(port: int) -> list[tuple[str, str, str]]:
    """One node's CLUSTER NODES: (node id, role, id of its primary or -) for every node."""
    rows = [line.split() for line in redis_cli(port, "cluster", "nodes").splitlines() if line.strip()]
    return sorted((r[0], "replica" if "slave" in r[2].split(",") else "primary", r[3]) for r in rows)


def wait_cluster_formed(ports: dict[str, int], timeout: float = 15.0) -> list[tuple[str, str, str]]:
    """Until every node says cluster_state:ok and node 1 sees 3 primaries serving slots and 3
    connected replicas, one per primary; returns node 1's table."""
    first = next(iter(ports.values()))
    deadline = time.monotonic() + timeout
    while True:
        rows = [line.split() for line in redis_cli(first, "cluster", "nodes").splitlines() if line.strip()]
        healthy = [r for r in rows if r[7] == "connected" and not {"fail", "fail?"} & set(r[2].split(","))]
        primaries = {r[0] for r in healthy if "master" in r[2].split(",") and r[8:]}
        replicas = [r[3] for r in healthy if "slave" in r[2].split(",")]
        if (len(rows) == 6 and len(primaries) == 3 and sorted(replicas) == sorted(primaries)
                and all(cluster_state(p) == "ok" for p in ports.values())):
            return cluster_table(first)
        assert time.monotonic() < deadline, f"no 3 + 3 cluster after {timeout} s:\n{rows}"
        time.sleep(0.05)


# Helpers: async --------------------------------------------------------------------------------

async def until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def heard_greeting(call: SimCall, timeout: float = 10.0) -> None:
    """Until the caller has heard the assistant's first utterance in full, and it is the greeting."""
    def done() -> bool:
        segs = call.heard_segments()
        return bool(segs) and call.now() - segs[0][1] > 0.3
    await until(done, timeout, "the greeting")
    start, end = call.heard_segments()[0]
    pcm = call.heard_pcm16()
    assert voices.identify(pcm[int(start * 8000) * 2: int(end * 8000) * 2], 8000) == "greeting"


async def one_call(twilio: TwilioSim, vapi: VapiSim, redis: aioredis.Redis, keys: Keys) -> SimCall:
    """Place a call, hear the greeting, hang up; assert it connected and ended cleanly."""
    call = await twilio.place_call()
    session = await vapi.wait_session(10)
    await session.wait_connected(5)
    await heard_greeting(call)
    await call.hangup()
    assert await call.wait_ended(5) == "caller-hangup"
    await session.wait_closed(5)
    assert session.received_control("end-call"), "Vapi was told the caller hung up"
    assert not call.protocol_errors
    assert vapi.open_sessions() == 0
    deadline = time.monotonic() + 5
    while (await redis.hget(keys.call(call.call_sid), "end_reason")) != b"caller-hangup":
        assert time.monotonic() < deadline, "the worker did not record the call as ended by the caller"
        await asyncio.sleep(0.05)
    return call


@contextlib.asynccontextmanager
async def sims() -> AsyncIterator[tuple[VapiSim, int]]:
    """The Vapi stand-in, and the port the gateway is to listen on (Twilio's sim needs its URL)."""
    vapi = VapiSim(api_key=VAPI_KEY, assistant=greeter(answers=1))
    await vapi.start()
    try:
        yield vapi, free_port()
    finally:
        await vapi.stop()


@contextlib.asynccontextmanager
async def twilio_sim(gateway_port: int) -> AsyncIterator[TwilioSim]:
    public = f"http://127.0.0.1:{gateway_port}"
    twilio = TwilioSim(gateway_url=public, public_url=public, account_sid=ACCOUNT_SID,
                       auth_token=AUTH_TOKEN)
    await twilio.start()
    try:
        yield twilio
    finally:
        await twilio.stop()


# 1. The image ---------------------------------------------------------------------------------

def _image_python(from_args: str) -> tuple[int, int] | None:
    """(major, minor) of an official python:X.Y… base image, else None."""
    image = next(a for a in from_args.split() if not a.startswith("--"))
    m = re.fullmatch(r"(?:docker\.io/)?(?:library/)?python:(\d+)\.(\d+)\b.*", image)
    return (int(m[1]), int(m[2])) if m else None


def test_image_runs_our_cli_as_non_root_on_python_313_from_prebuilt_wheels() -> None:
    """What the image must do, read from its Dockerfile: run on Python >= 3.13 (where the
    `audioop-lts` wheel replaces the removed stdlib module), install the app offline from what an
    earlier stage built (no compiler or index at runtime), run as a non-root user, start
    `callbridge gateway` by default, and verify at build time that both tiers import."""
    stages = dockerfile_stages()
    assert len(stages) >= 2, "the app is built in one stage and installed in another"
    froms = [s_[0].args for s_ in stages]
    builder_name = froms[0].split()[-1]
    final_from = froms[-1]
    version = _image_python(final_from)
    assert version is not None and version >= (3, 13), final_from
    assert builder_name not in final_from.split(), "the runtime stage is not built on the builder"
    final = stages[-1]

    installs = [i.args for i in final if i.keyword == "RUN" and "pip install" in i.args]
    assert len(installs) == 1, "one install step in the runtime stage"
    install = installs[0]
    assert re.search(rf"from={re.escape(builder_name)}\b", install), "installs what the builder built"
    assert "--no-index" in install.split(), "no package index at runtime: the builder's wheels only"

    # The build-time self-check the install step runs (everything after the pip install) passes
    # here too: each `python -c` and `callbridge` command in it, run in this environment.
    checks = [c.strip() for c in install.split("&&")[1:]]
    assert checks, "the install step verifies the image can load both tiers"
    for check in checks:
        argv = shlex.split(check.split(">")[0])
        argv = [sys.executable if a == "python" else a for a in argv]
        if argv[0] == "callbridge":
            argv = [sys.executable, "-m", "callbridge.cli", *argv[1:]]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 0, f"{check}: {out.stderr}"

    user = only(final, "USER").args.split(":")[0]
    assert user not in ("", "root", "0"), "the final stage runs as a non-root user"

    health = only(final, "HEALTHCHECK").args
    cmd = json.loads(health[health.index("CMD") + 3:].strip())
    assert cmd[0] == "python", "the healthcheck needs nothing the image lacks (no curl)"
    compile(cmd[2], "<HEALTHCHECK>", "exec")  # run against live processes in
    #   test_compose_services_run_as_declared

    from callbridge.cli import build_parser

    entry = json.loads(only(final, "ENTRYPOINT").args)
    default = json.loads(only(final, "CMD").args)
    assert entry == ["callbridge"]
    assert build_parser().parse_args(default).command == "gateway"


def test_dockerignore_sends_only_what_the_build_needs() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    packages = load_yaml_toml_packages()
    for needed in ["pyproject.toml", "README.md", *packages]:
        assert not dockerignore_excludes(needed, patterns), f"{needed} is needed to build the image"
    for junk in (".git", ".env", ".venv", "venv", "tests", "ops", "compose.yaml",
                 "gateway/__pycache__", "callbridge.egg-info", "call.wav"):
        assert dockerignore_excludes(junk, patterns), f"{junk} must stay out of the build context"


def load_yaml_toml_packages() -> list[str]:
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [p.rstrip("*") for p in cfg["tool"]["setuptools"]["packages"]["find"]["include"]]


# 2. compose.yaml -------------------------------------------------------------------------------

def test_compose_matches_schema_and_scales() -> None:
    assert COMPOSE_SCHEMA.exists(), f"Compose schema not found at {COMPOSE_SCHEMA}"
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    raw = load_yaml(COMPOSE)
    validator = jsonschema.Draft7Validator(schema)  # the schema's $schema: draft-07
    validator.validate(raw)
    validator.validate(interpolate(raw, {}))  # and as compose sees it with nothing set

    services = raw["services"]
    assert {"redis", "gateway", "worker", "prometheus", "grafana"} <= set(services)
    worker, gateway, redis = services["worker"], services["gateway"], services["redis"]
    assert "container_name" not in worker and "ports" not in worker, "`--scale worker=N` must work"
    assert worker["command"] == ["worker"]
    for name in PROJECT_SERVICES:
        svc = services[name]
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        for secret in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "VAPI_API_KEY", "VAPI_ASSISTANT_ID"):
            assert svc["environment"][secret] == f"${{{secret}}}", f"{name}: {secret} from the environment"
    assert gateway["environment"]["PUBLIC_URL"] == "${PUBLIC_URL}"
    assert "8080:8080" in gateway["ports"]

    assert redis["image"].startswith("redis:7")
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    args = redis["command"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction", "streams must not be evicted"

    # The demo profile runs the stand-ins, and only when asked for.
    demo = [s for s in services.values() if "demo" in s.get("profiles", [])]
    assert demo and demo[0]["command"][0] == "demo"
    for name in ("redis", "gateway", "worker", "prometheus", "grafana"):
        assert "profiles" not in services[name]

    # Every service run from our image has a command the `callbridge` CLI accepts.
    from callbridge.cli import build_parser

    for svc in services.values():
        if svc.get("build", {}).get("dockerfile") == "ops/Dockerfile":
            build_parser().parse_args(svc["command"])

    # Everything mounted from the repo exists.
    for svc in services.values():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{source} is mounted but missing"


def test_ports_agree_across_compose_prometheus_and_healthchecks() -> None:
    services = load_yaml(COMPOSE)["services"]
    prom = load_yaml(PROM_CONFIG)
    listen = {"gateway": services["gateway"]["environment"]["PORT"],
              "worker": services["worker"]["environment"]["WORKER_HTTP_PORT"]}
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    for name, port in listen.items():
        assert urlsplit(healthcheck_url(services[name])).port == int(port), f"{name} healthcheck port"
        job = jobs[name]
        assert "static_configs" not in job, "replicas are discovered, not listed"
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [name] and sd["type"] == "A" and sd["port"] == int(port)
    assert services["gateway"]["ports"] == [f"{listen['gateway']}:{listen['gateway']}"]
    rule_file = OPS / prom["rule_files"][0]
    assert rule_file == ALERTS
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"] if v.startswith("./")}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= mounted


def test_compose_cluster_override_matches_schema_and_waits_for_the_cluster() -> None:
    """compose.cluster.yaml is a valid Compose file, and merged over compose.yaml (as
    `docker compose -f compose.yaml -f compose.cluster.yaml` merges) it runs six cluster nodes
    configured like compose.yaml's Redis, one init service that joins them, and both tiers in
    cluster mode, started only after the init service succeeded."""
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    override = load_yaml(COMPOSE_CLUSTER)
    merged = compose_merge(load_yaml(COMPOSE), override)
    for doc in (override, interpolate(override, {}), merged, interpolate(merged, {})):
        validator.validate(doc)
    base = interpolate(load_yaml(COMPOSE), {})["services"]
    services = cluster_compose({})
    assert not cluster_nodes(base), "compose.yaml alone stays on one Redis"

    nodes = cluster_nodes(services)
    assert len(nodes) == 6 and nodes[0] == "redis", nodes
    node_command = services["redis"]["command"]
    for name in nodes:
        node = services[name]
        assert node["image"] == base["redis"]["image"], name
        assert node["command"] == node_command, f"{name}: every node runs the same command"
        for opt in ("--maxmemory", "--maxmemory-policy", "--save", "--appendonly"):
            assert option(node["command"], opt) == option(base["redis"]["command"], opt), \
                f"{name}: {opt} as compose.yaml's redis has it"
        assert "redis-cli ping" in " ".join(node["healthcheck"]["test"]), name
        assert "ports" not in node, f"{name}: outside the compose network the cluster is unusable"
    assert option(node_command, "--cluster-config-file") == "nodes.conf"
    assert option(node_command, "--cluster-node-timeout") == "1000", "the README's failover figures"
    assert option(node_command, "--cluster-require-full-coverage") == "no", "one node's loss " \
        "must not stop the calls on the others"

    init = services[CLUSTER_INIT]
    assert init["image"] == base["redis"]["image"] and init["restart"] == "no"
    assert init["depends_on"] == {name: {"condition": "service_healthy"} for name in nodes}
    assert init["command"][:2] == ["sh", "-c"] and len(init["command"]) == 3
    assert cluster_create_args(init["command"][2]) == [
        *(f"{name}:6379" for name in nodes), "--cluster-replicas", "1", "--cluster-yes"]

    for name in PROJECT_SERVICES:
        svc, env = services[name], services[name]["environment"]
        assert svc["depends_on"][CLUSTER_INIT] == {"condition": "service_completed_successfully"}
        assert svc["depends_on"]["redis"] == {"condition": "service_healthy"}, "kept from compose.yaml"
        assert env["REDIS_CLUSTER"] == "true", name
        assert urlsplit(env["REDIS_URL"]).hostname in nodes, name
        assert {k: env[k] for k in base[name]["environment"]} == base[name]["environment"], \
            f"{name}: the rest of its environment is compose.yaml's"
        assert svc["command"] == base[name]["command"]
    lanes = {services[name]["environment"]["REDIS_LANES"] for name in PROJECT_SERVICES}
    assert len(lanes) == 1, "every process must use the same REDIS_LANES"

    # Whatever else runs from our image either waits for the cluster in cluster mode, or uses a
    # plain Redis that is no cluster node (a cluster node would answer it with MOVED).
    for name, svc in services.items():
        if svc.get("build", {}).get("dockerfile") != "ops/Dockerfile" or name in PROJECT_SERVICES:
            continue
        host = urlsplit(svc["environment"]["REDIS_URL"]).hostname
        assert host not in nodes and "REDIS_CLUSTER" not in svc["environment"], name
        assert svc["depends_on"][host] == {"condition": "service_healthy"}, name
        assert set(services[host].get("profiles", [])) <= set(svc.get("profiles", [])), \
            f"{host} starts only with {name}"


# 3. Prometheus config and alerts -------------------------------------------------------------

@needs_promtool
def test_promtool_accepts_config_and_rules() -> None:
    for args in (["check", "config", str(PROM_CONFIG)], ["check", "rules", str(ALERTS)]):
        out = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_have_for_severity_and_what_to_do() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    for wanted in ("CallbridgeNoWorkersUp", "CallbridgeVapiSetupSlow", "CallbridgeMessagesDropped",
                   "CallbridgeCallErrorRate", "CallbridgeStuckCalls", "CallbridgeRedisErrors"):
        assert wanted in names
    for rule in rules:
        assert rule.get("for"), f"{rule['alert']}: no `for:`"
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"].strip() and rule["annotations"]["description"].strip()
    # What to do about each alert is in the README's alert table, one row per alert.
    readme = (ROOT / "README.md").read_text()
    for name in names:
        assert re.search(rf"^\| `{name}`", readme, re.M), f"{name} is not in the README's alert table"


# Synthetic series -> which alerts must fire (promtool's rule unit tests). Annotations are prose,
# so they are left out of a copy of the rules; promtool check rules validates their templates.
RULE_TESTS = [
    {"interval": "1m",
     "input_series": [{"series": 'up{job="worker", instance="w1:9100"}', "values": "0x10"}],
     "alert_rule_test": [{"eval_time": "3m", "alertname": "CallbridgeNoWorkersUp",
                          "exp_alerts": [{"exp_labels": {"severity": "critical"}}]}]},
    {"interval": "1m",
     "input_series": [{"series": 'up{job="worker", instance="w1:9100"}', "values": "1x10"}],
     "alert_rule_test": [{"eval_time": "5m", "alertname": "CallbridgeNoWorkersUp", "exp_alerts": []}]},
    {"interval": "1m",
     "input_series": [
         {"series": 'callbridge_worker_calls_active{job="worker", instance="w1"}', "values": "2x10"},
         {"series": 'callbridge_frames_total{job="worker", instance="w1", direction="in", hop="vapi"}',
          "values": "100x10"},
         {"series": 'callbridge_worker_calls_active{job="worker", instance="w2"}', "values": "2x10"},
         {"series": 'callbridge_frames_total{job="worker", instance="w2", direction="in", hop="vapi"}',
          "values": "0+6000x10"}],
     "alert_rule_test": [{"eval_time": "8m", "alertname": "CallbridgeStuckCalls",
                          "exp_alerts": [{"exp_labels": {"severity": "warning", "instance": "w1"}}]}]},
    {"interval": "1m",
     "input_series": [
         {"series": 'callbridge_worker_calls_ended_total{job="worker", reason="vapi-error"}',
          "values": "0+1x30"},
         {"series": 'callbridge_worker_calls_ended_total{job="worker", reason="caller-hangup"}',
          "values": "0+1x30"}],
     "alert_rule_test": [{"eval_time": "25m", "alertname": "CallbridgeCallErrorRate",
                          "exp_alerts": [{"exp_labels": {"severity": "critical"}}]}]},
    {"interval": "1m",
     "input_series": [
         {"series": 'callbridge_worker_calls_ended_total{job="worker", reason="caller-hangup"}',
          "values": "0+5x30"}],
     "alert_rule_test": [{"eval_time": "25m", "alertname": "CallbridgeCallErrorRate", "exp_alerts": []}]},
    {"interval": "1m",
     "input_series": [{"series": 'callbridge_redis_errors_total{job="gateway", instance="g1", op="xadd"}',
                       "values": "0+10x10"}],
     "alert_rule_test": [{"eval_time": "5m", "alertname": "CallbridgeRedisErrors",
                          "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "gateway",
                                                         "instance": "g1"}}]}]},
    {"interval": "1m",
     "input_series": [
         {"series": 'callbridge_vapi_setup_seconds_bucket{job="worker", le="1.0"}', "values": "0x30"},
         {"series": 'callbridge_vapi_setup_seconds_bucket{job="worker", le="5.0"}', "values": "0+10x30"},
         {"series": 'callbridge_vapi_setup_seconds_bucket{job="worker", le="+Inf"}', "values": "0+10x30"}],
     "alert_rule_test": [{"eval_time": "20m", "alertname": "CallbridgeVapiSetupSlow",
                          "exp_alerts": [{"exp_labels": {"severity": "warning"}}]}]},
    {"interval": "1m",
     "input_series": [{"series": 'callbridge_messages_dropped_total{job="gateway", cause="not_json"}',
                       "values": "0+60x20"}],
     "alert_rule_test": [{"eval_time": "12m", "alertname": "CallbridgeMessagesDropped",
                          "exp_alerts": [{"exp_labels": {"severity": "warning", "job": "gateway",
                                                         "cause": "not_json"}}]}]},
    {"interval": "1m",
     "input_series": [
         {"series": 'callbridge_frames_total{job="gateway", direction="in", hop="twilio"}',
          "values": "0+3000x30"},
         {"series": 'callbridge_frames_total{job="worker", direction="in", hop="vapi"}',
          "values": "0+2000x30"}],
     "alert_rule_test": [{"eval_time": "25m", "alertname": "CallbridgeUplinkFrameLoss",
                          "exp_alerts": [{"exp_labels": {"severity": "warning"}}]}]},
]


@needs_promtool
def test_alerts_fire_on_the_situations_they_describe(tmp_path: Path) -> None:
    rules = load_yaml(ALERTS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    (tmp_path / "tests.yml").write_text(yaml.safe_dump({
        "rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": RULE_TESTS}))
    out = subprocess.run(["promtool", "test", "rules", "tests.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_and_dashboard_use_only_exported_metrics() -> None:
    exported = exported_metric_names()
    assert "callbridge_worker_calls_ended_total" in exported
    assert "callbridge_vapi_setup_seconds_bucket" in exported
    used_alerts = {m for r in alert_rules() for m in METRIC_RE.findall(r["expr"])}
    used_dash = {m for e in dashboard_exprs() for m in METRIC_RE.findall(e)}
    assert used_alerts and used_dash
    assert used_alerts <= exported, f"alerts use unknown metrics: {sorted(used_alerts - exported)}"
    assert used_dash <= exported, f"dashboard uses unknown metrics: {sorted(used_dash - exported)}"
    # The dashboard shows what an operator needs, per the runbook in the alerts.
    for family in ("callbridge_worker_calls_active", "callbridge_worker_calls_started_total",
                   "callbridge_worker_calls_ended_total", "callbridge_frames_total",
                   "callbridge_messages_dropped_total", "callbridge_hop_latency_seconds_bucket",
                   "callbridge_barge_ins_total", "callbridge_vapi_setup_seconds_bucket",
                   "callbridge_worker_claims_total", "callbridge_redis_errors_total"):
        assert family in used_dash, f"no dashboard panel for {family}"
    # Jobs the queries select are the scrape jobs.
    jobs = {j["job_name"] for j in load_yaml(PROM_CONFIG)["scrape_configs"]}
    for expr in [r["expr"] for r in alert_rules()] + dashboard_exprs():
        for job in re.findall(r'job="([^"]+)"', expr):
            assert job in jobs, f"unknown job {job!r} in {expr}"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    prov = OPS / "grafana" / "provisioning"
    (ds,) = load_yaml(prov / "datasources" / "prometheus.yml")["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    (provider,) = load_yaml(prov / "dashboards" / "dashboards.yml")["providers"]
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./ops/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./ops/grafana/provisioning"] == "/etc/grafana/provisioning"
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == ds["uid"], panel["title"]


# 4. A real Prometheus scraping a real gateway and worker ----------------------------------------

def prometheus_test_config(targets: dict[str, str], self_target: str) -> dict[str, Any]:
    """ops/prometheus.yml with DNS discovery swapped for the loopback targets and fast intervals."""
    cfg = copy.deepcopy(load_yaml(PROM_CONFIG))
    cfg["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(ALERTS)]
    for job in cfg["scrape_configs"]:
        target = targets.get(job["job_name"], self_target)
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [target]}]
    return cfg


@contextlib.contextmanager
def run_prometheus(tmp_path: Path, config: dict[str, Any], port: int) -> Iterator[tuple[str, Path]]:
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT)
        try:
            yield f"http://127.0.0.1:{port}", log
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


async def prom_query(client: httpx.AsyncClient, base: str, expr: str) -> list[dict[str, Any]]:
    r = await client.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return list(body["data"]["result"])


@needs_prometheus
async def test_prometheus_scrapes_gateway_and_worker(tmp_path: Path, redis_url: str, prefix: str,
                                                     procs: list[Proc], redis: aioredis.Redis) -> None:
    async with sims() as (vapi, gw_port):
        env = base_env(redis_url, prefix, PUBLIC_URL=f"http://127.0.0.1:{gw_port}",
                       VAPI_BASE_URL=vapi.base_url)
        async with twilio_sim(gw_port) as twilio:
            env["TWILIO_API_BASE_URL"] = twilio.rest_base_url
            wk_port = free_port()
            gw, wk = gateway_proc(env, gw_port).start(), worker_proc(env, wk_port).start()
            procs += [gw, wk]
            await gw.wait_ready()
            await wk.wait_ready()
            await one_call(twilio, vapi, redis, Keys(prefix))

    prom_port = free_port()
    cfg = prometheus_test_config({"gateway": f"127.0.0.1:{gw_port}", "worker": f"127.0.0.1:{wk_port}"},
                                 self_target=f"127.0.0.1:{prom_port}")
    with run_prometheus(tmp_path, cfg, prom_port) as (base, log):
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + 25
            while True:  # /api answers 503 until the TSDB is open
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{base}/-/ready", timeout=1)).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"Prometheus not ready:\n{log.read_text()[-3000:]}"
                await asyncio.sleep(0.1)

            async def value_of(expr: str) -> float:
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        result = await prom_query(client, base, expr)
                        if result:
                            return float(result[0]["value"][1])
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"Prometheus never had {expr}:\n{log.read_text()[-3000:]}")
                    await asyncio.sleep(0.2)

            assert await value_of('callbridge_worker_calls_started_total{job="worker"}') >= 1
            assert await value_of('sum(callbridge_worker_calls_ended_total{job="worker", '
                                  'reason="caller-hangup"})') >= 1
            assert await value_of('callbridge_frames_total{job="gateway", direction="in", '
                                  'hop="twilio"}') > 0
            assert await value_of('callbridge_frames_total{job="worker", direction="out", '
                                  'hop="vapi"}') > 0
            assert await value_of('up{job="gateway"}') == 1
            assert await value_of('up{job="worker"}') == 1

            # Every alert rule evaluates against the real series without error.
            while True:
                body = (await client.get(f"{base}/api/v1/rules", timeout=5)).json()
                rules = [r for g in body["data"]["groups"] for r in g["rules"]]
                if rules and all(r.get("lastEvaluation", "").startswith("2") and
                                 not r["lastEvaluation"].startswith("0001") for r in rules):
                    break
                assert time.monotonic() < deadline, "rules were not evaluated in time"
                await asyncio.sleep(0.2)
            assert len(rules) == len(alert_rules())
            bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
            assert not bad, bad
            firing = [r["name"] for r in rules if r.get("state") == "firing"]
            assert "CallbridgeNoWorkersUp" not in firing and "CallbridgeRedisErrors" not in firing

            # Every dashboard query is valid PromQL for this Prometheus.
            for expr in dashboard_exprs():
                await prom_query(client, base, expr.replace("$__rate_interval", "1m")
                                 .replace("$__interval", "15s").replace("$__range", "1h"))


# 5. What compose says and what runs must not drift apart ---------------------------------------

def compose_process(name: str, service: dict[str, Any], image_env: dict[str, str],
                    port_map: dict[int, int], host_map: dict[str, str]) -> tuple[Proc, str]:
    """`callbridge <command>` as a local process with the service's environment, compose host
    names and container ports mapped to local ones; also its mapped healthcheck URL."""
    env = {"PATH": os.environ.get("PATH", ""), **image_env}
    for key, value in service["environment"].items():
        value = "" if value is None else str(value)
        if value.isdigit() and int(value) in port_map:
            value = str(port_map[int(value)])
        parts = urlsplit(value)
        if parts.scheme and parts.netloc in host_map:
            value = urlunsplit(parts._replace(netloc=host_map[parts.netloc]))
        env[key] = value
    url = urlsplit(healthcheck_url(service))
    assert url.port in port_map, f"{name}: healthcheck port {url.port} is not a port the service listens on"
    health = urlunsplit(url._replace(netloc=f"127.0.0.1:{port_map[url.port]}"))
    return Proc(name, list(service["command"]), env, health_url=health), health


def stand_in_compose_env(gw_port: int, vapi: VapiSim, twilio: TwilioSim, prefix: str) -> dict[str, str]:
    """What the shell or .env would give `docker compose`, pointed at the stand-ins."""
    return {
        "PUBLIC_URL": f"http://127.0.0.1:{gw_port}",
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID, "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "VAPI_API_KEY": VAPI_KEY, "VAPI_ASSISTANT_ID": ASSISTANT_ID,
        "VAPI_BASE_URL": vapi.base_url, "REDIS_PREFIX": prefix,
        "TWILIO_API_BASE_URL": twilio.rest_base_url,
    }


def start_compose_services(services: dict[str, Any], image_env: dict[str, str], gw_port: int,
                           host_map: dict[str, str],
                           procs: list[Proc]) -> tuple[dict[str, Proc], dict[int, int]]:
    """The gateway and worker services as local processes (see compose_process); also the map
    from the ports they listen on in compose to the local ones."""
    port_map = {int(services["gateway"]["environment"]["PORT"]): gw_port,
                int(services["worker"]["environment"]["WORKER_HTTP_PORT"]): free_port()}
    started: dict[str, Proc] = {}
    for name in PROJECT_SERVICES:
        proc, _ = compose_process(name, services[name], image_env, port_map, host_map)
        started[name] = proc.start()
        procs.append(proc)
    return started, port_map


async def test_compose_services_run_as_declared(redis_url: str, prefix: str, procs: list[Proc],
                                                redis: aioredis.Redis,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    stages = dockerfile_stages()
    assert json.loads(only(stages[-1], "ENTRYPOINT").args) == ["callbridge"]
    image_env = stage_env(stages[-1])
    raw = load_yaml(COMPOSE)
    redis_netloc = urlsplit(redis_url).netloc

    async with sims() as (vapi, gw_port):
        async with twilio_sim(gw_port) as twilio:
            services = interpolate(raw, stand_in_compose_env(gw_port, vapi, twilio, prefix))["services"]
            started, port_map = start_compose_services(services, image_env, gw_port,
                                                       {"redis:6379": redis_netloc}, procs)
            for name, proc in started.items():
                await proc.wait_ready()
                # The service's own compose healthcheck command passes, run as compose would.
                argv = [sys.executable if a == "python" else a for a in healthcheck_argv(services[name])]
                argv = [re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{port_map[int(m[1])]}", a)
                        for a in argv]
                out = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=10)
                assert out.returncode == 0, f"{name} healthcheck failed: {out.stderr.decode()}"

            # The image's HEALTHCHECK finds the right port for each tier (PID 1's argv decides).
            health = only(stages[-1], "HEALTHCHECK").args
            code = json.loads(health[health.index("CMD") + 3:].strip())[2]
            for proc in started.values():
                await asyncio.to_thread(run_image_healthcheck, code, proc, monkeypatch)

            await one_call(twilio, vapi, redis, Keys(prefix))
            for proc in started.values():
                assert proc.proc is not None and proc.proc.poll() is None, proc.logs()


def run_image_healthcheck(code: str, proc: Proc, monkeypatch: pytest.MonkeyPatch) -> None:
    cmdline = b"\0".join([b"/usr/local/bin/python3.13", b"/usr/local/bin/callbridge",
                          *(a.encode() for a in proc.args)]) + b"\0"
    real_open = builtins.open

    def fake_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        if path == "/proc/1/cmdline":
            import io
            return io.BytesIO(cmdline)
        return real_open(path, *args, **kwargs)

    with monkeypatch.context() as m:
        for key in ("PORT", "WORKER_HTTP_PORT"):
            if key in proc.env:
                m.setenv(key, proc.env[key])
            else:
                m.delenv(key, raising=False)
        exec(compile(code, "<HEALTHCHECK>", "exec"), {"__builtins__": builtins, "open": fake_open})


@pytest.mark.skipif(cluster_available() is not None, reason=str(cluster_available()))
async def test_compose_cluster_override_runs_as_declared(tmp_path: Path, prefix: str,
                                                         procs: list[Proc]) -> None:
    """compose.cluster.yaml's commands, run here: six `redis-server`s with the nodes' command,
    the init service's script (twice: a re-run must pass and change nothing), then the gateway
    and worker with exactly the environment the merged file gives them, and a call through them."""
    image_env = stage_env(dockerfile_stages()[-1])
    async with sims() as (vapi, gw_port):
        async with twilio_sim(gw_port) as twilio:
            services = cluster_compose(stand_in_compose_env(gw_port, vapi, twilio, prefix))
            with loopback_nodes(services, cluster_nodes(services), tmp_path) as ports:
                init = services[CLUSTER_INIT]["command"]
                argv = [*init[:-1], on_loopback(init[-1], ports)]

                first = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                                timeout=60)
                assert first.returncode == 0, first.stdout + first.stderr
                assert cluster_state(ports["redis"]) == "ok", "init returns once node 1 says ok"
                table = await asyncio.to_thread(wait_cluster_formed, ports)

                again = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                                timeout=60)
                assert again.returncode == 0, again.stdout + again.stderr
                assert cluster_table(ports["redis"]) == table, "a re-run leaves the cluster as it was"

                host_map = {f"{name}:6379": f"127.0.0.1:{port}" for name, port in ports.items()}
                started, _ = start_compose_services(services, image_env, gw_port, host_map, procs)
                try:
                    for proc in started.values():
                        await proc.wait_ready()  # the URL of its compose healthcheck (/healthz)
                        assert proc.health_url is not None
                        proc.health_url = urlunsplit(urlsplit(proc.health_url)._replace(path="/readyz"))
                        await proc.wait_ready()  # ready: it reached the cluster
                    client = connect(started["gateway"].env["REDIS_URL"], cluster=True)
                    try:
                        lanes = int(services["gateway"]["environment"]["REDIS_LANES"])
                        await one_call(twilio, vapi, client, Keys(prefix, lanes))
                    finally:
                        await client.aclose()
                    for proc in started.values():
                        assert proc.alive(), proc.logs()
                finally:
                    for proc in started.values():
                        proc.stop()  # before the nodes they drain through go away
