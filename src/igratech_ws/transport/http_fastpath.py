"""The publish routes' fast path: HTTP/1.1 requests parsed here, anything else handed to aiohttp.

aiohttp's request machinery (parser callbacks, a request object, middlewares, a response object, a
task wake-up per request) cost more CPU than everything else a publish does: serving the publish
routes here halves the server's instructions per request (docs/benchmarks.md, section 5, has the
CPU figures). The publish routes are the internal API's hot path: a backend
sends thousands of small requests a second on keep-alive connections. So the API's listener runs
this protocol, which serves exactly those requests itself:

- ``POST /api/v1/publish`` and ``POST /api/v1/publish/batch`` over ``HTTP/1.1``, with a head of
  token-named, printable header fields (RFC 9110 5.1, 5.5) whose framing is one
  ``Content-Length`` within the body limit, and no ``Transfer-Encoding``, ``Expect`` or
  ``Upgrade``;

with the same `PublishRoutes` and the same API-key and content-type checks as the aiohttp
routes, so the answers are the same. At the first request that is anything else (another route
or method, chunked or oversized bodies, HTTP/1.0, a head this strict reading refuses), the
connection is handed to aiohttp's own protocol with every byte not yet consumed, and it stays
with aiohttp. A repeated header field is handed over too (which one would count?). Each request
is parsed by exactly one parser, so the two can never disagree on where a request ends (no
request smuggling between them).

Requests on one connection are answered in order (pipelining works); reading pauses while a
connection holds more than one request's worth of unread bytes or its writes are paused. A
connection with no complete request for `keepalive_timeout` seconds is closed, like aiohttp does
with idle keep-alive connections. `PublishFastSite.stop` lets the publishes in flight finish
(bounded by the runner's shutdown timeout) before closing.

Per request, as little as possible runs beyond the publish itself:

- A head is parsed once per distinct head: a client on keep-alive sends the same head again
  and again (but for ``Content-Length``), and what a head asks for is a function of its bytes
  alone, so parsed heads are remembered by their bytes (a bounded cache, `HEAD_CACHE_SIZE`).
- On a node whose publish never waits (``publishes_at_once``: the memory broker), a publish
  runs at once, in the callback that read it (``coro.send(None)``), with no task: a task is made
  only if it waits after all. At most `MAX_SERVED_AT_ONCE` requests are answered per callback;
  the rest of a pipelined burst waits for the loop's next turn, so that one connection cannot
  hold the loop. Other brokers' publishes wait for a server (and may use ``asyncio.timeout``,
  which needs a task): each runs in a task, one at a time per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import types
from collections.abc import Coroutine, Generator
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, TypeVar, cast

from aiohttp import web

from igratech_ws.brokers.base import BrokerError
from igratech_ws.transport.http_api import (
    PUBLISH_ROUTES_KEY,
    Answer,
    PublishRoutes,
    broker_unavailable_answer,
    check_api_key,
    internal_error_answer,
    is_json_type,
    unsupported_media_answer,
)

#: The longest request head served here; a longer one goes to aiohttp (which has its own limits).
MAX_HEAD_BYTES = 8192
#: Seconds a connection may go without a complete request before it is closed.
KEEPALIVE_TIMEOUT = 75.0
#: Parsed heads remembered per site (by their bytes), and the longest head remembered: the keys
#: hold at most 128 KiB. When full, the cache is emptied (a client cycling through distinct heads
#: only makes each of them parse again).
HEAD_CACHE_SIZE = 64
MAX_CACHED_HEAD_BYTES = 2048
#: Requests answered in one callback before the rest of a pipelined burst waits for the loop.
MAX_SERVED_AT_ONCE = 32

_T = TypeVar("_T")
#: `_Connection._finish`'s mark of a publish not started yet.
_NOT_STARTED: Any = object()

_SINGLE_LINE = b"POST /api/v1/publish HTTP/1.1\r\n"
_BATCH_LINE = b"POST /api/v1/publish/batch HTTP/1.1\r\n"
# Header fields after the request line (RFC 9112 5): token ":" OWS field-value, where a value
# holds visible characters, spaces, tabs and obs-text only (no CR, LF, NUL or other controls).
_FIELDS_RE = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]++:[\t\x20-\x7e\x80-\xff]*+\r\n)*+")
_HANDOFF_FIELDS = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_WANTED_RE = re.compile(
    rb"\r\n(content-length|content-type|authorization|connection|transfer-encoding|expect"
    rb"|upgrade):([^\r]*)"
)
#: The start of an answer's head, by status: status line, Content-Type, then Content-Length's name.
_ANSWER_START = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: "
_ANSWER_STARTS = {s.value: _ANSWER_START % (s.value, s.phrase.encode()) for s in HTTPStatus}


class _Clock:
    """The ``Date`` header's value, formatted once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def date(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


class _Shared:
    """What every connection of one site shares."""

    def __init__(self, routes: PublishRoutes, aiohttp_protocol: Any, keepalive: float) -> None:
        self.routes = routes
        self.aiohttp_protocol = aiohttp_protocol
        self.keepalive = keepalive
        self.connections: set[_Connection] = set()
        self.clock = _Clock()
        #: Parsed heads by their bytes (request line to the blank line): see the module docstring.
        self.heads: dict[bytes, _Head] = {}


class _Head:
    """A parsed request head served here: where its body ends and what it asked for (offsets
    from the head's first byte). Shared by every request with the same head: never changed."""

    __slots__ = ("authorization", "batch", "close", "content_type", "end", "path", "start")

    def __init__(
        self,
        path: str,
        batch: bool,
        start: int,
        end: int,
        authorization: bytes,
        content_type: str,
        close: bool,
    ) -> None:
        self.path = path
        self.batch = batch
        self.start = start
        self.end = end
        self.authorization = authorization
        self.content_type = content_type
        self.close = close


class _Connection(asyncio.Protocol):
    """One client connection, until it is handed to aiohttp or closed."""

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.head: _Head | None = None
        self.task: asyncio.Task[None] | None = None
        self.write_paused = False
        self.read_paused = False
        self.closing = False
        self.eof = False
        self.last_active = time.monotonic()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but provide its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.shared.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.shared.connections.discard(self)
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is None and not self.write_paused:
            self._serve()
        if len(self.buffer) > self.shared.routes.max_body_bytes + MAX_HEAD_BYTES:
            self._pause_reading()

    def eof_received(self) -> bool | None:
        # The client sends no more (a half-close): answer every complete request it sent, then
        # close. Returning True keeps the transport open for those answers.
        # `_serve` (or `_finish`) closes once the last one is answered: a burst longer than
        # `MAX_SERVED_AT_ONCE`, or held by paused writes, is answered over later loop turns.
        self.eof = True
        if self.task is None and not self.closing:
            self._serve()
        if self.closing:  # handed to aiohttp, or closed: not ours to keep open
            return None
        return True

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.task is None:
            self._serve()

    # --- serving ---------------------------------------------------------------------------

    def _serve(self) -> None:
        """Answer the complete requests in the buffer, until one has to wait (for the broker),
        or `MAX_SERVED_AT_ONCE` were answered (the rest on the loop's next turn)."""
        routes = self.shared.routes
        served = 0
        more = False
        while self.buffer and not self.closing and self.task is None and not self.write_paused:
            if served == MAX_SERVED_AT_ONCE:
                self.loop.call_soon(self._serve)
                more = True
                break
            head = self.head or self._parse_head()
            if head is None:
                break
            if len(self.buffer) < head.end:
                self.head = head
                break
            body = bytes(self.buffer[head.start : head.end])
            del self.buffer[: head.end]
            self.head = None
            served += 1
            refused = check_api_key(routes.api_key, head.authorization)
            if refused is None and not is_json_type(head.content_type):
                refused = unsupported_media_answer(head.content_type)
            if refused is not None:
                self._answer(refused, head.close)
                continue
            publishing = routes.publish_batch(body) if head.batch else routes.publish(body)
            if not routes.publishes_at_once:
                self.task = self.loop.create_task(self._finish(head, publishing))
                break
            # Started here; a task only if it waits after all (see the module docstring).
            try:
                waiting_for = publishing.send(None)
            except StopIteration as done:
                answer = done.value
            except Exception as exc:
                answer = _failure_answer(head, exc)
            else:
                self.task = self.loop.create_task(self._finish(head, publishing, waiting_for))
                break
            self._answer(answer, head.close)
        if self.read_paused and not self.closing and len(self.buffer) <= routes.max_body_bytes:
            self.read_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        if self.eof and not (more or self.closing or self.write_paused) and self.task is None:
            # A half-closed client's every complete request answered (a partial one never
            # completes): see `eof_received`.
            self.closing = True
            assert self.transport is not None
            self.transport.close()

    def _parse_head(self) -> _Head | None:
        """The next request's head if it is one served here; hands off (and returns None) if
        not; returns None to wait for more bytes."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEAD_BYTES:
            if len(buffer) > MAX_HEAD_BYTES or (buffer and not b"POST /".startswith(buffer[:6])):
                self._hand_off()
            return None
        raw = bytes(buffer[: end + 4])
        heads = self.shared.heads
        head = heads.get(raw)
        if head is None:
            head = self._read_head(raw)
            if head is not None and len(raw) <= MAX_CACHED_HEAD_BYTES:
                if len(heads) >= HEAD_CACHE_SIZE:
                    heads.clear()
                heads[raw] = head
        return head

    def _read_head(self, raw: bytes) -> _Head | None:
        """`_parse_head` for a head (`raw`: request line to the blank line) not seen before."""
        end = len(raw) - 4
        if raw.startswith(_SINGLE_LINE):
            batch, fields_at = False, len(_SINGLE_LINE)
        elif raw.startswith(_BATCH_LINE):
            batch, fields_at = True, len(_BATCH_LINE)
        else:
            self._hand_off()
            return None
        fields = raw[fields_at : end + 2]
        if _FIELDS_RE.fullmatch(fields) is None:
            self._hand_off()
            return None
        # Only the fields that matter here are looked at: one search with a literal prefix (CRLF)
        # is far cheaper than splitting every line in Python. Names are tokens (checked above),
        # so a name is found as CRLF + lowercase name + ":" in the lowercased fields.
        original = b"\r\n" + fields
        found: dict[bytes, bytes] = {}
        for match in _WANTED_RE.finditer(original.lower()):
            name = match.group(1)
            if name in found or name in _HANDOFF_FIELDS:
                # A repeated field (which one counts?), or framing that aiohttp must handle.
                self._hand_off()
                return None
            found[name] = original[match.start(2) : match.end(2)].strip(b" \t")
        length = found.get(b"content-length", b"")
        if not length.isdigit() or len(length) > 12:
            self._hand_off()  # none, or not a number: aiohttp answers those
            return None
        content_type = found.get(b"content-type", b"").lower()
        connection = found.get(b"connection", b"").lower()
        authorization = found.get(b"authorization", b"")
        body_length = int(length)
        if body_length > self.shared.routes.max_body_bytes:
            self._hand_off()  # aiohttp answers 413 as it always has
            return None
        start = end + 4
        return _Head(
            "/api/v1/publish/batch" if batch else "/api/v1/publish",
            batch,
            start,
            start + body_length,
            authorization,
            # (absent: RFC 9110 8.3's default, as aiohttp reports it)
            content_type.partition(b";")[0].strip(b" \t").decode("latin-1")
            or "application/octet-stream",
            # (find, not `in`: bytes.__contains__ first tries the operand as an int, and
            # formats an exception to find out it is not one)
            connection.find(b"close") >= 0,
        )

    async def _finish(
        self,
        head: _Head,
        publishing: Coroutine[Any, Any, Answer],
        waiting_for: Any = _NOT_STARTED,
    ) -> None:
        """The task of a request: runs `publishing`, or the rest of it when `_serve` started it
        and it has to wait (`waiting_for`: what it waits for)."""
        try:
            if waiting_for is _NOT_STARTED:
                answer = await publishing
            else:
                answer = await _resumed(publishing, waiting_for)
        except Exception as exc:
            answer = _failure_answer(head, exc)
        self.task = None
        self._answer(answer, head.close)
        if self.buffer and not self.closing:
            self._serve()
        if self.eof and self.task is None and not self.closing and self.transport is not None:
            self.transport.close()  # every complete request of a half-closed client answered

    def _answer(self, answer: Answer, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = answer.body
        status = answer.status
        start = _ANSWER_STARTS.get(status) or _ANSWER_START % (status, b"Unknown")
        if answer.headers or close:
            headers = answer.headers or {}
            fields = [b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items()]
            if close:
                fields.append(b"Connection: close\r\n")
            extra = b"".join(fields)
        else:
            extra = b""
        transport.write(
            b"%s%d\r\nDate: %s\r\n%s\r\n%s"
            % (start, len(body), self.shared.clock.date(), extra, body)
        )
        self.last_active = time.monotonic()
        if close:
            self.closing = True
            transport.close()

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.closing:
            self.read_paused = True
            self.transport.pause_reading()

    def _hand_off(self) -> None:
        """Give the connection, and every byte not yet consumed, to aiohttp's protocol."""
        transport = self.transport
        assert transport is not None and self.task is None
        self.shared.connections.discard(self)
        self.closing = True
        protocol = self.shared.aiohttp_protocol()
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        pending, self.buffer = bytes(self.buffer), bytearray()
        if pending:
            protocol.data_received(pending)
        if self.eof:
            protocol.eof_received()

    def close_if_idle(self, now: float) -> None:
        """Close the connection if no request is in flight and none completed for too long."""
        if self.task is None and now - self.last_active > self.shared.keepalive:
            self.closing = True
            if self.transport is not None:
                self.transport.close()


def _failure_answer(head: _Head, exc: Exception) -> Answer:
    """The answer to a publish that raised `exc` (call from the ``except`` block: a bug's
    traceback is logged)."""
    if isinstance(exc, BrokerError):
        return broker_unavailable_answer("POST", head.path, exc)
    return internal_error_answer("POST", head.path)


@types.coroutine
def _resumed(coro: Coroutine[Any, Any, _T], waiting_for: Any) -> Generator[Any, Any, _T]:
    """Await the rest of `coro`, a coroutine started by hand (``coro.send(None)``) that returned
    `waiting_for` instead of finishing: what a coroutine hands its task (a future to wait for, or
    None for "run me again soon").

    ``await coro`` would start it over; this is ``yield from`` resumed after its first step, as
    PEP 380 spells it out: what the task sends or throws (a cancellation) goes on to `coro`.
    """
    while True:
        try:
            sent = yield waiting_for
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                waiting_for = coro.throw(exc)
            except StopIteration as done:
                return cast(_T, done.value)
        else:
            try:
                waiting_for = coro.send(sent)
            except StopIteration as done:
                return cast(_T, done.value)


class PublishFastSite(web.TCPSite):
    """A `web.TCPSite` for an application of `http_api.build_api_app` whose connections start
    on the publish fast path (see the module's docstring).

    Use it like `web.TCPSite`; the runner's `cleanup` stops it: the listener closes, publishes in
    flight finish (within the runner's shutdown timeout), then every fast-path connection closes;
    connections handed to aiohttp are shut down by the runner as usual.
    """

    def __init__(
        self,
        runner: web.AppRunner,
        host: str | None = None,
        port: int | None = None,
        *,
        reuse_port: bool | None = None,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
    ) -> None:
        super().__init__(runner, host, port, reuse_port=reuse_port)
        assert runner.server is not None
        self._shared = _Shared(runner.app[PUBLISH_ROUTES_KEY], runner.server, keepalive_timeout)
        self._shutdown_seconds: float = runner._shutdown_timeout
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        shared = self._shared
        self._server = await loop.create_server(
            lambda: _Connection(shared),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]
        self._sweeper = asyncio.ensure_future(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        interval = max(0.05, min(5.0, self._shared.keepalive / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for connection in list(self._shared.connections):
                connection.close_if_idle(now)

    async def stop(self) -> None:
        await super().stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        connections = list(self._shared.connections)
        in_flight = [c.task for c in connections if c.task is not None]
        if in_flight:
            await asyncio.wait(in_flight, timeout=self._shutdown_seconds)
        for connection in connections:
            connection.closing = True
            if connection.transport is not None:
                connection.transport.close()
