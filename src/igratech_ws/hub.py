"""Local fan-out: which connection follows which channel, and getting frames to them in order.

The hub sits between the broker (publications in offset order per channel) and the connections of
this node. Its guarantees, per connection and channel: every publication after the position the
connection started from, exactly once, in offset order, after the answer (`connected` or
`settings`) that reported that position. How:

- **Every byte queued to a client passes the hub** (`send`, `send_wire`: pushes, replies, pongs,
  recovery replays) and counts against one budget per connection, `max_buffer_bytes`: the bytes
  queued here plus the bytes in the socket's write buffer (`Subscriber.backlog_bytes`). A frame
  that would pass it makes the connection a slow consumer: what is queued is dropped and it is
  closed with 1013 through its one `close_with` path, on the next loop iteration (never from
  inside a fan-out loop).
- A publication is encoded once into a complete WebSocket frame and the same bytes are queued for
  every subscriber. Each connection's queued frames are written in one system call per *walk*:
  a frame queued to an idle hub starts one on the next loop iteration, over every connection
  with frames queued, which is what makes fan-out cheap.
- A walk writes `FLUSH_CHUNK` connections per loop iteration, so that reads, handshakes and
  publishes wait for a few milliseconds of writes, not for a fan-out to every connection. A frame
  queued meanwhile to a connection the walk has not reached yet joins that connection's write.
- Under load the next walk waits: when frames were queued during a walk (publications come
  faster than a walk writes), the next one starts as long after as that walk spent writing (at
  most `max_flush_delay`), when that was over `FLUSH_COST_FREE`. Writing is the cost of fan-out
  (one system call per connection, whatever it carries), so the publications arriving meanwhile
  share those calls, and the writes take at most about half the loop. Lightly loaded (the next
  publication comes after the walk ended), nothing waits; overloaded, latency stays near twice
  the cost of one walk instead of growing without bound.
- A walk to many connections (`LINGER_CONNECTIONS`) that did not wait first lingers once
  (`flush_linger`, 5 ms; the node sets none on the memory broker): a broker hands a burst over
  in several socket reads (NATS pushes a chain of appends over a few milliseconds: 2 ms caught a
  burst of 100 in some rounds of `make bench` only, 5 ms in all), and the publications still on
  their way then share the same writes, as a burst on the memory broker does. Small fan-outs
  never linger; a walk that already waited under load does not linger again.
- A connection joining a channel is first *buffering*: live publications are held for it
  (bounded in count and bytes) while the broker reports the position, or whether history can
  recover it. When the channel is already live on this node, the node's last delivered position
  is the start and the broker is not asked. Then, in one synchronous step with the answer, what
  was held goes out and the connection goes live.
- **A recovery is replayed in pages as the socket drains**: the join decides from one
  publication whether history covers the gap; after the answer, one task per connection reads
  history a page at a time (bounded in count and bytes), queues it, and reads the next only once
  the page has reached the socket and the socket's buffer is below a quarter of the budget
  (`on_writable` wakes it). Meanwhile live publications of that channel are not held for the
  connection: history has them. When the replay reaches the node's live position the connection
  goes live, without gap or duplicate. A replay that history can no longer continue (trimmed
  under it, or the stream recreated) closes the connection, so that its next resume is told
  `recovered: false`: never a silent hole. Memory per replaying connection is one page, whatever
  `recovery_limit` is. A buffer that overflows, or a gap seen while joining, turns into such a
  replay rather than a close.
- The node remembers the last offset it delivered per channel. A publication that skips offsets,
  or a broker reconnect, triggers a *resync*: live publications are held (bounded) while history
  fills the gap, page by page. When history cannot fill it, the channel's connections are closed
  with 1012 so that they reconnect and learn through recovery (`recovered: false`) that they must
  reload.
- **Current state on follow** (D9): right after the answer that adds a channel, `finish_join`
  queues the channel's state snapshot: the latest publication of each state event at or below
  the position the connection starts from, marked `"snapshot": true` (and, when asked, the last
  stream events of the channel). It comes from a node-local record of the latest state
  publications (seeded once from `Broker.latest_state` after the broker subscription is active,
  then kept by every delivery, so complete up to the node's last delivered position), or from
  the broker when the record cannot vouch for the position. A recovered channel (`recovered:
  true`) gets none: its replay carries what follows the client's position.
- **Conflation** (D9): a connection whose socket holds more than a quarter of its budget is
  *behind*: its queued frames stay in its `Outbox` until the socket drains (`on_writable`)
  instead of being handed to the socket each tick. While behind, a live state publication whose
  channel's last queued frame is a state frame of the same event replaces that frame in place,
  as its pre-encoded `"conflated": true` variant (built once per publication); stream frames,
  and every frame not of the live fan-out (answers, pongs, snapshots, replays, which also end the
  tracking), are never dropped or moved, so each channel's order is kept.
- What the socket's buffer holds can no longer be replaced, so it gets at most a quarter of the
  budget (and a frame): live frames queued in one tick past a quarter are held (conflatable)
  from there on, and a flush writes what the socket takes up to that mark (`_release`). Three
  quarters of the budget (less a frame) always stay for the queue, where state conflates and
  stream frames wait: a stats flood cannot make a client a slow consumer by filling the socket
  in the tick the client stopped reading.
- Broker subscriptions are reference-counted: the broker hears `subscribe` when the first local
  connection joins a channel and `unsubscribe` when the last one leaves. Every map here is keyed
  by a channel some local connection follows, or by a connection: none outlives its key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import msgspec

from igratech_ws.brokers.base import Broker, BrokerError, Publication, StreamPosition
from igratech_ws.core.channels import STATE_EVENTS
from igratech_ws.core.close_codes import CloseCode
from igratech_ws.core.codec import CONFLATED_MARK, SNAPSHOT_MARK, publication_frame
from igratech_ws.core.framing import text_frame
from igratech_ws.core.messages import ChannelState
from igratech_ws.core.recovery import continues, may_continue, resumable

log = logging.getLogger("igratech_ws.hub")

#: A walk that wrote for less than this (seconds) lets the next one run on the next loop tick.
FLUSH_COST_FREE = 0.002
#: Connections one step of a walk writes before the loop runs other callbacks: about 5-10 ms of
#: writes here, so reads, handshakes and publishes wait no longer than that for a large fan-out.
FLUSH_CHUNK = 500
#: Connections with queued frames from which a flush lingers (`Hub.flush_linger`) before writing:
#: below, one flush costs less than the linger (a write is a few µs).
LINGER_CONNECTIONS = 500

#: How many times a resync asks the broker for history before the followers must reconnect.
RESYNC_ATTEMPTS = 8

#: Publications one history read of a replay or resync asks for at most (the count adapts down
#: to the page's byte bound from the sizes seen).
PAGE_MAX_COUNT = 64
#: Bytes of publications one page queues at most (also bounded by a quarter of the budget).
PAGE_MAX_BYTES = 256 * 1024
#: How often a waiting replay looks at the socket again without an `on_writable` call (seconds):
#: a safety net for a transport that reports nothing, not the way replays normally advance.
WRITABLE_POLL = 0.25
#: Bytes counted per held publication besides its payload (object, channel, epoch).
PUBLICATION_OVERHEAD = 120
#: Publications a `history` request looks back through at most per channel, for its stream events.
HISTORY_SCAN = 1000
#: Reads of (state slots, position, state slots) for a join from the broker before settling for
#: the newest state at or below the position that the reads saw (see `Hub._state_at_top`).
STATE_READ_ATTEMPTS = 4


class Subscriber(Protocol):
    """What the hub needs of a connection (implemented by the WebSocket listener).

    `pending` is owned by the hub: the connection's `Outbox` (the frames queued this tick), None
    until the hub first queues something; the transport may reset it to None when it closes.
    `write_wire` writes bytes to the socket at once; `backlog_bytes` is what the socket's write
    buffer holds (the hub counts it against the budget); `close_with` flushes what is pending and
    closes with `code`, and the node then calls `leave` for every channel. The transport calls
    `Node.on_writable` (so `Hub.on_writable`) when the socket's buffer drains after a pause, and
    queues its own control frames (pongs) through `Hub.send_wire`.
    """

    pending: Outbox | None

    @property
    def is_open(self) -> bool: ...

    def backlog_bytes(self) -> int: ...

    def write_wire(self, data: bytes) -> None: ...

    def close_with(self, code: CloseCode) -> None: ...


class Outbox(list[bytes]):
    """One connection's frames queued this tick (empty between ticks: the same object serves the
    connection's whole life, so that a tick allocates nothing), and `size`: the bytes they and
    the socket's write buffer hold, checked against the budget on every push.

    `tracked` is None unless the connection is *behind* (its frames are held until the socket
    drains): then it maps each channel to the index of its last queued live frame, and each
    (channel, state event) to the index of its last queued live state frame, which is what
    conflation needs to replace a superseded state frame without reordering its channel.
    """

    __slots__ = ("size", "tracked")

    def __init__(self) -> None:
        super().__init__()
        self.size = 0
        self.tracked: dict[str | tuple[str, str], int] | None = None


#: The outbox of a connection that passed its budget: everything pushed to it is dropped until
#: the close (scheduled) takes it away. It holds nothing, and its size passes any budget.
_OVERFLOWED = Outbox()

# How a joining connection receives a channel's live publications (`_Join.mode`).
_BUFFERING = 0  # the start is not known yet: hold them (bounded)
_OVERFLOWED_BUFFER = 1  # the hold passed its bound: drop them; history will replay them
_REPLAYING = 2  # a replay from history feeds the connection: skip them
_FILTERING = 3  # the start is known: queue those after it, go live once caught up


class _Join:
    """A connection joining a channel; see the module doc for the modes."""

    __slots__ = ("buffer", "buffered_bytes", "epoch", "mode", "start")

    def __init__(self) -> None:
        self.mode = _BUFFERING
        self.buffer: list[Publication] = []
        self.buffered_bytes = 0
        #: The last position queued to the connection (meaningful from _REPLAYING on).
        self.start = 0
        self.epoch = ""


class JoinResult(msgspec.Struct, frozen=True):
    """The position a connection starts a channel from, and what to send it first.

    `missed` is the beginning of a recovery (at most one publication: the rest is replayed in
    pages after the answer); `cursor` is the offset the connection holds once `missed` is sent.
    """

    state: ChannelState
    missed: list[Publication]
    cursor: int
    #: The channel's current state (and asked-for stream events) at or below `cursor`, in offset
    #: order, queued marked `snapshot` right after the answer (empty for a recovered channel).
    snapshot: tuple[Publication, ...] = ()


class _StateRecord:
    """The latest publication of each state event of a channel this node follows.

    Complete up to the node's last delivered position once `seeded`: deliveries keep it from the
    broker subscription on, and one `Broker.latest_state` read after the subscription was active
    supplies what came before. `wires` caches each entry's snapshot frame.
    """

    __slots__ = ("latest", "seeded", "wires")

    def __init__(self) -> None:
        self.latest: dict[str, Publication] = {}
        self.wires: dict[str, tuple[Publication, bytes]] = {}
        self.seeded = False

    def put(self, publication: Publication) -> None:
        """A delivered state publication (deliveries are in order: the newest wins)."""
        self.latest[publication.event] = publication

    def complete_at(self, last: tuple[int, str]) -> bool:
        """Every entry is of `last`'s epoch and at or below it: the record is then exactly the
        newest state at or below `last` (deliveries are contiguous up to it)."""
        offset, epoch = last
        return all(p.epoch == epoch and p.offset <= offset for p in self.latest.values())

    def seed(self, publications: list[Publication], live_epoch: str | None) -> None:
        """Merge the broker's slots: an entry is replaced by a newer one of its epoch, or by one
        of another epoch unless the entry is of the epoch being delivered."""
        for publication in publications:
            known = self.latest.get(publication.event)
            if (
                known is None
                or (known.epoch == publication.epoch and known.offset < publication.offset)
                or (known.epoch != publication.epoch and known.epoch != live_epoch)
            ):
                self.latest[publication.event] = publication
        self.seeded = True


class HistoryAllowance:
    """What one request's `settings.history` may read and send, shared by every channel the
    request adds: one channel read at a time, at most `max_bytes` of stream events in all and at
    most `HISTORY_SCAN` publications looked through in all. Channels served after it is spent get
    fewer events, or none (the newest of each kept). A request's work and what it queues are so
    bounded whatever the number of channels times `history` (100 games with `history: 100` once
    read up to 256 KiB per game, all at once, and closed the asking client with 1013)."""

    __slots__ = ("bytes_left", "lock", "scan_left")

    def __init__(self, max_bytes: int) -> None:
        self.lock = asyncio.Lock()
        self.bytes_left = max_bytes
        self.scan_left = HISTORY_SCAN


def _with_held_state(
    snapshot: tuple[Publication, ...], held: list[Publication], cursor: int, epoch: str
) -> tuple[Publication, ...]:
    """`snapshot` with each state entry replaced by a newer one of its event that was delivered
    while the connection joined, at or below the start (`cursor`): the reads of the slots can
    miss it (see `Hub._state_at_top`), and it would otherwise be dropped as before the start."""
    newest = {p.event: p for p in snapshot if p.event in STATE_EVENTS}
    changed = False
    for publication in held:
        if (
            publication.event in STATE_EVENTS
            and publication.epoch == epoch
            and 0 < publication.offset <= cursor
        ):
            known = newest.get(publication.event)
            if known is None or known.offset < publication.offset:
                newest[publication.event] = publication
                changed = True
    if not changed:
        return snapshot
    stream = [p for p in snapshot if p.event not in STATE_EVENTS]
    return tuple(sorted([*stream, *newest.values()], key=lambda p: p.offset))


def _slots(states: list[Publication]) -> set[tuple[str, int, str]]:
    return {(p.event, p.offset, p.epoch) for p in states}


def _offset_of(publication: Publication) -> int:
    return publication.offset


def _held_size(publication: Publication) -> int:
    return len(publication.data) + PUBLICATION_OVERHEAD


class Hub:
    """Channel -> connections, with ordered, exactly-once, coalesced, budgeted delivery.

    See the module doc. `max_buffer_bytes` is each connection's outbound budget
    (`max_write_buffer_bytes`); `join_buffer_limit` / `join_buffer_bytes` bound what is held for
    one joining connection and for one channel's resync.
    """

    def __init__(
        self,
        broker: Broker,
        *,
        recovery_limit: int = 1000,
        join_buffer_limit: int = 10_000,
        join_buffer_bytes: int | None = None,
        max_buffer_bytes: int = 1_048_576,
        max_flush_delay: float = 0.05,
        flush_linger: float = 0.005,
    ) -> None:
        self.broker = broker
        self.recovery_limit = recovery_limit
        self.join_buffer_limit = join_buffer_limit
        self.max_buffer_bytes = max_buffer_bytes
        self.join_buffer_bytes = join_buffer_bytes or max_buffer_bytes
        #: A replay queues its next page only while the socket holds less than this.
        self.low_water = max_buffer_bytes // 4
        self.page_bytes = max(1, min(PAGE_MAX_BYTES, self.low_water))
        self._live: dict[str, set[Subscriber]] = {}
        self._joining: dict[str, dict[Subscriber, _Join]] = {}
        self._last: dict[str, tuple[int, str]] = {}
        self._syncing: dict[str, list[Publication]] = {}
        self._syncing_bytes: dict[str, int] = {}
        #: Channels with a broker subscription: the task making it, or None when the broker
        #: made it at once (`Broker.subscribe_now`).
        self._broker_subs: dict[str, asyncio.Task[None] | None] = {}
        #: Per connection with a replay: the joins waiting for the one replay task, in order.
        self._replays: dict[Subscriber, deque[tuple[str, _Join]]] = {}
        self._writable_waiters: dict[Subscriber, asyncio.Future[None]] = {}
        self._flush_waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        #: Connections with frames queued since the current walk began (or since the last one).
        self._dirty: list[Subscriber] = []
        #: A flush is scheduled or a walk is under way: what is queued meanwhile is written by it
        #: or by the walk that follows it, so queueing schedules nothing.
        self._flush_scheduled = False
        #: The walk under way (the connections it writes, `FLUSH_CHUNK` per loop iteration), the
        #: next one's index, and the seconds its chunks have spent writing so far.
        self._walk: list[Subscriber] | None = None
        self._walk_at = 0
        self._walk_cost = 0.0
        self.max_flush_delay = max_flush_delay
        self.flush_linger = flush_linger
        #: The scheduled flush waited under load, or already lingered: it writes when it runs.
        self._flush_waited = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Counters read by metrics: frames queued to connections, publications received.
        self.frames_out = 0
        #: Writes to client sockets from the hub: ``frames_out / writes`` is how many frames a
        #: write carries (the coalescing the module doc describes), per node.
        self.writes = 0
        self.publications_in = 0
        self.resyncs = 0
        self.slow_consumers = 0
        self.replays = 0
        self.replays_abandoned = 0
        #: Frames sent as a channel's current state or history on follow (`"snapshot": true`).
        self.snapshot_frames = 0
        #: Queued state frames dropped because a newer one of their channel and event replaced
        #: them under a connection that was behind (the replacement is marked `conflated`).
        self.conflated_frames = 0
        #: Per channel some local connection follows: its latest state publications.
        self._states: dict[str, _StateRecord] = {}
        self.state_ttl = broker.options.state_ttl
        #: Connections whose frames are held until their socket drains (see `Outbox.tracked`).
        self._behind: set[Subscriber] = set()
        self._behind_timer: asyncio.TimerHandle | None = None
        self._conflated_cache: tuple[Publication, bytes] | None = None
        self.on_delivered: Callable[[Publication, int], None] | None = None

    # --- queries ---------------------------------------------------------------------------------

    @property
    def channel_count(self) -> int:
        return len(self._live.keys() | self._joining.keys())

    def channels(self) -> set[str]:
        """Channels with at least one local follower (live or joining)."""
        return self._live.keys() | self._joining.keys()

    def subscriber_count(self, channel: str) -> int:
        return len(self._live.get(channel, ())) + len(self._joining.get(channel, ()))

    def position_of(self, subscriber: Subscriber, channel: str) -> tuple[int, str] | None:
        """The last position queued to `subscriber` on `channel`, if the hub knows it."""
        joining = self._joining.get(channel)
        join = joining.get(subscriber) if joining else None
        if join is not None:
            if join.mode in (_BUFFERING, _OVERFLOWED_BUFFER):
                return None
            return join.start, join.epoch
        if subscriber in self._live.get(channel, ()):
            return self._last.get(channel)
        return None

    # --- writing ---------------------------------------------------------------------------------

    def send(self, subscriber: Subscriber, frame_payload: bytes) -> None:
        """Queue one text frame (a JSON payload) to `subscriber`, in order with its pushes."""
        self.send_wire(subscriber, text_frame(frame_payload))

    def send_wire(self, subscriber: Subscriber, wire: bytes) -> None:
        """Queue one complete WebSocket frame (`wire`: header and payload, e.g. a pong the
        transport builds) to `subscriber`, in order with everything else queued to it, within its
        budget. Past the budget the connection is closed as a slow consumer (1013) on the next
        loop iteration, and this frame and everything queued with it are dropped."""
        pending = subscriber.pending
        if pending:  # frames queued this tick
            if pending.tracked:
                # Nothing queued before this frame may be replaced by a later one (its order
                # against this frame, an answer or a snapshot, say, is the client's view).
                pending.tracked.clear()
            size = pending.size + len(wire)
            if size > self.max_buffer_bytes and self._recount(subscriber, pending):
                size = pending.size + len(wire)
            if size <= self.max_buffer_bytes:
                pending.append(wire)
                pending.size = size
                return
            # Before calling the client slow, hand what is queued to the socket now: the kernel
            # takes what it can, and only what stays in the socket's buffer counts.
            self.flush_one(subscriber)
        elif pending is _OVERFLOWED:
            return
        backlog = subscriber.backlog_bytes()
        size = backlog + len(wire)
        if size > self.max_buffer_bytes:
            self._overflow(subscriber)
            return
        if pending is None:
            pending = subscriber.pending = Outbox()
        pending.append(wire)
        pending.size = size
        if backlog > self.low_water and subscriber.is_open:
            self._hold(subscriber, pending)  # behind: held (this frame is a barrier)
            return
        self._dirty.append(subscriber)
        if not self._flush_scheduled:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Something was queued to an idle hub: write it on the next loop iteration."""
        self._flush_scheduled = True
        self._flush_waited = False
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        loop.call_soon(self.flush)

    def _overflow(self, subscriber: Subscriber) -> None:
        if subscriber.pending is _OVERFLOWED:
            return
        subscriber.pending = _OVERFLOWED  # drops what was queued: it will never be read
        self.slow_consumers += 1
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        # Not now: the caller may be iterating over the channel's followers, which the close
        # (through the node's `leave`) changes.
        loop.call_soon(subscriber.close_with, CloseCode.TRY_AGAIN_LATER)

    def flush(self) -> None:
        """Write every connection's queued frames, one write per connection: start a walk over
        the connections queued so far (after lingering once when many have some and the flush
        did not wait: see the module doc), or carry on with the walk under way."""
        if self._walk is None:
            if (
                not self._flush_waited
                and self.flush_linger > 0
                and len(self._dirty) >= LINGER_CONNECTIONS
            ):
                self._flush_waited = True
                assert self._loop is not None  # set by `_schedule_flush`
                self._loop.call_later(self.flush_linger, self.flush)
                return
            self._walk, self._dirty = self._dirty, []
            self._walk_at = 0
            self._walk_cost = 0.0
        walk = self._walk
        started = time.perf_counter()
        at = self._walk_at
        end = min(at + FLUSH_CHUNK, len(walk))
        low_water = self.low_water
        assert self._loop is not None  # set by `_schedule_flush`
        index = at
        try:
            for index in range(at, end):
                subscriber = walk[index]
                pending = subscriber.pending
                if not pending:
                    continue
                if not subscriber.is_open:
                    self.flush_one(subscriber)  # drops them
                    continue
                backlog = subscriber.backlog_bytes()
                if backlog > low_water:
                    if pending.tracked is None:
                        self._hold(subscriber, pending)
                    continue  # held until the socket drains
                self._release(subscriber, pending, backlog)
        except BaseException:
            # A connection's write raised (the loop logs it): the walk carries on after it, or
            # it would stay under way with nothing to continue it, and nothing queued to any
            # connection would be written again.
            self._walk_at = index + 1
            self._loop.call_soon(self.flush)
            raise
        self._walk_cost += time.perf_counter() - started
        if end < len(walk):
            # The rest on the next loop iteration: what the sockets and timers have waited for
            # runs in between, and a frame queued meanwhile to a connection not yet written
            # joins its write.
            self._walk_at = end
            self._loop.call_soon(self.flush)
            return
        self._end_walk()
        # Replays waiting for their page to reach the socket: woken once per walk, not per chunk
        # (each would run once per chunk, filling the loop iterations between chunks).
        waiters, self._flush_waiters = self._flush_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _end_walk(self) -> None:
        """The walk wrote its last connection. Frames queued during it mean publications come
        faster than a walk: the next walk waits as long as this one wrote (at most
        `max_flush_delay`), so that more of them share each write. Otherwise the hub is idle
        and the next frame queued is written at once."""
        self._walk = None
        if not self._dirty:
            self._flush_scheduled = False
            return
        assert self._loop is not None  # set by `_schedule_flush`
        cost = self._walk_cost
        if cost >= FLUSH_COST_FREE and self.max_flush_delay > 0:
            self._flush_waited = True
            self._loop.call_later(min(cost, self.max_flush_delay), self.flush)
        else:
            self._flush_waited = False
            self._loop.call_soon(self.flush)

    def flush_one(self, subscriber: Subscriber) -> None:
        """Write all of `subscriber`'s queued frames now, held ones included, however full its
        socket is: before closing it, or before deciding it is a slow consumer. (A flush writes
        through `_release`, which keeps what the socket cannot take.)"""
        pending = subscriber.pending
        if not pending:
            return  # nothing queued (or a slow consumer's outbox, which is always empty)
        if pending.tracked is not None:
            pending.tracked = None
            self._behind.discard(subscriber)
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if subscriber.is_open:
            self.writes += 1
            subscriber.write_wire(data)

    def _release(self, subscriber: Subscriber, pending: Outbox, backlog: int) -> None:
        """Hand `subscriber`'s queued frames to its open socket, whose buffer holds `backlog`
        bytes (at most `low_water`: the caller checked). Usually in one write; when they would
        take the buffer past `low_water`, in writes that fill it up to there (at least one frame
        each) for as long as the socket keeps up, the rest held (conflatable) until it drains.

        Why not all at once: bytes in the socket's buffer can no longer be replaced by newer
        state. A socket that takes nothing would hold up to the whole budget of stats, and the
        next stream frame would close the connection as a slow consumer; so at most a quarter of
        the budget (and a frame) waits there, and the rest of the budget stays for the queue."""
        if len(pending) == 1:
            data = pending[0]
        else:
            data = b"".join(pending)
            if backlog + len(data) > self.low_water:
                self._release_some(subscriber, pending, backlog)
                return
        # Out of the outbox before the write: one that raises (the loop logs it) drops them.
        pending.clear()
        if pending.tracked is not None:
            pending.tracked = None
            self._behind.discard(subscriber)
        self.writes += 1
        subscriber.write_wire(data)

    def _release_some(self, subscriber: Subscriber, pending: Outbox, backlog: int) -> None:
        """`_release` of frames that would take the socket's buffer past `low_water`."""
        # Taken out of the outbox before writing: a write that raises (the loop logs it) drops
        # them, as `flush_one` does, and leaves no tracking pointing past the outbox's end.
        frames = pending[:]
        pending.clear()
        tracked = pending.tracked
        if tracked is not None:
            pending.tracked = None
            self._behind.discard(subscriber)
        low_water = self.low_water
        written = 0
        while written < len(frames) and backlog <= low_water:
            end = written + 1
            size = len(frames[written])
            room = low_water - backlog
            while end < len(frames) and size + len(frames[end]) <= room:
                size += len(frames[end])
                end += 1
            self.writes += 1
            subscriber.write_wire(
                frames[written] if end == written + 1 else b"".join(frames[written:end])
            )
            written = end
            if not subscriber.is_open:
                return
            backlog = subscriber.backlog_bytes()
        if written == len(frames):
            return
        pending.extend(frames[written:])
        pending.size = backlog + sum(map(len, pending))
        self._hold(subscriber, pending)
        if tracked:  # what was queued before the hold (`tracked` None) stays as it is
            pending.tracked = {key: at - written for key, at in tracked.items() if at >= written}

    def _recount(self, subscriber: Subscriber, pending: Outbox) -> bool:
        """A held `pending` counts the socket's buffer as it was at the hold (or the last
        release); the client may have read some since, without a drain report (that comes at
        half of `low_water`) nor a poll yet. Count it as it is now: True when that is less.
        Called only when the old count says over the budget (the sum is the frames' lengths)."""
        if pending.tracked is None or not subscriber.is_open:
            return False
        size = subscriber.backlog_bytes() + sum(map(len, pending))
        if size >= pending.size:
            return False
        pending.size = size
        return True

    def _hold(self, subscriber: Subscriber, pending: Outbox) -> None:
        """`subscriber` is behind: keep its frames queued (conflatable) until its socket drains,
        which the transport reports through `on_writable` (and a poll checks, as a safety net)."""
        pending.tracked = {}
        self._behind.add(subscriber)
        if self._behind_timer is None:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._behind_timer = loop.call_later(WRITABLE_POLL, self._poll_behind)

    def _poll_behind(self) -> None:
        self._behind_timer = None
        try:
            for subscriber in list(self._behind):
                if not subscriber.is_open:
                    self._behind.discard(subscriber)
                else:
                    self._write_held(subscriber)
        finally:
            # One timer: a partial release above holds the rest again (`_hold`), which already
            # scheduled the next poll; and a write that raises (the loop logs it) must not end
            # the polling of the others, whose held frames would then wait for good.
            if self._behind and self._behind_timer is None and self._loop is not None:
                self._behind_timer = self._loop.call_later(WRITABLE_POLL, self._poll_behind)

    def _write_held(self, subscriber: Subscriber) -> None:
        """`subscriber`'s socket may have drained: what is held for it goes out, as much as the
        socket takes (`_release`)."""
        pending = subscriber.pending
        if not pending or pending.tracked is None:
            return
        if not subscriber.is_open:
            self.flush_one(subscriber)  # drops them
            return
        backlog = subscriber.backlog_bytes()
        if backlog <= self.low_water:
            self._release(subscriber, pending, backlog)

    def on_writable(self, subscriber: Subscriber) -> None:
        """The transport: `subscriber`'s socket buffer drained after a pause: what was held for
        it goes out, and a waiting replay may queue its next page."""
        self._write_held(subscriber)
        waiter = self._writable_waiters.pop(subscriber, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- publications from the broker ------------------------------------------------------------

    def on_publication(self, publication: Publication) -> None:
        """Broker handler: deliver `publication` to this node's followers of its channel."""
        self.publications_in += 1
        channel = publication.channel
        if channel not in self._broker_subs:
            # Released (no local follower): the broker may deliver until its unsubscribe takes
            # effect. Remembering it would leave a `_last` for nobody, stale by the time someone
            # joins again (a false gap, and a resync that closes that follower).
            return
        held = self._syncing.get(channel)
        if held is not None:
            size = self._syncing_bytes.get(channel, 0) + _held_size(publication)
            if len(held) >= self.join_buffer_limit or size > self.join_buffer_bytes:
                self._give_up(channel, "resync buffer overflow")
            else:
                held.append(publication)
                self._syncing_bytes[channel] = size
            return
        last = self._last.get(channel)
        if last is not None:
            if publication.epoch == last[1]:
                if publication.offset <= last[0]:
                    return  # already delivered (redelivery after a resubscribe)
                if publication.offset > last[0] + 1:
                    self._start_resync(channel, [publication])
                    return
            elif self._live.get(channel):
                # The stream was recreated: what the followers hold belongs to the old epoch.
                self._start_resync(channel, [publication])
                return
        self._deliver(publication)

    def _deliver(self, publication: Publication) -> None:
        channel = publication.channel
        self._last[channel] = (publication.offset, publication.epoch)
        is_state = publication.event in STATE_EVENTS
        if is_state:
            record = self._states.get(channel)
            if record is not None:
                record.put(publication)
        wire: bytes | None = None
        live = self._live.get(channel)
        if live:
            wire = self._wire(publication)
            size = len(wire)
            room = self.max_buffer_bytes - size
            low_water = self.low_water
            loose_room = low_water - size
            dirty = self._dirty
            for subscriber in live:
                # `send_wire` inline for the fan-out's hot loop, where the frame fits the budget.
                pending = subscriber.pending
                if pending:
                    if pending.tracked is not None:
                        if self._queue_behind(pending, publication, wire, is_state) or (
                            self._recount(subscriber, pending)
                            and self._queue_behind(pending, publication, wire, is_state)
                        ):
                            continue
                    elif pending.size <= loose_room:
                        pending.append(wire)
                        pending.size += size
                        continue
                    elif pending.size <= room:
                        # A quarter of the budget queued (with the socket's buffer) since the
                        # last write: what follows is held, conflatable, until the walk has seen
                        # how much of it the socket takes (`_release`).
                        self._hold(subscriber, pending)
                        self._queue_behind(pending, publication, wire, is_state)
                        continue
                elif pending is not None and pending is not _OVERFLOWED:
                    backlog = subscriber.backlog_bytes()
                    if backlog <= room:
                        if backlog > low_water:  # behind: hold from this frame on
                            pending.size = backlog
                            self._hold(subscriber, pending)
                            self._queue_behind(pending, publication, wire, is_state)
                            continue
                        pending.append(wire)
                        pending.size = backlog + size
                        dirty.append(subscriber)
                        continue
                self.send_wire(subscriber, wire)
            if dirty and not self._flush_scheduled:
                self._schedule_flush()
            self.frames_out += len(live)
        joining = self._joining.get(channel)
        if joining:
            promote: list[Subscriber] = []
            for subscriber, join in list(joining.items()):
                mode = join.mode
                if mode == _BUFFERING:
                    size = join.buffered_bytes + _held_size(publication)
                    if len(join.buffer) >= self.join_buffer_limit or size > self.join_buffer_bytes:
                        # History holds them: the join catches up from there instead.
                        join.mode = _OVERFLOWED_BUFFER
                        join.buffer = []
                        join.buffered_bytes = 0
                    else:
                        join.buffer.append(publication)
                        join.buffered_bytes = size
                elif mode == _FILTERING:
                    offset = publication.offset
                    if publication.epoch == join.epoch and offset <= join.start:
                        if offset == join.start:
                            promote.append(subscriber)
                    elif _follows(join.start, join.epoch, publication):
                        wire = wire or self._wire(publication)
                        self.send_wire(subscriber, wire)
                        self.frames_out += 1
                        join.start, join.epoch = offset, publication.epoch
                        promote.append(subscriber)
                    elif not may_continue(join.start, join.epoch, publication.epoch):
                        # The stream was recreated since the connection's start.
                        subscriber.close_with(CloseCode.SERVICE_RESTART)
                    else:
                        # Offsets skipped between the start and live: history fills them.
                        self._replay_later(subscriber, channel, join)
            for subscriber in promote:
                del joining[subscriber]
                self._live.setdefault(channel, set()).add(subscriber)
            if not joining:
                self._joining.pop(channel, None)
        if self.on_delivered is not None:
            self.on_delivered(publication, len(live) if live else 0)

    def _queue_behind(
        self, pending: Outbox, publication: Publication, wire: bytes, is_state: bool
    ) -> bool:
        """Queue a live frame to a connection that is behind, replacing the channel's last queued
        frame when it is a state frame of the same event (conflation). False: over the budget
        (the caller's `send_wire` decides)."""
        tracked = pending.tracked
        assert tracked is not None
        channel = publication.channel
        if is_state:
            key = (channel, publication.event)
            previous = tracked.get(key)
            if previous is not None and tracked.get(channel) == previous:
                replacement = self._conflated_wire(publication)
                size = pending.size - len(pending[previous]) + len(replacement)
                if size > self.max_buffer_bytes:
                    return False
                pending[previous] = replacement  # the channel's last frame: its order holds
                pending.size = size
                self.conflated_frames += 1
                return True
        size = pending.size + len(wire)
        if size > self.max_buffer_bytes:
            return False
        index = len(pending)
        if is_state:
            tracked[(channel, publication.event)] = index
        tracked[channel] = index
        pending.append(wire)
        pending.size = size
        return True

    def _conflated_wire(self, publication: Publication) -> bytes:
        """The `"conflated": true` frame of `publication`, built once for all its followers."""
        cached = self._conflated_cache
        if cached is not None and cached[0] is publication:
            return cached[1]
        wire = self._wire(publication, CONFLATED_MARK)
        self._conflated_cache = (publication, wire)
        return wire

    def _snapshot_wire(self, publication: Publication) -> bytes:
        """The `"snapshot": true` frame of `publication` (cached for state entries of the
        channel's record, which a storm of joins shares)."""
        record = self._states.get(publication.channel)
        if record is None or publication.event not in STATE_EVENTS:
            return self._wire(publication, SNAPSHOT_MARK)
        cached = record.wires.get(publication.event)
        if cached is not None and cached[0] is publication:
            return cached[1]
        wire = self._wire(publication, SNAPSHOT_MARK)
        record.wires[publication.event] = (publication, wire)
        return wire

    @staticmethod
    def _wire(publication: Publication, mark: bytes = b"") -> bytes:
        return text_frame(
            publication_frame(
                publication.event,
                publication.channel,
                publication.offset,
                publication.epoch,
                publication.data,
                mark,
            )
        )

    # --- joining and leaving ---------------------------------------------------------------------

    def history_allowance(self) -> HistoryAllowance:
        """A new allowance for one request's history: a quarter of the budget in bytes."""
        return HistoryAllowance(self.page_bytes)

    def _delivered_states(self, channel: str) -> tuple[tuple[int, str], list[Publication]] | None:
        """The channel's last delivered position and latest states when this node can start a
        join there without asking the broker, else None.

        It can when it has delivered the channel up to that position, in order (not resyncing),
        and everything newer reaches the join buffer: an exact start, which is what keeps a storm
        of clients joining one game off the broker; and when the state record is complete up to
        that position (none of it newer: a newer entry from the broker's slots hides the one at
        or below it).
        """
        last = self._last.get(channel)
        record = self._states.get(channel)
        if (
            last is not None
            and channel not in self._syncing
            and record is not None
            and record.seeded
            and record.complete_at(last)
        ):
            return last, list(record.latest.values())
        return None

    def join_now(self, subscriber: Subscriber, channel: str) -> JoinResult | None:
        """`join` of `channel` without recovery or history, done before returning when nothing
        needs the broker's I/O: its subscription is active (or the broker makes it at once,
        `Broker.subscribe_now`) and the start is this node's last delivered position, or what
        the broker reads at once (`Broker.state_now`). None when it cannot: no join was started
        (a subscription may have been), and the caller awaits `join` instead.

        The result and the caller's duties are `join`'s (`finish_join` right after the answer).
        """
        subscriptions = self._broker_subs
        if channel in subscriptions:
            task = subscriptions[channel]
            if task is not None and not (
                task.done() and not task.cancelled() and task.exception() is None
            ):
                return None  # being made, or failed: `join` waits for it or tries again
        elif self.broker.subscribe_now(channel):
            subscriptions[channel] = None
            self._states[channel] = _StateRecord()
        else:
            return None
        record = self._states.get(channel)
        known = self._delivered_states(channel)
        if known is not None:
            last, states = known
        else:
            read = self.broker.state_now(channel)
            if read is None:
                return None
            states, top = read
            if record is not None:  # seeded as `_read_states` does
                live = self._last.get(channel)
                record.seed(states, live[1] if live is not None else None)
            last = (top.offset, top.epoch)
        self._joining.setdefault(channel, {})[subscriber] = _Join()
        offset, epoch = last
        snapshot: tuple[Publication, ...] = ()
        if offset > 0 and states:  # as `_snapshot` without history
            picked = self._current_state(states, offset, epoch)
            picked.sort(key=_offset_of)
            snapshot = tuple(picked)
        state = ChannelState(channel=channel, offset=offset, epoch=epoch)
        return JoinResult(state, [], offset, snapshot)

    async def join(
        self,
        subscriber: Subscriber,
        channel: str,
        recover: tuple[int, str] | None,
        history: int = 0,
        allowance: HistoryAllowance | None = None,
    ) -> JoinResult:
        """Start `subscriber` on `channel`; hold live publications until `finish_join`.

        The result carries the channel's current state at or below the start (and its last
        `history` stream events, within `allowance`: pass the same one for every channel of one
        request), unless the channel is recovered.

        Caller's duties: call `finish_join` for every successful `join` of one answer together,
        right after queueing the answer (`connected` or `settings`) and nothing else in between,
        or `leave` on failure. Raises `BrokerError` when the broker cannot answer.
        """
        self._joining.setdefault(channel, {})[subscriber] = _Join()
        await self._ensure_broker_subscription(channel)
        if recover is None:
            known = self._delivered_states(channel)
            if known is not None:
                last, states = known
            else:
                states, top = await self._state_at_top(channel)
                last = (top.offset, top.epoch)
            state = ChannelState(channel=channel, offset=last[0], epoch=last[1])
            snapshot = await self._snapshot(channel, states, last[0], last[1], history, allowance)
            return JoinResult(state, [], last[0], snapshot)
        offset, epoch = recover
        # One publication decides: the rest is replayed in pages once the answer is out.
        page = await self.broker.history(channel, offset, 1)
        top = page.top
        first = [p for p in page.publications if offset < p.offset <= top.offset][:1]
        recovered = resumable(
            offset,
            epoch,
            top.epoch,
            top.offset,
            first[0].offset if first else None,
            self.recovery_limit,
        )
        if not recovered:
            # A fresh start, as for a follow.
            states, top = await self._state_at_top(channel)
            state = ChannelState(
                channel=channel, offset=top.offset, epoch=top.epoch, recovered=False
            )
            snapshot = await self._snapshot(
                channel, states, top.offset, top.epoch, history, allowance
            )
            return JoinResult(state, [], top.offset, snapshot)
        state = ChannelState(channel=channel, offset=top.offset, epoch=top.epoch, recovered=True)
        return JoinResult(state, first, offset + len(first))

    async def _state_at_top(self, channel: str) -> tuple[list[Publication], StreamPosition]:
        """The channel's state slots and a position they are exact for: the newest state of each
        event at or below the position.

        A slot holds only the newest publication of its event, so one read of the slots and one
        of the position race with publishing: slots read first miss a state published before
        the position was read (a stale snapshot), slots read after may hold one newer than the
        position that hides the one at or below it. Slots, position, slots again: when the two
        reads of the slots agree, nothing of state was published in between and the first read
        is exact for the position. Under a publish rate faster than three broker round trips the
        reads may keep disagreeing; after `STATE_READ_ATTEMPTS` the newest entry at or below the
        position of either read is taken (it may then be older than the newest state at or
        below the start; the next state push corrects it).
        """
        for _ in range(STATE_READ_ATTEMPTS):
            before = await self._read_states(channel)
            top = await self.broker.position(channel)
            after = await self._read_states(channel)
            if _slots(before) == _slots(after):
                return before, top
        newest: dict[str, Publication] = {}
        for publication in (*before, *after):
            known = newest.get(publication.event)
            if (
                publication.epoch == top.epoch
                and publication.offset <= top.offset
                and (known is None or known.offset < publication.offset)
            ):
                newest[publication.event] = publication
        return list(newest.values()), top

    async def _read_states(self, channel: str) -> list[Publication]:
        """The broker's state slots of `channel`, merged into the node's record (which they
        seed: the broker subscription is active, so deliveries cover everything newer)."""
        states = await self.broker.latest_state(channel)
        record = self._states.get(channel)  # the channel may have been released meanwhile
        if record is not None:
            live = self._last.get(channel)
            record.seed(states, live[1] if live is not None else None)
        return states

    async def _snapshot(
        self,
        channel: str,
        states: list[Publication],
        cursor: int,
        epoch: str,
        history: int,
        allowance: HistoryAllowance | None,
    ) -> tuple[Publication, ...]:
        """Of `states`, those of (`epoch`) at or below `cursor` and younger than the state ttl,
        with the last `history` stream events, in offset order."""
        if cursor <= 0:
            return ()  # no stream yet (or its first life not seen): nothing to show
        picked = self._current_state(states, cursor, epoch)
        if history > 0:
            picked.extend(
                await self._recent_stream(
                    channel, cursor, epoch, history, allowance or self.history_allowance()
                )
            )
        picked.sort(key=_offset_of)
        return tuple(picked)

    def _current_state(
        self, states: list[Publication], cursor: int, epoch: str
    ) -> list[Publication]:
        """Of `states`, those of `epoch` at or below `cursor` and younger than the state ttl."""
        oldest = time.time() - self.state_ttl
        return [
            p
            for p in states
            if p.epoch == epoch and 0 < p.offset <= cursor and p.published_at > oldest
        ]

    async def _recent_stream(
        self, channel: str, cursor: int, epoch: str, count: int, allowance: HistoryAllowance
    ) -> list[Publication]:
        """The last `count` stream events at or below `cursor` in `epoch`, oldest first: read
        backwards a page at a time, one channel of the request at a time, within `allowance`
        (publications looked through, bytes kept: the newest kept)."""
        found: list[Publication] = []
        end = cursor
        async with allowance.lock:
            while end > 0 and len(found) < count and allowance.scan_left > 0:
                step = min(PAGE_MAX_COUNT, end, allowance.scan_left)
                allowance.scan_left -= step
                page = await self.broker.history(channel, end - step, step)
                if page.top.epoch != epoch:
                    break
                publications = [p for p in page.publications if end - step < p.offset <= end]
                for publication in reversed(publications):
                    if publication.event in STATE_EVENTS:
                        continue
                    if len(found) >= count:
                        return found[::-1]
                    size = _held_size(publication)
                    if size > allowance.bytes_left:
                        allowance.bytes_left = 0  # spent: no older event for another channel
                        return found[::-1]
                    allowance.bytes_left -= size
                    found.append(publication)
                if not publications or publications[0].offset != end - step + 1:
                    break  # history no longer holds what is older
                end -= step
        return found[::-1]

    def finish_join(self, subscriber: Subscriber, result: JoinResult) -> None:
        """Queue the start of a recovery and what was held; go live, or replay what is missing.

        Synchronous: call it right after queueing the answer that reported `result.state`.
        """
        channel = result.state.channel
        joining = self._joining.get(channel)
        join = joining.get(subscriber) if joining else None
        if join is None or joining is None:
            return  # left meanwhile
        epoch = result.state.epoch
        cursor = result.cursor
        snapshot = result.snapshot
        if join.buffer and result.state.recovered is not True:
            snapshot = _with_held_state(snapshot, join.buffer, cursor, epoch)
        for publication in snapshot:
            if subscriber.pending is _OVERFLOWED:
                break  # closed as a slow consumer: what follows is never sent
            self.send_wire(subscriber, self._snapshot_wire(publication))
            if subscriber.pending is not _OVERFLOWED:
                self.snapshot_frames += 1
        for publication in result.missed:
            self.send_wire(subscriber, self._wire(publication))
        held, overflowed = join.buffer, join.mode == _OVERFLOWED_BUFFER
        join.buffer = []
        join.buffered_bytes = 0
        join.start, join.epoch = cursor, epoch
        join.mode = _FILTERING
        if overflowed or cursor < result.state.offset:
            self._replay_later(subscriber, channel, join)
            return
        for publication in held:
            if publication.epoch == join.epoch and publication.offset <= join.start:
                continue  # before the start, or already sent
            if _follows(join.start, join.epoch, publication):
                self.send_wire(subscriber, self._wire(publication))
                join.start, join.epoch = publication.offset, publication.epoch
            elif publication.epoch == join.epoch:
                self._replay_later(subscriber, channel, join)  # a gap: history fills it
                return
            # else: a publication of an older life of the stream, still in flight: not ours.
        self._promote_if_caught_up(subscriber, channel, join)

    def _promote_if_caught_up(self, subscriber: Subscriber, channel: str, join: _Join) -> None:
        """Live when the node's last delivered position is the join's; a replay when the node is
        ahead of it in the same epoch; otherwise the join filters live publications."""
        last = self._last.get(channel)
        if last is None or last[1] != join.epoch or last[0] < join.start:
            return
        if last[0] > join.start:
            self._replay_later(subscriber, channel, join)
            return
        joining = self._joining[channel]
        del joining[subscriber]
        if not joining:
            del self._joining[channel]
        self._live.setdefault(channel, set()).add(subscriber)

    def leave(self, subscriber: Subscriber, channel: str) -> None:
        """Stop delivering `channel` to `subscriber` (idempotent)."""
        live = self._live.get(channel)
        if live is not None:
            live.discard(subscriber)
            if not live:
                del self._live[channel]
        joining = self._joining.get(channel)
        if joining is not None:
            joining.pop(subscriber, None)
            if not joining:
                del self._joining[channel]
        if channel not in self._live and channel not in self._joining:
            self._release_broker_subscription(channel)
        if not subscriber.is_open:
            self._behind.discard(subscriber)
            self.on_writable(subscriber)  # a replay waiting for the socket: let it end

    async def _ensure_broker_subscription(self, channel: str) -> None:
        subscriptions = self._broker_subs
        task = subscriptions.get(channel)
        if task is None and channel in subscriptions:
            return  # made at once (`Broker.subscribe_now`)
        if task is not None and task.done() and not task.cancelled() and task.exception() is None:
            return  # already subscribed: the common case, without a shield future per join
        if task is None:
            task = asyncio.ensure_future(self.broker.subscribe(channel))
            self._broker_subs[channel] = task
            self._states[channel] = _StateRecord()
        try:
            await asyncio.shield(task)
        except BaseException:
            if self._broker_subs.get(channel) is task and task.done():
                del self._broker_subs[channel]
            raise

    def _release_broker_subscription(self, channel: str) -> None:
        made_at_once = self._broker_subs.get(channel, ...) is None
        task = self._broker_subs.pop(channel, None)
        # The node no longer sees this channel, so it cannot know what followers would miss.
        self._last.pop(channel, None)
        self._states.pop(channel, None)
        self._syncing.pop(channel, None)  # a resync under way ends (it checks `_syncing`)
        self._syncing_bytes.pop(channel, None)
        if task is not None:
            self._spawn(self._unsubscribe_after(task, channel))
        elif made_at_once and not self.broker.unsubscribe_now(channel):
            self._spawn(self._unsubscribe_after(None, channel))

    async def _unsubscribe_after(self, task: asyncio.Task[None] | None, channel: str) -> None:
        if task is not None:
            try:
                await task
            except (BrokerError, asyncio.CancelledError):
                return
        if channel in self._broker_subs:
            return  # someone joined again meanwhile
        try:
            await self.broker.unsubscribe(channel)
        except BrokerError as exc:
            log.warning("broker unsubscribe failed", extra={"channel": channel, "error": str(exc)})

    # --- replays ---------------------------------------------------------------------------------

    def _replay_later(self, subscriber: Subscriber, channel: str, join: _Join) -> None:
        """Feed `join` from history, after the connection's other replays (one task per
        connection, so that its memory is one page whatever it recovers)."""
        join.mode = _REPLAYING
        self.replays += 1
        queue = self._replays.get(subscriber)
        if queue is None:
            self._replays[subscriber] = deque([(channel, join)])
            self._spawn(self._run_replays(subscriber))
        else:
            queue.append((channel, join))

    def _current(self, subscriber: Subscriber, channel: str, join: _Join) -> bool:
        joining = self._joining.get(channel)
        return joining is not None and joining.get(subscriber) is join

    async def _run_replays(self, subscriber: Subscriber) -> None:
        queue = self._replays[subscriber]
        try:
            while queue and subscriber.is_open:
                channel, join = queue[0]
                try:
                    await self._replay(subscriber, channel, join)
                except BrokerError as exc:
                    log.warning("replay failed", extra={"channel": channel, "error": str(exc)})
                    self._abandon(subscriber, CloseCode.TRY_AGAIN_LATER)
                    return
                queue.popleft()
        finally:
            if self._replays.get(subscriber) is queue:
                del self._replays[subscriber]

    async def _replay(self, subscriber: Subscriber, channel: str, join: _Join) -> None:
        """Queue history after `join.start` page by page until the node's live position."""
        count = 16
        while self._current(subscriber, channel, join) and join.mode == _REPLAYING:
            if not await self._wait_writable(subscriber):
                return
            if not self._current(subscriber, channel, join):
                return
            page = await self.broker.history(channel, join.start, count)
            if not self._current(subscriber, channel, join) or not subscriber.is_open:
                return
            top = page.top
            if top.epoch != join.epoch and may_continue(join.start, join.epoch, top.epoch):
                join.epoch = top.epoch  # a follower from no stream at all, into its first life
            if top.epoch != join.epoch:
                self._abandon(subscriber, CloseCode.SERVICE_RESTART)  # the stream was recreated
                return
            publications = [p for p in page.publications if join.start < p.offset <= top.offset]
            last = self._last.get(channel)
            target = top.offset
            if last is not None and last[1] == join.epoch:
                target = max(target, last[0])
            if not continues(join.start, publications) or (
                not publications and join.start < top.offset
            ):
                self._abandon(subscriber, CloseCode.TRY_AGAIN_LATER)  # trimmed under the replay
                return
            queued = 0
            for publication in publications:
                size = _held_size(publication)
                if queued and queued + size > self.page_bytes:
                    break
                self.send_wire(subscriber, self._wire(publication))
                self.frames_out += 1
                queued += size
                join.start = publication.offset
            if publications:  # as many as fill a page, judging by this one's sizes
                average = sum(_held_size(p) for p in publications) // len(publications)
                count = max(1, min(PAGE_MAX_COUNT, self.page_bytes // average))
            if join.start >= target:
                # Caught up with history and with what this node delivered: from here on the
                # live publications carry on (those up to the start are skipped as sent).
                join.mode = _FILTERING
                self._promote_if_caught_up(subscriber, channel, join)
                return

    async def _wait_writable(self, subscriber: Subscriber) -> bool:
        """Wait until what is queued to `subscriber` reached its socket and the socket holds less
        than `low_water`; False when the connection is gone meanwhile."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        while subscriber.is_open:
            pending = subscriber.pending
            if pending is _OVERFLOWED:
                return False
            if pending and pending.tracked is None:
                waiter = loop.create_future()
                self._flush_waiters.append(waiter)
                await waiter
                continue
            if pending:  # held until the socket drains: `on_writable` (or the poll) writes it
                waiter = loop.create_future()
                self._writable_waiters[subscriber] = waiter
                try:
                    await asyncio.wait((waiter,), timeout=WRITABLE_POLL)
                finally:
                    if self._writable_waiters.get(subscriber) is waiter:
                        del self._writable_waiters[subscriber]
                continue
            if subscriber.backlog_bytes() < self.low_water:
                return True
            waiter = loop.create_future()
            self._writable_waiters[subscriber] = waiter
            try:
                await asyncio.wait((waiter,), timeout=WRITABLE_POLL)
            finally:
                if self._writable_waiters.get(subscriber) is waiter:
                    del self._writable_waiters[subscriber]
        return False

    def _abandon(self, subscriber: Subscriber, code: CloseCode) -> None:
        """A replay that cannot complete: close, so that the next resume tells the client."""
        self.replays_abandoned += 1
        log.info("replay abandoned", extra={"code": int(code)})
        subscriber.close_with(code)

    # --- resync ----------------------------------------------------------------------------------

    def resync_all(self) -> None:
        """After a broker reconnect: fill, from history, whatever was published while away."""
        for channel in list(self._last):
            if channel not in self._syncing:
                self._start_resync(channel, [])

    def _start_resync(self, channel: str, held: list[Publication]) -> None:
        self.resyncs += 1
        self._syncing[channel] = held
        self._syncing_bytes[channel] = sum(_held_size(p) for p in held)
        self._spawn(self._resync(channel))

    async def _resync(self, channel: str) -> None:
        delay = 0.2
        failures = 0
        epoch: str | None = None
        while True:
            try:
                step = await self._resync_page(channel)
            except BrokerError as exc:
                # Held publications stay held (bounded): releasing them would only re-detect the
                # gap. Retry with backoff; the broker's reconnect may also call resync_all.
                log.warning("resync failed", extra={"channel": channel, "error": str(exc)})
                failures += 1
                if failures >= RESYNC_ATTEMPTS:
                    self._give_up(channel, "broker unavailable for too long")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if channel not in self._syncing:
                return  # gave up meanwhile (held publications overflowed)
            if step is None:
                self._give_up(channel, "history does not cover the gap")
                return
            done, epoch = step
            if done:
                break
        held = self._syncing.pop(channel, [])
        self._syncing_bytes.pop(channel, None)
        for publication in held:
            # A held publication of another epoch than the one history just confirmed is stale
            # (an old stream's): feeding it back would start the same resync forever. If the
            # stream was recreated since, its next publication triggers a resync that reads the
            # new stream from its start, this one included.
            if epoch is None or publication.epoch == epoch:
                self.on_publication(publication)

    async def _resync_page(self, channel: str) -> tuple[bool, str | None] | None:
        """Deliver one page of what followers missed after the last delivered offset.

        Returns (caught up, the epoch history is in; None when nothing was delivered yet), or
        None when history cannot fill the gap.
        """
        last = self._last.get(channel)
        if last is None:
            return True, None
        since, epoch = last
        page = await self.broker.history(channel, since, PAGE_MAX_COUNT)
        if page.top.epoch != epoch:
            # A new stream: everything in it is new to the followers.
            since = 0
            page = await self.broker.history(channel, 0, PAGE_MAX_COUNT)
        top = page.top
        if channel not in self._syncing:
            return True, top.epoch
        if top.offset - since > self.recovery_limit:
            return None
        missed = [p for p in page.publications if since < p.offset <= top.offset]
        if not continues(since, missed) or (not missed and since < top.offset):
            return None
        for publication in missed:
            self._deliver(publication)
        return (missed[-1].offset if missed else since) >= top.offset, top.epoch

    def _give_up(self, channel: str, why: str) -> None:
        log.warning("followers must reconnect", extra={"channel": channel, "reason": why})
        self._syncing.pop(channel, None)
        self._syncing_bytes.pop(channel, None)
        self._last.pop(channel, None)
        if channel in self._states:
            self._states[channel] = _StateRecord()  # deliveries were skipped: seed it again
        for subscriber in list(self._live.get(channel, ())):
            subscriber.close_with(CloseCode.SERVICE_RESTART)
        # A joining connection past its start may have been owed what was held, which is
        # dropped: history (from its own, newer, position) serves it, or it is closed. One
        # still buffering or replaying checks what it gets against its own position anyway.
        for subscriber, join in list(self._joining.get(channel, {}).items()):
            if join.mode == _FILTERING:
                self._replay_later(subscriber, channel, join)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._behind_timer is not None:
            self._behind_timer.cancel()
            self._behind_timer = None
        for task in list(self._tasks):
            task.cancel()
        for subscribing in list(self._broker_subs.values()):
            if subscribing is not None:
                subscribing.cancel()
        self._tasks.clear()
        self._broker_subs.clear()
        self._replays.clear()


def _follows(start: int, epoch: str, publication: Publication) -> bool:
    """Whether `publication` is the next one after (`start`, `epoch`) for a connected follower:
    the next offset of the same life, or offset 1 of the first life after no stream (D1)."""
    return publication.offset == start + 1 and may_continue(start, epoch, publication.epoch)
