"""`CommandPipe`: one Redis connection carrying many commands in flight, in call order.

Redis executes the commands of one connection in the order it reads them, and answers in that
order. So a node publishes through one pipe per Redis server: every `call` is queued at once (no
await before it is queued), all calls made in one loop iteration leave in one write, and replies are
matched to callers first-in first-out. Two publications to one channel made one after the other
through the broker therefore get consecutive offsets in that order, whether or not the first one's
reply has arrived; and a burst of publications costs one round trip, not one per publication.

redis-py makes the connection (TLS, AUTH, SELECT, CLIENT SETNAME, and the master's address from
the sentinels); the pipe then drives the socket itself with hiredis (``pack_command`` and one
`hiredis.Reader`), since redis-py's per-reply path costs more than the script it waits for.

Failure: a connection error, or a reply later than `op_timeout`, fails every call in flight with
`BrokerError` (each of them may or may not have been executed) and drops the connection; the next
call connects again. Calls in flight are bounded by `max_in_flight` (further callers wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import hiredis
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import RedisError

from igratech_ws.brokers.base import BrokerError

log = logging.getLogger("igratech_ws.brokers.redis")

#: What a lost or refused connection looks like, from redis-py and from the OS.
CONNECTION_ERRORS = (RedisError, OSError, TimeoutError)
#: Calls in flight on one pipe at most; beyond it callers wait for replies to come back.
MAX_IN_FLIGHT = 8192
_READ_SIZE = 1 << 16

Arg = str | bytes | int | float


class RedisReplyError(BrokerError):
    """Redis answered a call with an error (the message is Redis's, e.g. ``NOSCRIPT ...``)."""


class CommandPipe:
    """Pipelined commands on one connection made by `factory` (see the module docstring).

    Caller's duties: `close` once at the end. Every call raises `BrokerError` on failure.
    """

    def __init__(
        self,
        factory: ConnectionPool,
        *,
        op_timeout: float,
        max_in_flight: int = MAX_IN_FLIGHT,
        address: str = "Redis",
        client_name: str | None = None,
    ) -> None:
        self._factory = factory
        self._client_name = client_name
        self._op_timeout = op_timeout
        self._address = address
        self._max_in_flight = max_in_flight
        self._limit = op_timeout * 2
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self._conn: AbstractConnection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._disconnecting: set[asyncio.Task[None]] = set()
        # Commands packed but not written yet, and the futures of every call in flight, in order.
        self._out: list[bytes] = []
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._flush_scheduled = False
        self._closed = False
        #: Scripts loaded on every new connection before anything else: sha -> body.
        self._scripts: dict[str, str] = {}

    def register_script(self, sha: str, body: str) -> None:
        """Load `body` (whose SHA1 is `sha`) on each new connection, before any other command,
        so that EVALSHA needs no fallback."""
        self._scripts[sha] = body

    @property
    def conn(self) -> AbstractConnection | None:
        """The live connection, if any (for the Sentinel watch)."""
        return self._conn

    async def abort(self, conn: AbstractConnection | None = None) -> None:
        """Drop the connection (`conn`, if it is still the current one); the next call connects
        again. Calls in flight fail with `BrokerError`."""
        if conn is None or conn is self._conn:
            self._fail_all(f"connection to {self._address} reset")

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    async def call(self, *args: Arg) -> Any:
        """Run one command; its reply (hiredis types: bytes, int, list). Queued at once, in call
        order, before the first await (unless `max_in_flight` calls are in flight: then after the
        callers already waiting). Raises `RedisReplyError` for an error reply, `BrokerError` when
        Redis cannot be reached or does not answer within twice `op_timeout`."""
        if self._closed:
            raise BrokerError("broker is closed")
        if self._slot_waiters or len(self._waiting) >= self._max_in_flight:
            await self._wait_for_slot()
        reply = await self._queue(_pack(args))
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    async def _wait_for_slot(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter in self._slot_waiters:
                self._slot_waiters.remove(waiter)
            raise

    def _wake_slot_waiters(self) -> None:
        free = self._max_in_flight - len(self._waiting)
        while free > 0 and self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def _queue(self, packed: bytes) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._out.append(packed)
        self._waiting.append((future, loop.time() + self._limit))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._limit, self._check_deadline)
        return future

    def _check_deadline(self) -> None:
        """One timer for every call (a timer per call would cost more than the call): fail all
        calls when the oldest is past its deadline, else look again at the oldest's deadline."""
        self._watchdog = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        deadline = self._waiting[0][1]
        if deadline <= loop.time():
            self._fail_all(f"no reply from {self._address} within {self._limit:g}s")
        else:
            self._watchdog = loop.call_at(deadline, self._check_deadline)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out:
            return
        writer = self._writer
        if writer is None:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
            return  # written once connected
        data, self._out = b"".join(self._out), []
        try:
            writer.write(data)
        except CONNECTION_ERRORS as exc:
            self._fail_all(f"write to {self._address} failed: {exc!r}")

    async def _connect(self) -> None:
        factory = self._factory
        kwargs = dict(factory.connection_kwargs)
        if self._client_name is not None:
            kwargs["client_name"] = self._client_name
        conn: AbstractConnection = factory.connection_class(**kwargs)
        try:
            async with asyncio.timeout(self._op_timeout * 2):
                await conn.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        except (*CONNECTION_ERRORS, asyncio.CancelledError) as exc:
            self._connecting = None
            with contextlib.suppress(*CONNECTION_ERRORS):
                await conn.disconnect(nowait=True)
            self._fail_all(f"cannot reach {self._address}: {exc!r}")
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._connecting = None
        if self._closed:
            await conn.disconnect(nowait=True)
            return
        # redis-py has done the handshake; from here the pipe owns the socket (see module doc).
        reader: asyncio.StreamReader = conn._reader  # type: ignore[assignment]
        writer: asyncio.StreamWriter = conn._writer  # type: ignore[assignment]
        self._conn, self._writer = conn, writer
        parser = hiredis.Reader(replyError=hiredis.ReplyError)
        loaders = [_pack(("SCRIPT", "LOAD", body)) for body in self._scripts.values()]
        if loaders:
            # Their replies are consumed by the reader before any caller's.
            writer.write(b"".join(loaders))
        self._reader_task = asyncio.ensure_future(self._read(conn, reader, parser, len(loaders)))
        self._flush()

    async def _read(
        self,
        conn: AbstractConnection,
        reader: asyncio.StreamReader,
        parser: hiredis.Reader,
        skip: int,
    ) -> None:
        waiting = self._waiting
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    raise ConnectionError(f"{self._address} closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    if skip:
                        skip -= 1
                        if isinstance(reply, hiredis.ReplyError):
                            log.warning("SCRIPT LOAD failed on %s: %s", self._address, reply)
                        continue
                    if waiting:
                        future = waiting.popleft()[0]
                        if not future.done():  # else its caller was cancelled
                            future.set_result(reply)
                if self._slot_waiters:
                    self._wake_slot_waiters()
        except asyncio.CancelledError:
            raise
        except (*CONNECTION_ERRORS, ConnectionError, hiredis.ProtocolError) as exc:
            if self._conn is conn:
                self._fail_all(f"connection to {self._address} lost: {exc!r}")

    def _fail_all(self, reason: str) -> None:
        """Drop the connection; every call in flight fails (it may or may not have run)."""
        conn, writer, self._conn, self._writer = self._conn, self._writer, None, None
        reader_task, self._reader_task = self._reader_task, None
        if reader_task is not None and reader_task is not asyncio.current_task():
            reader_task.cancel()
        if writer is not None:
            writer.transport.abort()
        if conn is not None:
            # redis-py's own bookkeeping of the connection (it warns about one never closed).
            task = asyncio.ensure_future(conn.disconnect(nowait=True))
            self._disconnecting.add(task)
            task.add_done_callback(self._disconnecting.discard)
        self._out = []
        waiting, self._waiting = self._waiting, deque()
        for future, _deadline in waiting:
            if not future.done():
                future.set_exception(BrokerError(reason))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._wake_slot_waiters()

    async def close(self) -> None:
        self._closed = True
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
            await asyncio.wait([connecting])
        self._fail_all("broker is closed")
        if self._disconnecting:
            await asyncio.wait(list(self._disconnecting))


def _pack(args: tuple[Arg, ...]) -> bytes:
    """One command in RESP, packed in C."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]  # the stub wants 1-tuples
    return packed
