"""Redis broker: channel streams in Redis, fan-out over per-channel Redis pub/sub.

URL: ``redis://[user:password@]host:port/db?prefix=igws:`` (also ``rediss://`` and ``unix://``),
or ``redis+sentinel://[user:password@]host1:26379,host2:26379/<service>/<db>?prefix=`` for a
master watched by Redis Sentinel (``rediss+sentinel://`` for TLS). Several servers are shards:
``redis://h1:6379,h2:6379/0`` or ``redis+sentinel://s1,s2/<service1>,<service2>/0`` (`shards`:
each channel on one of them by jump hashing, control messages on the first). The ``prefix``
query parameter (default ``igws:``) starts every key and pub/sub channel name, so several
deployments (or tests) can share one database; the rest of the URL is redis-py's. Tuning
(timeouts, pool size, pings, backoff) comes from `BrokerOptions`.

What lives where, for a channel ``C`` (``P`` = prefix; see `names`):

- ``P meta:{C}``: hash ``epoch`` (random, chosen by the publication that creates the stream) and
  ``top`` (the newest offset). Expires `BrokerOptions.retention` (a day at least) after the last
  publish; reads never refresh it, and never create it.
- ``P stream:{C}``: Redis Stream, the history. Entry ID ``<offset>-0``, fields ``t`` (publication
  time, Unix ms, Redis clock) and ``p`` (the publication, see `wire`). Trimmed to
  ``history_size`` entries (MAXLEN) and, on each publish, to entries younger than
  ``history_ttl``; a read skips older ones. The key expires ``history_ttl`` after the last publish.
- ``P state:{C}``: hash, state event -> its latest publication (the same bytes as ``p``),
  written by the publish script; expires ``state_ttl`` after the last state publication, and a
  read ignores slots older than that. Deleted when the stream starts a new epoch.
- ``P idem:{C}:<key>``: the first publication made with an idempotency key (without its data),
  expiring after ``idempotency_window``.
- ``P pub:C``: pub/sub channel of C's publications; ``P control``: control messages (JSON).

Modules: `names` (keys), `urls` (URL and Sentinel parsing), `shards` (sharded URLs, which shard
holds a channel), `wire` (encoding, Lua scripts in ``lua/``), `store` (the stream store and
`publish_direct`), `pipe` (pipelined publishing on one connection), `pubsub` (the listener),
`connections` (pools, Sentinel), `server` (one server's connections together), `broker`
(`RedisBroker`: routing to shards, state).

Outage: the listener survives Redis going away (DISCONNECTED, reconnect with backoff, resubscribe,
CONNECTED); `publish`, `history`, `position`, `latest_state` and `publish_control` raise
`BrokerError` (never raw redis-py errors) while Redis is unreachable; timeouts bound every call.
"""

from igratech_ws.brokers.redis.broker import RedisBroker
from igratech_ws.brokers.redis.names import (
    DEFAULT_PREFIX,
    control_channel,
    idempotency_key,
    meta_key,
    pubsub_channel,
    state_key,
    stream_key,
)
from igratech_ws.brokers.redis.shards import CONTROL_SHARD, shard_index, split_shards
from igratech_ws.brokers.redis.store import StreamStore, publish_direct
from igratech_ws.brokers.redis.urls import (
    DEFAULT_SENTINEL_PORT,
    SENTINEL_SCHEMES,
    SentinelTarget,
    parse_sentinel_url,
    split_prefix,
)
from igratech_ws.brokers.redis.wire import HISTORY_SCRIPT, PUBLISH_SCRIPT, STATE_SCRIPT

__all__ = [
    "CONTROL_SHARD",
    "DEFAULT_PREFIX",
    "DEFAULT_SENTINEL_PORT",
    "HISTORY_SCRIPT",
    "PUBLISH_SCRIPT",
    "SENTINEL_SCHEMES",
    "STATE_SCRIPT",
    "RedisBroker",
    "SentinelTarget",
    "StreamStore",
    "control_channel",
    "idempotency_key",
    "meta_key",
    "parse_sentinel_url",
    "publish_direct",
    "pubsub_channel",
    "shard_index",
    "split_prefix",
    "split_shards",
    "state_key",
    "stream_key",
]
