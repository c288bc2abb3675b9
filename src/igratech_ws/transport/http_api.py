"""The internal HTTP API: how the platform's backend publishes events and logs users out.

It runs on its own listener (loopback by default), apart from the public WebSocket endpoint.
Routes (see ``docs/http-api.md`` for the full reference with examples):

- ``GET /healthz`` (public): liveness, 200 while the process serves.
- ``GET /readyz`` (public): readiness, 200 when the node's broker is connected and it is not
  draining, else 503.
- ``GET /asyncapi.yaml`` (public): the contract.
- ``POST /api/v1/publish``, ``POST /api/v1/publish/batch``: validate, then publish.
- ``POST /api/v1/users/{userId}/logout``: close every connection of a user on every node.
- ``GET /api/v1/info``: the node's counters.

Every other route needs ``Authorization: Bearer <api key>``. Without a configured key the API
refuses those routes with 503, so a gateway cannot be run unprotected by accident. ``/metrics``
(added by the application) is the exception: public on this private listener, or, when a
`metrics_key` is given, readable with that read-only key (or the API key).

Every answer the API makes itself is JSON encoded with msgspec, errors included:
``{"error": {"code": ..., "message": ..., "field": ...}}``. Validation happens before anything
is published: an invalid request (or one invalid item of a batch) publishes nothing.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from igratech_ws.brokers.base import BrokerError, Publication
from igratech_ws.core import channels
from igratech_ws.core.codec import ProtocolError, split_validation_error
from igratech_ws.core.publishing import (
    ValidatedPublication,
    parse_batch_body,
    parse_publish_body,
    validate_publish,
)

logger = logging.getLogger(__name__)

#: Paths that answer without the API key: probes, the contract, and the human-facing pages.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/asyncapi.yaml"})
#: Path prefixes (whole segments: ``/docs`` and ``/docs/...``) that answer without the API key.
PUBLIC_PREFIXES = ("/docs", "/console")

_JSON_TYPES = frozenset({"application/json"})
_MEMBER_RE = re.compile(r"^Object (?:missing required|contains unknown) field `(?P<name>[^`]+)`")


class GatewayNode(Protocol):
    """What the HTTP API needs from the node it fronts.

    `publish` and `publish_many` append validated publications to their channels (in order) and
    may raise `BrokerError`; `logout_user` closes the user's local connections, tells the other
    nodes, and returns how many local connections it closed; `info` returns JSON-able counters
    (``node``, ``connections``, ``users``, ``channels``, ``broker``); `ready` is true while the
    broker is connected and the node is not draining.
    """

    node_id: str

    async def publish(self, publication: ValidatedPublication) -> Publication: ...

    async def publish_many(self, publications: list[ValidatedPublication]) -> list[Publication]: ...

    async def logout_user(
        self, user_id: str, reason: Literal["forced", "token_expired"] = "forced"
    ) -> int: ...

    def info(self) -> dict[str, Any]: ...

    @property
    def ready(self) -> bool: ...


# --- answers ---------------------------------------------------------------------------------


class ErrorBody(msgspec.Struct):
    code: str
    message: str
    field: str | None = None


class ErrorAnswer(msgspec.Struct):
    error: ErrorBody


class PublishResult(msgspec.Struct):
    channel: str
    offset: int
    epoch: str
    event: str


class BatchResult(msgspec.Struct):
    results: list[PublishResult]


class LogoutResult(msgspec.Struct):
    userId: str
    closedLocal: int


class LogoutRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The optional body of ``POST /api/v1/users/{userId}/logout``."""

    reason: Literal["forced", "token_expired"] = "forced"


_encoder = msgspec.json.Encoder()
_logout_decoder = msgspec.json.Decoder(LogoutRequest)


def json_response(
    value: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """`value` (a msgspec struct or JSON-able value) as an ``application/json`` answer."""
    return web.Response(
        body=_encoder.encode(value),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """The API's one error shape: ``{"error": {"code", "message", "field"}}``."""
    # Messages can quote client input; bound them so an error answer stays small.
    return json_response(ErrorAnswer(ErrorBody(code, message[:500], field)), status, headers)


def _named_field(message: str, field: str | None) -> str | None:
    """Point `field` at the missing or unknown member itself, not at the object holding it.

    msgspec locates "missing required field `x`" at the enclosing object (``data``); a client
    fixing its request wants ``data.x``.
    """
    match = _MEMBER_RE.match(message)
    if match is None:
        return field
    name = match.group("name")
    return f"{field}.{name}" if field else name


def _protocol_error_response(exc: ProtocolError, field_prefix: str = "") -> web.Response:
    field = _named_field(exc.message, exc.field)
    if field_prefix:
        field = f"{field_prefix}.{field}" if field else field_prefix
    message = f"{field_prefix}: {exc.message}" if field_prefix else exc.message
    return error_response(400, exc.code, message, field)


def _result(publication: Publication) -> PublishResult:
    return PublishResult(
        channel=publication.channel,
        offset=publication.offset,
        epoch=publication.epoch,
        event=publication.event,
    )


def _is_public(path: str) -> bool:
    if path in PUBLIC_PATHS:
        return True
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PUBLIC_PREFIXES)


# --- middlewares -----------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _error_middleware(max_body_bytes: int) -> Middleware:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Turn every failure into the JSON error shape; never leak a traceback to a client."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise  # redirects (of pages added by `extra_routes`) pass as they are
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            if exc.status == 404:
                message = f"No route {request.method} {request.path[:200]}"
            elif exc.status == 405:
                allowed = exc.headers.get("Allow", "")
                message = f"Method {request.method[:20]} not allowed here; allowed: {allowed}"
            elif exc.status == 413:
                message = f"Request body exceeds {max_body_bytes} bytes"
            else:
                message = exc.reason
            return error_response(
                exc.status,
                _STATUS_CODES.get(exc.status, f"http_{exc.status}"),
                message,
                headers=headers,
            )
        except BrokerError as exc:
            logger.warning("broker unavailable during %s %s: %s", request.method, request.path, exc)
            return error_response(
                503,
                "broker_unavailable",
                "The broker is unavailable; retry later",
            )
        except Exception:
            logger.exception("unexpected error in %s %s", request.method, request.path)
            return error_response(500, "internal_error", "Internal server error")

    return errors


#: Prometheus's route: public unless a metrics key is configured (then it or the API key).
METRICS_PATH = "/metrics"


def _unauthorized() -> web.Response:
    return error_response(
        401,
        "unauthorized",
        "Missing or wrong API key: send 'Authorization: Bearer <api key>'",
        headers={"WWW-Authenticate": 'Bearer realm="igratech-ws"'},
    )


def _auth_middleware(api_key: str | None, metrics_key: str | None = None) -> Middleware:
    # An empty key would let "Authorization: Bearer " through: treat it as no key at all.
    expected = api_key.encode("utf-8") if api_key else None
    metrics_expected = metrics_key.encode("utf-8") if metrics_key else None

    def _bearer_is(request: web.Request, key: bytes) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        # surrogatepass never fails, so odd header bytes become a mismatch rather than an error.
        given = token.strip().encode("utf-8", "surrogatepass")
        return scheme.lower() == "bearer" and hmac.compare_digest(given, key)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Require ``Authorization: Bearer <api key>`` on every route but the public ones;
        ``/metrics`` is public without a metrics key, else needs it (or the API key)."""
        if _is_public(request.path):
            return await handler(request)
        if request.path == METRICS_PATH:
            if metrics_expected is None or _bearer_is(request, metrics_expected):
                return await handler(request)
            if expected is not None and _bearer_is(request, expected):
                return await handler(request)
            return _unauthorized()
        if expected is None:
            return error_response(
                503,
                "api_key_not_configured",
                "API key not configured: the internal API refuses every protected route",
            )
        if not _bearer_is(request, expected):
            return _unauthorized()
        return await handler(request)

    return auth


# --- handlers --------------------------------------------------------------------------------


class _Api:
    def __init__(
        self,
        node: GatewayNode,
        *,
        asyncapi_yaml: str,
        max_body_bytes: int,
        max_batch_items: int,
    ) -> None:
        self.node = node
        self.asyncapi_yaml = asyncapi_yaml.encode("utf-8")
        self.max_body_bytes = max_body_bytes
        self.max_batch_items = max_batch_items

    async def _json_body(
        self, request: web.Request, *, optional: bool = False
    ) -> bytes | web.Response:
        """The raw body of a JSON request, or the error answer to send instead."""
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            # Refuse before reading: the declared length alone is too much.
            return error_response(
                413, "payload_too_large", f"Request body exceeds {self.max_body_bytes} bytes"
            )
        if optional and not request.body_exists:
            return b""
        content_type = request.content_type
        if content_type not in _JSON_TYPES and not content_type.endswith("+json"):
            return error_response(
                415,
                "unsupported_media_type",
                f"Content-Type must be application/json, not {content_type[:100]!r}",
            )
        # `read` enforces client_max_size (413 via the error middleware) when no length was sent.
        body = await request.read()
        if optional and not body:
            return body
        if not body.strip():
            return error_response(400, "bad_json", "Body is empty; expected a JSON object")
        return body

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok", "node": self.node.node_id})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.node.ready:
            return json_response({"status": "ready"})
        return json_response({"status": "not_ready", "broker": self.node.info().get("broker")}, 503)

    async def asyncapi(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.asyncapi_yaml, content_type="application/yaml", charset="utf-8"
        )

    async def info(self, request: web.Request) -> web.Response:
        return json_response(self.node.info())

    async def publish(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            validated = validate_publish(parse_publish_body(body))
        except ProtocolError as exc:
            return _protocol_error_response(exc)
        publication = await self.node.publish(validated)
        return json_response(_result(publication))

    async def publish_batch(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            items = parse_batch_body(body, self.max_batch_items)
        except ProtocolError as exc:
            return _protocol_error_response(exc)
        # Validate every item before publishing any: a batch is all or nothing.
        validated: list[ValidatedPublication] = []
        for index, item in enumerate(items):
            try:
                validated.append(validate_publish(item))
            except ProtocolError as exc:
                return _protocol_error_response(exc, f"items[{index}]")
        publications = await self.node.publish_many(validated)
        return json_response(BatchResult([_result(p) for p in publications]))

    async def logout(self, request: web.Request) -> web.Response:
        user_id = request.match_info["userId"]
        if not channels.is_valid_id(user_id):
            return error_response(
                400,
                "bad_message",
                "userId must be 1-64 of A-Z a-z 0-9 _ . - starting alphanumeric",
                "userId",
            )
        body = await self._json_body(request, optional=True)
        if isinstance(body, web.Response):
            return body
        reason: Literal["forced", "token_expired"] = "forced"
        if body:
            try:
                reason = _logout_decoder.decode(body).reason
            except msgspec.ValidationError as exc:
                message, field = split_validation_error(exc)
                return error_response(
                    400,
                    "bad_message",
                    message + (f" at {field}" if field else ""),
                    _named_field(message, field),
                )
            except msgspec.DecodeError as exc:
                return error_response(400, "bad_json", f"Body is not valid JSON: {exc}")
        closed = await self.node.logout_user(user_id, reason)
        logger.info("forced logout of user %s (%s): %d local connections", user_id, reason, closed)
        return json_response(LogoutResult(userId=user_id, closedLocal=closed))


def build_api_app(
    node: GatewayNode,
    *,
    api_key: str | None,
    asyncapi_yaml: str,
    metrics_key: str | None = None,
    max_body_bytes: int = 1_048_576,
    max_batch_items: int = 1000,
    extra_routes: Callable[[web.Application], None] | None = None,
) -> web.Application:
    """Build the internal API's application; the caller runs it (``web.AppRunner`` + a site).

    `api_key` None (or empty) makes every protected route answer 503: configure a key to use the
    API. `extra_routes` is called with the application before it is returned, to add pages
    (``/docs``, ``/console`` are public; anything else it adds needs the key) — it must not add
    middlewares that answer errors in another shape. Request bodies are bounded by
    `max_body_bytes` (413 beyond) and batches by `max_batch_items` (400 beyond).
    """
    if max_body_bytes <= 0 or max_batch_items <= 0:
        raise ValueError("max_body_bytes and max_batch_items must be positive")
    api = _Api(
        node,
        asyncapi_yaml=asyncapi_yaml,
        max_body_bytes=max_body_bytes,
        max_batch_items=max_batch_items,
    )
    app = web.Application(
        client_max_size=max_body_bytes,
        middlewares=[_error_middleware(max_body_bytes), _auth_middleware(api_key, metrics_key)],
    )
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/asyncapi.yaml", api.asyncapi)
    app.router.add_get("/api/v1/info", api.info)
    app.router.add_post("/api/v1/publish", api.publish)
    app.router.add_post("/api/v1/publish/batch", api.publish_batch)
    app.router.add_post("/api/v1/users/{userId}/logout", api.logout)
    if extra_routes is not None:
        extra_routes(app)
    return app
