"""The `igratech-ws` command: serve, demo, token, publish, listen, health, config.

Secrets (JWT secret or public key, API key) come from the environment (`IGRATECH_WS_JWT_SECRET`,
`IGRATECH_WS_JWT_PUBLIC_KEY`, `IGRATECH_WS_API_KEY`, or `..._FILE` naming a file), never from flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import math
import os
import random
import re
import secrets
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from igratech_ws import logs
from igratech_ws.config import SECRETS, Config, ConfigError, Resolved, flag, resolve, variable


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a TOML configuration file (or IGRATECH_WS_CONFIG)")
    parser.add_argument("--host", help="WebSocket listener address (default 0.0.0.0)")
    parser.add_argument("--port", help="WebSocket listener port (default 8080)")
    parser.add_argument("--api-host", help="internal API address (default 127.0.0.1)")
    parser.add_argument("--api-port", help="internal API port (default 8081)")
    parser.add_argument(
        "--broker", help="memory:// (default), redis://host:6379/0, nats://host:4222"
    )
    parser.add_argument("--node-id", help="this node's id (default: random)")
    parser.add_argument("--log-level", help="debug, info (default), warning or error")


#: Settings that have a flag on the server commands (the others come from the file or the
#: environment). Flag values are text, converted and checked by the one settings model.
FLAG_SETTINGS = ("host", "port", "api_host", "api_port", "broker", "node_id", "log_level")


def _resolve(args: argparse.Namespace) -> Resolved:
    flags = {name: getattr(args, name) for name in FLAG_SETTINGS}
    return resolve(file=args.config, flags=flags)


def _config_from(args: argparse.Namespace) -> Config:
    """The configuration, with a warning on stderr for each variable that is not a setting."""
    resolved = _resolve(args)
    for warning in resolved.warnings:
        print(f"igratech-ws: warning: {warning}", file=sys.stderr)
    return resolved.config


def fail(command: str, message: str) -> int:
    """Print `message` as the command's one line on stderr; the exit status of a failure."""
    print(f"igratech-ws {command}: {message}", file=sys.stderr)
    return 1


def _public_broker(url: str) -> str:
    """The broker URL without credentials, to show in messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc, query="", fragment="").geturl()


_CREDENTIALS_RE = re.compile(r"//[^/@\s]+@")
_BIND_ERRORS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)
_BIND_RE = re.compile(r"address \('?([^',]*)'?, (\d+)")


def auth_error(exc: BaseException, config: Config) -> str:
    """One line for a key or JWKS file the token verifier cannot use."""
    if config.jwt_jwks_file and (
        type(exc).__name__ == "JwksError"
        or (isinstance(exc, OSError) and exc.filename == config.jwt_jwks_file)
    ):
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        return (
            f"cannot use the JWKS file {config.jwt_jwks_file}: {reason}; fix the file or "
            "IGRATECH_WS_JWT_JWKS_FILE"
        )
    if config.jwt_public_key:
        return (
            "IGRATECH_WS_JWT_PUBLIC_KEY (or the file named by IGRATECH_WS_JWT_PUBLIC_KEY_FILE) "
            "is not an RSA or P-256 EC public key in PEM: give the whole '-----BEGIN PUBLIC "
            "KEY-----' block"
        )
    return f"cannot set up token verification: {exc}"


def startup_error(exc: BaseException, config: Config) -> str:
    """One line saying why a node could not start and what to do, for any start failure."""
    from igratech_ws.brokers.base import BrokerError

    if isinstance(exc, BrokerError):
        reason = _CREDENTIALS_RE.sub("//", str(exc))  # a broker's message may quote its URL
        return (
            f"cannot reach the broker {_public_broker(config.broker)}: {reason}; start it, or "
            "point --broker / IGRATECH_WS_BROKER at a running one"
        )
    if isinstance(exc, socket.gaierror):
        return (
            f"cannot resolve a listener address ({exc.strerror}): check --host / --api-host "
            "(IGRATECH_WS_HOST / IGRATECH_WS_API_HOST)"
        )
    if isinstance(exc, OSError) and exc.errno in _BIND_ERRORS:
        match = _BIND_RE.search(str(exc))
        host, port = (match.group(1), int(match.group(2))) if match else ("?", -1)
        name = "api_port" if port == config.api_port and port != config.port else "port"
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            return (
                f"port {port} on {host} is already in use (another igratech-ws?): stop that "
                f"process or choose another port with {flag(name)} / {variable(name)}"
            )
        if exc.errno == errno.EACCES:
            return (
                f"not allowed to listen on {where}: ports below 1024 need privileges; use a "
                f"higher port with {flag(name)} / {variable(name)}"
            )
        host_name = "api_host" if name == "api_port" else "host"
        return (
            f"cannot listen on {where}: {host} is not an address of this machine; fix "
            f"{flag(host_name)} / {variable(host_name)}"
        )
    if isinstance(exc, ValueError) and "broker URL" in str(exc):
        return f"{exc}; fix --broker / IGRATECH_WS_BROKER"
    if isinstance(exc, OSError):
        target = f" {exc.filename}" if exc.filename else ""
        return f"cannot start: {exc.strerror or exc}{target}"
    return (
        f"cannot start: {type(exc).__name__}: {exc} (a bug? IGRATECH_WS_LOG_LEVEL=debug logs "
        "the traceback)"
    )


def _run(coroutine: Any) -> None:
    try:
        import uvloop

        uvloop.run(coroutine)
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep a fallback for PyPy
        asyncio.run(coroutine)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config_from(args)
    problems = []
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
    return _serve_one(config)


def _serve_one(config: Config) -> int:
    from igratech_ws.app import serve_forever

    logs.configure(config.log_level)
    return _guarded_start(
        "serve", config, lambda on_ready: serve_forever(config, on_ready=on_ready)
    )


def _guarded_start(command: str, config: Config, start: Any) -> int:
    """Run `start(on_ready)`; a failure before the node is ready is one line on stderr (exit 1)
    instead of a traceback. Failures after it, bugs, propagate as they are."""
    from igratech_ws.auth import TokenVerifier

    try:  # keys and files first: a mistake there is found before anything starts
        TokenVerifier.from_config(config)
    except (OSError, ValueError) as exc:
        return fail(command, auth_error(exc, config))
    ready = False

    def on_ready(_app: object) -> None:
        nonlocal ready
        ready = True

    try:
        _run(start(on_ready))
    except Exception as exc:
        if ready:
            raise
        logging.getLogger("igratech_ws.cli").debug("start failed", exc_info=True)
        return fail(command, startup_error(exc, config))
    return 0


def _serve_workers(config: Config, workers: int) -> int:
    """Run `workers` processes sharing the ports with SO_REUSEPORT; the kernel spreads the
    connections. SIGTERM/SIGINT are passed on, so every worker drains; returns the worst exit."""
    import multiprocessing
    import signal

    base = config.node_id or secrets.token_hex(4)
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_serve_worker,
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


def _serve_worker(config: Config) -> None:
    sys.exit(_serve_one(config))


def cmd_demo(args: argparse.Namespace) -> int:
    from igratech_ws.app import App, running_app
    from igratech_ws.auth import mint_token
    from igratech_ws.core.publishing import PublishRequest, validate_publish
    from igratech_ws.demo_feed import DEMO_GAMES, DEMO_USER, run_demo_feed

    config = _config_from(args)
    # A demo must start with no set-up: invent development secrets when none are configured
    # (IGRATECH_WS_JWT_SECRET / IGRATECH_WS_API_KEY pin them across runs).
    config = config.with_overrides(
        {
            "jwt_secret": config.jwt_secret or secrets.token_urlsafe(32),
            "api_key": config.api_key or "demo-" + secrets.token_urlsafe(16),
            "demo": True,
        }
    )
    logs.configure(config.log_level)
    secret = config.jwt_secret or ""

    def start(on_ready: Any) -> Any:
        return main(on_ready)

    async def main(on_ready: Any) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with running_app(config) as app:
            on_ready(app)
            print(demo_banner(app, mint_token(secret, DEMO_USER, ttl=86_400)), flush=True)

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

    def demo_banner(app: App, token: str) -> str:
        games = ",".join(DEMO_GAMES)
        return "\n".join(
            [
                "",
                "igratech-ws demo is running: a simulated platform publishes live games.",
                f"  WebSocket : {app.ws_url}",
                f"  API       : {app.api_url}   (API key: {config.api_key})",
                f"  Console   : {app.api_url}/console   Docs: {app.api_url}/docs",
                f"  Demo user : {DEMO_USER}",
                "",
                "In another terminal, paste these lines (the README's commands use them):",
                f"  export IGRATECH_WS_API_KEY={config.api_key}",
                f"  export IGRATECH_WS_JWT_SECRET={secret}",
                f"  export IGRATECH_WS_TOKEN={token}",
                "then follow the games as the demo user (one session per user: an open console "
                "is logged out):",
                f"  .venv/bin/igratech-ws listen --url {app.ws_url} --games {games} --stats",
                "(set IGRATECH_WS_API_KEY and IGRATECH_WS_JWT_SECRET before `make run` to keep "
                "the same keys across runs)",
                "Press Ctrl+C to stop.",
                "",
            ]
        )

    return _guarded_start("demo", config, start)


#: The longest `token --ttl` (ten years): further is a mistake, and far enough for any test.
MAX_TOKEN_TTL = 10 * 365 * 86_400


def cmd_token(args: argparse.Namespace) -> int:
    from igratech_ws.auth import mint_token
    from igratech_ws.core.channels import is_valid_id

    config = Config.from_env()
    if not config.jwt_secret:
        if config.jwt_public_key or config.jwt_jwks_file:
            return fail(
                "token",
                "this gateway verifies RS256/ES256 tokens with a public key; mint them where the "
                "private key is (your identity provider); `token` signs HS256 with "
                "IGRATECH_WS_JWT_SECRET",
            )
        return fail("token", "set IGRATECH_WS_JWT_SECRET to the gateway's secret")
    if not is_valid_id(args.user):
        return fail(
            "token",
            f"--user {args.user!r} is not a user id the gateway accepts: 1-64 of A-Z a-z 0-9 "
            "_ . - starting with a letter or digit",
        )
    if not (math.isfinite(args.ttl) and 1 <= args.ttl <= MAX_TOKEN_TTL):
        return fail(
            "token",
            f"--ttl {args.ttl:g} must be from 1 to {MAX_TOKEN_TTL} seconds: the gateway refuses "
            "an expired token",
        )
    for name, given, expected in (
        ("audience", args.audience, config.jwt_audience),
        ("issuer", args.issuer, config.jwt_issuer),
    ):
        if given is not None and expected is not None and given != expected:
            return fail(
                "token",
                f"--{name} {given!r} would be refused: the gateway expects {expected!r} "
                f"(IGRATECH_WS_JWT_{name.upper()})",
            )
    print(
        mint_token(
            config.jwt_secret,
            args.user,
            ttl=args.ttl,
            audience=args.audience or config.jwt_audience,
            issuer=args.issuer or config.jwt_issuer,
        )
    )
    return 0


def _server_reason(body: bytes) -> str:
    """The message of an API error answer (``{"error": {"message": ...}}``), else the body."""
    import msgspec

    try:
        decoded = msgspec.json.decode(body)
        error = decoded.get("error") if isinstance(decoded, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            field = f" ({error['field']})" if error.get("field") else ""
            return f"{error.get('code')}: {error['message']}{field}"
    except msgspec.DecodeError:
        pass
    return body.decode("utf-8", "replace").strip().replace("\n", " ")[:500]


def cmd_publish(args: argparse.Namespace) -> int:
    import msgspec

    body: dict[str, Any] = {"event": args.event}
    try:
        body["data"] = msgspec.json.decode(args.data if args.data != "-" else sys.stdin.read())
    except msgspec.DecodeError as exc:
        return fail("publish", f"--data is not JSON: {exc}")
    if args.game:
        body["gameId"] = args.game
    if args.user:
        body["userId"] = args.user
    key = Config.from_env().api_key
    if not key:
        return fail("publish", "set IGRATECH_WS_API_KEY to the gateway's API key")
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
        reason = _server_reason(exc.read())
        hint = ""
        if exc.code == 401:
            hint = "; IGRATECH_WS_API_KEY must be the gateway's API key"
        return fail("publish", f"the gateway answered HTTP {exc.code}: {reason}{hint}")
    except (urllib.error.URLError, OSError) as exc:
        cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return fail(
            "publish", f"cannot reach {args.api}: {cause}; is the gateway running? check --api"
        )


def cmd_listen(args: argparse.Namespace) -> int:
    from igratech_ws.client import ClientError, HandshakeRejected
    from igratech_ws.client.console import listen

    token = args.token or os.environ.get("IGRATECH_WS_TOKEN") or None
    games = [g for g in (args.games or "").split(",") if g]
    try:
        with contextlib.suppress(KeyboardInterrupt):
            _run(listen(args.url, token, games, args.stats, max_events=args.max_events))
    except HandshakeRejected as exc:
        reason = getattr(exc, "reason", "") or f"HTTP {exc.status}"
        hint = ""
        if exc.status == 401:
            hint = "; check --token / IGRATECH_WS_TOKEN (`igratech-ws token --user ...`)"
        return fail("listen", f"the gateway refused the connection: {reason}{hint}")
    except (OSError, TimeoutError) as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return fail(
            "listen",
            f"cannot connect to {args.url}: {reason}; is the gateway running? check --url",
        )
    except (ClientError, ValueError) as exc:
        return fail("listen", str(exc))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when this node's ``/healthz`` answers 200 (the container image's HEALTHCHECK)."""
    config = Config.load(file=args.config)
    host = "127.0.0.1" if config.api_host in ("0.0.0.0", "", "::") else config.api_host
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{config.api_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as answer:
            answer.read()
    except (urllib.error.URLError, OSError) as exc:
        cause = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return fail("health", f"{url} does not answer: {cause}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    try:
        resolved = _resolve(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"invalid: {problem}", file=sys.stderr)
        return 2
    width = max(len(name) for name in resolved.sources)
    for name, source in resolved.sources.items():
        value = getattr(resolved.config, name)
        shown = "'***'" if name in SECRETS and value else repr(value)
        print(f"{name:<{width}} = {shown:<24} # {source}")
    for warning in resolved.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


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
    token.add_argument("--audience", help="the `aud` claim (default IGRATECH_WS_JWT_AUDIENCE)")
    token.add_argument("--issuer", help="the `iss` claim (default IGRATECH_WS_JWT_ISSUER)")
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

    health = sub.add_parser("health", help="exit 0 when this node's /healthz answers")
    health.add_argument("--config", help="a TOML configuration file (or IGRATECH_WS_CONFIG)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    health.set_defaults(func=cmd_health)

    config = sub.add_parser(
        "config", help="print the effective configuration, where each value comes from"
    )
    _add_server_flags(config)
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"igratech-ws: {problem}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `igratech-ws config | head`: the reader left, nothing to say
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
