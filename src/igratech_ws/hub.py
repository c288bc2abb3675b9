"""Local fan-out: which connection follows which channel, and getting frames to them in order.

The hub sits between the broker (publications in offset order per channel) and the connections of
this node. Its guarantees, per connection and channel: every publication after the position the
connection started from, exactly once, in offset order, after the `settings` answer that reported
that position. How:

- A publication is encoded once into a complete WebSocket frame and the same bytes are queued for
  every subscriber. Each connection's queued frames are written in one system call per loop tick
  (the flush is scheduled once per tick for all connections), which is what makes fan-out cheap.
- Under load the flush waits: it starts no sooner than the previous flush's end plus that
  flush's duration (the wait capped by `max_flush_delay`), when that duration was over
  `FLUSH_COST_FREE`. Writing is the cost of fan-out (one system call per connection, whatever it
  carries), so publications arriving meanwhile share those calls, and the writes take at most
  about half the loop. Lightly loaded, nothing waits; overloaded, latency stays near twice the
  cost of one flush instead of growing without bound.
- A connection joining a channel is first *joining*: live publications are buffered for it while
  the broker reports the position (or the history to recover); then the answer, the missed
  publications and the buffered ones newer than its start go out in one synchronous step. When
  the channel is already live on this node, the node's last delivered position is the start and
  the broker is not asked.
- The node remembers the last offset it delivered per channel. A publication that skips offsets,
  or a broker reconnect, triggers a *resync*: live publications are held while history fills the
  gap. When history cannot fill it, the channel's connections are closed with 1012 so that they
  reconnect and learn through recovery (`recovered: false`) that they must reload.
- Broker subscriptions are reference-counted: the broker hears `subscribe` when the first local
  connection joins a channel and `unsubscribe` when the last one leaves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from igratech_ws.brokers.base import Broker, BrokerError, Publication
from igratech_ws.core.close_codes import CloseCode
from igratech_ws.core.codec import publication_frame
from igratech_ws.core.framing import text_frame
from igratech_ws.core.messages import ChannelState
from igratech_ws.core.recovery import decide_recovery

log = logging.getLogger("igratech_ws.hub")

#: A flush cheaper than this (seconds) lets the next one run on the next loop tick.
FLUSH_COST_FREE = 0.002

#: How many times a resync asks the broker for history before the followers must reconnect.
RESYNC_ATTEMPTS = 8


class Subscriber(Protocol):
    """What the hub needs of a connection (implemented by the WebSocket listener).

    `pending` is owned by the hub: the frames queued this tick, or None. `write_wire` writes bytes
    to the socket at once (and closes the connection as a slow consumer when its buffer is full);
    `close_with` flushes what is pending and closes with `code`.
    """

    pending: list[bytes] | None

    @property
    def is_open(self) -> bool: ...

    def write_wire(self, data: bytes) -> None: ...

    def close_with(self, code: CloseCode) -> None: ...


class _Join:
    """A connection joining a channel: buffering until `start` is known, then filtering."""

    __slots__ = ("buffer", "epoch", "start")

    def __init__(self) -> None:
        self.buffer: list[Publication] | None = []
        self.start = 0
        self.epoch = ""


@dataclass(frozen=True, slots=True)
class JoinResult:
    """The position a connection starts a channel from, and what to send it first."""

    state: ChannelState
    missed: list[Publication]


class Hub:
    """Channel -> connections, with ordered, exactly-once, coalesced delivery. See module doc."""

    def __init__(
        self,
        broker: Broker,
        *,
        recovery_limit: int = 1000,
        join_buffer_limit: int = 10_000,
        max_flush_delay: float = 0.05,
    ) -> None:
        self.broker = broker
        self.recovery_limit = recovery_limit
        self.join_buffer_limit = join_buffer_limit
        self._live: dict[str, set[Subscriber]] = {}
        self._joining: dict[str, dict[Subscriber, _Join]] = {}
        self._last: dict[str, tuple[int, str]] = {}
        self._syncing: dict[str, list[Publication]] = {}
        self._broker_subs: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._dirty: list[Subscriber] = []
        self._flush_scheduled = False
        self._flush_cost = 0.0
        self._flush_end = 0.0
        self.max_flush_delay = max_flush_delay
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Counters read by metrics: frames queued to connections, publications received.
        self.frames_out = 0
        self.publications_in = 0
        self.resyncs = 0
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
            return None if join.buffer is not None else (join.start, join.epoch)
        if subscriber in self._live.get(channel, ()):
            return self._last.get(channel)
        return None

    # --- writing ---------------------------------------------------------------------------------

    def send(self, subscriber: Subscriber, frame_payload: bytes) -> None:
        """Queue one frame (a JSON payload) to `subscriber`, in order with its publications."""
        self._push(subscriber, text_frame(frame_payload))

    def send_wire(self, subscriber: Subscriber, wire: bytes) -> None:
        """Queue one complete WebSocket frame (a pong, from the transport) like `send` does."""
        self._push(subscriber, wire)

    def on_writable(self, subscriber: Subscriber) -> None:
        """`subscriber`'s socket drained after a pause (D7). Nothing waits for it yet: the hub
        writes as frames come (recovery replays paged on drain are the hub's part of D7)."""

    def _push(self, subscriber: Subscriber, wire: bytes) -> None:
        pending = subscriber.pending
        if pending is None:
            subscriber.pending = [wire]
            self._dirty.append(subscriber)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                if self._loop is None:
                    self._loop = asyncio.get_running_loop()
                cost = self._flush_cost
                wait = 0.0
                if cost >= FLUSH_COST_FREE:
                    wait = self._flush_end + cost - time.perf_counter()
                if wait <= 0:
                    self._loop.call_soon(self.flush)
                else:
                    self._loop.call_later(min(wait, self.max_flush_delay), self.flush)
        else:
            pending.append(wire)

    def flush(self) -> None:
        """Write every connection's queued frames, one write per connection."""
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        started = time.perf_counter()
        for subscriber in dirty:
            self.flush_one(subscriber)
        self._flush_end = time.perf_counter()
        self._flush_cost = self._flush_end - started

    def flush_one(self, subscriber: Subscriber) -> None:
        """Write `subscriber`'s queued frames now (before closing it, for instance)."""
        pending = subscriber.pending
        if pending is None:
            return
        subscriber.pending = None
        if subscriber.is_open:
            subscriber.write_wire(pending[0] if len(pending) == 1 else b"".join(pending))

    # --- publications from the broker ------------------------------------------------------------

    def on_publication(self, publication: Publication) -> None:
        """Broker handler: deliver `publication` to this node's followers of its channel."""
        self.publications_in += 1
        channel = publication.channel
        held = self._syncing.get(channel)
        if held is not None:
            if len(held) >= self.join_buffer_limit:
                self._give_up(channel, "resync buffer overflow")
            else:
                held.append(publication)
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
        wire: bytes | None = None
        live = self._live.get(channel)
        if live:
            wire = self._wire(publication)
            for subscriber in live:
                self._push(subscriber, wire)
            self.frames_out += len(live)
        joining = self._joining.get(channel)
        if joining:
            promote: list[Subscriber] = []
            for subscriber, join in list(joining.items()):
                if join.buffer is not None:
                    if len(join.buffer) >= self.join_buffer_limit:
                        subscriber.close_with(CloseCode.TRY_AGAIN_LATER)
                    else:
                        join.buffer.append(publication)
                    continue
                if publication.epoch != join.epoch:
                    if join.start != 0:
                        subscriber.close_with(CloseCode.SERVICE_RESTART)
                        continue
                    # Offset 0 has seen nothing: the stream's first epoch is new to it (D1).
                    join.epoch = publication.epoch
                if publication.offset > join.start:
                    wire = wire or self._wire(publication)
                    self._push(subscriber, wire)
                    self.frames_out += 1
                if publication.offset >= join.start:
                    promote.append(subscriber)
            for subscriber in promote:
                del joining[subscriber]
                self._live.setdefault(channel, set()).add(subscriber)
            if not joining:
                self._joining.pop(channel, None)
        if self.on_delivered is not None:
            self.on_delivered(publication, len(live) if live else 0)

    @staticmethod
    def _wire(publication: Publication) -> bytes:
        return text_frame(
            publication_frame(
                publication.event,
                publication.channel,
                publication.offset,
                publication.epoch,
                publication.data,
            )
        )

    # --- joining and leaving ---------------------------------------------------------------------

    async def join(
        self, subscriber: Subscriber, channel: str, recover: tuple[int, str] | None
    ) -> JoinResult:
        """Start `subscriber` on `channel`; buffer live publications until `finish_join`.

        Caller's duties: call `finish_join` for every successful `join` of one settings request
        together (after sending nothing else to the subscriber in between), or `leave` on failure.
        Raises `BrokerError` when the broker cannot answer.
        """
        self._joining.setdefault(channel, {})[subscriber] = _Join()
        await self._ensure_broker_subscription(channel)
        if recover is None:
            last = self._last.get(channel)
            if last is not None and channel not in self._syncing:
                # This node has delivered the channel up to `last`, in order, and everything
                # newer reaches the join buffer: an exact start without asking the broker, which
                # is what keeps a storm of clients joining one game off the broker.
                return JoinResult(ChannelState(channel=channel, offset=last[0], epoch=last[1]), [])
            top = await self.broker.position(channel)
            return JoinResult(ChannelState(channel=channel, offset=top.offset, epoch=top.epoch), [])
        offset, epoch = recover
        page = await self.broker.history(channel, offset, self.recovery_limit)
        outcome = decide_recovery(offset, epoch, page.top.epoch, page.top.offset, page.publications)
        state = ChannelState(
            channel=channel,
            offset=page.top.offset,
            epoch=page.top.epoch,
            recovered=outcome.recovered,
        )
        return JoinResult(state, outcome.missed)

    def finish_join(self, subscriber: Subscriber, result: JoinResult) -> None:
        """Queue the missed publications and the buffered newer ones; go live when caught up."""
        channel = result.state.channel
        joining = self._joining.get(channel)
        join = joining.get(subscriber) if joining else None
        if join is None or joining is None:
            return  # left meanwhile
        start, epoch = result.state.offset, result.state.epoch
        for publication in result.missed:
            self._push(subscriber, self._wire(publication))
        buffered = join.buffer or []
        join.buffer = None
        for publication in buffered:
            if start == 0:
                epoch = publication.epoch  # offset 0 has seen nothing: any epoch is new (D1)
            if publication.epoch == epoch and publication.offset > start:
                self._push(subscriber, self._wire(publication))
                start = publication.offset
        join.start, join.epoch = start, epoch
        last = self._last.get(channel)
        if last is not None and last[1] == epoch and last[0] >= start:
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

    async def _ensure_broker_subscription(self, channel: str) -> None:
        task = self._broker_subs.get(channel)
        if task is not None and task.done() and not task.cancelled() and task.exception() is None:
            return  # already subscribed: the common case, without a shield future per join
        if task is None:
            task = asyncio.ensure_future(self.broker.subscribe(channel))
            self._broker_subs[channel] = task
        try:
            await asyncio.shield(task)
        except BaseException:
            if self._broker_subs.get(channel) is task and task.done():
                del self._broker_subs[channel]
            raise

    def _release_broker_subscription(self, channel: str) -> None:
        task = self._broker_subs.pop(channel, None)
        # The node no longer sees this channel, so it cannot know what followers would miss.
        self._last.pop(channel, None)
        if task is not None:
            self._spawn(self._unsubscribe_after(task, channel))

    async def _unsubscribe_after(self, task: asyncio.Task[None], channel: str) -> None:
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

    # --- resync ----------------------------------------------------------------------------------

    def resync_all(self) -> None:
        """After a broker reconnect: fill, from history, whatever was published while away."""
        for channel in list(self._last):
            if channel not in self._syncing:
                self._start_resync(channel, [])

    def _start_resync(self, channel: str, held: list[Publication]) -> None:
        self.resyncs += 1
        self._syncing[channel] = held
        self._spawn(self._resync(channel))

    async def _resync(self, channel: str) -> None:
        delay = 0.2
        for _attempt in range(RESYNC_ATTEMPTS):
            try:
                recovered, missed, epoch = await self._missed_since_last(channel)
                break
            except BrokerError as exc:
                # Held publications stay held (bounded): releasing them would only re-detect the
                # gap. Retry with backoff; the broker's reconnect may also call resync_all.
                log.warning("resync failed", extra={"channel": channel, "error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        else:
            self._give_up(channel, "broker unavailable for too long")
            return
        held = self._syncing.pop(channel, [])
        if not recovered:
            self._give_up(channel, "history does not cover the gap")
            return
        for publication in missed:
            self._deliver(publication)
        for publication in held:
            # A held publication of another epoch than the one history just confirmed is stale
            # (an old stream's): feeding it back would start the same resync forever. If the
            # stream was recreated since, its next publication triggers a resync that reads the
            # new stream from its start, this one included.
            if epoch is None or publication.epoch == epoch:
                self.on_publication(publication)

    async def _missed_since_last(self, channel: str) -> tuple[bool, list[Publication], str | None]:
        """Whether history fills the gap after the last delivered offset, what fills it, and the
        epoch history is in (None when nothing was delivered yet)."""
        last = self._last.get(channel)
        if last is None:
            return True, [], None
        since, epoch = last
        page = await self.broker.history(channel, since, self.recovery_limit)
        if page.top.epoch != epoch:
            # A new stream: everything in it is new to the followers.
            since = 0
            page = await self.broker.history(channel, 0, self.recovery_limit)
        outcome = decide_recovery(
            since, page.top.epoch, page.top.epoch, page.top.offset, page.publications
        )
        return outcome.recovered, outcome.missed, page.top.epoch

    def _give_up(self, channel: str, why: str) -> None:
        log.warning("followers must reconnect", extra={"channel": channel, "reason": why})
        self._syncing.pop(channel, None)
        self._last.pop(channel, None)
        for subscriber in list(self._live.get(channel, ())):
            subscriber.close_with(CloseCode.SERVICE_RESTART)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._broker_subs.values()):
            task.cancel()
        self._tasks.clear()
        self._broker_subs.clear()
