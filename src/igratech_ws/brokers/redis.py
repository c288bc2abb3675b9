"""Redis broker: channel streams in Redis, fan-out over per-channel Redis pub/sub.

URL: ``redis://[user:password@]host:port/db?prefix=igws:`` (also ``rediss://`` and ``unix://``).
The ``prefix`` query parameter (default ``igws:``) is removed before the URL is handed to
redis-py; every key and pub/sub channel name starts with it, so several deployments (or tests) can
share one Redis database.

Sentinel URL: ``redis+sentinel://[user:password@]host1:26379,host2:26379/<service>/<db>?prefix=``
(``rediss+sentinel://`` for TLS to the sentinels and the master; port defaults to 26379, db to 0;
see `parse_sentinel_url`). The user and password are the master's; ``sentinel_username`` and
``sentinel_password`` query parameters authenticate to the sentinels. Both the command pool and the
listener's connection are redis-py `SentinelConnectionPool`s: every new connection asks the
sentinels for the current master, so after a failover the listener's reconnect loop (below) lands
on the promoted replica and resubscribes, and each pooled command connection fails at most once
(`BrokerError`) before it reconnects there. A dead master breaks the connections by itself; a live
one (manual failover, healed partition) stays writable until the sentinels demote it seconds
later, so a watcher task also asks the sentinels every ``sentinel_check_interval`` and, when they
name another master, resets the listener and stops the command pool from reusing connections to
the old one. Replication is asynchronous: the publications the old master acknowledged last may be
missing on the new one, under the same epoch (the same hazard as partial persistence; see
docs/deployment.md).

Keys and pub/sub channels, for a channel ``C`` (``P`` = prefix):

- ``P meta:{C}``: hash, fields ``epoch`` (the stream's epoch, a random string chosen when the
  stream is created) and ``top`` (the newest offset). Expires ``max(10 * ttl, 1 day)`` after the
  last publish or read, so abandoned channels do not live forever.
- ``P stream:{C}``: Redis Stream holding the history. Entry ID ``<offset>-0``, fields ``t``
  (publication time, Unix ms, Redis clock) and ``p`` (the encoded publication below). Trimmed to
  ``HistoryLimits.size`` entries (MAXLEN) and to entries younger than ``HistoryLimits.ttl`` on each
  publish and read; the whole key expires ``ttl`` after the last publish.
  The ``{C}`` hash tag keeps a channel's two keys in one Redis Cluster slot.
- ``P pub:C``: pub/sub channel carrying each publication of ``C`` (the same bytes as field ``p``).
  A node SUBSCRIBEs only to the channels its clients follow; there is no shared channel for all
  publications, so a node never receives traffic nobody on it wants.
- ``P control``: pub/sub channel carrying node-to-node `ControlMessage`s (msgpack, tagged union
  ``kind``). A node ignores the ones it sent (``origin == node_id``).

Message format: a publication is the msgpack encoding of `brokers.base.Publication` as produced by
``msgspec.msgpack.encode`` (an array of 7: channel str, offset int, epoch str, event str,
data bin, published_at float seconds, origin str).

Publishing is one Lua script (`PUBLISH_SCRIPT`, run with EVALSHA) so that appending and fanning out
are atomic per channel: create the meta with a new epoch if missing (Redis restarted without
persistence, key expired or deleted: the stream is dropped too, so a client holding an old position
is told recovery failed), HINCRBY ``top``, XADD, trim by length and age, PUBLISH, return the
encoded publication. KEYS = (meta key, stream key); ARGV = (pub/sub channel, channel, event, data
JSON, origin, history size, ttl ms, meta ttl ms, epoch candidate). Any backend can publish straight
into Redis by running that script with those arguments (`publish_direct` does it from Python
without a node).

Decision, deliberate: publications are delivered to every subscribed node INCLUDING the node that
published them. The hub relies on the bus order to hand publications to its clients in offset
order, so the origin must not short-cut its own. Only control messages skip their own echo.

Outage: the pub/sub listener survives Redis going away. On a connection error (or a PING left
unanswered for two intervals) it reports `BrokerState.DISCONNECTED`, reconnects with exponential
backoff and jitter (0.1 s to 5 s), resubscribes the control channel and every subscribed channel,
then reports `BrokerState.CONNECTED`; the caller must then re-read history to fill the gap.
`publish`, `history`, `position` and `publish_control` raise `BrokerError` (never raw redis-py
errors) when Redis is unreachable; socket timeouts bound every call.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import msgspec
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from igratech_ws.brokers.base import (
    BrokerError,
    BrokerState,
    ControlHandler,
    ControlKinds,
    HistoryLimits,
    HistoryPage,
    Publication,
    PublicationHandler,
    StateHandler,
    StreamPosition,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "igws:"
META_TTL_MIN_S = 86_400.0

# Shared Lua helpers. The stream ID of a publication is its offset, so XRANGE by offset is direct.
_LUA_PRELUDE = r"""
local function ensure_meta(meta, stream, candidate, meta_ttl_ms)
  local state = redis.call('HMGET', meta, 'epoch', 'top')
  local epoch, top = state[1], tonumber(state[2])
  if not epoch then
    -- A new life of the stream: history of an earlier life must not be served under the new epoch.
    epoch = candidate
    top = 0
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
  end
  redis.call('PEXPIRE', meta, meta_ttl_ms)
  return epoch, top or 0
end

local function field(entry, name)
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

local function now_ms_and_seconds()
  local now = redis.call('TIME')
  local sec, usec = tonumber(now[1]), tonumber(now[2])
  return sec * 1000 + math.floor(usec / 1000), sec + usec / 1000000
end

-- Drop entries older than cutoff_ms. Each entry is deleted once, so the work is amortised.
local function trim_age(stream, cutoff_ms)
  local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #head == 0 or (tonumber(field(head[1], 't')) or 0) >= cutoff_ms then return end
  while true do
    local batch = redis.call('XRANGE', stream, '-', '+', 'COUNT', 64)
    if #batch == 0 then return end
    for i = 1, #batch do
      if (tonumber(field(batch[i], 't')) or 0) >= cutoff_ms then
        redis.call('XTRIM', stream, 'MINID', batch[i][1])
        return
      end
    end
    local last = batch[#batch][1]
    redis.call('XTRIM', stream, 'MINID', last)
    redis.call('XDEL', stream, last)
  end
end

-- msgpack bin header: cmsgpack only writes str, and Publication.data is bytes.
local function bin(s)
  local n = #s
  if n < 256 then
    return '\196' .. string.char(n) .. s
  elseif n < 65536 then
    return '\197' .. string.char(math.floor(n / 256), n % 256) .. s
  end
  return '\198' .. string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256, n % 256) .. s
end
"""

PUBLISH_SCRIPT = (
    _LUA_PRELUDE
    + r"""
local meta, stream = KEYS[1], KEYS[2]
local pubsub, channel, event, data, origin = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local size, ttl_ms, meta_ttl_ms = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local epoch = ensure_meta(meta, stream, ARGV[9], meta_ttl_ms)
local top = redis.call('HINCRBY', meta, 'top', 1)
local now_ms, now_s = now_ms_and_seconds()
-- 0x97 = msgpack array of 7: the layout of brokers.base.Publication (array_like).
local payload = '\151' .. cmsgpack.pack(channel) .. cmsgpack.pack(top) .. cmsgpack.pack(epoch)
  .. cmsgpack.pack(event) .. bin(data) .. cmsgpack.pack(now_s) .. cmsgpack.pack(origin)
redis.call('XADD', stream, 'MAXLEN', size, tostring(top), 't', now_ms, 'p', payload)
trim_age(stream, now_ms - ttl_ms)
redis.call('PEXPIRE', stream, ttl_ms)
redis.call('PUBLISH', pubsub, payload)
return payload
"""
)

# KEYS = (meta, stream); ARGV = (since offset, limit, ttl ms, meta ttl ms, epoch candidate).
# Returns {top, epoch, payload...}. limit 0 reads only the position.
HISTORY_SCRIPT = (
    _LUA_PRELUDE
    + r"""
local meta, stream = KEYS[1], KEYS[2]
local since, limit, ttl_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local epoch, top = ensure_meta(meta, stream, ARGV[5], tonumber(ARGV[4]))
local result = {top, epoch}
if limit > 0 and since < top then
  local now_ms = now_ms_and_seconds()
  trim_age(stream, now_ms - ttl_ms)
  local entries = redis.call('XRANGE', stream, tostring(since + 1), '+', 'COUNT', limit)
  for i = 1, #entries do
    result[#result + 1] = field(entries[i], 'p')
  end
end
return result
"""
)

_publication_decoder = msgspec.msgpack.Decoder(Publication)
_control_decoder: msgspec.msgpack.Decoder[ControlKinds] = msgspec.msgpack.Decoder(ControlKinds)
_encoder = msgspec.msgpack.Encoder()

# What a lost or refused connection looks like, from redis-py and from the OS.
_CONNECTION_ERRORS = (RedisError, OSError, TimeoutError)

_CLIENT_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\-]")


def split_prefix(url: str) -> tuple[str, str]:
    """Return (`url` without its ``prefix`` query parameter, the prefix or ``igws:``)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = DEFAULT_PREFIX
    kept: list[tuple[str, str]] = []
    for name, value in query:
        if name == "prefix":
            prefix = value
        else:
            kept.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), prefix


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
# Query parameters of a sentinel URL meant for the sentinels rather than the master.
_SENTINEL_AUTH_PARAMS = {"sentinel_username": "username", "sentinel_password": "password"}
# Options of a connection pool, not of a connection: the listener's pool must not pass them on.
_POOL_ONLY_OPTIONS = ("max_connections", "timeout")


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names: where the sentinels are, and how to reach the master.

    `master_kwargs` are redis-py connection options for the master (db, credentials, ``ssl`` and
    every other query parameter, parsed as redis-py parses a ``redis://`` query);
    `sentinel_kwargs` are the options for the sentinels themselves (credentials and TLS).
    """

    sentinels: list[tuple[str, int]]
    service_name: str
    master_kwargs: dict[str, Any] = field(default_factory=dict)
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)


def _parse_sentinel_host(item: str) -> tuple[str, int]:
    host, port = item, ""
    if item.startswith("["):  # IPv6 literal: [::1]:26379
        host, _, rest = item[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad sentinel address {item!r}")
        port = rest[1:]
    elif ":" in item:
        host, _, port = item.rpartition(":")
    if not host:
        raise ValueError(f"bad sentinel address {item!r}")
    try:
        number = int(port) if port else DEFAULT_SENTINEL_PORT
    except ValueError:
        raise ValueError(f"bad sentinel port in {item!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"bad sentinel port in {item!r}")
    return unquote(host), number


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[user:password@]h1[:port],h2[:port]/<service>[/<db>][?query]``.

    The caller must have removed ``prefix`` (see `split_prefix`). ``rediss+sentinel://`` turns on
    TLS for both the sentinels and the master, with the same ``ssl_*`` query parameters.
    Raises ValueError for a malformed URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a sentinel URL: scheme {parts.scheme!r}")
    tls = parts.scheme == "rediss+sentinel"
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = [_parse_sentinel_host(item) for item in hosts.split(",") if item]
    if not sentinels:
        raise ValueError("a sentinel URL needs at least one sentinel host")
    segments = parts.path.strip("/").split("/") if parts.path.strip("/") else []
    if not segments or len(segments) > 2 or not segments[0]:
        raise ValueError("a sentinel URL path is /<service_name> or /<service_name>/<db>")
    service_name = unquote(segments[0])
    db = segments[1] if len(segments) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"bad database number {db!r} in sentinel URL")

    query = parse_qsl(parts.query, keep_blank_values=True)
    sentinel_kwargs: dict[str, Any] = {
        _SENTINEL_AUTH_PARAMS[name]: value for name, value in query if name in _SENTINEL_AUTH_PARAMS
    }
    kept = [(name, value) for name, value in query if name not in _SENTINEL_AUTH_PARAMS]
    # redis-py's own query parsing, so the options mean what they mean in a redis:// URL.
    master_kwargs: dict[str, Any] = dict(
        parse_url(urlunsplit(("redis", "placeholder", f"/{db}", urlencode(kept), "")))
    )
    master_kwargs.pop("host", None)
    master_kwargs.pop("port", None)
    user, has_password, password = userinfo.partition(":")
    if user:
        master_kwargs["username"] = unquote(user)
    if has_password and password:
        master_kwargs["password"] = unquote(password)
    # The sentinels share the socket and TLS settings; the master's other options are its own.
    for name, value in master_kwargs.items():
        if name.startswith("socket_") or (tls and name.startswith("ssl_")):
            sentinel_kwargs.setdefault(name, value)
    if tls:
        master_kwargs["ssl"] = True
        sentinel_kwargs["ssl"] = True
    return SentinelTarget(sentinels, service_name, master_kwargs, sentinel_kwargs)


def _address_of(connection: AbstractConnection) -> tuple[Any, Any]:
    return getattr(connection, "host", None), getattr(connection, "port", None)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A `SentinelConnectionPool` that waits (bounded by ``timeout``) for a free connection.

    The plain URL uses a `BlockingConnectionPool`; this keeps the same behaviour under load.
    """

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        # redis-py drops only *idle* connections when it learns of a new master; one that was in
        # use then still leads to the old master, which stays writable until the sentinels
        # demote it (seconds after the switch): writes there would be lost. Reconnect it instead.
        known = self.master_address
        if connection.is_connected and known is not None and _address_of(connection) != known:
            await connection.disconnect()
        await super().ensure_connection(connection)


def meta_key(prefix: str, channel: str) -> str:
    return f"{prefix}meta:{{{channel}}}"


def stream_key(prefix: str, channel: str) -> str:
    return f"{prefix}stream:{{{channel}}}"


def pubsub_channel(prefix: str, channel: str) -> str:
    return f"{prefix}pub:{channel}"


def control_channel(prefix: str) -> str:
    return f"{prefix}control"


def _new_epoch() -> str:
    return uuid.uuid4().hex[:8]


def _ttl_ms(limits: HistoryLimits) -> int:
    return max(1, int(limits.ttl * 1000))


def _meta_ttl_ms(limits: HistoryLimits) -> int:
    return int(max(limits.ttl * 10, META_TTL_MIN_S) * 1000)


def _decode_publication(payload: Any) -> Publication:
    if not isinstance(payload, bytes):
        raise BrokerError(f"unexpected reply from Redis: {payload!r:.80}")
    return _publication_decoder.decode(payload)


async def _run_publish(
    script: AsyncScript,
    prefix: str,
    channel: str,
    event: str,
    data: bytes,
    origin: str,
    limits: HistoryLimits,
) -> Publication:
    payload = await script(
        keys=[meta_key(prefix, channel), stream_key(prefix, channel)],
        args=[
            pubsub_channel(prefix, channel),
            channel,
            event,
            data,
            origin,
            max(0, limits.size),
            _ttl_ms(limits),
            _meta_ttl_ms(limits),
            _new_epoch(),
        ],
    )
    return _decode_publication(payload)


async def publish_direct(
    client: Redis,
    prefix: str,
    channel: str,
    event: str,
    data_json: bytes,
    *,
    limits: HistoryLimits | None = None,
    origin: str = "direct",
) -> Publication:
    """Publish into Redis without a node, exactly as a node would (same script, same format).

    `data_json` must already be the validated compact JSON of the payload (see
    `core.publishing`); `limits` must match the nodes' history limits. Raises `BrokerError`.
    """
    script = client.register_script(PUBLISH_SCRIPT)
    try:
        return await _run_publish(
            script, prefix, channel, event, data_json, origin, limits or HistoryLimits()
        )
    except _CONNECTION_ERRORS as exc:
        raise BrokerError(f"Redis publish failed: {exc}") from exc


class RedisBroker:
    """`Broker` on Redis. See the module docstring for keys, format and outage behaviour.

    `op_timeout` bounds each Redis call (connect, send, read) and waiting for a pooled
    connection; `max_connections` bounds the command pool (the pub/sub connection is extra);
    `ping_interval` is how long the listener waits on a silent connection before it PINGs, and a
    connection silent for two intervals is considered dead. With a sentinel URL, the sentinels are
    asked for the current master every `sentinel_check_interval` seconds (see `_watch_sentinels`).
    """

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        limits: HistoryLimits | None = None,
        op_timeout: float = 3.0,
        max_connections: int = 32,
        ping_interval: float = 5.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        sentinel_check_interval: float = 1.0,
    ) -> None:
        self.node_id = node_id
        self.shared = True
        self.limits = limits or HistoryLimits()
        redis_url, self.prefix = split_prefix(url)
        self._op_timeout = op_timeout
        self._ping_interval = ping_interval
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._sentinel_check_interval = sentinel_check_interval
        self.client_name = "igws-" + _CLIENT_NAME_UNSAFE.sub("_", node_id)
        self.pubsub_client_name = self.client_name + "-sub"
        common: dict[str, Any] = {
            "socket_timeout": op_timeout,
            "socket_connect_timeout": op_timeout,
            # No silent retries: a retried EVALSHA could publish twice. Callers get BrokerError.
            "retry": Retry(NoBackoff(), 0),
            # RESP2 so pub/sub messages and script replies have one plain shape.
            "protocol": 2,
        }
        self._sentinel: Sentinel | None = None
        self._sentinel_pool: _BlockingSentinelPool | None = None
        pool: ConnectionPool
        if urlsplit(redis_url).scheme in SENTINEL_SCHEMES:
            target = parse_sentinel_url(redis_url)
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]  # untyped in redis-py
                target.sentinels, sentinel_kwargs={**common, **target.sentinel_kwargs}
            )
            # As with from_url below, options in the URL win over the defaults.
            pool_options = {
                "max_connections": max_connections,
                "timeout": op_timeout,
                **common,
                **target.master_kwargs,
            }
            pool = self._sentinel_pool = _BlockingSentinelPool(  # type: ignore[no-untyped-call]
                target.service_name,
                self._sentinel,
                client_name=self.client_name,
                **pool_options,
            )
            connection_options = {
                k: v for k, v in pool_options.items() if k not in _POOL_ONLY_OPTIONS
            }
            # Each connection made from it asks the sentinels for the current master.
            self._sub_factory: ConnectionPool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
                target.service_name,
                self._sentinel,
                client_name=self.pubsub_client_name,
                **connection_options,
            )
        else:
            pool = BlockingConnectionPool.from_url(
                redis_url,
                max_connections=max_connections,
                timeout=op_timeout,
                client_name=self.client_name,
                **common,
            )
            # Used only as a factory of the listener's dedicated connection.
            self._sub_factory = ConnectionPool.from_url(
                redis_url, client_name=self.pubsub_client_name, **common
            )
        self._redis = Redis.from_pool(pool)
        self._publish_script = self._redis.register_script(PUBLISH_SCRIPT)
        self._history_script = self._redis.register_script(HISTORY_SCRIPT)
        self._control_name = control_channel(self.prefix).encode()

        self._state = BrokerState.CONNECTING
        self._closed = False
        self._on_publication: PublicationHandler | None = None
        self._on_control: ControlHandler | None = None
        self._on_state: StateHandler | None = None
        self._listener: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._reached_connected = False

        # Channels this node's clients follow; bounded by the hub's channel count.
        self._wanted: set[str] = set()
        # Per live pub/sub connection: names SUBSCRIBE was sent for, SUBSCRIBEs not yet confirmed,
        # confirmed names, and subscribe() calls waiting for a confirmation.
        self._sub_conn: AbstractConnection | None = None
        self._sent: set[bytes] = set()
        self._inflight: dict[bytes, int] = {}
        self._confirmed: set[bytes] = set()
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._write_lock = asyncio.Lock()

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> BrokerState:
        return self._state

    def _set_state(self, state: BrokerState) -> None:
        if self._closed or state is self._state:
            return
        self._state = state
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:
                log.exception("broker state handler failed")

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(
        self,
        on_publication: PublicationHandler,
        on_control: ControlHandler,
        on_state: StateHandler | None = None,
    ) -> None:
        """Start the listener and wait (bounded) for its first connection attempt.

        Does not raise when Redis is unreachable: the state is then DISCONNECTED and the listener
        keeps retrying in the background.
        """
        if self._listener is not None or self._closed:
            raise RuntimeError("RedisBroker.start() must be called once, before close()")
        self._on_publication = on_publication
        self._on_control = on_control
        self._on_state = on_state
        self._listener = asyncio.create_task(self._listen_forever(), name="redis-broker-listener")
        if self._sentinel_pool is not None:
            self._watcher = asyncio.create_task(
                self._watch_sentinels(self._sentinel_pool), name="redis-broker-sentinel-watch"
            )
        try:
            async with asyncio.timeout(self._op_timeout * 2):
                await self._first_attempt.wait()
        except TimeoutError:
            log.warning("Redis broker: no answer from Redis yet; still trying")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._state = BrokerState.CLOSED
        self._on_publication = None
        self._on_control = None
        tasks = [task for task in (self._listener, self._watcher) if task is not None]
        self._listener = self._watcher = None
        for task in tasks:
            task.cancel()
        if tasks:
            # wait() rather than await: a cancellation of close() itself must still propagate.
            await asyncio.wait(tasks)
        await self._drop_sub_connection()
        self._wanted.clear()
        try:
            await self._redis.aclose()
            if self._sentinel is not None:
                await self._sentinel.aclose()
        except _CONNECTION_ERRORS:
            log.debug("error closing Redis connections", exc_info=True)

    # -- commands ----------------------------------------------------------------------------

    async def _eval(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        if self._closed:
            raise BrokerError("broker is closed")
        try:
            # Socket timeouts bound each step; this bounds the sum (pool wait, connect, reply).
            async with asyncio.timeout(self._op_timeout * 2):
                return await script(keys=list(keys), args=list(args))
        except _CONNECTION_ERRORS as exc:
            raise BrokerError(f"Redis call failed: {exc!r}") from exc

    async def publish(self, channel: str, event: str, data: bytes) -> Publication:
        """See `Broker.publish`. On `BrokerError` the publication may or may not have been made."""
        if self._closed:
            raise BrokerError("broker is closed")
        try:
            async with asyncio.timeout(self._op_timeout * 2):
                return await _run_publish(
                    self._publish_script,
                    self.prefix,
                    channel,
                    event,
                    data,
                    self.node_id,
                    self.limits,
                )
        except msgspec.DecodeError as exc:
            raise BrokerError(f"bad publication from Redis: {exc}") from exc
        except _CONNECTION_ERRORS as exc:
            raise BrokerError(f"Redis publish failed: {exc!r}") from exc

    async def _read(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        reply = await self._eval(
            self._history_script,
            [meta_key(self.prefix, channel), stream_key(self.prefix, channel)],
            [
                max(0, since_offset),
                max(0, limit),
                _ttl_ms(self.limits),
                _meta_ttl_ms(self.limits),
                _new_epoch(),
            ],
        )
        try:
            top = StreamPosition(int(reply[0]), reply[1].decode())
            publications = [_decode_publication(payload) for payload in reply[2:]]
        except (msgspec.DecodeError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise BrokerError(f"bad history reply from Redis: {exc}") from exc
        return HistoryPage(publications, top)

    async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        return await self._read(channel, since_offset, limit)

    async def position(self, channel: str) -> StreamPosition:
        return (await self._read(channel, 0, 0)).top

    async def publish_control(self, message: ControlKinds) -> None:
        if self._closed:
            raise BrokerError("broker is closed")
        try:
            async with asyncio.timeout(self._op_timeout * 2):
                await self._redis.publish(self._control_name, _encoder.encode(message))
        except _CONNECTION_ERRORS as exc:
            raise BrokerError(f"Redis publish failed: {exc!r}") from exc

    # -- subscriptions -----------------------------------------------------------------------

    def _pub_name(self, channel: str) -> bytes:
        return pubsub_channel(self.prefix, channel).encode()

    async def subscribe(self, channel: str) -> None:
        """See `Broker.subscribe`.

        Returns once Redis confirmed the subscription, or at once while disconnected (the
        listener subscribes on reconnect, then reports CONNECTED). If Redis does not confirm
        within the operation timeout, the listener's connection is reset, which leads to the same
        DISCONNECTED -> CONNECTED sequence.
        """
        if self._closed:
            raise BrokerError("broker is closed")
        self._wanted.add(channel)
        name = self._pub_name(channel)
        conn = self._sub_conn
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
            log.warning("Redis did not confirm SUBSCRIBE %s; resetting the listener", channel)
            await self._abort_connection(conn)
        except _CONNECTION_ERRORS:
            # The listener sees the same failure and resubscribes everything on reconnect.
            log.debug("SUBSCRIBE %s failed", channel, exc_info=True)
        finally:
            waiters = self._waiters.get(name)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[name]

    async def unsubscribe(self, channel: str) -> None:
        """See `Broker.unsubscribe`. Takes effect at once: later messages are dropped locally."""
        self._wanted.discard(channel)
        name = self._pub_name(channel)
        conn = self._sub_conn
        if conn is None or name not in self._sent:
            return
        self._sent.discard(name)
        self._confirmed.discard(name)
        try:
            await self._send(conn, "UNSUBSCRIBE", name)
        except _CONNECTION_ERRORS:
            log.debug("UNSUBSCRIBE %s failed", channel, exc_info=True)

    async def _send(self, conn: AbstractConnection, *args: str | bytes) -> None:
        # redis-py reconnects a closed connection on send; a new socket would carry no
        # subscriptions, so a dead connection stays dead until the listener replaces it.
        if conn is not self._sub_conn or not conn.is_connected:
            raise RedisConnectionError("pub/sub connection is gone")
        async with self._write_lock:
            await conn.send_command(*args, check_health=False)

    async def _send_subscribe(self, conn: AbstractConnection, names: list[bytes]) -> None:
        for name in names:
            self._sent.add(name)
            self._inflight[name] = self._inflight.get(name, 0) + 1
        # Chunks keep one command's size sane when a node follows many channels.
        for start in range(0, len(names), 1000):
            await self._send(conn, "SUBSCRIBE", *names[start : start + 1000])

    # -- listener ----------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._backoff_max, self._backoff_min * (2.0**attempt))
        # "Equal jitter": at least half the step, so nodes do not all come back at once.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    async def _listen_forever(self) -> None:
        attempt = 0
        while not self._closed:
            self._reached_connected = False
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except _CONNECTION_ERRORS as exc:
                log.warning("Redis pub/sub connection lost: %r", exc)
            except Exception:
                # A bug must not stop delivery silently: log it and start over.
                log.exception("Redis pub/sub listener failed")
            finally:
                await self._drop_sub_connection()
            if self._closed:
                return
            self._set_state(BrokerState.DISCONNECTED)
            self._first_attempt.set()
            # Backoff grows only while attempts keep failing before CONNECTED.
            attempt = 0 if self._reached_connected else attempt + 1
            await asyncio.sleep(self._backoff(attempt))

    async def _listen_once(self) -> None:
        """Connect, subscribe everything, then read until the connection fails (raises)."""
        factory = self._sub_factory
        conn: AbstractConnection = factory.connection_class(**factory.connection_kwargs)
        self._sub_conn = conn
        self._sent.clear()
        self._inflight.clear()
        self._confirmed.clear()
        async with asyncio.timeout(self._op_timeout * 2):
            await conn.connect()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        initial = [self._control_name, *(self._pub_name(c) for c in sorted(self._wanted))]
        await self._send_subscribe(conn, initial)
        pending = set(initial)
        ping_outstanding = False
        while True:
            reply = await conn.read_response(timeout=self._ping_interval, disconnect_on_error=False)
            if self._sub_conn is not conn:
                raise RedisConnectionError("pub/sub connection was reset")
            if reply is None:
                if ping_outstanding:
                    raise RedisConnectionError("Redis did not answer PING")
                ping_outstanding = True
                await self._send(conn, "PING")
                continue
            ping_outstanding = False
            if not isinstance(reply, list) or len(reply) < 3:
                continue
            kind = reply[0]
            if kind == b"message":
                self._dispatch(reply[1], reply[2])
            elif kind == b"subscribe":
                self._on_subscribed(reply[1])
                if pending:
                    pending.discard(reply[1])
                    if not pending:
                        self._reached_connected = True
                        self._set_state(BrokerState.CONNECTED)
                        self._first_attempt.set()

    async def _watch_sentinels(self, pool: _BlockingSentinelPool) -> None:
        """Move to a new master as soon as the sentinels name one, while the old one still runs.

        A dead master breaks the connections by itself, but after a failover of a live one (manual
        ``SENTINEL FAILOVER``, or a partition that healed) the old master keeps accepting writes
        until the sentinels demote it, seconds later; what a node wrote there is then lost.
        """
        while not self._closed:
            await asyncio.sleep(self._sentinel_check_interval)
            try:
                async with asyncio.timeout(self._op_timeout * 2):
                    # Also drops idle command connections if the master changed (redis-py).
                    master = await pool.get_master_address()  # type: ignore[no-untyped-call]
            except _CONNECTION_ERRORS:
                # Sentinels unreachable (or no master now): the connections fail on their own if
                # the master is gone, so keep what works.
                log.debug("sentinel query failed", exc_info=True)
                continue
            except Exception:
                # A bug must not end the watch silently: log it and keep watching.
                log.exception("sentinel watch failed")
                continue
            conn = self._sub_conn
            if conn is not None and conn.is_connected and _address_of(conn) != master:
                log.warning("Redis sentinels name a new master %s:%s; reconnecting", *master)
                await self._abort_connection(conn)

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

    def _dispatch(self, name: bytes, payload: bytes) -> None:
        if name == self._control_name:
            try:
                message = _control_decoder.decode(payload)
            except msgspec.DecodeError:
                log.warning("dropping malformed control message %r", payload[:80])
                return
            if message.origin == self.node_id or self._on_control is None:
                return
            try:
                self._on_control(message)
            except Exception:
                log.exception("control handler failed")
            return
        try:
            publication = _publication_decoder.decode(payload)
        except msgspec.DecodeError:
            log.warning("dropping malformed publication on %r", name)
            return
        # Messages still in flight after unsubscribe() are dropped here.
        if publication.channel not in self._wanted or self._on_publication is None:
            return
        try:
            self._on_publication(publication)
        except Exception:
            log.exception("publication handler failed")

    async def _abort_connection(self, conn: AbstractConnection) -> None:
        if self._sub_conn is conn:
            await self._drop_sub_connection()

    async def _drop_sub_connection(self) -> None:
        conn, self._sub_conn = self._sub_conn, None
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
            except _CONNECTION_ERRORS:
                log.debug("error closing the pub/sub connection", exc_info=True)
