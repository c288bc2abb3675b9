"""The broker contract: what every broker (memory, Redis, NATS) provides to a node.

A broker owns each channel's stream: it appends a publication to the channel's bounded history and
fans it out to every node subscribed to the channel, *atomically per channel*, so that offsets are
gap-free. It keeps the latest publication of each state event of a channel (`latest_state`),
remembers idempotency keys for a window (`PublishResult.duplicate`), and carries control messages
(logins, forced logouts, presence) between nodes.

Only `publish` creates a stream: reading a channel nobody published (`position`, `history`,
`latest_state`) creates and refreshes nothing, and answers `StreamPosition(0, EMPTY_EPOCH)`.

Value types are plain and immutable so that a broker can hand the same object to many subscribers.
The contract is checked against every broker by `tests/brokers/test_contract.py` and
`tests/brokers/test_lifecycle.py`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import msgspec

from igratech_ws.core.recovery import EMPTY_EPOCH

if TYPE_CHECKING:
    from igratech_ws.brokers.options import BrokerOptions

__all__ = [
    "EMPTY_EPOCH",
    "Broker",
    "BrokerError",
    "BrokerState",
    "ControlKinds",
    "HistoryLimits",
    "HistoryPage",
    "NodePresence",
    "Publication",
    "PublishItem",
    "PublishResult",
    "StreamPosition",
    "UserLogin",
    "UserLogout",
]


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where a channel's stream stands: the newest offset and the stream's epoch.

    A channel with no stream (never published, or dropped) is at ``(0, EMPTY_EPOCH)``; its first
    publication starts a stream with a fresh epoch at offset 1.
    """

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


class PublishResult(msgspec.Struct, frozen=True, gc=False):
    """What `Broker.publish` did: the publication, and whether it was a duplicate.

    `duplicate` is True when the idempotency key was already used for this channel within the
    window: nothing was published, and `publication` describes the first publication made with
    that key (its channel, offset, epoch, event, time and origin; `data` is this call's, since
    brokers keep no payload for deduplication). A broker may know where the first publication is
    only while it is in history: once it has left, a duplicate is still refused and reported
    with `publication.offset` 0 and `publication.epoch` `EMPTY_EPOCH` (position unknown).

    (A frozen struct, not a frozen dataclass: one is built per publish, and it is cheaper.)
    """

    publication: Publication
    duplicate: bool = False


#: One item of `Broker.publish_many`: channel, event, data, idempotency key (or None).
PublishItem = tuple[str, str, bytes, str | None]


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


#: Longest idempotency key a broker accepts (the HTTP API allows 1-128 identifier characters).
MAX_IDEMPOTENCY_KEY_LENGTH = 128


def check_idempotency_key(key: str | None) -> None:
    """Raise ValueError unless `key` is None or 1-128 printable ASCII characters without spaces."""
    if key is None:
        return
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH or not (key.isascii() and key.isprintable()):
        raise ValueError("an idempotency key is 1-128 printable ASCII characters")
    if " " in key:
        raise ValueError("an idempotency key has no spaces")


def check_data(data: bytes) -> None:
    """Raise ValueError unless `data` is UTF-8, as the compact JSON of a payload is.

    Every broker checks it before publishing: a stored payload must read back as it was (the
    Redis broker stores it as a msgpack str), and a bad one must fail the publisher, not readers.
    """
    if data.isascii():  # the usual compact JSON, checked without decoding it
        return
    try:
        data.decode()
    except UnicodeDecodeError:
        raise ValueError("publication data must be UTF-8 (compact JSON)") from None


class Broker(Protocol):
    """What a node needs from a broker. One instance per node process.

    Caller's duties: call `start` once before anything else and `close` once at the end; call
    `subscribe` when the node's first local client follows a channel and `unsubscribe` when the last
    one leaves (the hub reference-counts; brokers need not); never block in the handlers, which are
    called on the event loop.

    Delivery: each publication of a subscribed channel is handed to `on_publication` once per
    subscription. Publications appended through one broker instance arrive in offset order;
    publications appended through different instances (nodes, backends) may arrive in another
    order than their offsets, so a caller treats a skipped offset as a gap (fill it from
    `history`) and an offset at or below the last one it delivered as a duplicate (the hub does).
    A handler that raises is logged (rate limited) and counted in `handler_errors`; delivery goes
    on.

    Lifecycle: `start` raises `BrokerError` naming the unreachable address if the broker cannot be
    reached at start. After that an outage is reported to `on_state` (CONNECTED -> DISCONNECTED
    -> CONNECTED) while the broker reconnects by itself; after CONNECTED again the caller re-reads
    history to fill what it missed. While disconnected, calls raise `BrokerError` (bounded by the
    broker's timeout) rather than hang.
    """

    node_id: str
    limits: HistoryLimits
    #: How the broker behaves (the same for every node of a deployment).
    options: BrokerOptions
    #: Whether other nodes can share this broker (False for memory: control messages are moot).
    shared: bool
    #: Whether `publish` finishes without ever waiting (memory): then a caller may run it outside
    #: a task (the HTTP fast path does). False when it may wait for a server, and may use
    #: ``asyncio.timeout``, which needs a task.
    publishes_at_once: bool

    @property
    def state(self) -> BrokerState: ...

    @property
    def handler_errors(self) -> int:
        """How many times a handler given to `start` raised."""
        ...

    async def start(
        self,
        on_publication: PublicationHandler,
        on_control: ControlHandler,
        on_state: StateHandler | None = None,
    ) -> None:
        """Connect, and deliver publications of subscribed channels and others' control messages.

        Raises `BrokerError` (naming host:port) if the broker is unreachable.
        """
        ...

    async def close(self) -> None:
        """Stop delivering and release connections. Idempotent."""
        ...

    async def publish(
        self, channel: str, event: str, data: bytes, *, idempotency_key: str | None = None
    ) -> PublishResult:
        """Append to `channel`'s history and fan out to subscribed nodes, atomically per channel.

        `data` is the validated compact JSON of the payload (UTF-8). With `idempotency_key`, a
        second publish with the same key to the same channel within the broker's idempotency
        window publishes nothing and returns the first one (`PublishResult.duplicate`), whichever
        node receives it. A state event (`BrokerOptions.state_events`) also replaces the channel's
        state slot for that event, in the same step. Raises `BrokerError` if it cannot (the
        publication may or may not have been made: retry with the same key), ValueError for a
        malformed key or data that is not UTF-8 (`check_idempotency_key`, `check_data`).

        Calls through one broker instance are queued in call order before their first await, so
        concurrent publishes to one channel (``asyncio.gather``) get offsets in call order, and
        a broker may carry them together (Redis: pipelined; NATS: one batch) instead of one
        round trip each.
        """
        ...

    async def publish_many(self, items: Sequence[PublishItem]) -> list[PublishResult]:
        """`publish` of every item (channel, event, data, idempotency key), all handed to the
        broker together, in list order; one result per item, in that order.

        As if published one after the other: each channel's offsets follow the list order, and
        a key repeated within `items` (same channel) makes the later item a duplicate of the
        earlier one. Unlike one after the other, the items travel together (Redis: one script
        call per server; NATS: one chain of appends per channel), so their deliveries come back
        together too, and a follower gets them in a few writes rather than one each.

        Raises ValueError for a malformed key or data in any item, before publishing any. If
        publishing fails, raises `BrokerError` once every item has settled: any item, before or
        after the failed one in the list, may or may not have been published (retry them all
        with their keys).
        """
        ...

    async def subscribe(self, channel: str) -> None:
        """Start delivering `channel`'s publications to this node. Returns once active."""
        ...

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering `channel`'s publications to this node."""
        ...

    # The `*_now` methods are optional shortcuts for a broker that can answer without I/O (the
    # memory broker): each either does at once exactly what its awaited counterpart does, or
    # declines and changes nothing, and the caller awaits the counterpart. `BrokerCore` declines
    # all of them. They spare a node a task and a few loop iterations per connection.

    def subscribe_now(self, channel: str) -> bool:
        """`subscribe`, done before returning: True when delivery of `channel` is active, as after
        ``await subscribe(channel)``; False when this broker cannot (nothing was done)."""
        ...

    def unsubscribe_now(self, channel: str) -> bool:
        """`unsubscribe`, done before returning: True when delivery of `channel` has stopped, as
        after ``await unsubscribe(channel)``; False when this broker cannot (nothing was done)."""
        ...

    def state_now(self, channel: str) -> tuple[list[Publication], StreamPosition] | None:
        """`latest_state` and `position` of `channel` read in one step, before returning: the
        states are then exactly the newest of each state event at or below the position
        (nothing can be published between the two reads). None when this broker cannot."""
        ...

    async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        """Publications of `channel` with offset > `since_offset` (at most `limit`), and the top.

        Only publications younger than the history ttl are returned. Creates nothing.
        """
        ...

    async def position(self, channel: str) -> StreamPosition:
        """The current top of `channel`'s stream; ``(0, EMPTY_EPOCH)`` if it has none.

        Creates and refreshes nothing.
        """
        ...

    async def latest_state(self, channel: str) -> list[Publication]:
        """The latest publication of each state event of `channel` in its current epoch, younger
        than the state ttl, oldest offset first (empty if none). Creates nothing."""
        ...

    async def publish_control(self, message: ControlKinds) -> None:
        """Send `message` to every other node (this node handles its own messages directly)."""
        ...
