"""The broker contract: what every broker (memory, Redis, NATS) provides to a node.

A broker owns each channel's stream: it appends a publication to the channel's bounded history and
fans it out to every node subscribed to the channel, *atomically per channel*, so that offsets are
gap-free and every subscriber sees publications in offset order. It also carries control messages
(logins, forced logouts) between nodes.

Value types are plain and immutable so that a broker can hand the same object to many subscribers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where a channel's stream stands: the newest offset (0 = empty) and the stream's epoch."""

    offset: int
    epoch: str


class Publication(msgspec.Struct, frozen=True, array_like=True):
    """One event appended to a channel. `data` is the validated compact JSON of the payload.

    `published_at` (Unix seconds) and `origin` (node id) are for latency metrics and echo handling.
    """

    channel: str
    offset: int
    epoch: str
    event: str
    data: bytes
    published_at: float
    origin: str


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Publications after a requested offset, oldest first, and the stream's current top.

    If `publications` does not start right after the requested offset, history no longer covers
    the gap (see `igratech_ws.core.recovery.decide_recovery`).
    """

    publications: list[Publication]
    top: StreamPosition


class ControlMessage(msgspec.Struct, frozen=True, tag_field="kind"):
    """Base of node-to-node messages. Nodes skip the ones whose `origin` is themselves."""

    origin: str


class UserLogin(ControlMessage, frozen=True, tag="login"):
    """A user connected on `origin`; every other connection of that user opened earlier must go.

    "Earlier" compares (`connected_at`, `session_id`), so two simultaneous logins settle on one.
    """

    user_id: str
    session_id: str
    connected_at: float


class UserLogout(ControlMessage, frozen=True, tag="logout"):
    """The platform logged the user out: every connection of the user on every node must go."""

    user_id: str
    reason: Literal["forced", "token_expired"] = "forced"


class NodePresence(ControlMessage, frozen=True, tag="presence"):
    """A node's periodic report of who is connected to it, so that every node can tell totals.

    Nodes send one every `interval` seconds; a report older than three intervals is stale (the node
    is gone). `games` maps a game id to the connections following it on that node.
    """

    connections: int
    users: int
    games: dict[str, int]
    interval: float


ControlKinds = UserLogin | UserLogout | NodePresence

PublicationHandler = Callable[[Publication], None]
ControlHandler = Callable[[ControlKinds], None]
StateHandler = Callable[["BrokerState"], None]


class BrokerState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class HistoryLimits:
    """Bounds of each channel's history: at most `size` publications, none older than `ttl` s."""

    size: int = 1000
    ttl: float = 300.0


class BrokerError(Exception):
    """The broker could not do what was asked (unreachable, timed out). Safe to retry later."""


class Broker(Protocol):
    """What a node needs from a broker. One instance per node process.

    Caller's duties: call `start` once before anything else and `close` once at the end; call
    `subscribe` when the node's first local client follows a channel and `unsubscribe` when the last
    one leaves (the hub reference-counts; brokers need not); never block in the handlers, which are
    called on the event loop, once per publication and in offset order per channel, except that
    NATS's RePublish may swap two publications stored from different connections: the hub treats
    a skipped offset as a gap, fills it from history and drops the late one as a duplicate.
    """

    node_id: str
    limits: HistoryLimits
    #: Whether other nodes can share this broker (False for memory: control messages are moot).
    shared: bool

    @property
    def state(self) -> BrokerState: ...

    async def start(
        self,
        on_publication: PublicationHandler,
        on_control: ControlHandler,
        on_state: StateHandler | None = None,
    ) -> None:
        """Connect, and deliver publications of subscribed channels and others' control messages."""
        ...

    async def close(self) -> None:
        """Stop delivering and release connections. Idempotent."""
        ...

    async def publish(self, channel: str, event: str, data: bytes) -> Publication:
        """Append to `channel`'s history and fan out to subscribed nodes, atomically per channel.

        Returns the publication with its offset and epoch. Raises `BrokerError` if it cannot.
        """
        ...

    async def subscribe(self, channel: str) -> None:
        """Start delivering `channel`'s publications to this node. Returns once active."""
        ...

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering `channel`'s publications to this node."""
        ...

    async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        """Publications of `channel` with offset > `since_offset` (at most `limit`), and the top."""
        ...

    async def position(self, channel: str) -> StreamPosition:
        """The current top of `channel`'s stream (offset 0 and a fresh epoch if never used)."""
        ...

    async def publish_control(self, message: ControlKinds) -> None:
        """Send `message` to every other node (this node handles its own messages directly)."""
        ...
