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

A publish may carry an ``idempotencyKey``: a repeat with the same key to the same channel within
the broker's window publishes nothing and answers the first publication's position with
``"duplicate": true``. The broker keeps the window, so the repeat may reach any node.

The answers of the publish routes are computed by `PublishRoutes` as plain `Answer` values, so
that the aiohttp handlers here and the HTTP/1.1 fast path of `http_fastpath` (which serves the
publish routes without aiohttp's per-request machinery) answer byte for byte alike.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from igratech_ws.brokers.base import BrokerError, PublishResult
from igratech_ws.core import channels
from igratech_ws.core.codec import ProtocolError, split_validation_error
from igratech_ws.core.publishing import (
    ValidatedPublication,
    decode_valid_batch,
    decode_valid_publish,
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

    `publish` appends a validated publication to its channel and may raise `BrokerError`; with an
    `idempotency_key` already seen on that channel within the broker's window it appends nothing
    and returns the first publication as a duplicate. `publish_many` does the same for each
    (publication, key) pair as if one after the other, but hands them to the broker together;
    it raises `BrokerError` once every item has settled. `logout_user` closes the user's local
    connections, tells the other nodes, and returns how many local connections it closed; `info`
    returns JSON-able counters (``node``, ``connections``, ``users``, ``channels``, ``broker``);
    `ready` is true while the broker is connected and the node is not draining.

    A node may also have ``publishes_at_once``: true when `publish` finishes without waiting (the
    memory broker), so that the fast path may run it outside a task (absent: false).
    """

    node_id: str

    async def publish(
        self, publication: ValidatedPublication, *, idempotency_key: str | None = None
    ) -> PublishResult: ...

    async def publish_many(
        self, items: Sequence[tuple[ValidatedPublication, str | None]]
    ) -> list[PublishResult]: ...

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


class PublishAnswer(msgspec.Struct):
    """The answer to one publish: where it went; `duplicate` when the idempotency key was seen."""

    channel: str
    offset: int
    epoch: str
    event: str
    duplicate: bool


class BatchAnswer(msgspec.Struct):
    results: list[PublishAnswer]


class LogoutResult(msgspec.Struct):
    userId: str
    closedLocal: int


class LogoutRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The optional body of ``POST /api/v1/users/{userId}/logout``."""

    reason: Literal["forced", "token_expired"] = "forced"


class Answer(msgspec.Struct, frozen=True):
    """An API answer before it meets a transport: status, JSON body, extra headers.

    (A struct rather than a named tuple: one is built per request, and a named tuple's
    constructor is a Python function.)
    """

    status: int
    body: bytes
    headers: Mapping[str, str] | None = None


_encoder = msgspec.json.Encoder()
_logout_decoder = msgspec.json.Decoder(LogoutRequest)


def json_answer(value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Answer:
    """`value` (a msgspec struct or JSON-able value) encoded as an answer."""
    return Answer(status, _encoder.encode(value), headers)


def error_answer(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """The API's one error shape: ``{"error": {"code", "message", "field"}}``."""
    # Messages can quote client input; bound them so an error answer stays small.
    return json_answer(ErrorAnswer(ErrorBody(code, message[:500], field)), status, headers)


def to_response(answer: Answer) -> web.Response:
    """`answer` as an aiohttp ``application/json`` response."""
    return web.Response(
        body=answer.body,
        status=answer.status,
        content_type="application/json",
        headers=answer.headers,
    )


def json_response(
    value: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """`value` (a msgspec struct or JSON-able value) as an ``application/json`` response."""
    return to_response(json_answer(value, status, headers))


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """The API's one error shape as an aiohttp response (see `error_answer`)."""
    return to_response(error_answer(status, code, message, field, headers))


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


def _protocol_error_answer(exc: ProtocolError, field_prefix: str = "") -> Answer:
    field = _named_field(exc.message, exc.field)
    if field_prefix:
        field = f"{field_prefix}.{field}" if field else field_prefix
    message = f"{field_prefix}: {exc.message}" if field_prefix else exc.message
    return error_answer(400, exc.code, message, field)


def _result(outcome: PublishResult) -> PublishAnswer:
    publication = outcome.publication
    # Positional: this runs once per published item of a batch.
    return PublishAnswer(
        publication.channel,
        publication.offset,
        publication.epoch,
        publication.event,
        outcome.duplicate,
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


def broker_unavailable_answer(method: str, path: str, exc: BrokerError) -> Answer:
    """The answer to a request the broker could not carry out (logged here)."""
    logger.warning("broker unavailable during %s %s: %s", method, path[:200], exc)
    return error_answer(503, "broker_unavailable", "The broker is unavailable; retry later")


def internal_error_answer(method: str, path: str) -> Answer:
    """The answer to a bug: the traceback goes to the log (call from an ``except`` block)."""
    logger.exception("unexpected error in %s %s", method, path[:200])
    return error_answer(500, "internal_error", "Internal server error")


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
            return to_response(broker_unavailable_answer(request.method, request.path, exc))
        except Exception:
            return to_response(internal_error_answer(request.method, request.path))

    return errors


#: Prometheus's route: public unless a metrics key is configured (then it or the API key).
METRICS_PATH = "/metrics"

_NO_KEY = error_answer(
    503,
    "api_key_not_configured",
    "API key not configured: the internal API refuses every protected route",
)
_UNAUTHORIZED = error_answer(
    401,
    "unauthorized",
    "Missing or wrong API key: send 'Authorization: Bearer <api key>'",
    headers={"WWW-Authenticate": 'Bearer realm="igratech-ws"'},
)


def _bearer_is(authorization: bytes, key: bytes) -> bool:
    """Whether `authorization` (a raw header value) is ``Bearer <key>``, compared in constant
    time; the scheme is case-insensitive."""
    scheme, _, token = authorization.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


def check_api_key(expected: bytes | None, authorization: bytes) -> Answer | None:
    """None when `authorization` (the raw header value) is ``Bearer <expected>``, else the answer.

    `expected` None (no key configured) refuses everything with 503. The key is compared in
    constant time; the scheme is case-insensitive.
    """
    if expected is None:
        return _NO_KEY
    if not _bearer_is(authorization, expected):
        return _UNAUTHORIZED
    return None


def _auth_middleware(expected: bytes | None, metrics_expected: bytes | None) -> Middleware:
    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Require ``Authorization: Bearer <api key>`` on every route but the public ones;
        ``/metrics`` is public without a metrics key, else needs it (or the API key)."""
        if _is_public(request.path):
            return await handler(request)
        # surrogatepass never fails, so odd header bytes become a mismatch rather than an error.
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogatepass")
        if request.path == METRICS_PATH:
            if (
                metrics_expected is None
                or _bearer_is(given, metrics_expected)
                or (expected is not None and _bearer_is(given, expected))
            ):
                return await handler(request)
            return to_response(_UNAUTHORIZED)
        refused = check_api_key(expected, given)
        if refused is not None:
            return to_response(refused)
        return await handler(request)

    return auth


def is_json_type(content_type: str) -> bool:
    """Whether a media type (lowercase, without parameters) is JSON."""
    return content_type in _JSON_TYPES or content_type.endswith("+json")


def unsupported_media_answer(content_type: str) -> Answer:
    return error_answer(
        415,
        "unsupported_media_type",
        f"Content-Type must be application/json, not {content_type[:100]!r}",
    )


# --- the publish routes ----------------------------------------------------------------------


class PublishRoutes:
    """The two publish routes, transport-free: a JSON body in, an `Answer` out.

    Callers (the aiohttp handlers below and `http_fastpath`) have checked the API key
    (`check_api_key` with `api_key`), the content type, and `max_body_bytes`; they turn
    `BrokerError` into `broker_unavailable_answer` and anything else into `internal_error_answer`.
    """

    def __init__(
        self,
        node: GatewayNode,
        *,
        api_key: bytes | None,
        max_body_bytes: int,
        max_batch_items: int,
    ) -> None:
        self.node = node
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.max_batch_items = max_batch_items
        #: Whether the node's `publish` finishes without waiting (see `GatewayNode`).
        self.publishes_at_once = bool(getattr(node, "publishes_at_once", False))

    async def publish(self, body: bytes) -> Answer:
        """``POST /api/v1/publish``: validate, then publish (at most once per idempotency key)."""
        decoded = decode_valid_publish(body)
        if decoded is None:
            # The two-pass reading: what is wrong (or, rarely, valid after all: see
            # `decode_valid_publish`).
            if not body.strip():
                return _EMPTY_BODY
            try:
                request = parse_publish_body(body)
                decoded = (validate_publish(request), request.idempotencyKey)
            except ProtocolError as exc:
                return _protocol_error_answer(exc)
        validated, key = decoded
        outcome = await self.node.publish(validated, idempotency_key=key)
        return json_answer(_result(outcome))

    async def publish_batch(self, body: bytes) -> Answer:
        """``POST /api/v1/publish/batch``: validate every item, then publish them in order."""
        if not body.strip():
            return _EMPTY_BODY
        # Validate every item before publishing any: a batch is all or nothing.
        validated = decode_valid_batch(body, self.max_batch_items)
        if validated is None:
            # The two-pass reading: what is wrong (or, rarely, valid after all: see
            # `decode_valid_publish`).
            read = self._read_batch_in_two_passes(body)
            if isinstance(read, Answer):
                return read
            validated = read
        # Together, in order: each channel's offsets follow the list order, a key repeated
        # inside the batch is a duplicate of its first item, and the broker gets the whole
        # batch at once, so its deliveries reach each follower together (a few writes, not one
        # per item). A broker failure answers 503 once every item has settled.
        outcomes = await self.node.publish_many(validated)
        return Answer(200, _encoder.encode(BatchAnswer([_result(o) for o in outcomes])))

    def _read_batch_in_two_passes(
        self, body: bytes
    ) -> Answer | list[tuple[ValidatedPublication, str | None]]:
        """A batch that `decode_valid_batch` refused, read again in two passes: the error answer
        naming the first offending item and field, or the items after all (a JSON object with a
        repeated member is read by its last value here, and may fail the one pass)."""
        try:
            items = parse_batch_body(body, self.max_batch_items)
        except ProtocolError as exc:
            return _protocol_error_answer(exc)
        validated = []
        for index, item in enumerate(items):
            try:
                validated.append((validate_publish(item), item.idempotencyKey))
            except ProtocolError as exc:
                return _protocol_error_answer(exc, f"items[{index}]")
        return validated


_EMPTY_BODY = error_answer(400, "bad_json", "Body is empty; expected a JSON object")
#: Where `build_api_app` keeps its `PublishRoutes` in the application, for `http_fastpath`.
PUBLISH_ROUTES_KEY = web.AppKey("publish_routes", PublishRoutes)


# --- handlers --------------------------------------------------------------------------------


class _Api:
    def __init__(self, routes: PublishRoutes, *, asyncapi_yaml: str) -> None:
        self.routes = routes
        self.node = routes.node
        self.asyncapi_yaml = asyncapi_yaml.encode("utf-8")
        self.max_body_bytes = routes.max_body_bytes

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
        if not is_json_type(request.content_type):
            return to_response(unsupported_media_answer(request.content_type))
        # `read` enforces client_max_size (413 via the error middleware) when no length was sent.
        body = await request.read()
        if optional and not body:
            return body
        if not body.strip():
            return to_response(_EMPTY_BODY)
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
        return to_response(await self.routes.publish(body))

    async def publish_batch(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        return to_response(await self.routes.publish_batch(body))

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
    `max_body_bytes` (413 beyond) and batches by `max_batch_items` (400 beyond). Serve it with
    `http_fastpath.PublishFastSite` to take the publish routes past aiohttp's request machinery.
    """
    if max_body_bytes <= 0 or max_batch_items <= 0:
        raise ValueError("max_body_bytes and max_batch_items must be positive")
    # An empty key would let "Authorization: Bearer " through: treat it as no key at all.
    expected = api_key.encode("utf-8") if api_key else None
    routes = PublishRoutes(
        node, api_key=expected, max_body_bytes=max_body_bytes, max_batch_items=max_batch_items
    )
    api = _Api(routes, asyncapi_yaml=asyncapi_yaml)
    app = web.Application(
        client_max_size=max_body_bytes,
        middlewares=[
            _error_middleware(max_body_bytes),
            _auth_middleware(expected, metrics_key.encode("utf-8") if metrics_key else None),
        ],
    )
    app[PUBLISH_ROUTES_KEY] = routes
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
