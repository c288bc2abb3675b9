"""The public WebSocket listener (/wspublic): who may connect, and the node behind each socket.

`Handshake` decides every upgrade request: 404 for another path, 401 for a bad token (or none,
when anonymous access is off), 400 for a malformed target or query or an invalid `settings`
parameter, 403 for a forbidden channel or origin, 503 while draining or full; never a 500 for
anything a client sends. `ClientConnection` is the node's connection (node.Connection,
hub.Subscriber) on top of `wsconnection.WebSocketConnection`, which owns the frames: each valid
text message goes to the node, a binary one gets an `error`, a frame over the budget gets
`error rate_limited`; the hub writes the node's frames, coalesced per loop tick.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import deque
from urllib.parse import parse_qs, urlsplit

from picows import WSUpgradeRequest, WSUpgradeResponse

from igratech_ws.auth import ANONYMOUS, AuthError, Principal, TokenVerifier
from igratech_ws.core import wsframes
from igratech_ws.core.codec import ProtocolError, decode_payload
from igratech_ws.core.messages import SettingsRequest
from igratech_ws.core.session import Session, SettingsPlan
from igratech_ws.hub import Outbox
from igratech_ws.node import Node
from igratech_ws.transport.wsconnection import WebSocketConnection, error_response, serve

PATH = "/wspublic"
#: Query parameters accepted in the upgrade request (`token`, `settings`, and room to spare).
MAX_QUERY_FIELDS = 16

_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: A query `parse_qs` would read as it is written: no percent-escape, no `+`, no fragment, nothing
#: `urlsplit` strips or that could name a host. Such a query is split without them. Checked by
#: deleting these bytes (`bytes.translate`), which costs about half a regular expression's
#: character class on a query holding a token, and much less than one that fails at a `%`.
_PLAIN_QUERY_BYTES = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~!$'()*,;:@/?=&-"
)
_PREFIX = PATH.encode() + b"?"


def plain_query(raw_target: bytes) -> dict[str, list[str]] | None:
    """The query of `raw_target` as `parse_qs` reads it, when the target is ``/wspublic`` with a
    plain query of at most `MAX_QUERY_FIELDS` fields; otherwise None (the caller parses it in
    full). The handshake of nearly every client (a token and a settings JSON, both URL-safe once
    encoded) takes this path."""
    if raw_target == _PREFIX[:-1]:
        return {}
    if not raw_target.startswith(_PREFIX):
        return None
    raw_query = raw_target[len(_PREFIX) :]
    if raw_query.translate(None, _PLAIN_QUERY_BYTES):
        return None
    fields = raw_query.decode("ascii").split("&")
    if len(fields) > MAX_QUERY_FIELDS:
        return None
    query: dict[str, list[str]] = {}
    for field in fields:
        name, _, value = field.partition("=")
        if value:  # parse_qs drops a field without a value (`a`, `a=`), and empty fields
            query.setdefault(name, []).append(value)
    return query


class _SessionIds:
    """Session ids: 32 hex digits (128 random bits) each, from one `os.urandom` per 256."""

    __slots__ = ("_pool",)

    def __init__(self) -> None:
        self._pool: list[str] = []

    def __call__(self) -> str:
        if not self._pool:
            block = os.urandom(16 * 256).hex()
            self._pool = [block[i : i + 32] for i in range(0, len(block), 32)]
        return self._pool.pop()


new_session_id = _SessionIds()


class Admission:
    """A client `Handshake` accepted: as whom, and the first settings plan to carry out."""

    __slots__ = ("answer", "expires_at", "plan", "session")

    def __init__(
        self, session: Session, expires_at: float | None, plan: SettingsPlan, answer: bool
    ) -> None:
        self.session = session
        self.expires_at = expires_at
        self.plan = plan
        self.answer = answer


class ClientConnection(WebSocketConnection):
    """A /wspublic client: the node's connection (node.Connection, hub.Subscriber)."""

    __slots__ = (
        "_admission",
        "_handshake",
        "_node",
        "connected_at",
        "expires_at",
        "pending",
        "session",
        "settings_queue",
    )

    def __init__(self, node: Node, handshake: Handshake) -> None:
        super().__init__(node.config)
        self._node = node
        self._handshake = handshake
        self._admission: Admission | None = None
        self.pending: Outbox | None = None
        self.settings_queue: deque[tuple[SettingsPlan, bool]] | None = None
        self.expires_at: float | None = None
        self.connected_at = time.time()

    session: Session

    def _decide(self, request: WSUpgradeRequest) -> WSUpgradeResponse | None:
        decision = self._handshake(request)
        if isinstance(decision, Admission):
            self._admission = decision
            self.session = decision.session
            self.expires_at = decision.expires_at
            return None
        return decision

    def _refusing(self, code: str) -> None:
        self._node.count_refusal(code)

    def _opened(self) -> None:
        admission, self._admission = self._admission, None
        assert admission is not None
        self.connected_at = time.time()
        self._node.accept(self, admission.plan, admission.answer)

    def _text(self, payload: bytes) -> None:
        self._node.on_text(self, payload)

    def _binary(self, payload: bytes) -> None:
        self._node.send_error(
            self, ProtocolError("bad_message", "Binary frames are not accepted; send JSON text")
        )

    def _refused(self, opcode: int) -> None:
        node = self._node
        node.rate_limited += 1
        if opcode <= wsframes.OP_BINARY:
            config = node.config
            node.send_error(
                self,
                ProtocolError(
                    "rate_limited",
                    f"Too many messages: at most {config.max_message_rate:g} per second "
                    f"(bursts of {config.message_burst:g}); this one was dropped, and going on "
                    "closes the connection (1008)",
                ),
            )
        # A ping over the budget is not answered: answering is what a flood wants.

    def _send(self, wire: bytes) -> None:
        self._node.hub.send_wire(self, wire)

    def _flush(self) -> None:
        self._node.hub.flush_one(self)

    def _queued(self) -> bool:
        return bool(self.pending)  # the hub's flush is scheduled (Hub.send_wire)

    def _ended(self, code: int | None) -> None:
        self.pending = None
        self.session.begin_close()
        self._node.on_closed(self, code)

    def _drained(self) -> None:
        self._node.on_writable(self)


class Handshake:
    """Decides, for each upgrade request, whether and as whom a client connects.

    Every refusal is an HTTP 4xx or 503 with a JSON body ``{"error": {"code", "message",
    "field"?}}``; nothing a client sends in the request can make it a 500.
    """

    def __init__(self, node: Node, verifier: TokenVerifier) -> None:
        self.node = node
        self.verifier = verifier
        self.allowed_origins = node.config.origin_allow_list

    def _refuse(
        self, status: int, code: str, message: str, field: str | None = None
    ) -> WSUpgradeResponse:
        self.node.count_refusal(code)
        return error_response(status, code, message, field)

    def __call__(self, request: WSUpgradeRequest) -> Admission | WSUpgradeResponse:
        raw_target = request.path
        query = plain_query(raw_target)
        if query is not None:
            return self._admit(request, query)
        if not raw_target.isascii():
            return self._refuse(
                400, "bad_request", "The request target must be ASCII (percent-encoded)", "target"
            )
        try:
            target = urlsplit(raw_target.decode("ascii"))
        except ValueError:
            return self._refuse(400, "bad_request", "The request target is not a URI", "target")
        if target.path != PATH:
            return self._refuse(404, "not_found", f"The WebSocket endpoint is {PATH}")
        refusal = self._may_connect(request)
        if refusal is not None:
            return refusal
        if _BAD_PERCENT.search(target.query):
            return self._refuse(
                400, "bad_request", "The query has a `%` not followed by two hex digits", "query"
            )
        try:
            query = parse_qs(target.query, max_num_fields=MAX_QUERY_FIELDS, errors="strict")
        except UnicodeDecodeError:
            return self._refuse(
                400, "bad_request", "The query is not UTF-8 once percent-decoded", "query"
            )
        except ValueError:
            return self._refuse(
                400, "bad_request", f"At most {MAX_QUERY_FIELDS} query parameters", "query"
            )
        return self._admit(request, query, checked=True)

    def _may_connect(self, request: WSUpgradeRequest) -> WSUpgradeResponse | None:
        """The refusals that do not depend on the query, in the order they are checked."""
        if self.node.draining:
            return self._refuse(503, "draining", "This node is restarting; connect again shortly")
        if self.node.at_capacity():
            return self._refuse(503, "at_capacity", "This node is full; connect to another one")
        allowed_origins = self.allowed_origins
        if allowed_origins:
            origin = (request.headers.get("Origin") or "").rstrip("/").lower()
            if origin and origin not in allowed_origins:
                return self._refuse(403, "origin_not_allowed", "This origin may not connect")
        return None

    def _admit(
        self, request: WSUpgradeRequest, query: dict[str, list[str]], *, checked: bool = False
    ) -> Admission | WSUpgradeResponse:
        """Decide on a parsed query; `checked` says `_may_connect` was already applied."""
        if not checked:
            refusal = self._may_connect(request)
            if refusal is not None:
                return refusal
        token = _first(query.get("token")) or _bearer(request.headers.get("Authorization"))
        principal: Principal = ANONYMOUS
        if token:
            try:
                principal = self.verifier.verify(token)
            except AuthError as exc:
                return self._refuse(401, "unauthorized", str(exc))
        elif not self.node.config.allow_anonymous:
            return self._refuse(
                401,
                "unauthorized",
                "A token is required (query `token` or `Authorization: Bearer`)",
            )
        raw_settings = _first(query.get("settings"))
        session = Session(
            new_session_id(), principal.user_id, max_games=self.node.config.max_games_per_connection
        )
        try:
            request_settings = (
                decode_payload("settings", raw_settings.encode(), bad_code="invalid_settings")
                if raw_settings
                else SettingsRequest()
            )
            plan = session.plan_settings(request_settings)
        except ProtocolError as exc:
            path = exc.field or "data"
            field = "settings" + path[4:] if path.startswith("data") else "settings"
            status = 403 if exc.code == "forbidden_channel" else 400
            return self._refuse(status, exc.code, exc.message, field)
        return Admission(session, principal.expires_at, plan, bool(raw_settings))


def _first(values: list[str] | None) -> str | None:
    return values[0] if values else None


def _bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


async def start_listener(
    node: Node, verifier: TokenVerifier, host: str, port: int, *, reuse_port: bool = False
) -> asyncio.Server:
    """Listen for WebSocket clients on (`host`, `port`); the caller closes the returned server."""
    handshake = Handshake(node, verifier)
    return await serve(
        lambda: ClientConnection(node, handshake),
        node.config,
        host,
        port,
        reuse_port=reuse_port,
    )


__all__ = [
    "MAX_QUERY_FIELDS",
    "PATH",
    "Admission",
    "ClientConnection",
    "Handshake",
    "start_listener",
]
