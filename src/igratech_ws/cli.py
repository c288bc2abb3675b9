"""The `igratech-ws` command: serve, demo, token, publish, listen, config.

Secrets (JWT secret or public key, API key) come from the environment (`IGRATECH_WS_JWT_SECRET`,
`IGRATECH_WS_JWT_PUBLIC_KEY`, `IGRATECH_WS_API_KEY`, or `..._FILE` naming a file), never from flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from igratech_ws import logs
from igratech_ws.config import Config

DEMO_USER = "demo-user"
DEMO_GAMES = ["g-1001", "g-1002", "g-1003"]


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML configuration file (or IGRATECH_WS_CONFIG)")
    parser.add_argument("--host", help="WebSocket listener address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="WebSocket listener port (default 8080)")
    parser.add_argument("--api-host", help="internal API address (default 127.0.0.1)")
    parser.add_argument("--api-port", type=int, help="internal API port (default 8081)")
    parser.add_argument(
        "--broker", help="memory:// (default), redis://host:6379/0, nats://host:4222"
    )
    parser.add_argument("--node-id", help="this node's id (default: random)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _config_from(args: argparse.Namespace) -> Config:
    overrides = {
        "host": args.host,
        "port": args.port,
        "api_host": args.api_host,
        "api_port": args.api_port,
        "broker": args.broker,
        "node_id": args.node_id,
        "log_level": args.log_level,
    }
    return Config.load(file=args.config, flags=overrides)


def _run(coroutine: Any) -> None:
    try:
        import uvloop

        uvloop.run(coroutine)
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep a fallback for PyPy
        asyncio.run(coroutine)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config_from(args)
    problems = config.validate()
    if args.workers < 1:
        problems.append("--workers must be at least 1")
    elif args.workers > 1:
        if config.broker.startswith("memory:"):
            problems.append(
                "--workers needs a shared broker (redis:// or nats://): with memory:// each "
                "worker would be a separate node that sees only its own publications"
            )
        if config.port == 0 or config.api_port == 0:
            problems.append("--workers needs fixed ports (the workers share them)")
    if problems:
        for problem in problems:
            print(f"igratech-ws: {problem}", file=sys.stderr)
        return 2
    if args.workers > 1:
        return _serve_workers(config, args.workers)
    _serve_one(config)
    return 0


def _serve_one(config: Config) -> None:
    from igratech_ws.app import serve_forever

    logs.configure(config.log_level)
    _run(serve_forever(config))


def _serve_workers(config: Config, workers: int) -> int:
    """Run `workers` processes sharing the ports with SO_REUSEPORT; the kernel spreads the
    connections. SIGTERM/SIGINT are passed on, so every worker drains; returns the worst exit."""
    import multiprocessing
    import signal

    base = config.node_id or secrets.token_hex(4)
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_serve_one,
            args=(config.with_overrides({"reuse_port": True, "node_id": f"{base}-w{index}"}),),
            name=f"igratech-ws-worker-{index}",
        )
        for index in range(workers)
    ]
    for process in processes:
        process.start()

    def forward(signum: int, _frame: object) -> None:
        for process in processes:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for process in processes:
        process.join()
    return max(abs(process.exitcode or 0) for process in processes)


def cmd_demo(args: argparse.Namespace) -> int:
    from igratech_ws.app import App, running_app
    from igratech_ws.auth import mint_token
    from igratech_ws.core.publishing import PublishRequest, validate_publish
    from igratech_ws.demo_feed import run_demo_feed

    config = _config_from(args)
    # A demo must start with no set-up: invent development secrets when none are configured.
    config = config.with_overrides(
        {
            "jwt_secret": config.jwt_secret or secrets.token_urlsafe(32),
            "api_key": config.api_key or "demo-" + secrets.token_urlsafe(16),
            "demo": True,
        }
    )
    logs.configure(config.log_level)
    assert config.jwt_secret is not None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with running_app(config) as app:
            _print_demo_banner(app, mint_token(config.jwt_secret or "", DEMO_USER, ttl=86_400))

            async def publish(request: PublishRequest) -> None:
                await app.node.publish(validate_publish(request))

            feed = asyncio.ensure_future(
                run_demo_feed(
                    publish,
                    games=DEMO_GAMES,
                    demo_user_id=DEMO_USER,
                    rng=random.Random(),
                    rate=args.rate,
                    stop=stop,
                )
            )
            if args.duration:
                loop.call_later(args.duration, stop.set)
            await stop.wait()
            await feed

    def _print_demo_banner(app: App, token: str) -> None:
        games = ",".join(DEMO_GAMES)
        print(
            "\n".join(
                [
                    "",
                    "igratech-ws demo is running: a simulated platform publishes live games.",
                    f"  WebSocket : {app.ws_url}",
                    f"  API       : {app.api_url}   (API key: {config.api_key})",
                    f"  Demo user : {DEMO_USER}",
                    f"  Token     : {token}",
                    "",
                    "Connect as the demo user and follow the games:",
                    f"  .venv/bin/igratech-ws listen --url {app.ws_url} --games {games} --stats "
                    f"--token {token}",
                    "or with any WebSocket client, then send",
                    f'  {{"event":"settings","data":{{"games":["{DEMO_GAMES[0]}"],"stats":true}}}}',
                    f"  to {app.ws_url}?token=<token>",
                    "Press Ctrl+C to stop.",
                    "",
                ]
            ),
            flush=True,
        )

    _run(main())
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from igratech_ws.auth import mint_token

    secret = Config.from_env().jwt_secret
    if not secret:
        print(
            "igratech-ws token: set IGRATECH_WS_JWT_SECRET to the server's secret", file=sys.stderr
        )
        return 2
    print(mint_token(secret, args.user, ttl=args.ttl, audience=args.audience, issuer=args.issuer))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    import msgspec

    body: dict[str, Any] = {"event": args.event}
    try:
        body["data"] = msgspec.json.decode(args.data if args.data != "-" else sys.stdin.read())
    except msgspec.DecodeError as exc:
        print(f"igratech-ws publish: --data is not JSON: {exc}", file=sys.stderr)
        return 2
    if args.game:
        body["gameId"] = args.game
    if args.user:
        body["userId"] = args.user
    key = Config.from_env().api_key or ""
    request = urllib.request.Request(
        args.api.rstrip("/") + "/api/v1/publish",
        data=msgspec.json.encode(body),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            print(answer.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"HTTP {exc.code}: {exc.read().decode()}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"igratech-ws publish: cannot reach {args.api}: {exc.reason}", file=sys.stderr)
        return 1


def cmd_listen(args: argparse.Namespace) -> int:
    from igratech_ws.client.console import listen

    token = args.token or os.environ.get("IGRATECH_WS_TOKEN")
    games = [g for g in (args.games or "").split(",") if g]
    with contextlib.suppress(KeyboardInterrupt):
        _run(listen(args.url, token, games, args.stats, max_events=args.max_events))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    try:
        config = _config_from(args)
    except ValueError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 2
    secret_names = {"jwt_secret", "jwt_public_key", "api_key"}
    for item in fields(config):
        value = getattr(config, item.name)
        if item.name in secret_names and value:
            value = "***"
        print(f"{item.name} = {value!r}")
    problems = config.validate()
    for problem in problems:
        print(f"invalid: {problem}", file=sys.stderr)
    return 2 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igratech-ws", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a gateway node")
    _add_server_flags(serve)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the ports with SO_REUSEPORT (needs redis:// or nats://)",
    )
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="run a node with a simulated betting platform")
    _add_server_flags(demo)
    demo.add_argument("--rate", type=float, default=5.0, help="publications per second (default 5)")
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
    demo.set_defaults(func=cmd_demo)

    token = sub.add_parser("token", help="mint a development JWT (HS256, IGRATECH_WS_JWT_SECRET)")
    token.add_argument("--user", required=True, help="user id (the `sub` claim)")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds of validity")
    token.add_argument("--audience")
    token.add_argument("--issuer")
    token.set_defaults(func=cmd_token)

    publish = sub.add_parser("publish", help="publish one event through the internal API")
    publish.add_argument("--api", default="http://127.0.0.1:8081", help="internal API base URL")
    publish.add_argument(
        "--event", required=True, choices=["incident", "bet", "bets-result", "balance", "stats"]
    )
    publish.add_argument("--data", required=True, help="the payload as JSON, or - for stdin")
    target = publish.add_mutually_exclusive_group()
    target.add_argument("--game", help="target game id (incident, bet, game stats)")
    target.add_argument("--user", help="target user id (balance, bets-result)")
    publish.set_defaults(func=cmd_publish)

    listen = sub.add_parser("listen", help="print the events a client receives")
    listen.add_argument("--url", default="ws://127.0.0.1:8080/wspublic")
    listen.add_argument("--token", help="JWT (or IGRATECH_WS_TOKEN)")
    listen.add_argument("--games", help="comma-separated game ids to follow")
    listen.add_argument("--stats", action="store_true", help="receive global stats")
    listen.add_argument("--max-events", type=int, help="exit after this many events")
    listen.set_defaults(func=cmd_listen)

    config = sub.add_parser("config", help="print the effective configuration (secrets masked)")
    _add_server_flags(config)
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as exc:
        print(f"igratech-ws: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
