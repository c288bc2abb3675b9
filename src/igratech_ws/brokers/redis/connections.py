"""Connections to Redis: the command pool and the listener's connection factory, plain or Sentinel.

Plain URL: a `BlockingConnectionPool` for commands (bounded by `max_connections`, waiting at most
`op_timeout` for a free connection) and a `ConnectionPool` used only as the factory of the
listener's dedicated connection.

Sentinel URL (``redis+sentinel://``, see `urls.parse_sentinel_url`): both are redis-py
`SentinelConnectionPool`s, so every new connection asks the sentinels for the current master.
After a failover the listener's reconnect loop lands on the promoted replica and resubscribes, and
each pooled command connection fails at most once (`BrokerError`) before it reconnects there. A
dead master breaks the connections by itself; a live one (manual failover, healed partition) stays
writable until the sentinels demote it seconds later, so `watch_sentinels` asks the sentinels
every `sentinel_check_interval` and, when they name another master, resets the listener and stops
the command pool from reusing connections to the old one. Replication is asynchronous: the
publications the old master acknowledged last may be missing on the new one, under the same epoch
(see docs/deployment.md).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.retry import Retry

from igratech_ws.brokers.options import BrokerOptions
from igratech_ws.brokers.redis.pipe import CONNECTION_ERRORS
from igratech_ws.brokers.redis.pubsub import address_of
from igratech_ws.brokers.redis.urls import SENTINEL_SCHEMES, parse_sentinel_url

log = logging.getLogger("igratech_ws.brokers.redis")

# Options of a connection pool, not of a connection: the listener's factory must not pass them on.
_POOL_ONLY_OPTIONS = ("max_connections", "timeout")
_CLIENT_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\-]")


def client_name(node_id: str) -> str:
    """The CLIENT SETNAME of a node's command connections (Redis refuses spaces)."""
    return "igws-" + _CLIENT_NAME_UNSAFE.sub("_", node_id)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A `SentinelConnectionPool` that waits (bounded by ``timeout``) for a free connection.

    The plain URL uses a `BlockingConnectionPool`; this keeps the same behaviour under load.
    """

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        # redis-py drops only *idle* connections when it learns of a new master; one that was in
        # use then still leads to the old master, which stays writable until the sentinels
        # demote it (seconds after the switch): writes there would be lost. Reconnect it instead.
        known = self.master_address
        if connection.is_connected and known is not None and address_of(connection) != known:
            await connection.disconnect()
        await super().ensure_connection(connection)


@dataclass
class Connections:
    """The command client (on its pool), the listener's connection factory, and the Sentinel
    parts if any."""

    client: Redis
    listener_factory: ConnectionPool
    sentinel: Sentinel | None = None
    sentinel_pool: _BlockingSentinelPool | None = None

    async def close(self) -> None:
        try:
            await self.client.aclose()  # and its pool
            if self.sentinel is not None:
                await self.sentinel.aclose()
        except CONNECTION_ERRORS:
            log.debug("error closing Redis connections", exc_info=True)


def connect(url: str, options: BrokerOptions, name: str) -> Connections:
    """The pools for `url` (without ``prefix``); connections open lazily, nothing is sent yet.

    `name` is the command connections' client name; the listener's is `name` + ``-sub``.
    """
    common: dict[str, Any] = {
        "socket_timeout": options.op_timeout,
        "socket_connect_timeout": options.op_timeout,
        # No silent retries: a retried EVALSHA could publish twice. Callers get BrokerError.
        "retry": Retry(NoBackoff(), 0),
        # RESP2 so pub/sub messages and script replies have one plain shape.
        "protocol": 2,
    }
    if urlsplit(url).scheme not in SENTINEL_SCHEMES:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=options.max_connections,
            timeout=options.op_timeout,
            client_name=name,
            **common,
        )
        factory = ConnectionPool.from_url(url, client_name=name + "-sub", **common)
        return Connections(Redis.from_pool(pool), factory)
    target = parse_sentinel_url(url)
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # untyped in redis-py
        target.sentinels, sentinel_kwargs={**common, **target.sentinel_kwargs}
    )
    # As with from_url above, options in the URL win over the defaults.
    pool_options = {
        "max_connections": options.max_connections,
        "timeout": options.op_timeout,
        **common,
        **target.master_kwargs,
    }
    sentinel_pool = _BlockingSentinelPool(  # type: ignore[no-untyped-call]
        target.service_name, sentinel, client_name=name, **pool_options
    )
    connection_options = {k: v for k, v in pool_options.items() if k not in _POOL_ONLY_OPTIONS}
    # Each connection made from it asks the sentinels for the current master.
    factory = SentinelConnectionPool(  # type: ignore[no-untyped-call]
        target.service_name, sentinel, client_name=name + "-sub", **connection_options
    )
    return Connections(Redis.from_pool(sentinel_pool), factory, sentinel, sentinel_pool)


class OwnConnection(Protocol):
    """A holder of one dedicated connection (the pub/sub listener, the command pipe)."""

    @property
    def conn(self) -> AbstractConnection | None: ...

    async def abort(self, conn: AbstractConnection | None = None) -> None: ...


async def watch_sentinels(
    pool: _BlockingSentinelPool,
    *,
    interval: float,
    op_timeout: float,
    holders: Sequence[OwnConnection],
) -> None:
    """Move to a new master as soon as the sentinels name one, while the old one still runs.

    A dead master breaks the connections by itself, but after a failover of a live one (manual
    ``SENTINEL FAILOVER``, or a partition that healed) the old master keeps accepting writes until
    the sentinels demote it, seconds later; what a node wrote there is then lost. So each of
    `holders` whose connection leads elsewhere than the master is reset (it reconnects to the
    master). Runs until cancelled.
    """
    while True:
        await asyncio.sleep(interval)
        try:
            async with asyncio.timeout(op_timeout * 2):
                # Also drops idle command connections if the master changed (redis-py).
                master = await pool.get_master_address()  # type: ignore[no-untyped-call]
        except CONNECTION_ERRORS:
            # Sentinels unreachable (or no master now): the connections fail on their own if
            # the master is gone, so keep what works.
            log.debug("sentinel query failed", exc_info=True)
            continue
        except Exception:
            # A bug must not end the watch silently: log it and keep watching.
            log.exception("sentinel watch failed")
            continue
        for holder in holders:
            conn = holder.conn
            if conn is not None and conn.is_connected and address_of(conn) != master:
                log.warning("Redis sentinels name a new master %s:%s; reconnecting", *master)
                await holder.abort(conn)
