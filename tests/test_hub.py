"""The hub on a real MemoryBroker with fake subscribers that record what is written to them.

Each test drives the loop by hand (`settle`), so nothing depends on timing: the memory broker
delivers synchronously and the hub flushes on the next loop iteration.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from igratech_ws.brokers.base import (
    BrokerState,
    ControlKinds,
    HistoryLimits,
    HistoryPage,
    Publication,
    StreamPosition,
)
from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.core.close_codes import CloseCode
from igratech_ws.core.codec import event_frame
from igratech_ws.hub import Hub

CH = "game:g-1"


class FakeSubscriber:
    """A connection as the hub sees it, recording every write and close."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending: list[bytes] | None = None
        self.open = True
        self.writes: list[bytes] = []
        self.closes: list[CloseCode] = []

    def __repr__(self) -> str:
        return f"FakeSubscriber({self.name})"

    @property
    def is_open(self) -> bool:
        return self.open

    def write_wire(self, data: bytes) -> None:
        self.writes.append(data)

    def close_with(self, code: CloseCode) -> None:
        self.closes.append(code)
        self.open = False

    def frames(self) -> list[dict[str, Any]]:
        """Every frame written, parsed (RFC 6455 5.2, unmasked server frames)."""
        return [json.loads(p) for p in split_frames(b"".join(self.writes))]

    def offsets(self, channel: str = CH) -> list[int]:
        return [f["offset"] for f in self.frames() if f.get("channel") == channel]


def split_frames(wire: bytes) -> list[bytes]:
    payloads = []
    at = 0
    while at < len(wire):
        assert wire[at] == 0x81
        length = wire[at + 1]
        at += 2
        if length == 126:
            length = int.from_bytes(wire[at : at + 2], "big")
            at += 2
        elif length == 127:
            length = int.from_bytes(wire[at : at + 8], "big")
            at += 8
        payloads.append(wire[at : at + length])
        at += length
    return payloads


class RecordingBroker(MemoryBroker):
    """The memory broker, recording (un)subscribe calls; `gate` can hold history and position."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(node_id="n-test", **kwargs)
        self.calls: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def subscribe(self, channel: str) -> None:
        self.calls.append(("subscribe", channel))
        await super().subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        self.calls.append(("unsubscribe", channel))
        await super().unsubscribe(channel)

    async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        await self.gate.wait()
        return await super().history(channel, since_offset, limit)

    async def position(self, channel: str) -> StreamPosition:
        await self.gate.wait()
        return await super().position(channel)

    def lose_subscription(self, channel: str) -> None:
        """What a broker outage does: publications keep going to history, not to this node."""
        self._subscribed.discard(channel)

    def restore_subscription(self, channel: str) -> None:
        self._subscribed.add(channel)


def _ignore(message: ControlKinds) -> None:
    pass


async def settle(rounds: int = 20) -> None:
    """Run the loop until the hub's flushes and resync tasks (all synchronous here) are done."""
    for _ in range(rounds):
        await asyncio.sleep(0)


@pytest.fixture
async def broker() -> AsyncIterator[RecordingBroker]:
    broker = RecordingBroker()
    yield broker
    await broker.close()


async def make_hub(broker: RecordingBroker, **kwargs: Any) -> Hub:
    hub = Hub(broker, **kwargs)
    await broker.start(hub.on_publication, _ignore)
    return hub


@pytest.fixture
async def hub(broker: RecordingBroker) -> AsyncIterator[Hub]:
    hub = await make_hub(broker)
    yield hub
    await hub.close()


async def join(
    hub: Hub, subscriber: FakeSubscriber, channel: str = CH, recover: tuple[int, str] | None = None
) -> Any:
    result = await hub.join(subscriber, channel, recover)
    hub.finish_join(subscriber, result)
    return result


def publish(broker: MemoryBroker, count: int, channel: str = CH) -> list[Publication]:
    return [
        broker.publish_now(channel, "incident", json.dumps({"n": i}).encode()) for i in range(count)
    ]


# --- fan-out ----------------------------------------------------------------------------------


async def test_one_encoding_per_publication_shared_by_all_subscribers(
    hub: Hub, broker: RecordingBroker
) -> None:
    subs = [FakeSubscriber(str(i)) for i in range(3)]
    for sub in subs:
        await join(hub, sub)
    publish(broker, 2)
    first = subs[0].pending
    assert first is not None and len(first) == 2
    for sub in subs[1:]:
        assert sub.pending is not None
        assert all(mine is theirs for mine, theirs in zip(sub.pending, first, strict=True))
    await settle()
    for sub in subs:
        assert sub.pending is None
        assert sub.offsets() == [1, 2]
    frame = subs[0].frames()[0]
    assert frame["event"] == "incident"
    assert frame["channel"] == CH
    assert frame["data"] == {"n": 0}
    assert hub.frames_out == 6
    assert hub.publications_in == 2


async def test_one_write_per_subscriber_per_tick(hub: Hub, broker: RecordingBroker) -> None:
    a, b = FakeSubscriber("a"), FakeSubscriber("b")
    await join(hub, a)
    await join(hub, b)
    await join(hub, a, "game:g-2")
    publish(broker, 1)
    await settle()
    a.writes.clear()
    b.writes.clear()
    publish(broker, 5)
    publish(broker, 2, "game:g-2")
    assert a.writes == [] and b.writes == []  # nothing written synchronously
    await settle()
    assert len(a.writes) == 1
    assert len(b.writes) == 1
    assert a.offsets() == [2, 3, 4, 5, 6]
    assert a.offsets("game:g-2") == [1, 2]
    assert b.offsets() == [2, 3, 4, 5, 6]


async def test_send_is_ordered_with_publications(hub: Hub, broker: RecordingBroker) -> None:
    a = FakeSubscriber("a")
    await join(hub, a)
    publish(broker, 1)
    hub.send(a, event_frame("pong", {"serverTime": "2026-11-23T19:45:00Z"}))
    publish(broker, 1)
    await settle()
    assert len(a.writes) == 1
    assert [f["event"] for f in a.frames()] == ["incident", "pong", "incident"]


async def test_closed_subscribers_get_no_writes(hub: Hub, broker: RecordingBroker) -> None:
    a = FakeSubscriber("a")
    await join(hub, a)
    publish(broker, 1)
    a.open = False
    await settle()
    assert a.writes == []
    assert a.pending is None


async def test_flush_one_writes_at_once(hub: Hub, broker: RecordingBroker) -> None:
    a = FakeSubscriber("a")
    await join(hub, a)
    publish(broker, 2)
    hub.flush_one(a)
    assert len(a.writes) == 1 and a.offsets() == [1, 2]
    await settle()
    assert len(a.writes) == 1


# --- joining ----------------------------------------------------------------------------------


async def test_join_reports_the_top_and_delivers_what_follows(
    hub: Hub, broker: RecordingBroker
) -> None:
    publish(broker, 3)
    a = FakeSubscriber("a")
    result = await join(hub, a)
    assert (result.state.offset, result.state.recovered, result.missed) == (3, None, [])
    assert result.state.epoch == (await broker.position(CH)).epoch
    publish(broker, 2)
    await settle()
    assert a.offsets() == [4, 5]


async def test_join_with_recovery_delivers_missed_then_buffered_none_twice(
    hub: Hub, broker: RecordingBroker
) -> None:
    publish(broker, 3)
    epoch = (await broker.position(CH)).epoch
    a = FakeSubscriber("a")
    broker.gate.clear()
    joining = asyncio.ensure_future(hub.join(a, CH, (1, epoch)))
    await settle()
    assert ("subscribe", CH) in broker.calls and not joining.done()
    publish(broker, 2)  # 4, 5: during the join, before history is read: buffered and in history
    broker.gate.set()
    result = await joining
    assert result.state.recovered is True
    assert (result.state.offset, [p.offset for p in result.missed]) == (5, [2, 3, 4, 5])
    publish(broker, 1)  # 6: after history was read, before the answer: buffered only
    hub.send(a, event_frame("settings", {"games": ["g-1"], "stats": False, "channels": []}))
    hub.finish_join(a, result)
    publish(broker, 1)  # 7: live
    await settle()
    assert a.frames()[0]["event"] == "settings"
    assert a.offsets() == [2, 3, 4, 5, 6, 7]
    assert hub.position_of(a, CH) == (7, epoch)


async def test_join_without_recovery_skips_what_was_buffered_before_the_top(
    hub: Hub, broker: RecordingBroker
) -> None:
    a = FakeSubscriber("a")
    broker.gate.clear()
    joining = asyncio.ensure_future(hub.join(a, CH, None))
    await settle()
    publish(broker, 2)
    broker.gate.set()
    result = await joining
    assert result.state.offset == 2
    publish(broker, 1)
    hub.finish_join(a, result)
    await settle()
    assert a.offsets() == [3]


async def test_recovery_from_another_epoch_fails(hub: Hub, broker: RecordingBroker) -> None:
    publish(broker, 3)
    a = FakeSubscriber("a")
    result = await join(hub, a, CH, (1, "other-epoch"))
    assert result.state.recovered is False
    assert result.missed == []
    assert result.state.offset == 3
    publish(broker, 1)
    await settle()
    assert a.offsets() == [4]


async def test_a_second_subscriber_joins_a_live_channel(hub: Hub, broker: RecordingBroker) -> None:
    a, b = FakeSubscriber("a"), FakeSubscriber("b")
    await join(hub, a)
    publish(broker, 2)
    epoch = (await broker.position(CH)).epoch
    await join(hub, b, CH, (0, epoch))
    publish(broker, 1)
    await settle()
    assert a.offsets() == [1, 2, 3]
    assert b.offsets() == [1, 2, 3]
    assert broker.calls.count(("subscribe", CH)) == 1


async def test_join_buffer_bound_closes_with_1013(broker: RecordingBroker) -> None:
    hub = await make_hub(broker, join_buffer_limit=3)
    try:
        a, b = FakeSubscriber("a"), FakeSubscriber("b")
        await join(hub, b)
        result = await hub.join(a, CH, None)  # answer not sent yet: publications are buffered
        publish(broker, 3)
        assert a.closes == []
        publish(broker, 1)
        assert a.closes[0] is CloseCode.TRY_AGAIN_LATER
        hub.leave(a, CH)  # what the node does when the transport reports the close
        hub.finish_join(a, result)  # late: ignored
        await settle()
        assert a.writes == []
        assert b.offsets() == [1, 2, 3, 4]
    finally:
        await hub.close()


# --- leaving ----------------------------------------------------------------------------------


async def test_leave_stops_delivery_and_unsubscribes_at_refcount_zero(
    hub: Hub, broker: RecordingBroker
) -> None:
    a, b = FakeSubscriber("a"), FakeSubscriber("b")
    await join(hub, a)
    await join(hub, b)
    assert hub.subscriber_count(CH) == 2
    hub.leave(a, CH)
    await settle()
    assert ("unsubscribe", CH) not in broker.calls
    publish(broker, 1)
    await settle()
    assert a.offsets() == []
    assert b.offsets() == [1]
    hub.leave(b, CH)
    hub.leave(b, CH)  # idempotent
    await settle()
    assert broker.calls.count(("unsubscribe", CH)) == 1
    assert hub.subscriber_count(CH) == 0
    assert hub.channel_count == 0
    received = hub.publications_in
    publish(broker, 1)
    assert hub.publications_in == received  # the broker no longer delivers here


async def test_rejoin_after_leaving_subscribes_again(hub: Hub, broker: RecordingBroker) -> None:
    a = FakeSubscriber("a")
    await join(hub, a)
    hub.leave(a, CH)
    await settle()
    publish(broker, 2)
    await join(hub, a)
    publish(broker, 1)
    await settle()
    assert broker.calls == [("subscribe", CH), ("unsubscribe", CH), ("subscribe", CH)]
    assert a.offsets() == [3]


async def test_leave_and_rejoin_in_one_tick_keeps_the_subscription(
    hub: Hub, broker: RecordingBroker
) -> None:
    a = FakeSubscriber("a")
    await join(hub, a)
    hub.leave(a, CH)
    await join(hub, a)
    await settle()
    publish(broker, 1)
    await settle()
    assert a.offsets() == [1]
    assert broker.calls[-1] == ("subscribe", CH)


# --- gaps, epochs and resync ------------------------------------------------------------------


async def test_a_skipped_offset_is_filled_from_history(hub: Hub, broker: RecordingBroker) -> None:
    a = FakeSubscriber("a")
    await join(hub, a)
    publish(broker, 1)
    broker.lose_subscription(CH)
    publish(broker, 2)  # 2, 3 never reach the hub
    broker.restore_subscription(CH)
    publish(broker, 1)  # 4: the hub sees 1 -> 4
    await settle()
    assert hub.resyncs == 1
    assert a.offsets() == [1, 2, 3, 4]
    publish(broker, 1)
    await settle()
    assert a.offsets() == [1, 2, 3, 4, 5]


async def test_live_publications_are_held_during_a_resync(
    hub: Hub, broker: RecordingBroker
) -> None:
    a = FakeSubscriber("a")
    await join(hub, a)
    publish(broker, 1)
    broker.lose_subscription(CH)
    publish(broker, 2)
    broker.restore_subscription(CH)
    broker.gate.clear()
    publish(broker, 1)  # 4: gap, resync waits on history
    await settle()
    publish(broker, 2)  # 5, 6: held
    await settle()
    assert a.offsets() == [1]
    broker.gate.set()
    await settle()
    assert a.offsets() == [1, 2, 3, 4, 5, 6]


async def test_a_gap_history_cannot_fill_closes_followers_with_1012(
    broker: RecordingBroker,
) -> None:
    small = RecordingBroker(limits=HistoryLimits(size=2))
    hub = await make_hub(small)
    try:
        a = FakeSubscriber("a")
        await join(hub, a)
        publish(small, 1)
        small.lose_subscription(CH)
        publish(small, 4)  # 2..5, of which history keeps only 4, 5
        small.restore_subscription(CH)
        publish(small, 1)  # 6
        await settle()
        assert a.closes == [CloseCode.SERVICE_RESTART]
        assert a.offsets() == [1]
    finally:
        await hub.close()
        await small.close()


async def test_epoch_change_delivers_the_new_stream(broker: RecordingBroker) -> None:
    """The memory broker drops the least recently used stream; it restarts with a new epoch."""
    tiny = RecordingBroker(max_channels=1)
    hub = await make_hub(tiny)
    try:
        a = FakeSubscriber("a")
        await join(hub, a)
        old = publish(tiny, 2)
        publish(tiny, 1, "game:other")  # evicts CH's stream
        new = publish(tiny, 2)  # CH again: a new epoch from offset 1
        assert new[0].epoch != old[0].epoch and new[0].offset == 1
        await settle()
        frames = [f for f in a.frames() if f["channel"] == CH]
        assert [(f["offset"], f["epoch"]) for f in frames] == [
            (1, old[0].epoch),
            (2, old[0].epoch),
            (1, new[0].epoch),
            (2, new[0].epoch),
        ]
        assert a.closes == []
    finally:
        await hub.close()
        await tiny.close()


async def test_resync_all_after_a_broker_reconnect(hub: Hub, broker: RecordingBroker) -> None:
    a, b = FakeSubscriber("a"), FakeSubscriber("b")
    await join(hub, a)
    await join(hub, b, "game:g-2")
    publish(broker, 1)
    publish(broker, 1, "game:g-2")
    for channel in (CH, "game:g-2"):
        broker.lose_subscription(channel)
    publish(broker, 3)  # missed while "disconnected"
    publish(broker, 1, "game:g-2")
    for channel in (CH, "game:g-2"):
        broker.restore_subscription(channel)
    broker.gate.clear()
    hub.resync_all()
    publish(broker, 1)  # live while the resync reads history: held, then delivered in order
    broker.gate.set()
    await settle()
    assert a.offsets() == [1, 2, 3, 4, 5]
    assert b.offsets("game:g-2") == [1, 2]
    assert hub.resyncs == 2
    assert broker.state is BrokerState.CONNECTED


async def test_resync_with_nothing_missed_changes_nothing(
    hub: Hub, broker: RecordingBroker
) -> None:
    a = FakeSubscriber("a")
    await join(hub, a)
    publish(broker, 2)
    hub.resync_all()
    await settle()
    publish(broker, 1)
    await settle()
    assert a.offsets() == [1, 2, 3]
    assert a.closes == []


async def test_redelivered_publications_are_dropped(hub: Hub, broker: RecordingBroker) -> None:
    a = FakeSubscriber("a")
    await join(hub, a)
    pubs = publish(broker, 2)
    for publication in pubs:  # a broker redelivering after a resubscribe
        hub.on_publication(publication)
    await settle()
    assert a.offsets() == [1, 2]


async def test_a_stale_publication_of_an_old_epoch_does_not_resync_forever(
    hub: Hub, broker: RecordingBroker
) -> None:
    a = FakeSubscriber("a")
    await join(hub, a)
    (live,) = publish(broker, 1)
    stale = Publication(
        channel=CH,
        offset=2,
        epoch="gone",
        event="incident",
        data=b"{}",
        published_at=live.published_at,
        origin="n-old",
    )
    hub.on_publication(stale)
    await settle(50)
    assert hub.resyncs <= 2


async def test_joining_a_live_channel_needs_no_broker_round_trip(
    hub: Hub, broker: RecordingBroker
) -> None:
    first, others = FakeSubscriber("first"), [FakeSubscriber(f"s{i}") for i in range(50)]
    await join(hub, first)
    publish(broker, 3)
    await settle()
    epoch = (await broker.position(CH)).epoch
    broker.gate.clear()  # a broker call would now block: the joins below must not make one
    async with asyncio.timeout(2):
        for subscriber in others:
            result = await join(hub, subscriber)
            assert (result.state.offset, result.state.epoch) == (3, epoch)
    broker.gate.set()
    publish(broker, 2)
    await settle()
    assert all(s.offsets() == [4, 5] for s in others)
    assert first.offsets() == [1, 2, 3, 4, 5]
