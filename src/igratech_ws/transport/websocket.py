"""The public WebSocket listener on picows: the handshake, then frames in and out of the node.

The handshake (RFC 6455 section 4.2) is where a connection is refused: 404 for another path,
401 for a bad token (or none, when anonymous access is off), 400 for an invalid `settings`
parameter, 503 while draining. After the upgrade, each text frame goes to the node; binary frames
are answered with an `error`. Outgoing frames are written by the hub, coalesced per loop tick,
straight to the socket; a connection whose socket buffer passes the bound is a slow consumer and
is closed with 1013.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections import deque
from typing import Any
from urllib.parse import parse_qs, urlsplit

import picows
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)

from igratech_ws.auth import ANONYMOUS, AuthError, Principal, TokenVerifier
from igratech_ws.core.close_codes import CloseCode, close_reason
from igratech_ws.core.codec import ProtocolError, decode_payload, encode
from igratech_ws.core.messages import SettingsRequest
from igratech_ws.core.session import Session, SettingsPlan
from igratech_ws.hub import Outbox
from igratech_ws.node import Node

log = logging.getLogger("igratech_ws.websocket")

PATH = "/wspublic"
#: Initial read buffer per connection (picows's minimum is 2 KB).
READ_BUFFER_BYTES = 2048


class ClientConnection(WSListener):
    """One client: the picows listener is the connection object (one object per client)."""

    __slots__ = (
        "_fragments",
        "_node",
        "_plan",
        "_plan_answer",
        "address",
        "connected_at",
        "expires_at",
        "last_seen",
        "pending",
        "rate_at",
        "rate_strikes",
        "rate_tokens",
        "session",
        "settings_queue",
        "transport",
    )

    def __init__(
        self, node: Node, session: Session, principal: Principal, plan: SettingsPlan, answer: bool
    ) -> None:
        self._node = node
        self.session = session
        self.expires_at = principal.expires_at
        self.connected_at = time.time()
        self.last_seen = self.rate_at = time.monotonic()
        self.rate_tokens = node.config.message_burst
        self.rate_strikes = 0
        self.address = ""
        self.pending: Outbox | None = None
        self.settings_queue: deque[tuple[SettingsPlan, bool]] | None = None
        self.transport: WSTransport | None = None
        self._fragments: bytearray | None = None
        self._plan = plan
        self._plan_answer = answer

    # --- picows callbacks ----------------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        peer = transport.underlying_transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else ""
        self._node.accept(self, self._plan, self._plan_answer)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.last_seen = time.monotonic()
        msg_type = frame.msg_type
        if msg_type is WSMsgType.TEXT:
            if frame.fin:
                self._node.on_text(self, frame.get_payload_as_bytes())
            else:
                self._fragments = bytearray(frame.get_payload_as_memoryview())
        elif msg_type is WSMsgType.CONTINUATION:
            self._continue(frame)
        elif msg_type is WSMsgType.CLOSE:
            # Answer the client's close handshake (section 5.5.1) and let the socket go.
            if self.session.begin_close():
                code = frame.get_close_code()
                transport.send_close(code if code is not WSCloseCode.NO_INFO else WSCloseCode.OK)
            transport.disconnect()
        elif msg_type is WSMsgType.BINARY:
            self._node.send_error(
                self, ProtocolError("bad_message", "Binary frames are not accepted; send JSON text")
            )

    def _continue(self, frame: WSFrame) -> None:
        fragments = self._fragments
        if fragments is None:
            self.close_with(CloseCode.POLICY_VIOLATION)
            return
        fragments += frame.get_payload_as_memoryview()
        if len(fragments) > self._node.config.max_frame_bytes:
            self._fragments = None
            self.close_with(CloseCode.MESSAGE_TOO_BIG)
        elif frame.fin:
            self._fragments = None
            self._node.on_text(self, bytes(fragments))

    def resume_writing(self) -> None:
        # picows: the socket's buffer drained below its low watermark after a pause.
        self._node.on_writable(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        handshake = transport.close_handshake
        code: int | None = None
        if handshake is not None:
            info = handshake.sent or handshake.recv
            if info is not None:
                code = int(info.code.value)
        self._node.on_closed(self, code)

    # --- what the hub and node call ------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        transport = self.transport
        return (
            transport is not None
            and not transport.is_close_frame_sent
            and not (transport.is_disconnected)
        )

    def backlog_bytes(self) -> int:
        """Bytes in the socket's write buffer (the hub counts them against the budget)."""
        transport = self.transport
        if transport is None:
            return 0
        return int(transport.underlying_transport.get_write_buffer_size())

    def write_wire(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        raw = transport.underlying_transport
        raw.write(data)
        if raw.get_write_buffer_size() > self._node.config.max_write_buffer_bytes:
            # A slow consumer: it would hold memory without bound. A close frame would queue
            # behind what it does not read, so send it and drop the socket at once.
            self.pending = None
            if self.session.begin_close():
                transport.send_close(WSCloseCode(int(CloseCode.TRY_AGAIN_LATER)), b"slow consumer")
            self._node.on_closed(self, int(CloseCode.TRY_AGAIN_LATER))
            transport.disconnect(False)

    def close_with(self, code: CloseCode) -> None:
        transport = self.transport
        if transport is None or not self.session.begin_close():
            return
        self._node.hub.flush_one(self)
        if not transport.is_disconnected:
            transport.send_close(WSCloseCode(int(code)), close_reason(code).encode())
            transport.disconnect()
        self._node.on_closed(self, int(code))


class Handshake:
    """Decides, for each upgrade request, whether and as whom a client connects."""

    def __init__(self, node: Node, verifier: TokenVerifier) -> None:
        self.node = node
        self.verifier = verifier
        self.allowed_origins = node.config.origin_allow_list

    def _refuse(self, status: int, code: str, message: str, field: str | None = None) -> Any:
        self.node.count_refusal(code)
        return _refuse(status, code, message, field)

    def __call__(self, request: WSUpgradeRequest) -> Any:
        try:
            return self._decide(request)
        except Exception:  # a bug must refuse one handshake, not take the listener down
            log.exception("handshake failed")
            return _refuse(500, "internal_error", "The server could not accept the connection")

    def _decide(self, request: WSUpgradeRequest) -> Any:
        target = urlsplit(request.path.decode("latin-1"))
        if target.path != PATH:
            return self._refuse(404, "not_found", f"The WebSocket endpoint is {PATH}")
        if self.node.draining:
            return self._refuse(503, "draining", "This node is restarting; connect again shortly")
        if self.node.at_capacity():
            return self._refuse(503, "at_capacity", "This node is full; connect to another one")
        allowed_origins = self.allowed_origins
        if allowed_origins:
            origin = (request.headers.get("Origin") or "").rstrip("/").lower()
            if origin and origin not in allowed_origins:
                return self._refuse(403, "origin_not_allowed", "This origin may not connect")
        query = parse_qs(target.query, max_num_fields=16)
        token = _first(query.get("token")) or _bearer(request.headers.get("Authorization"))
        principal = ANONYMOUS
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
            uuid.uuid4().hex, principal.user_id, max_games=self.node.config.max_games_per_connection
        )
        try:
            request_settings = (
                decode_payload("settings", raw_settings.encode(), bad_code="invalid_settings")
                if raw_settings
                else SettingsRequest()
            )
            plan = session.plan_settings(request_settings)
        except ProtocolError as exc:
            field = exc.field.replace("data.", "settings.", 1) if exc.field else "settings"
            status = 403 if exc.code == "forbidden_channel" else 400
            return self._refuse(status, exc.code, exc.message, field)
        return ClientConnection(self.node, session, principal, plan, bool(raw_settings))


def _first(values: list[str] | None) -> str | None:
    return values[0] if values else None


def _bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


def _refuse(status: int, code: str, message: str, field: str | None = None) -> Any:
    error: dict[str, str] = {"code": code, "message": message}
    if field:
        error["field"] = field
    response = WSUpgradeResponse.create_error_response(
        status, encode({"error": error}), {"Content-Type": "application/json"}
    )
    return WSUpgradeResponseWithListener(response, None)


async def start_listener(
    node: Node, verifier: TokenVerifier, host: str, port: int, *, reuse_port: bool = False
) -> asyncio.Server:
    """Listen for WebSocket clients on (`host`, `port`); the caller closes the returned server."""
    config = node.config
    return await picows.ws_create_server(
        Handshake(node, verifier),
        host,
        port,
        max_frame_size=config.max_frame_bytes,
        websocket_handshake_timeout=5,
        enable_auto_pong=True,
        logger_name="ws",
        reuse_port=reuse_port or None,
        # asyncio's default backlog of 100 drops handshakes when many clients reconnect at once.
        backlog=socket.SOMAXCONN,
        # Clients send small frames; picows grows the buffer when one does not fit. The default
        # 16 KB per connection would be most of an idle connection's memory.
        read_buffer_init_size=READ_BUFFER_BYTES,
        # aiofastnet (a picows dependency) saves 10-35% CPU per delivery but holds ~5 KB more
        # per connection than uvloop's own transports: a setting, off by default.
        use_aiofastnet=config.use_aiofastnet,
    )


__all__ = ["PATH", "ClientConnection", "Handshake", "start_listener"]
