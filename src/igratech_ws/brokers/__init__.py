"""Brokers behind one contract (`base.Broker`), chosen by URL scheme.

``memory://`` is the embedded default (one node). ``redis://`` / ``rediss://`` / ``unix://`` /
``redis+sentinel://`` and ``nats://`` / ``tls://`` import their client libraries lazily, so a node
on memory never loads them. The URL says where the broker is (and its namespace, ``prefix``);
`BrokerOptions` (built from the configuration by `options_from_config`) says how it behaves.

Layout: `base` (the contract and value types), `options`, `core` (what every broker shares:
handlers, state, guarded dispatch, epochs, backoff, control encoding), `memory`, and the packages
`redis` and `nats`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from igratech_ws.brokers.base import Broker
from igratech_ws.brokers.options import BrokerOptions, options_from_config

__all__ = ["BrokerOptions", "from_url", "options_from_config"]

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
NATS_SCHEMES = ("nats", "tls")


def from_url(url: str, options: BrokerOptions | None = None) -> Broker:
    """Build (not start) the broker named by `url`. Raises ValueError for an unknown scheme or
    a malformed URL."""
    options = options or BrokerOptions()
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from igratech_ws.brokers.memory import MemoryBroker

        return MemoryBroker(options)
    if scheme in REDIS_SCHEMES:
        from igratech_ws.brokers.redis import RedisBroker

        return RedisBroker(url, options)
    if scheme in NATS_SCHEMES:
        from igratech_ws.brokers.nats import NatsBroker

        return NatsBroker(url, options)
    raise ValueError(f"unknown broker URL scheme {scheme!r}: use memory://, redis:// or nats://")
