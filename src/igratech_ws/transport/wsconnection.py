"""One WebSocket connection: its HTTP upgrade, frames in, frames out, closing.

Each accepted socket gets one `WebSocketConnection`, a plain asyncio protocol, from the first byte:

0. **Who is it.** `peer` is the TCP peer's address. With `proxy_protocol` on, a connection from
   a trusted proxy (`trusted_proxies`) must start with a PROXY protocol v1/v2 header
   (`core.client_address`): it is read and stripped here, before the request is read, and its
   source address is kept (`proxy_source`). A connection that should carry one and does not, or
   carries a malformed one, is answered 400 `proxy_header_missing` / `proxy_header_invalid`; one
   that carries a PROXY header where none is read (the setting is off, or the peer is not
   trusted) is answered 400 `proxy_header_refused`. At the upgrade request, the PROXY source and
   a trusted peer's `X-Forwarded-For` give the client (`client`, shown in logs) and the key of
   the per-address limit (`address`, None when a trusted proxy named nobody). The handshake
   deadline (`HANDSHAKE_TIMEOUT`) covers the PROXY header too.
1. **Upgrade.** The bytes of the HTTP request, up to the blank line that ends it, are parsed
   here with picows's rules (`parse_request`: a GET request line in HTTP/1.1, at most 128 header
   fields, token names, no folding, no body); the application's `_decide` answers it, then the
   WebSocket headers are checked as picows checks them (Upgrade, Connection, version 13, a
   16-byte key) and the 101 is written. What is malformed is answered 400 `bad_request` (field
   `request`). A request over `MAX_REQUEST_BYTES` without its blank line is answered 431. Frames
   a client pipelined behind its request are parsed like every later byte. Nothing of picows is
   built per connection (its protocol object, logger, timer, future and socket options cost more
   than the rest of a handshake together; uvloop and aiofastnet set TCP_NODELAY themselves), and
   an idle connection holds no read buffer at all (uvloop and aiofastnet read into one buffer per
   read for plain protocols).
2. **Frames in.** Every byte goes through one path, `core.wsframes.Inbound`: RFC 6455 framing,
   unmasking, message assembly, UTF-8 (1007), the size bound (1009, from the header), and the
   per-connection budget (every frame takes a token; 1008 after `ratelimit.STRIKES` refused in
   a row). Every complete frame counts as activity (`last_seen`). Pings are answered through
   the application's outbound path (`_send`), so pongs count against `max_write_buffer_bytes`;
   the pongs of one read are flushed at its end, so the buffer's pause acts before the next read.
3. **Frames out.** `write_wire` writes to the socket; past `max_write_buffer_bytes` buffered the
   client is a slow consumer and the socket is aborted at once (1013). Above a quarter of the
   bound (`pause_writing`) the client is no longer read (TCP backpressure) until the socket
   drains below an eighth (`resume_writing`, which tells the application it may write again);
   a socket paused for `idle_timeout / 2` is a slow consumer too.
4. **Closing** (section 7), one way for every cause: `close_with(code)` sends the close frame
   after what is queued, then waits (at most `CLOSE_TIMEOUT`) for the client's close before
   closing TCP; `fail(code)` does the same for a protocol violation but stops parsing and
   half-closes at once (section 7.1.7); a client's close is answered with its own code (1000 for
   an empty body, section 5.5.1) and TCP is closed. The application hears of the end once
   (`_ended`), with the code sent (None when the TCP connection was simply lost).

The application is a subclass: `transport.websocket.ClientConnection` for /wspublic (the node),
the Autobahn echo testee (tests/support/autobahn_echo_server.py) for the conformance suite.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import socket
import time
import weakref
from collections import deque
from hashlib import sha1
from typing import Any, cast

from multidict import CIMultiDict
from picows import WSUpgradeRequest, WSUpgradeResponse

from igratech_ws.config import Config
from igratech_ws.core import wsframes
from igratech_ws.core.client_address import (
    ClientAddress,
    ProxyHeaderMissing,
    ProxyProtocolError,
    parse_proxy_header,
    resolve,
    starts_with_proxy_header,
)
from igratech_ws.core.close_codes import CloseCode, close_reason
from igratech_ws.core.codec import encode
from igratech_ws.core.framing import close_frame, pong_frame
from igratech_ws.logs import RateLimitFilter

log = logging.getLogger("igratech_ws.websocket")
# Clients can make this logger speak (a bug they trigger, their odd closes): never unbounded.
log.addFilter(RateLimitFilter())

#: An upgrade request (request line and headers) longer than this is answered 431.
MAX_REQUEST_BYTES = 16 * 1024
#: Seconds to complete the upgrade after connecting (a silent client is dropped).
HANDSHAKE_TIMEOUT = 5.0
#: Seconds to wait for the client's close frame (or its EOF) after ours, then abort.
CLOSE_TIMEOUT = 3.0

REQUEST_TOO_LONG = f"The upgrade request (its line and headers) is over {MAX_REQUEST_BYTES} bytes"
PROXY_HEADER_MISSING = (
    "This listener expects a PROXY protocol header (v1 or v2) from its trusted proxies first "
    "(proxy_protocol is on); configure the load balancer to send one"
)
PROXY_HEADER_OFF = (
    "This listener does not read PROXY protocol headers (proxy_protocol is off); turn it on, "
    "or stop the load balancer from sending them"
)
PROXY_HEADER_AGAIN = "A second PROXY protocol header: only the first, the load balancer's, is read"
PROXY_HEADER_UNTRUSTED = (
    "A PROXY protocol header is read only from a trusted proxy (trusted_proxies); this peer is "
    "not one"
)

_HANDSHAKE, _OPEN, _CLOSING, _CLOSED = 0, 1, 2, 3

#: Header fields an upgrade request may have (picows's bound).
MAX_HEADER_FIELDS = 128
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: The bytes of an RFC 9110 token (a header field's name), and those a field value may not hold
#: (controls other than HTAB): each checked by deleting them (`bytes.translate`), cheaper per
#: field than a regular expression's match.
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BAD_VALUE_BYTES = bytes([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])
_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"


class BadRequest(ValueError):
    """The upgrade request is not one picows would accept; the message says why."""


def parse_request(head: bytes) -> WSUpgradeRequest:
    """The request line and header fields of `head` (the request up to its blank line), by
    picows's rules; raises `BadRequest`."""
    line, crlf, rest = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise BadRequest(f"Malformed request line: {line[:80]!r}")
    method, path, version = parts
    if method != b"GET":
        raise BadRequest(f"Unsupported HTTP method: {method[:20]!r}")
    if not path:
        raise BadRequest("HTTP request target cannot be empty")
    if version != b"HTTP/1.1":
        raise BadRequest(f"Unsupported HTTP version: {version[:20]!r}")
    # The header lines decoded once (bytes over 0x7F as lone surrogates, as picows reads them):
    # a decode per name and per value cost more than the rest of the parse.
    lines = rest.decode("ascii", "surrogateescape").split("\r\n") if crlf else []
    if len(lines) > MAX_HEADER_FIELDS:
        raise BadRequest(f"HTTP request contains more than {MAX_HEADER_FIELDS} headers")
    fields: list[tuple[str, str]] = []
    for line_text in lines:
        if line_text[:1] in (" ", "\t"):
            raise BadRequest(
                f"Obsolete folded HTTP header is not supported: {_raw(line_text)[:80]!r}"
            )
        name, colon, value = line_text.partition(":")
        if not colon:
            raise BadRequest(f"Malformed header in HTTP request: {_raw(line_text)[:80]!r}")
        if not name:
            raise BadRequest(f"Invalid HTTP header name: {_raw(name)[:80]!r}")
        fields.append((name, value.strip(" \t")))
    # One deletion pass over all names and one over the whole head instead of two per field
    # (each `translate` builds a 256-entry table): the head's only control bytes may be the
    # CRLFs between its lines. A field is named only when a pass finds something.
    if _raw("".join([name for name, _ in fields])).translate(None, _TOKEN_BYTES):
        for name, _ in fields:
            if _raw(name).translate(None, _TOKEN_BYTES):
                raise BadRequest(f"Invalid HTTP header name: {_raw(name)[:80]!r}")
    if len(head) - len(head.translate(None, _BAD_VALUE_BYTES)) != 2 * len(lines):
        for name, value in fields:
            raw = _raw(value)
            if len(raw.translate(None, _BAD_VALUE_BYTES)) != len(raw):
                raise BadRequest(f"Invalid HTTP header value for {_raw(name)[:80]!r}")
    headers: CIMultiDict[str] = CIMultiDict(fields)
    if "Transfer-Encoding" in headers:
        raise BadRequest("Transfer-Encoding is not supported in HTTP requests")
    lengths = headers.getall("Content-Length", [])
    if len(lengths) > 1:
        raise BadRequest("Multiple Content-Length headers are not supported")
    if lengths and (not lengths[0] or lengths[0].strip("0")):
        raise BadRequest(f"HTTP request body is not supported: Content-Length is {lengths[0]!r}")
    request = WSUpgradeRequest()
    request.method = method
    request.path = path
    request.version = version
    request.headers = headers
    return request


def _raw(text: str) -> bytes:
    """The request's bytes of `text`, a piece of its decoded header lines."""
    return text.encode("ascii", "surrogateescape")


def accept_key(headers: CIMultiDict[str]) -> bytes:
    """The Sec-WebSocket-Accept of an upgrade request's `headers` (RFC 6455 section 4.2.1), or
    `BadRequest` for a request that is not a WebSocket upgrade (picows's checks and order)."""
    if headers.get("upgrade", "").lower() != "websocket":
        raise BadRequest("No WebSocket UPGRADE header. Can 'Upgrade' only to 'websocket'")
    connection = headers.get("connection")
    if connection is None:
        raise BadRequest("No CONNECTION upgrade header")
    if connection.lower() != "upgrade":
        raise BadRequest("CONNECTION header value is not 'upgrade'")
    version = headers.get("sec-websocket-version")
    if version not in ("13", "8", "7"):
        raise BadRequest(f"Upgrade requested to unsupported websocket version: {version!r:.40}")
    key = headers.get("sec-websocket-key")
    try:
        key_bytes = key.encode("ascii") if key else b""
        # binascii's strict mode is what `b64decode(validate=True)` calls.
        if not key_bytes or len(binascii.a2b_base64(key_bytes, strict_mode=True)) != 16:
            raise BadRequest(f"Handshake error, invalid key: {key!r:.40}")
    except (UnicodeEncodeError, binascii.Error):
        raise BadRequest(f"Handshake error, invalid key: {key!r:.40}") from None
    return binascii.b2a_base64(sha1(key_bytes + _WS_GUID).digest(), newline=False)


class WebSocketConnection(asyncio.Protocol):
    """One client socket: upgrade, frames in, frames out, closing. See the module docstring.

    Subclasses are the application: they implement `_decide` (the upgrade), `_opened`, `_text`,
    `_binary`, `_refused`, `_send` / `_flush` (their outbound queue), `_ended` and `_drained`.
    """

    __slots__ = (
        "__weakref__",  # HandshakeDeadlines holds connections weakly
        "_close_timer",
        "_config",
        "_head",
        "_inbound",
        "_live",
        "_proxy_bytes",
        "_request",
        "_stall_timer",
        "_state",
        "_transport",
        "address",
        "client",
        "last_seen",
        "peer",
        "proxy_source",
        "writable",
    )

    def __init__(self, config: Config) -> None:
        self._config = config
        self._state = _HANDSHAKE
        self._transport: asyncio.Transport | None = None
        #: The upgrade request received so far (its blank line not yet seen).
        self._request = b""
        #: The 101 response while it waits to go out with the first frames (`_upgrade`).
        self._head: bytes | None = None
        self._inbound: wsframes.Inbound | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        #: The application was told `_opened` and not yet `_ended`.
        self._live = False
        #: The PROXY header read so far, while one is awaited (None: none is, or it was read).
        self._proxy_bytes: bytes | None = None
        #: The TCP peer's address, and the source its PROXY header named (a trusted peer's).
        self.peer = ""
        self.proxy_source: str | None = None
        #: Who the connection is from, for logs: the client a trusted proxy named, else `peer`.
        self.client = ""
        #: The per-address limit's key (node.Connection): the client's address, or None when a
        #: trusted proxy named nobody (its clients cannot be told apart: the limit does not
        #: apply). Until the upgrade request is read, the TCP peer.
        self.address: str | None = ""
        self.last_seen = time.monotonic()
        self.writable = True

    # --- what the application implements ------------------------------------------------------

    def _decide(self, request: WSUpgradeRequest) -> WSUpgradeResponse | None:
        """The upgrade `request` arrived: None to accept it, or the refusal to answer."""
        raise NotImplementedError

    def _opened(self) -> None:
        """The 101 is written; frames may flow."""

    def _refusing(self, code: str) -> None:
        """The upgrade request is refused before `_decide` could see it (`code`: a fixed word)."""

    def _text(self, payload: bytes) -> None:
        """A valid UTF-8 text message inside the budget."""

    def _binary(self, payload: bytes) -> None:
        """A binary message inside the budget."""

    def _refused(self, opcode: int) -> None:
        """A frame (`opcode`) was dropped by the budget; the connection goes on."""

    def _send(self, wire: bytes) -> None:
        """Queue `wire` (a complete frame) behind what the application queued."""
        self.write_wire(wire)

    def _flush(self) -> None:
        """Write what the application queued, now (before a close frame)."""

    def _queued(self) -> bool:
        """Whether the application holds frames it will write soon (its flush is scheduled)."""
        return False

    def _ended(self, code: int | None) -> None:
        """The connection is over for the application: `code` was sent, received or is None."""

    def _drained(self) -> None:
        """The socket drained below its low watermark after having been paused."""

    # --- what the hub and node call (hub.Subscriber, node.Connection) -------------------------

    @property
    def is_open(self) -> bool:
        return self._state == _OPEN

    def backlog_bytes(self) -> int:
        """Bytes written but still in the socket's buffer (the kernel's not counted)."""
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def write_wire(self, data: bytes) -> None:
        """Write complete frames; past `max_write_buffer_bytes` buffered, abort (1013)."""
        transport = self._transport
        if transport is None or self._state == _CLOSED:
            return
        head = self._head
        if head is not None:  # the 101, written together with the first frames
            self._head = None
            data = head + data
        transport.write(data)
        if transport.get_write_buffer_size() > self._config.max_write_buffer_bytes:
            # A slow consumer: it would hold memory without bound, and a close frame would only
            # queue behind what it does not read. Abort at once.
            self._leave_open(int(CloseCode.TRY_AGAIN_LATER))
            self._state = _CLOSED
            transport.abort()

    def close_with(self, code: CloseCode, reason: str | None = None) -> None:
        """Close with `code` (RFC 6455 section 7.1.2): what is queued, the close frame, then wait
        for the client's close (at most `CLOSE_TIMEOUT`) and close TCP. Idempotent."""
        if self._state != _OPEN:
            return
        self._flush()  # while open: what is queued goes before the close frame
        if self._state != _OPEN:
            return  # the flush found a slow consumer
        self._state = _CLOSING
        self._write_close(code, reason)
        if self._state != _CLOSED:
            assert self._inbound is not None
            self._inbound.discard_data()
            self._arm_close_timer()
        self._leave_open(int(code))

    def fail(self, code: CloseCode) -> None:
        """Fail the connection (section 7.1.7): the close frame, then no more parsing, a
        half-close, and TCP closed on the client's EOF (at most `CLOSE_TIMEOUT`)."""
        if self._state != _OPEN:
            if self._state == _CLOSING and self._transport is not None:
                self._transport.close()
            return
        self._flush()
        if self._state != _OPEN:
            return
        self._state = _CLOSING
        self._write_close(code, None)
        transport = self._transport
        if self._state != _CLOSED and transport is not None:
            if transport.can_write_eof():
                transport.write_eof()
            self._arm_close_timer()
        self._leave_open(int(code))

    # --- asyncio protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's and aiofastnet's transports are not asyncio.Transport subclasses.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        config = self._config
        self.peer = self.client = self.address = str(peer[0]) if peer else ""
        if config.proxy_protocol and self.peer in config.trusted_proxy_list:
            self._proxy_bytes = b""
        high = max(1, self._config.max_write_buffer_bytes // 4)
        transport.set_write_buffer_limits(high=high, low=high // 2)
        _deadlines().add(self, self.last_seen + HANDSHAKE_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        try:
            if self._state == _OPEN or self._state == _CLOSING:
                self._receive(data)
            elif self._state == _HANDSHAKE:
                if self._proxy_bytes is None:
                    self._handshake_data(data)
                else:
                    self._proxy_data(data)
        except Exception:
            # A bug here must cost one connection and one (rate-limited) log line, not the
            # event loop's unthrottled "Fatal error" per connection.
            log.exception("reading a connection failed", extra={"client": self.client})
            if self._state == _OPEN:
                self.close_with(CloseCode.INTERNAL_ERROR)
            elif self._transport is not None:
                self._leave_open(int(CloseCode.INTERNAL_ERROR))
                self._state = _CLOSED
                self._transport.abort()

    def eof_received(self) -> bool:
        return False  # close our side too (after what is buffered)

    def pause_writing(self) -> None:
        """The socket's buffer passed a quarter of the budget: stop reading the client (D7)."""
        self.writable = False
        transport = self._transport
        if self._state != _HANDSHAKE and transport is not None and not transport.is_closing():
            transport.pause_reading()
        if self._stall_timer is None:
            # A client that reads nothing for half the idle timeout (its frames are not read
            # meanwhile, so it cannot be told idle) is a slow consumer.
            stall = self._config.idle_timeout / 2
            self._stall_timer = asyncio.get_running_loop().call_later(stall, self._stalled)

    def resume_writing(self) -> None:
        self.writable = True
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        transport = self._transport
        if self._state != _HANDSHAKE and transport is not None and not transport.is_closing():
            transport.resume_reading()
        if self._state == _OPEN:
            self._drained()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._close_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._close_timer = self._stall_timer = None
        self._inbound = None
        self._leave_open(None)
        self._state = _CLOSED

    # --- the upgrade ---------------------------------------------------------------------------

    def _proxy_data(self, data: bytes) -> None:
        """Bytes of the PROXY header a trusted proxy sends first; what follows is the request."""
        assert self._proxy_bytes is not None
        received = self._proxy_bytes + data  # bounded: the parser refuses a header too long
        try:
            header = parse_proxy_header(received)
        except ProxyHeaderMissing:
            self._refuse_raw(400, "proxy_header_missing", PROXY_HEADER_MISSING, "proxy")
            return
        except ProxyProtocolError as exc:
            message = f"The PROXY protocol header is invalid: {exc}"
            self._refuse_raw(400, "proxy_header_invalid", message, "proxy")
            return
        if header is None:
            self._proxy_bytes = received
            return
        self._proxy_bytes = None
        self.proxy_source = header.source
        rest = received[header.length :]
        if rest:
            self._handshake_data(rest)

    def _handshake_data(self, data: bytes) -> None:
        """Bytes before the upgrade: the request up to its blank line, then frames."""
        if self._state != _HANDSHAKE:
            return  # refused: the answer is written and the socket is closing
        received = self._request
        if not received and starts_with_proxy_header(data):
            # A PROXY header where none is read: refused by name, not as a malformed request.
            config = self._config
            if not config.proxy_protocol:
                why = PROXY_HEADER_OFF
            elif self.peer in config.trusted_proxy_list:
                why = PROXY_HEADER_AGAIN  # the balancer's was read: this one is its client's
            else:
                why = PROXY_HEADER_UNTRUSTED
            self._refuse_raw(400, "proxy_header_refused", why, "proxy")
            return
        if received:
            start = len(received) - 3  # the blank line may straddle two reads
            received += data
            end = received.find(b"\r\n\r\n", max(0, start))
        else:
            received = data
            end = data.find(b"\r\n\r\n")
        if end < 0 or end + 4 > MAX_REQUEST_BYTES:
            if len(received) > MAX_REQUEST_BYTES or end >= 0:
                self._request = b""
                self._refuse_raw(431, "request_too_large", REQUEST_TOO_LONG)
                return
            self._request = received  # bounded: MAX_REQUEST_BYTES
            return
        self._request = b""
        self._upgrade(received[:end], received[end + 4 :])

    def _upgrade(self, head: bytes, rest: bytes) -> None:
        """The whole request (`head`, without its blank line) arrived: decide, answer, go on
        with what the client sent behind it (`rest`)."""
        try:
            request = parse_request(head)
        except BadRequest as exc:
            self._refuse_raw(400, "bad_request", str(exc))
            return
        try:
            forwarded_for = request.headers.getall("X-Forwarded-For", None)
            if forwarded_for is None and self.proxy_source is None:
                found = _peer_only(self.peer, self._config)
            else:
                found = resolve(
                    self.peer,
                    self._config.trusted_proxy_list,
                    forwarded_for=forwarded_for,
                    proxy_source=self.proxy_source,
                )
            self.client, self.address = found.address, found.limit_key
            refusal = self._decide(request)
        except Exception:  # a bug must refuse one handshake, not take the listener down
            log.exception("handshake failed", extra={"client": self.client})
            self._refusing("internal_error")
            refusal = error_response(500, "internal_error", "The server could not accept this")
        if refusal is not None:
            self._answer_and_close(refusal)
            return
        try:
            accept = accept_key(request.headers)
        except BadRequest as exc:
            self._refuse_raw(400, "bad_request", str(exc))
            return
        # The 101 goes out with the first frames the application queues as it opens (its
        # `connected`, say), in one write, when it flushes them (soon: `_queued`); alone now if
        # it queued none. Every write after this point puts it first.
        self._head = _SWITCHING + b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        self._upgraded()
        if self._head is not None and not self._queued():
            self.write_wire(b"")
        if rest:
            self._receive(rest)

    def _handshake_timeout(self) -> None:
        """The client did not complete its upgrade request in time: drop it, without an answer.
        (Called at the deadline whatever the state: it does nothing once the upgrade is done.)"""
        if self._state == _HANDSHAKE:
            self._state = _CLOSED
            if self._transport is not None:
                self._transport.close()

    def _upgraded(self) -> None:
        """The 101 is written: from here on every byte is a frame."""
        config = self._config
        now = time.monotonic()
        self._inbound = wsframes.Inbound(
            max_message_bytes=config.max_frame_bytes,
            rate=config.max_message_rate,
            burst=config.message_burst,
            now=now,
        )
        self.last_seen = now
        self._state = _OPEN
        self._live = True
        self._guarded(self._opened)

    def _answer_and_close(self, response: WSUpgradeResponse) -> None:
        """Write a refusal (`response`, already counted) and close the socket after it."""
        self._state = _CLOSED
        transport = self._transport
        if transport is not None:
            response.headers["Connection"] = "close"
            transport.write(bytes(response.to_bytes()))
            transport.close()

    def _refuse_raw(self, status: int, code: str, message: str, field: str = "request") -> None:
        """Refuse the upgrade request before (or without) `_decide`: `status`, then close."""
        self._refusing(code)
        self._answer_and_close(error_response(status, code, message, field))

    # --- frames in -----------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        inbound = self._inbound
        if inbound is None:
            return
        now = time.monotonic()
        frames = inbound.frames_received
        events = inbound.receive_data(data, now)
        if inbound.frames_received != frames:
            self.last_seen = now
        pongs = False
        for event in events:
            if self._state == _OPEN:
                if type(event) is wsframes.Ping:
                    pongs = True
                self._dispatch(event)
            elif (
                isinstance(event, wsframes.CloseFrame | wsframes.Failure)
                and self._transport is not None
            ):
                # Our close was sent: the client's answer (or its garbage) ends it.
                self._transport.close()
        if pongs and self._state == _OPEN:
            # This read's pongs go out now, in one write: the socket's buffer (and with it the
            # pause of reading, and the budget) sees them before the next read, which an event
            # loop may do in the same tick (libuv reads up to 32 times per wake-up).
            self._flush()

    def _dispatch(self, event: wsframes.Event) -> None:
        kind = type(event)
        if kind is wsframes.TextMessage:
            assert isinstance(event, wsframes.TextMessage)
            self._guarded(self._text, event.payload)
        elif kind is wsframes.Ping:
            assert isinstance(event, wsframes.Ping)
            self._send(pong_frame(event.payload))
        elif kind is wsframes.Pong:
            pass  # activity, counted above
        elif kind is wsframes.BinaryMessage:
            assert isinstance(event, wsframes.BinaryMessage)
            self._guarded(self._binary, event.payload)
        elif kind is wsframes.Refused:
            assert isinstance(event, wsframes.Refused)
            self._guarded(self._refused, event.opcode)
        elif kind is wsframes.CloseFrame:
            assert isinstance(event, wsframes.CloseFrame)
            self._close_received(event.code)
        elif kind is wsframes.Failure:
            assert isinstance(event, wsframes.Failure)
            log.debug(
                "failing a connection",
                extra={"code": int(event.code), "why": event.detail, "client": self.client},
            )
            self.fail(event.code)

    def _close_received(self, code: int | None) -> None:
        """Section 5.5.1: answer with the client's code (1000 when it sent none), close TCP."""
        answer = CloseCode.NORMAL if code is None else code
        self._flush()
        if self._state != _OPEN:
            return
        self._state = _CLOSING
        self._write_close(answer, None)
        transport = self._transport
        if self._state != _CLOSED and transport is not None:
            transport.close()  # after what is buffered; the timer covers a client not reading
            self._arm_close_timer()
        self._leave_open(int(answer))

    def _guarded(self, handler: Any, *args: Any) -> None:
        """Run an application handler; a bug there fails this connection (1011), once logged."""
        try:
            handler(*args)
        except Exception:
            log.exception("connection handler failed", extra={"client": self.client})
            if self._state == _OPEN:
                self.close_with(CloseCode.INTERNAL_ERROR)

    # --- closing -------------------------------------------------------------------------------

    def _write_close(self, code: int, reason: str | None) -> None:
        if reason is None:
            try:
                reason = close_reason(CloseCode(code))
            except (ValueError, KeyError):
                reason = ""  # an echoed client code outside our table
        self.write_wire(close_frame(int(code), reason))

    def _arm_close_timer(self) -> None:
        if self._close_timer is None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT, self._close_timeout)

    def _stalled(self) -> None:
        self._stall_timer = None
        transport = self._transport
        if transport is not None and self._state != _CLOSED:
            self._leave_open(int(CloseCode.TRY_AGAIN_LATER))
            self._state = _CLOSED
            transport.abort()

    def _close_timeout(self) -> None:
        self._close_timer = None
        if self._transport is not None:
            self._transport.abort()

    def _leave_open(self, code: int | None) -> None:
        """Tell the application, once, that the connection is over (if it ever opened)."""
        if not self._live:
            return
        self._live = False
        try:
            self._ended(code)
        except Exception:
            log.exception("connection end handler failed", extra={"client": self.client})


class HandshakeDeadlines:
    """The handshake deadlines (`HANDSHAKE_TIMEOUT`) of one event loop's connections, behind one
    timer.

    The timeout is the same for every connection, so the deadlines come in the order the
    connections do: a FIFO holds them in deadline order and one timer, armed for the first,
    serves them all (a timer per connection, armed and cancelled, cost more than the rest of the
    upgrade's bookkeeping). An entry stays until its deadline even when its connection upgraded
    or closed meanwhile (`_handshake_timeout` then does nothing). It holds its connection weakly:
    a flood of connections that open and close at once leaves a small entry each for
    `HANDSHAKE_TIMEOUT` seconds, not the connections themselves.
    """

    __slots__ = ("_entries", "_loop", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._entries: deque[tuple[float, weakref.ref[WebSocketConnection]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, connection: WebSocketConnection, deadline: float) -> None:
        """Call `connection._handshake_timeout()` at `deadline` (`time.monotonic()` seconds)."""
        entries = self._entries
        entry = (deadline, weakref.ref(connection))
        if entries and deadline < entries[-1][0]:
            # The timeout was lowered since (a test does): keep the FIFO in deadline order.
            entries.append(entry)
            self._entries = deque(sorted(entries, key=_deadline_of))
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        else:
            entries.append(entry)
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
        delay = self._entries[0][0] - time.monotonic()
        self._timer = self._loop.call_later(max(0.0, delay), self._expire)

    def _expire(self) -> None:
        self._timer = None
        # A timer may fire a little early (the loop's clock has millisecond steps).
        now = time.monotonic() + _CLOCK_STEP
        entries = self._entries
        while entries and entries[0][0] <= now:
            connection = entries.popleft()[1]()
            if connection is not None:  # else it closed and is gone
                connection._handshake_timeout()
        if entries:
            self._arm()


_CLOCK_STEP = 0.001


def _deadline_of(entry: tuple[float, weakref.ref[WebSocketConnection]]) -> float:
    return entry[0]


#: The running loop's deadlines (one loop at a time in practice; another loop gets its own).
_LOOP_DEADLINES: tuple[asyncio.AbstractEventLoop, HandshakeDeadlines] | None = None


def _deadlines() -> HandshakeDeadlines:
    global _LOOP_DEADLINES
    loop = asyncio.get_running_loop()
    current = _LOOP_DEADLINES
    if current is None or current[0] is not loop:
        current = _LOOP_DEADLINES = (loop, HandshakeDeadlines(loop))
    return current[1]


#: `resolve` of a TCP peer alone (no PROXY header, no X-Forwarded-For), by peer: it depends on
#: nothing else but the trusted networks, and parsing the address costs more than the rest of it.
_PEER_ONLY: dict[str, tuple[str, ClientAddress]] = {}
_MAX_PEERS_CACHED = 4096


def _peer_only(peer: str, config: Config) -> ClientAddress:
    # Keyed by the setting as written (`trusted_proxies`): parsing it is not needed on a hit.
    trusted_proxies = config.trusted_proxies
    entry = _PEER_ONLY.get(peer)
    if entry is not None and entry[0] == trusted_proxies:
        return entry[1]
    found = resolve(peer, config.trusted_proxy_list)
    if len(_PEER_ONLY) >= _MAX_PEERS_CACHED:
        _PEER_ONLY.clear()
    _PEER_ONLY[peer] = (trusted_proxies, found)
    return found


def error_response(
    status: int, code: str, message: str, field: str | None = None
) -> WSUpgradeResponse:
    error: dict[str, str] = {"code": code, "message": message}
    if field:
        error["field"] = field
    response: WSUpgradeResponse = WSUpgradeResponse.create_error_response(
        status, encode({"error": error}), {"Content-Type": "application/json"}
    )
    return response


async def serve(
    factory: Any, config: Config, host: str, port: int, *, reuse_port: bool = False
) -> asyncio.Server:
    """Listen on (`host`, `port`) with one `factory()` protocol per accepted socket."""
    loop = asyncio.get_running_loop()
    kwargs: dict[str, Any] = {
        "reuse_port": reuse_port or None,
        # asyncio's default backlog of 100 drops handshakes when many clients reconnect at once.
        "backlog": socket.SOMAXCONN,
    }
    if config.use_aiofastnet:
        # aiofastnet saves CPU per delivery (docs/benchmarks.md); its transports take a plain
        # protocol like uvloop's do.
        import aiofastnet

        return await aiofastnet.create_server(loop, factory, host, port, **kwargs)
    return await loop.create_server(factory, host, port, **kwargs)


__all__ = [
    "CLOSE_TIMEOUT",
    "MAX_HEADER_FIELDS",
    "MAX_REQUEST_BYTES",
    "BadRequest",
    "WebSocketConnection",
    "accept_key",
    "error_response",
    "parse_request",
    "serve",
]
