"""`BrokerOptions`: every broker setting in one frozen value, built from `Config` in one place.

Brokers take their tuning from here and from nowhere else (the URL names *where* the broker is and
its namespace; these say how to behave). Settings that a broker does not use are ignored by it:
`max_channels` and `max_idempotency_keys` bound the memory broker only; `max_connections`,
`ping_interval` and `sentinel_check_interval` are Redis's.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from igratech_ws.brokers.base import HistoryLimits
from igratech_ws.core.channels import STATE_EVENTS

if TYPE_CHECKING:
    from igratech_ws.config import Config


def random_node_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    """How a broker behaves. Raises ValueError at construction for a nonsensical value.

    - `node_id`: this node's id (the origin of its publications and control messages).
    - `limits`: each channel's history bound (size, ttl seconds).
    - `state_ttl`: seconds a state slot (`Broker.latest_state`) lives after its last write.
    - `state_events`: the events kept in state slots (`core.channels.STATE_EVENTS`).
    - `idempotency_window`: seconds an idempotency key is remembered per channel.
    - `max_idempotency_keys`: memory broker: keys remembered at most (oldest forgotten first).
    - `max_channels`: memory broker: streams kept at most (least recently published dropped).
    - `op_timeout`: seconds one broker call may take (connect, request, reply).
    - `max_connections`: Redis: command connections per node and server (the pub/sub and the
      publish connection are extra).
    - `ping_interval`: Redis: seconds of silence before the listener PINGs (dead after two).
    - `backoff_min` / `backoff_max`: reconnect backoff bounds, seconds (equal jitter).
    - `sentinel_check_interval`: Redis Sentinel: seconds between asking who the master is.
    """

    node_id: str = field(default_factory=random_node_id)
    limits: HistoryLimits = field(default_factory=HistoryLimits)
    state_ttl: float = 86_400.0
    state_events: frozenset[str] = STATE_EVENTS
    idempotency_window: float = 300.0
    max_idempotency_keys: int = 100_000
    max_channels: int = 100_000
    op_timeout: float = 3.0
    max_connections: int = 32
    ping_interval: float = 5.0
    backoff_min: float = 0.1
    backoff_max: float = 5.0
    sentinel_check_interval: float = 1.0

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id must not be empty")
        if self.limits.size < 1 or not 0 < self.limits.ttl < math.inf:
            raise ValueError("history size must be at least 1 and history ttl positive")
        positive = {
            "state_ttl": self.state_ttl,
            "idempotency_window": self.idempotency_window,
            "op_timeout": self.op_timeout,
            "ping_interval": self.ping_interval,
            "backoff_min": self.backoff_min,
            "sentinel_check_interval": self.sentinel_check_interval,
        }
        for name, value in positive.items():
            if not 0 < value < math.inf:  # also refuses NaN
                raise ValueError(f"{name} must be positive (seconds), not {value}")
        if not self.backoff_min <= self.backoff_max < math.inf:
            raise ValueError("backoff_max must be at least backoff_min")
        for name, count in (
            ("max_idempotency_keys", self.max_idempotency_keys),
            ("max_channels", self.max_channels),
            ("max_connections", self.max_connections),
        ):
            if count < 1:
                raise ValueError(f"{name} must be at least 1, not {count}")

    @property
    def retention(self) -> float:
        """Seconds a stream's position (offset and epoch) outlives its last publication.

        At least a day, ten history ttls, and the state ttl (state belongs to an epoch, so the
        epoch must live as long as its state), and at least the idempotency window.
        """
        return max(86_400.0, 10 * self.limits.ttl, self.state_ttl, self.idempotency_window)


def options_from_config(config: Config) -> BrokerOptions:
    """The broker options of a node configured by `config` (the only place that maps them)."""
    return BrokerOptions(
        node_id=config.node_id or random_node_id(),
        limits=HistoryLimits(size=config.history_size, ttl=config.history_ttl),
        state_ttl=config.state_ttl,
        idempotency_window=config.idempotency_window,
        max_idempotency_keys=config.broker_max_idempotency_keys,
        max_channels=config.broker_max_channels,
        op_timeout=config.broker_timeout,
        max_connections=config.broker_max_connections,
        ping_interval=config.broker_ping_interval,
        backoff_min=config.broker_backoff_min,
        backoff_max=config.broker_backoff_max,
        sentinel_check_interval=config.broker_sentinel_check_interval,
    )
