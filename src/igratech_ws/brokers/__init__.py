"""Brokers behind one contract (`base.Broker`), chosen by URL scheme.

``memory://`` is the embedded default (one node). ``redis://`` / ``rediss://`` and ``nats://``
import their client libraries lazily, so a node on memory never loads them.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

from igratech_ws.brokers.base import Broker, HistoryLimits


def from_url(
    url: str, *, node_id: str | None = None, limits: HistoryLimits | None = None
) -> Broker:
    """Build the broker named by `url`. Raises ValueError for an unknown scheme."""
    node_id = node_id or uuid.uuid4().hex[:12]
    limits = limits or HistoryLimits()
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from igratech_ws.brokers.memory import MemoryBroker

        return MemoryBroker(node_id=node_id, limits=limits)
    if scheme in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"):
        from igratech_ws.brokers.redis import RedisBroker

        return RedisBroker(url, node_id=node_id, limits=limits)
    if scheme in ("nats", "tls"):
        from igratech_ws.brokers.nats import NatsBroker

        return NatsBroker(url, node_id=node_id, limits=limits)
    raise ValueError(f"unknown broker URL scheme {scheme!r}: use memory://, redis:// or nats://")
