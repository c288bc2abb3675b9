"""The one place that picks concrete classes and wires a node: broker, node, listeners.

`running_app(config)` is an async context manager: on entry the node serves WebSocket clients on
(`host`, `port`) and the internal API on (`api_host`, `api_port`); on exit it drains (clients are
told 1012), closes listeners and the broker. Ports 0 pick free ports; `App.port` / `App.api_port`
tell which.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiohttp import web

from igratech_ws import brokers
from igratech_ws.auth import TokenVerifier
from igratech_ws.config import Config
from igratech_ws.node import Node
from igratech_ws.outbox import Outbox, OutboxCollector
from igratech_ws.transport.websocket import start_listener

log = logging.getLogger("igratech_ws.app")

#: How long the API may take to finish the requests in flight when the node stops.
API_SHUTDOWN_SECONDS = 5.0
#: How long close frames get to leave after the drain, before the loop stops.
DRAIN_FLUSH_SECONDS = 0.2


@dataclass
class App:
    """A running node and its listeners."""

    config: Config
    node: Node
    ws_server: asyncio.Server
    api_runner: web.AppRunner
    port: int
    api_port: int
    background: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def ws_url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "", "::") else self.config.host
        return f"ws://{host}:{self.port}/wspublic"

    @property
    def api_url(self) -> str:
        host = (
            "127.0.0.1" if self.config.api_host in ("0.0.0.0", "", "::") else self.config.api_host
        )
        return f"http://{host}:{self.api_port}"


def build_verifier(config: Config) -> TokenVerifier:
    """The token verifier `config` describes (reads the JWKS file, if any)."""
    return TokenVerifier.from_config(config)


@contextlib.asynccontextmanager
async def running_app(
    config: Config,
    *,
    extra_routes: Callable[[web.Application], None] | None = None,
) -> AsyncIterator[App]:
    """Start a node with `config`; drain and stop it on exit. Raises if a listener cannot bind."""
    from igratech_ws import metrics
    from igratech_ws.contract import document_text
    from igratech_ws.transport import console, docs_page
    from igratech_ws.transport.http_api import build_api_app
    from igratech_ws.transport.http_fastpath import PublishFastSite

    broker = brokers.from_url(config.broker, brokers.options_from_config(config))
    node = Node(config, broker)
    await node.start()
    ws_server: asyncio.Server | None = None
    runner: web.AppRunner | None = None
    outbox: Outbox | None = None
    try:
        if config.outbox_dsn:
            outbox = Outbox(
                node,
                config.outbox_dsn,
                config.outbox_table,
                max_body_bytes=config.max_publish_body_bytes,
            )
            await outbox.start()
        ws_server = await start_listener(
            node, build_verifier(config), config.host, config.port, reuse_port=config.reuse_port
        )
        port = ws_server.sockets[0].getsockname()[1]

        def routes(api_app: web.Application) -> None:
            # Operator and developer pages: /metrics (metrics key, if any), /docs and /console.
            node_metrics = metrics.install(api_app, node)
            if outbox is not None:
                node_metrics.registry.register(OutboxCollector(outbox, node.node_id))
            docs_page.install(api_app)
            console.install(api_app, node, config, ws_port=port)
            if extra_routes is not None:
                extra_routes(api_app)

        api = build_api_app(
            node,
            api_key=config.api_key,
            metrics_key=config.metrics_key,
            asyncapi_yaml=document_text(),
            max_body_bytes=config.max_publish_body_bytes,
            max_batch_items=config.max_batch_items,
            extra_routes=routes,
        )
        runner = web.AppRunner(
            api, access_log=None, handle_signals=False, shutdown_timeout=API_SHUTDOWN_SECONDS
        )
        await runner.setup()
        site = PublishFastSite(
            runner, config.api_host, config.api_port, reuse_port=config.reuse_port or None
        )
        await site.start()
        api_port = runner.addresses[0][1]
        app = App(config, node, ws_server, runner, port, api_port)
        log.info(
            "serving",
            extra={
                "ws": app.ws_url,
                "api": app.api_url,
                "node": node.node_id,
                "broker": config.broker,
            },
        )
        yield app
    finally:
        # Drain order: stop taking clients; let the API finish the publishes it accepted (they
        # reach the clients still connected); then tell every client to reconnect (1012) after
        # flushing what it is owed; give the close frames a moment to leave; stop the broker.
        node.draining = True
        if outbox is not None:
            await outbox.close()
        if ws_server is not None:
            ws_server.close()
        if runner is not None:
            await runner.cleanup()
        node.drain()
        await asyncio.sleep(DRAIN_FLUSH_SECONDS)
        await node.close()


def freeze_startup_heap() -> int:
    """Take what the process has made so far (modules, classes, the wired node) out of the
    cyclic garbage collector's walks (`gc.freeze`), after collecting what is already garbage.

    It lives as long as the process, yet every full collection would walk all of it again:
    about 65,000 objects, 25-35 ms on this project's 2-core VM, a pause every client of the
    node feels. Call it once, from the process's owner, when the node is ready (`serve_forever`
    does; tests that run nodes inside their own process do not). Returns how many objects are
    frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def serve_forever(
    config: Config,
    *,
    on_ready: Callable[[App], None] | None = None,
    extra_routes: Callable[[web.Application], None] | None = None,
) -> None:
    """Run until SIGINT or SIGTERM, then drain and exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with running_app(config, extra_routes=extra_routes) as app:
        frozen = freeze_startup_heap()
        log.debug("startup heap frozen", extra={"objects": frozen})
        if on_ready is not None:
            on_ready(app)
        await stop.wait()
        log.info("draining", extra={"connections": app.node.connection_count})
