"""The Redis pub/sub listener: one dedicated connection, its subscriptions, and its reconnects.

One connection per node carries the control channel and one pub/sub channel per channel the
node's clients follow (there is no shared channel for all publications, so a node never receives
traffic nobody on it wants). It is driven by hand rather than through redis-py's PubSub so that
every step is bounded and a broken connection is never silently replaced by a fresh one without
subscriptions.

Outage: on a connection error (or a PING left unanswered for two `ping_interval`s) the listener
reports DISCONNECTED, reconnects with `Backoff`, resubscribes the control channel and every wanted
channel, then reports CONNECTED; the caller must then re-read history to fill the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from igratech_ws.brokers.base import BrokerState
from igratech_ws.brokers.core import Backoff
from igratech_ws.brokers.redis.pipe import CONNECTION_ERRORS

log = logging.getLogger("igratech_ws.brokers.redis")

#: Channels per SUBSCRIBE command, so that one command stays a sane size.
SUBSCRIBE_CHUNK = 1000
_READ_SIZE = 1 << 16

MessageHandler = Callable[[bytes, bytes], None]


def address_of(connection: AbstractConnection) -> tuple[Any, Any]:
    return getattr(connection, "host", None), getattr(connection, "port", None)


class PubSubListener:
    """Keeps one pub/sub connection subscribed to `control_name` (None: no control channel, on
    the shards other than the first) and every `subscribe`d name.

    `factory` makes the connection (its `connection_class` and `connection_kwargs`; a Sentinel
    pool asks the sentinels for the master each time). `on_message(name, payload)` gets every
    message; `on_state` every state change. Caller's duties: `start` once, `close` once.
    """

    def __init__(
        self,
        factory: ConnectionPool,
        control_name: bytes | None,
        *,
        op_timeout: float,
        ping_interval: float,
        backoff: Backoff,
        on_message: MessageHandler,
        on_state: Callable[[BrokerState], None],
    ) -> None:
        self._factory = factory
        self._control_name = control_name
        self._op_timeout = op_timeout
        self._ping_interval = ping_interval
        self._backoff = backoff
        self._on_message = on_message
        self._on_state = on_state
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Set once the first connection attempt ended (CONNECTED, or failed: see `last_error`).
        self.first_attempt = asyncio.Event()
        self.connected_once = False
        self.last_error: BaseException | None = None
        self._reached_connected = False
        # Names this node's clients follow; bounded by the hub's channel count.
        self.wanted: set[bytes] = set()
        # Per live connection: names SUBSCRIBE was sent for, SUBSCRIBEs not yet confirmed,
        # confirmed names, and subscribe() calls waiting for a confirmation.
        self.conn: AbstractConnection | None = None
        self._sent: set[bytes] = set()
        self._inflight: dict[bytes, int] = {}
        self._confirmed: set[bytes] = set()
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._write_lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="redis-broker-listener")

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # wait() rather than await: a cancellation of close() itself must still propagate.
            await asyncio.wait([task])
        await self._drop_connection()
        self.wanted.clear()

    # -- subscriptions -------------------------------------------------------------------------

    async def subscribe(self, name: bytes) -> None:
        """Subscribe `name`; return once Redis confirmed it, or at once while disconnected (the
        listener subscribes on reconnect). If Redis does not confirm within the operation timeout,
        the connection is reset, which leads to DISCONNECTED -> CONNECTED."""
        self.wanted.add(name)
        conn = self.conn
        if conn is None or name in self._confirmed:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(name, []).append(waiter)
        try:
            if name not in self._sent:
                await self._send_subscribe(conn, [name])
            async with asyncio.timeout(self._op_timeout):
                await waiter
        except TimeoutError:
            log.warning("Redis did not confirm SUBSCRIBE %r; resetting the listener", name)
            await self.abort(conn)
        except CONNECTION_ERRORS:
            # The listener sees the same failure and resubscribes everything on reconnect.
            log.debug("SUBSCRIBE %r failed", name, exc_info=True)
        finally:
            waiters = self._waiters.get(name)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[name]

    async def unsubscribe(self, name: bytes) -> None:
        """Unsubscribe `name`. Takes effect at once: the caller drops later messages itself."""
        self.wanted.discard(name)
        conn = self.conn
        if conn is None or name not in self._sent:
            return
        self._sent.discard(name)
        self._confirmed.discard(name)
        try:
            await self._send(conn, "UNSUBSCRIBE", name)
        except CONNECTION_ERRORS:
            log.debug("UNSUBSCRIBE %r failed", name, exc_info=True)

    async def _send(self, conn: AbstractConnection, *args: str | bytes) -> None:
        # redis-py reconnects a closed connection on send; a new socket would carry no
        # subscriptions, so a dead connection stays dead until the listener replaces it.
        if conn is not self.conn or not conn.is_connected:
            raise RedisConnectionError("pub/sub connection is gone")
        async with self._write_lock:
            await conn.send_command(*args, check_health=False)

    async def _send_subscribe(self, conn: AbstractConnection, names: list[bytes]) -> None:
        for name in names:
            self._sent.add(name)
            self._inflight[name] = self._inflight.get(name, 0) + 1
        for start in range(0, len(names), SUBSCRIBE_CHUNK):
            await self._send(conn, "SUBSCRIBE", *names[start : start + SUBSCRIBE_CHUNK])

    def _on_subscribed(self, name: bytes) -> None:
        remaining = self._inflight.get(name, 0) - 1
        if remaining > 0:
            # A later SUBSCRIBE of the same name (after an UNSUBSCRIBE) is still on its way.
            self._inflight[name] = remaining
            return
        self._inflight.pop(name, None)
        if name in self._sent:
            self._confirmed.add(name)
            for waiter in self._waiters.pop(name, []):
                if not waiter.done():
                    waiter.set_result(None)

    # -- the connection ------------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        attempt = 0
        while not self._closed:
            self._reached_connected = False
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except CONNECTION_ERRORS as exc:
                self.last_error = exc
                log.warning("Redis pub/sub connection lost: %r", exc)
            except Exception as exc:
                # A bug must not stop delivery silently: log it and start over.
                self.last_error = exc
                log.exception("Redis pub/sub listener failed")
            finally:
                await self._drop_connection()
            if self._closed:
                return
            self._on_state(BrokerState.DISCONNECTED)
            self.first_attempt.set()
            # Backoff grows only while attempts keep failing before CONNECTED.
            attempt = 0 if self._reached_connected else attempt + 1
            await asyncio.sleep(self._backoff.delay(attempt))

    async def _listen_once(self) -> None:
        """Connect, subscribe everything, then read until the connection fails (raises)."""
        factory = self._factory
        conn: AbstractConnection = factory.connection_class(**factory.connection_kwargs)
        self.conn = conn
        self._sent.clear()
        self._inflight.clear()
        self._confirmed.clear()
        async with asyncio.timeout(self._op_timeout * 2):
            await conn.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        initial = sorted(self.wanted)
        if self._control_name is not None:
            initial.insert(0, self._control_name)
        pending = set(initial)
        if initial:
            await self._send_subscribe(conn, initial)
        else:
            self._connected()
        # redis-py made the connection; the replies are read here, a socket read at a time, and
        # every message of a read is handed on before the next await (one hub pass per read).
        reader: asyncio.StreamReader = conn._reader  # type: ignore[assignment]
        parser = hiredis.Reader()
        ping_outstanding = False
        while True:
            data: bytes | None = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ping_interval):
                    data = await reader.read(_READ_SIZE)
            if self.conn is not conn:
                raise RedisConnectionError("pub/sub connection was reset")
            if data is None:
                if ping_outstanding:
                    raise RedisConnectionError("Redis did not answer PING")
                ping_outstanding = True
                await self._send(conn, "PING")
                continue
            if not data:
                raise RedisConnectionError("Redis closed the pub/sub connection")
            ping_outstanding = False
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                if not isinstance(reply, list) or len(reply) < 3:
                    continue  # a PONG
                kind = reply[0]
                if kind == b"message":
                    self._on_message(reply[1], reply[2])
                elif kind == b"subscribe":
                    self._on_subscribed(reply[1])
                    if pending:
                        pending.discard(reply[1])
                        if not pending:
                            self._connected()

    def _connected(self) -> None:
        self._reached_connected = self.connected_once = True
        self._on_state(BrokerState.CONNECTED)
        self.first_attempt.set()

    async def abort(self, conn: AbstractConnection | None = None) -> None:
        """Drop the connection (`conn`, if it is still the current one): the listener reconnects."""
        if conn is None or self.conn is conn:
            await self._drop_connection()

    async def _drop_connection(self) -> None:
        conn, self.conn = self.conn, None
        self._sent.clear()
        self._inflight.clear()
        self._confirmed.clear()
        # subscribe() calls waiting on this connection return; the next one resubscribes.
        waiters, self._waiters = self._waiters, {}
        for pending in waiters.values():
            for waiter in pending:
                if not waiter.done():
                    waiter.set_result(None)
        if conn is not None:
            try:
                await conn.disconnect(nowait=True)
            except CONNECTION_ERRORS:
                log.debug("error closing the pub/sub connection", exc_info=True)
