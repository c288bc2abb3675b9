"""The embedded default broker: one node, everything in this process's memory.

Streams. Only `publish` creates a channel's stream: an epoch (random, chosen then), a top offset,
a history bounded by `HistoryLimits.size` and `HistoryLimits.ttl`, and the channel's state slots.
Reads (`position`, `history`, `latest_state`) of a channel without a stream answer
``(0, EMPTY_EPOCH)`` and create nothing, so readers (anonymous clients following made-up games)
cost nothing and cannot push real channels out. The number of streams is bounded by
`BrokerOptions.max_channels`: the least recently *published* stream is dropped first (reads never
reorder), and if it is published again it starts over with a new epoch, so a client holding an
old position is told recovery failed rather than receiving a wrong sequence.

State slots: the latest publication of each state event of a stream (`BrokerOptions.state_events`),
kept whatever history trims, until `state_ttl` after it was published; they belong to the stream
and go with it.

Idempotency keys: remembered per (channel, key) for `idempotency_window` seconds, at most
`max_idempotency_keys` of them (about 300 bytes each): when full, the oldest key is forgotten first
(a retry of it publishes again) and `idempotency_keys_dropped` counts it. Only the first
publication's position is kept, not its payload.

Appending and delivering happen in one synchronous step, so they are atomic per channel. Expired
history, state and keys are dropped when used, and by a sweep every quarter of the history ttl for
the ones nobody uses any more, so memory follows the age bounds and not only the count bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from igratech_ws.brokers.base import (
    EMPTY_EPOCH,
    BrokerState,
    ControlHandler,
    ControlKinds,
    HistoryPage,
    Publication,
    PublicationHandler,
    PublishItem,
    PublishResult,
    StateHandler,
    StreamPosition,
    check_data,
    check_idempotency_key,
)
from igratech_ws.brokers.core import BrokerCore, new_epoch
from igratech_ws.brokers.options import BrokerOptions

_EMPTY = StreamPosition(0, EMPTY_EPOCH)


class _Stream:
    __slots__ = ("epoch", "history", "states", "top")

    def __init__(self, size: int) -> None:
        self.epoch = new_epoch()
        self.top = 0
        self.history: deque[Publication] = deque(maxlen=size)
        #: event -> latest publication of that state event; at most len(state_events) entries.
        self.states: dict[str, Publication] = {}


class KeyMemory:
    """Idempotency keys per channel, bounded in count and age (see the module docstring)."""

    def __init__(self, *, capacity: int, window: float) -> None:
        self.capacity = capacity
        self.window = window
        # (channel, key) -> (expiry, first publication without its data); insertion order is
        # expiry order, since the window is the same for every key.
        self._keys: OrderedDict[tuple[str, str], tuple[float, Publication]] = OrderedDict()
        #: Keys forgotten before their window ended because the map was full.
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, channel: str, key: str, now: float) -> Publication | None:
        found = self._keys.get((channel, key))
        if found is None:
            return None
        if found[0] <= now:
            del self._keys[(channel, key)]
            return None
        return found[1]

    def put(self, channel: str, key: str, publication: Publication, now: float) -> None:
        self.expire(now)
        self._keys[(channel, key)] = (now + self.window, publication)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
            self.dropped += 1

    def expire(self, now: float) -> None:
        keys = self._keys
        while keys:
            expiry, _ = next(iter(keys.values()))
            if expiry > now:
                return
            keys.popitem(last=False)


class MemoryBroker(BrokerCore):
    """`Broker` for a single node. See the module docstring for the bounds.

    `options` fields may also be given as keywords (``MemoryBroker(node_id="n", max_channels=5)``),
    which override those of `options`.
    """

    shared = False
    #: `publish` never awaits: appending and delivering are one synchronous step.
    publishes_at_once = True

    def __init__(self, options: BrokerOptions | None = None, **fields: Any) -> None:
        super().__init__(replace(options or BrokerOptions(), **fields))
        self.max_channels = self.options.max_channels
        # Ordered by last publish: the first one is the next to drop.
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._subscribed: set[str] = set()
        self._keys = KeyMemory(
            capacity=self.options.max_idempotency_keys, window=self.options.idempotency_window
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._state_events = self.options.state_events
        # The `*_now` shortcuts do what this class's awaited methods do; a subclass that changes
        # those (a test's slow or recording broker) gets the awaited ones, through declining.
        cls = type(self)
        self._subscribe_now = (
            cls.subscribe is MemoryBroker.subscribe and cls.unsubscribe is MemoryBroker.unsubscribe
        )
        self._state_now = (
            cls.position is MemoryBroker.position and cls.latest_state is MemoryBroker.latest_state
        )

    @property
    def channel_count(self) -> int:
        """Streams held (channels published and not dropped)."""
        return len(self._streams)

    @property
    def subscription_count(self) -> int:
        return len(self._subscribed)

    @property
    def idempotency_key_count(self) -> int:
        return len(self._keys)

    @property
    def idempotency_keys_dropped(self) -> int:
        return self._keys.dropped

    async def start(
        self,
        on_publication: PublicationHandler,
        on_control: ControlHandler,
        on_state: StateHandler | None = None,
    ) -> None:
        self.bind(on_publication, on_control, on_state)
        self._sweeper = asyncio.ensure_future(self._sweep_forever())
        self.set_state(BrokerState.CONNECTED)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(max(self.limits.ttl / 4, 0.05))
            await self.sweep()

    async def sweep(self, chunk: int = 1000) -> int:
        """Drop expired history, state and keys; yields to the loop every `chunk` channels.

        Returns how many publications were dropped from history.
        """
        dropped = 0
        now = time.time()
        self._keys.expire(now)
        for index, channel in enumerate(list(self._streams)):
            stream = self._streams.get(channel)
            if stream is not None:
                before = len(stream.history)
                self._expire(stream, now)
                dropped += before - len(stream.history)
            if index % chunk == chunk - 1:
                await asyncio.sleep(0)
                now = time.time()
        return dropped

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        self.mark_closed()
        self._subscribed.clear()

    def _expire(self, stream: _Stream, now: float) -> None:
        cutoff = now - self.limits.ttl
        history = stream.history
        while history and history[0].published_at < cutoff:
            history.popleft()
        if stream.states:
            state_cutoff = now - self.options.state_ttl
            for event, publication in list(stream.states.items()):
                if publication.published_at < state_cutoff:
                    del stream.states[event]

    async def publish(
        self, channel: str, event: str, data: bytes, *, idempotency_key: str | None = None
    ) -> PublishResult:
        check_idempotency_key(idempotency_key)
        check_data(data)
        return self._publish(channel, event, data, idempotency_key, time.time())

    async def publish_many(self, items: Sequence[PublishItem]) -> list[PublishResult]:
        """See `Broker.publish_many`: here every item is published (and delivered) in one
        synchronous step, so nothing can come in between and nothing fails halfway."""
        for _, _, data, key in items:
            check_idempotency_key(key)
            check_data(data)
        now = time.time()
        append, publish = self._append, self._publish
        return [
            PublishResult(append(channel, event, data, now))
            if key is None
            else publish(channel, event, data, key, now)
            for channel, event, data, key in items
        ]

    def _publish(
        self, channel: str, event: str, data: bytes, key: str | None, now: float
    ) -> PublishResult:
        if key is None:
            return PublishResult(self._append(channel, event, data, now))
        keys = self._keys
        first = keys.get(channel, key, now)
        if first is not None:
            return PublishResult(_with_data(first, data), True)
        publication = self._append(channel, event, data, now)
        keys.put(channel, key, _with_data(publication, b""), now)
        return PublishResult(publication)

    def publish_now(self, channel: str, event: str, data: bytes) -> Publication:
        """Synchronous `publish` without a key, for callers on the loop that want no await."""
        return self._append(channel, event, data, time.time())

    def _append(self, channel: str, event: str, data: bytes, now: float) -> Publication:
        """Append to `channel`'s stream (made if need be) and deliver, in one step."""
        streams = self._streams
        stream = streams.get(channel)
        if stream is None:
            stream = streams[channel] = _Stream(self.limits.size)
            while len(streams) > self.max_channels:
                streams.popitem(last=False)
        else:
            streams.move_to_end(channel)
        stream.top += 1
        publication = Publication(channel, stream.top, stream.epoch, event, data, now, self.node_id)
        history = stream.history
        history.append(publication)
        if event in self._state_events:
            stream.states[event] = publication
        if stream.states or history[0].published_at < now - self.limits.ttl:
            self._expire(stream, now)  # (else it has nothing to drop)
        if channel in self._subscribed:
            self.deliver(publication)
        return publication

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    def subscribe_now(self, channel: str) -> bool:
        if not self._subscribe_now:
            return False
        self._subscribed.add(channel)
        return True

    def unsubscribe_now(self, channel: str) -> bool:
        if not self._subscribe_now:
            return False
        self._subscribed.discard(channel)
        return True

    def state_now(self, channel: str) -> tuple[list[Publication], StreamPosition] | None:
        if not self._state_now:
            return None
        stream = self._streams.get(channel)
        if stream is None:
            return [], _EMPTY
        states: list[Publication] = []
        if stream.states:
            self._expire(stream, time.time())
            states = sorted(stream.states.values(), key=lambda p: p.offset)
        return states, StreamPosition(stream.top, stream.epoch)

    async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        stream = self._streams.get(channel)
        if stream is None:
            return HistoryPage([], _EMPTY)
        self._expire(stream, time.time())
        top = StreamPosition(stream.top, stream.epoch)
        history = stream.history
        if not history or since_offset >= stream.top:
            return HistoryPage([], top)
        # Offsets in history are consecutive, so the start index is arithmetic, not a scan.
        start = max(0, since_offset + 1 - history[0].offset)
        end = min(len(history), start + max(0, limit))
        return HistoryPage([history[i] for i in range(start, end)], top)

    async def position(self, channel: str) -> StreamPosition:
        stream = self._streams.get(channel)
        if stream is None:
            return _EMPTY
        return StreamPosition(stream.top, stream.epoch)

    async def latest_state(self, channel: str) -> list[Publication]:
        stream = self._streams.get(channel)
        if stream is None or not stream.states:
            return []
        self._expire(stream, time.time())
        return sorted(stream.states.values(), key=lambda p: p.offset)

    async def publish_control(self, message: ControlKinds) -> None:
        # One node only: there is nobody else to tell; the node handles its own messages directly.
        return None


def _with_data(publication: Publication, data: bytes) -> Publication:
    return Publication(
        channel=publication.channel,
        offset=publication.offset,
        epoch=publication.epoch,
        event=publication.event,
        data=data,
        published_at=publication.published_at,
        origin=publication.origin,
    )
