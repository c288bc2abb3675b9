"""``GET /console``: a live console in the browser for front-end developers and operators.

Routes, all on the internal API listener and public (no API key; see `http_api.PUBLIC_PREFIXES`):

- ``GET /console``: the page (``static/console.html``).
- ``GET /console/static/<file>``: its script, style and the browser client module
  (``igratech-ws-client.js``), from a fixed list of packaged files.
- ``GET /console/config.json``: what the page needs to know: the public WebSocket URL, whether
  demo mode is on, the node id, example publications from the contract, and in demo mode the
  demo's game ids (``demoGames``, followed on first load), the demo user (``demoUser``), a token
  for them (``demoToken``) and the name their bets carry in the public bet feed (``demoPlayer``).
- ``POST /console/publish``: only when ``Config.demo`` is true. Takes the body of
  ``POST /api/v1/publish``, validates it the same way (`core.publishing`) and publishes through
  the node, without the API key. It does not exist otherwise (404), so a production node exposes
  no unauthenticated way to publish.

The page itself connects to the public ``/wspublic`` endpoint like any browser client would.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web

from igratech_ws.auth import mint_token
from igratech_ws.config import Config
from igratech_ws.core import channels
from igratech_ws.core.codec import ProtocolError
from igratech_ws.core.messages import PUBLISHED_EVENTS
from igratech_ws.core.publishing import parse_publish_body, validate_publish
from igratech_ws.demo_feed import DEMO_GAMES, DEMO_USER, demo_player_name
from igratech_ws.transport.http_api import (
    GatewayNode,
    error_response,
    json_response,
)

#: The only files served under /console/static/, with their content types.
STATIC_FILES = {
    "console.js": "text/javascript",
    "console.css": "text/css",
    "igratech-ws-client.js": "text/javascript",
}
#: How long a demo token handed out by config.json stays valid.
DEMO_TOKEN_TTL = 86_400.0

#: Scripts and styles only from this origin; WebSocket connections to any host (the gateway's
#: public listener has another port, hence another origin).
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"}


def _read(name: str) -> bytes:
    return resources.files("igratech_ws").joinpath("static", name).read_bytes()


def ws_url(request: web.Request, config: Config, ws_port: int) -> str:
    """The public WebSocket URL as the browser that made `request` can reach it.

    A listener bound to a wildcard address is reached by the host name the browser used for this
    page; one bound to a specific address, by that address.
    """
    host = config.host
    if host in ("", "0.0.0.0", "::"):
        host = request.url.host or "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "wss" if request.secure else "ws"
    return f"{scheme}://{host}:{ws_port}/wspublic"


def publish_examples() -> dict[str, dict[str, Any]]:
    """Event -> a publish request body built from the contract's first example of that event."""
    from igratech_ws.contract import examples

    result: dict[str, dict[str, Any]] = {}
    for _, frame in examples():
        event = frame.get("event")
        channel = frame.get("channel")
        if event not in PUBLISHED_EVENTS or not isinstance(channel, str):
            continue
        key = event
        if event == "stats":
            key = "stats (global)" if channel == channels.GLOBAL_CHANNEL else "stats (game)"
        if key in result:
            continue
        body: dict[str, Any] = {"event": event, "data": frame.get("data", {})}
        kind, _, target = channel.partition(":")
        if kind == "game":
            body["gameId"] = target
        elif kind == "user":
            body["userId"] = target
        result[key] = body
    # Incidents first: the first thing a developer wants to see on a followed game.
    order = [*PUBLISHED_EVENTS, "stats (game)", "stats (global)"]
    return dict(sorted(result.items(), key=lambda item: order.index(item[0])))


class _Console:
    def __init__(self, node: GatewayNode, config: Config, ws_port: int) -> None:
        self.node = node
        self.config = config
        self.ws_port = ws_port
        self.page = _read("console.html")
        self.static = {name: _read(name) for name in STATIC_FILES}
        self.examples = publish_examples()

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.page, content_type="text/html", charset="utf-8", headers=_HEADERS
        )

    async def static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = self.static.get(name)
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(
            body=body,
            content_type=STATIC_FILES[name],
            charset="utf-8",
            headers={**_HEADERS, "Cache-Control": "no-cache"},
        )

    async def config_json(self, request: web.Request) -> web.Response:
        config = self.config
        answer: dict[str, Any] = {
            "wsUrl": ws_url(request, config, self.ws_port),
            "demo": config.demo,
            "node": self.node.node_id,
            "allowAnonymous": config.allow_anonymous,
            "examples": self.examples,
        }
        if config.demo and config.jwt_secret:
            # Demo only: a ready-made token so the console can show a user's own channel.
            answer["demoUser"] = DEMO_USER
            answer["demoGames"] = DEMO_GAMES
            answer["demoPlayer"] = demo_player_name(DEMO_USER)
            answer["demoToken"] = mint_token(
                config.jwt_secret,
                DEMO_USER,
                ttl=DEMO_TOKEN_TTL,
                audience=config.jwt_audience,
                issuer=config.jwt_issuer,
            )
        return json_response(answer, headers={"Cache-Control": "no-store"})

    async def publish(self, request: web.Request) -> web.Response:
        # Requiring JSON keeps plain HTML forms of other sites from publishing here (they cannot
        # send application/json without a CORS preflight, which this route does not answer).
        if request.content_type != "application/json":
            return error_response(
                415, "unsupported_media_type", "Content-Type must be application/json"
            )
        body = await request.read()
        try:
            validated = validate_publish(parse_publish_body(body))
        except ProtocolError as exc:
            return error_response(400, exc.code, exc.message, exc.field)
        publication = (await self.node.publish(validated)).publication
        return json_response(
            {
                "channel": publication.channel,
                "offset": publication.offset,
                "epoch": publication.epoch,
                "event": publication.event,
            }
        )


def install(app: web.Application, node: GatewayNode, config: Config, *, ws_port: int) -> None:
    """Add the console's routes to the internal API `app`.

    `ws_port` is the port the public WebSocket listener actually bound (it differs from
    ``config.port`` when that is 0). ``POST /console/publish`` is added only when ``config.demo``.
    """
    console = _Console(node, config, ws_port)
    app.router.add_get("/console", console.index)
    app.router.add_get("/console/config.json", console.config_json)
    app.router.add_get("/console/static/{name}", console.static_file)
    if config.demo:
        app.router.add_post("/console/publish", console.publish)
