"""The `callbridge` command: gateway, worker, dev (both in one process), demo and bench."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from shared.logs import setup_logging
from shared.serving import run_until_signal
from shared.settings import ConfigError, Settings, load_settings


def _settings() -> Settings:
    return load_settings()


def cmd_gateway(args: argparse.Namespace) -> None:
    from gateway.app import create_app, drain, server_config
    from shared.serving import quiet_server, serve_until

    settings = _settings()
    setup_logging(settings.log_level, settings.log_format, role="gateway")
    app = create_app(settings)
    server = quiet_server(server_config(app, settings, args.host, args.port))

    async def main(stop: asyncio.Event) -> None:
        # SIGTERM: /readyz turns 503 and new sockets are refused at once; live streams are handed
        # back to Twilio (the drain); then uvicorn stops within the drain timeout.
        await serve_until(server, stop, lambda: drain(app.state.gw))

    run_until_signal(main)
    if app.state.gw.failed:
        sys.exit(1)


def cmd_worker(args: argparse.Namespace) -> None:
    from worker.main import Worker

    settings = _settings()
    if args.http_port is not None:
        settings.worker_http_port = args.http_port
    worker = Worker(settings)
    setup_logging(settings.log_level, settings.log_format, role="worker", worker_id=worker.worker_id)

    async def main(stop: asyncio.Event) -> None:
        await worker.run(stop)

    run_until_signal(main)
    if worker.failed:
        sys.exit(1)


def cmd_dev(args: argparse.Namespace) -> None:
    from callbridge.dev import embedded_redis, run_dev

    settings = _settings()
    if not settings.public_url:
        settings.public_url = f"http://{args.host}:{args.port}"
    setup_logging(settings.log_level, settings.log_format, role="dev")
    redis_server = embedded_redis(settings)
    try:
        run_until_signal(lambda stop: run_dev(settings, args.host, args.port, stop))
    finally:
        if redis_server is not None:
            redis_server.stop()


def cmd_demo(args: argparse.Namespace) -> None:
    from callbridge.demo import run_demo

    sys.exit(run_demo(args))


def cmd_bench(args: argparse.Namespace) -> None:
    from callbridge.bench import run_bench

    sys.exit(run_bench(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="callbridge", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("gateway", help="run the FastAPI gateway (Twilio webhooks + media sockets)")
    g.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    g.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    g.set_defaults(func=cmd_gateway)

    w = sub.add_parser("worker", help="run a worker (Vapi sessions, transcoding, pacing)")
    w.add_argument("--http-port", type=int, default=None,
                   help="health/metrics port (default WORKER_HTTP_PORT, 9100; 0 disables)")
    w.set_defaults(func=cmd_worker)

    d = sub.add_parser("dev", help="gateway + worker in one process; embedded Redis if REDIS_URL is unset")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    d.set_defaults(func=cmd_dev)

    demo = sub.add_parser("demo", help="dev + Twilio and Vapi stand-ins + one simulated call")
    demo.add_argument("--wav", default="callbridge-demo.wav", help="stereo WAV of the call")
    demo.add_argument("--format", choices=["pcm_s16le", "mulaw"], default=None)
    demo.add_argument("--outbound", action="store_true",
                      help="place the call through the call API (POST /v1/calls) instead of dialling in")
    demo.add_argument("--console", action="store_true",
                      help="keep running until Ctrl-C, placing a call every 20-40 s; open the printed "
                           "console address (GET /console) with the printed API key")
    demo.add_argument("--port", type=int, default=None, help="the gateway's port (default: a free one)")
    demo.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="N concurrent simulated calls through gateway + worker processes")
    b.add_argument("--calls", type=int, default=100)
    b.add_argument("--seconds", type=float, default=20.0)
    b.add_argument("--format", choices=["pcm_s16le", "mulaw"], default="pcm_s16le")
    b.add_argument("--workers", type=int, default=1)
    b.add_argument("--scenario", choices=["duplex", "conversation", "failover"], default="duplex",
                   help="duplex: assistant talks all along (default); conversation: turns and barge-ins; "
                        "failover: conversations while the busiest worker is killed or frozen, again "
                        "and again (--events; needs --workers >= 2): gap, words lost, duplicates")
    b.add_argument("--events", type=int, default=10,
                   help="failover: worker kills and 6 s stalls, alternating (default 10)")
    b.add_argument("--redis-cluster", action="store_true",
                   help="duplex on one private redis-server and on a private 3+3-node Redis Cluster, "
                        "one after the other, side by side: latency, CPU per tier and per node, "
                        "commands/s per node (REDIS_URL is ignored)")
    b.add_argument("--kill-primary", action="store_true",
                   help="with --redis-cluster: after the cluster's window, SIGKILL the primary serving "
                        "the most calls' lanes (not the {ctl} one): promotion, audio again after it")
    b.add_argument("--baseline", choices=["direct"], default=None,
                   help="direct: duplex through a direct bridge (one process, Twilio socket to Vapi "
                        "socket, no Redis), then through callbridge on a private redis-server, side by "
                        "side: CPU per call per process, latency, loss, and bridge total / direct; "
                        "between them the hop through Redis alone (bench_floor), a lean reference")
    b.add_argument("--phases", type=int, default=1,
                   help="1 (default) sends every call's frames on one 20 ms "
                        "grid, the whole load in one burst; N spreads the calls over N phases of the "
                        "20 ms, as independent calls' streams are on a real line")
    b.add_argument("--json", action="store_true", help="print the figures as JSON too")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"callbridge: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
