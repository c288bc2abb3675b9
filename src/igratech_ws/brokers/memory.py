"""The embedded default broker: one node, everything in this process's memory.

Each channel has a stream: an epoch (random, chosen when the stream is created), a top offset, and a
history bounded by `HistoryLimits.size` and `HistoryLimits.ttl`. The number of streams is bounded by
`max_channels`: the least recently published stream is dropped first, and if it is used again it
starts over with a new epoch, so a client holding an old position is told recovery failed rather
than receiving a wrong sequence.

Appending and delivering happen in one synchronous step, so they are atomic per channel. History
past its age is dropped when a channel is used, and by a sweep every quarter of the ttl for the
channels nobody uses any more, so memory follows the age bound and not only the channel bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict, deque

from igratech_ws.brokers.base import (
    BrokerState,
    ControlHandler,
    ControlKinds,
    HistoryLimits,
    HistoryPage,
    Publication,
    PublicationHandler,
    StateHandler,
    StreamPosition,
)


class _Stream:
    __slots__ = ("epoch", "history", "top")

    def __init__(self, size: int) -> None:
        self.epoch = uuid.uuid4().hex[:8]
        self.top = 0
        self.history: deque[Publication] = deque(maxlen=size)


class MemoryBroker:
    """`Broker` for a single node. See the module docstring for the bounds."""

    def __init__(
        self,
        *,
        node_id: str,
        limits: HistoryLimits | None = None,
        max_channels: int = 100_000,
    ) -> None:
        self.node_id = node_id
        self.shared = False
        self.limits = limits or HistoryLimits()
        self.max_channels = max_channels
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._subscribed: set[str] = set()
        self._on_publication: PublicationHandler | None = None
        self._state = BrokerState.CONNECTING
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def state(self) -> BrokerState:
        return self._state

    @property
    def channel_count(self) -> int:
        return len(self._streams)

    async def start(
        self,
        on_publication: PublicationHandler,
        on_control: ControlHandler,
        on_state: StateHandler | None = None,
    ) -> None:
        self._on_publication = on_publication
        self._state = BrokerState.CONNECTED
        self._sweeper = asyncio.ensure_future(self._sweep_forever())
        if on_state is not None:
            on_state(self._state)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(max(self.limits.ttl / 4, 0.05))
            await self.sweep()

    async def sweep(self, chunk: int = 1000) -> int:
        """Drop expired history of every channel; yields to the loop every `chunk` channels.

        Returns how many publications were dropped.
        """
        dropped = 0
        for index, channel in enumerate(list(self._streams)):
            stream = self._streams.get(channel)
            if stream is not None and stream.history:
                before = len(stream.history)
                self._expire(stream, time.time())
                dropped += before - len(stream.history)
            if index % chunk == chunk - 1:
                await asyncio.sleep(0)
        return dropped

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        self._state = BrokerState.CLOSED
        self._on_publication = None
        self._subscribed.clear()

    def _stream(self, channel: str) -> _Stream:
        stream = self._streams.get(channel)
        if stream is None:
            stream = _Stream(self.limits.size)
            self._streams[channel] = stream
            while len(self._streams) > self.max_channels:
                self._streams.popitem(last=False)
        return stream

    def _expire(self, stream: _Stream, now: float) -> None:
        cutoff = now - self.limits.ttl
        history = stream.history
        while history and history[0].published_at < cutoff:
            history.popleft()

    async def publish(self, channel: str, event: str, data: bytes) -> Publication:
        return self.publish_now(channel, event, data)

    def publish_now(self, channel: str, event: str, data: bytes) -> Publication:
        """Synchronous `publish`, for callers already on the loop that want no await."""
        stream = self._stream(channel)
        self._streams.move_to_end(channel)
        now = time.time()
        stream.top += 1
        publication = Publication(
            channel=channel,
            offset=stream.top,
            epoch=stream.epoch,
            event=event,
            data=data,
            published_at=now,
            origin=self.node_id,
        )
        stream.history.append(publication)
        self._expire(stream, now)
        if channel in self._subscribed and self._on_publication is not None:
            self._on_publication(publication)
        return publication

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        stream = self._stream(channel)
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
        stream = self._stream(channel)
        return StreamPosition(stream.top, stream.epoch)

    async def publish_control(self, message: ControlKinds) -> None:
        # One node only: there is nobody else to tell; the node handles its own messages directly.
        return None
