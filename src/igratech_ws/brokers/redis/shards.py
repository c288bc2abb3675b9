"""Redis shards: which server holds a channel, and the server URLs of a sharded broker URL.

A broker URL may name several independent Redis servers (or Sentinel-watched masters). Each
channel lives on exactly one of them, chosen by *jump consistent hashing* (Lamping and Veach,
2014, as Centrifugo does) of the FNV-1a 64-bit hash of the channel name's UTF-8 bytes:
``shard_index(channel, n)``. Everything of a channel (meta, stream, state, idempotency records,
pub/sub) is on its shard, so a shard outage affects only its channels. Control messages (logins,
logouts, presence) use the first shard, `CONTROL_SHARD`.

Shards are numbered by their position in the URL. Jump hashing moves about 1/(n+1) of the
channels when a shard is added **at the end**, and nothing else; reordering or removing shards
moves most channels (their streams start over with new epochs, which clients are told). A backend
that publishes straight into Redis must use the same function (`publish_direct` does).

URLs (the ``prefix`` and other query parameters apply to every shard)::

    redis://[user:password@]host1:6379,host2:6379,host3:6379/0?prefix=igws:
    rediss://...                                   (TLS, same form)
    redis+sentinel://[user:password@]s1:26379,s2:26379/master-a,master-b,master-c/0
"""

from __future__ import annotations

import functools
from urllib.parse import urlsplit, urlunsplit

from igratech_ws.brokers.redis.urls import SENTINEL_SCHEMES

#: The shard that carries control messages.
CONTROL_SHARD = 0

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK = (1 << 64) - 1


def fnv1a_64(data: bytes) -> int:
    """The 64-bit FNV-1a hash of `data`."""
    value = _FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV_PRIME) & _MASK
    return value


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash: the bucket in ``range(buckets)`` of the 64-bit `key`."""
    if buckets < 1:
        raise ValueError("at least one bucket")
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * 2862933555777941757 + 1) & _MASK
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


@functools.lru_cache(maxsize=65_536)
def shard_index(channel: str, shards: int) -> int:
    """The shard (0-based, in URL order) that holds `channel` among `shards`."""
    if shards == 1:
        return 0
    return jump_hash(fnv1a_64(channel.encode()), shards)


def split_shards(url: str) -> list[str]:
    """The URL of each shard of a broker URL (one element for an unsharded URL).

    Plain URLs list the servers comma-separated in the host part; Sentinel URLs list the
    masters' service names comma-separated in the path (the sentinels are shared); a
    ``unix://`` URL is one server. Raises ValueError for an empty shard in a list.
    """
    parts = urlsplit(url)
    if parts.scheme in SENTINEL_SCHEMES:
        path = parts.path.strip("/")
        services, _, rest = path.partition("/")
        names = services.split(",")
        if len(names) == 1:
            return [url]
        if not all(names):
            raise ValueError("an empty Sentinel service name in the shard list")
        return [
            urlunsplit(parts._replace(path="/" + "/".join(filter(None, (name, rest)))))
            for name in names
        ]
    userinfo, at, hosts = parts.netloc.rpartition("@")
    servers = hosts.split(",")
    if len(servers) == 1:
        return [url]  # unix:// too: its socket path is not a host list
    if not all(servers):
        raise ValueError("an empty host in the Redis shard list")
    return [urlunsplit(parts._replace(netloc=f"{userinfo}{at}{server}")) for server in servers]
