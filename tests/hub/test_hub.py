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
    HistoryLimits,
    HistoryPage,
    Publication,
)
from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.core.close_codes import CloseCode
from igratech_ws.core.codec import event_frame
from igratech_ws.core.recovery import EMPTY_EPOCH
from igratech_ws.hub import LINGER_CONNECTIONS, Hub
from tests.support.fakes import (
    CH,
    EmptyEpochBroker,
    FakeSubscriber,
    RecordingBroker,
    make_hub,
    settle,
)


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
    first = subs[0].queued()
    assert len(first) == 2
    for sub in subs[1:]:
        assert all(mine is theirs for mine, theirs in zip(sub.queued(), first, strict=True))
    await settle()
    for sub in subs:
        assert not sub.pending
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
    writes_before = hub.writes
    publish(broker, 5)
    publish(broker, 2, "game:g-2")
    assert a.writes == [] and b.writes == []  # nothing written synchronously
    await settle()
    assert len(a.writes) == 1
    assert len(b.writes) == 1
    assert hub.writes - writes_before == 2  # the metric counts what the sockets got
    assert a.offsets() == [2, 3, 4, 5, 6]
    assert a.offsets("game:g-2") == [1, 2]
    assert b.offsets() == [2, 3, 4, 5, 6]


async def test_a_burst_that_arrives_in_two_reads_shares_one_write_per_follower() -> None:
    """A broker hands a burst over in pieces (NATS: a chain of appends pushed over a millisecond
    or so). To many followers, the flush lingers once, and the pieces share one write each; to
    few, nothing waits; without a linger each piece is its own write."""
    for linger, followers, writes in (
        (0.05, LINGER_CONNECTIONS, 1),
        (0.0, LINGER_CONNECTIONS, 2),
        (0.05, LINGER_CONNECTIONS - 1, 2),
    ):
        broker = RecordingBroker()
        hub = await make_hub(broker, flush_linger=linger)
        channel = f"game:linger-{linger}-{followers}"
        subscribers = [FakeSubscriber(f"s-{n}") for n in range(followers)]
        for subscriber in subscribers:
            await join(hub, subscriber, channel)
        publish(broker, 1, channel)
        await asyncio.sleep(0.1)  # past the linger
        await settle()
        assert subscribers[0].offsets(channel) == [1]
        for subscriber in subscribers:
            subscriber.writes.clear()
        writes_before = hub.writes
        publish(broker, 3, channel)
        await settle()  # the first piece is read, the flush is due...
        publish(broker, 2, channel)  # ...and the rest comes in the next read
        await asyncio.sleep(0.1)  # past the linger
        await settle()
        assert {len(s.writes) for s in subscribers} == {writes}, (linger, followers)
        assert hub.writes - writes_before == writes * followers
        assert subscribers[0].offsets(channel) == [2, 3, 4, 5, 6]
        await hub.close()
        await broker.close()


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
    assert not a.pending


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
    # The join reads one publication to decide; the rest is replayed after the answer.
    assert (result.state.offset, [p.offset for p in result.missed]) == (5, [2])
    publish(broker, 1)  # 6: after history was read, before the answer: in history
    hub.send(a, event_frame("settings", {"games": ["g-1"], "stats": False, "channels": []}))
    hub.finish_join(a, result)
    publish(broker, 1)  # 7: live, while the replay reads history
    await settle()
    assert a.frames()[0]["event"] == "settings"
    assert a.offsets() == [2, 3, 4, 5, 6, 7]
    assert hub.position_of(a, CH) == (7, epoch)
    publish(broker, 1)
    await settle()
    assert a.offsets() == [2, 3, 4, 5, 6, 7, 8]


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


@pytest.mark.parametrize("bounds", [{"join_buffer_limit": 3}, {"join_buffer_bytes": 3 * (120 + 8)}])
async def test_a_join_buffer_past_its_bound_is_dropped_and_replayed_from_history(
    broker: RecordingBroker, bounds: dict[str, int]
) -> None:
    """What a join holds is bounded in count and in bytes; past the bound it holds nothing and
    catches up from history after the answer: no close, no gap, no duplicate."""
    hub = await make_hub(broker, **bounds)
    try:
        a, b = FakeSubscriber("a"), FakeSubscriber("b")
        await join(hub, b)
        result = await hub.join(a, CH, None)  # answer not sent yet: publications are held
        publish(broker, 3)
        assert len(hub._joining[CH][a].buffer) == 3
        publish(broker, 2)
        assert hub._joining[CH][a].buffer == []  # overflowed: nothing held any more
        hub.finish_join(a, result)
        publish(broker, 1)
        await settle()
        assert a.closes == []
        assert a.offsets() == [1, 2, 3, 4, 5, 6]
        assert b.offsets() == [1, 2, 3, 4, 5, 6]
        epoch = (await broker.position(CH)).epoch
        assert hub.position_of(a, CH) == (6, epoch)
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


# --- the outbound budget (D7) -------------------------------------------------------------------


BIG = 20_000  # bytes of payload per publication in the budget tests


def publish_big(broker: MemoryBroker, count: int, channel: str = CH) -> list[Publication]:
    body = json.dumps({"pad": "x" * BIG}).encode()
    return [broker.publish_now(channel, "bet", body) for _ in range(count)]


async def test_every_queued_byte_counts_against_the_budget_with_the_socket_backlog(
    broker: RecordingBroker,
) -> None:
    """Queued frames plus the socket's buffer stay within `max_buffer_bytes`; the frame that
    would pass it makes the connection a slow consumer: dropped, closed 1013 on the next tick
    (never inside the fan-out loop), and the other followers are not affected."""
    hub = await make_hub(broker, max_buffer_bytes=100_000)
    try:
        slow, fast = FakeSubscriber("slow", reading=False), FakeSubscriber("fast")
        await join(hub, slow)
        await join(hub, fast)
        publish_big(broker, 3)  # 3 x ~20 KB: queued this tick
        await settle()
        # In the socket (up to a quarter of the budget and a frame) or held for it.
        assert slow.backlog + sum(map(len, slow.queued())) > 60_000 and slow.closes == []
        publish_big(broker, 2)  # 60 KB in the socket or held + 2 x 20 KB queued: over 100 KB
        assert slow.closes == []  # not from inside the fan-out
        await settle()
        assert slow.closes == [CloseCode.TRY_AGAIN_LATER]
        # The 4th fitted (what was queued went to the socket first); the 5th did not.
        assert slow.offsets() == [1, 2, 3, 4]
        assert slow.backlog <= 100_000
        assert fast.offsets() == [1, 2, 3, 4, 5]
        assert hub.slow_consumers == 1
    finally:
        await hub.close()


async def test_send_wire_is_the_one_path_for_control_frames(broker: RecordingBroker) -> None:
    """Pongs the transport builds go through `send_wire`: in order with pushes, and budgeted
    (on main the automatic pongs of a client sending pings were written past the bound)."""
    hub = await make_hub(broker, max_buffer_bytes=10_000)
    try:
        a = FakeSubscriber("a", reading=False)
        await join(hub, a)
        publish(broker, 1)
        pong = b"\x8a\x04ping"
        hub.send_wire(a, pong)
        publish(broker, 1)
        await settle()
        assert b"".join(a.writes).count(pong) == 1
        assert a.offsets() == [1, 2]
        for _ in range(10_000 // len(pong)):
            hub.send_wire(a, pong)
        await settle()
        assert a.closes == [CloseCode.TRY_AGAIN_LATER]
        assert a.backlog <= 10_000
    finally:
        await hub.close()


async def test_a_closed_slow_consumer_keeps_nothing_queued(broker: RecordingBroker) -> None:
    hub = await make_hub(broker, max_buffer_bytes=30_000)
    try:
        a = FakeSubscriber("a", reading=False)
        await join(hub, a)
        publish_big(broker, 3)
        assert a.queued() == []  # dropped at once, not when the close comes
        written = list(a.writes)  # what fitted went to the socket first
        await settle()
        assert a.closes == [CloseCode.TRY_AGAIN_LATER]
        publish_big(broker, 3)
        await settle()
        assert a.queued() == [] and a.writes == written
    finally:
        await hub.close()


# --- recovery replayed in pages as the socket drains --------------------------------------------


async def test_a_replay_to_a_client_that_does_not_read_stays_within_a_quarter_of_the_budget(
    broker: RecordingBroker,
) -> None:
    """On main the whole replay was queued at once: 30 such clients recovering 1,000 large
    publications grew the server by ~900 MB. Here a replay queues a page, waits for the socket
    to drain below a quarter of the budget, and goes on: exactly once and in order."""
    hub = await make_hub(broker, max_buffer_bytes=400_000, recovery_limit=1000)
    try:
        published = publish_big(broker, 100)  # ~2 MB of history
        a = FakeSubscriber("a", reading=False)
        result = await join(hub, a, CH, (0, published[0].epoch))
        assert result.state.recovered is True and result.state.offset == 100
        await settle(200)
        stalled = a.offsets()
        assert 0 < len(stalled) < 100
        peak = a.backlog
        assert peak < 100_000 + 300_000  # below low water, plus at most one page
        for _ in range(100):  # the client reads, a little at a time
            if len(a.offsets()) == 100:
                break
            a.drain(hub)
            await settle(50)
            peak = max(peak, a.backlog)
        assert a.offsets() == list(range(1, 101))
        assert peak <= hub.low_water + hub.page_bytes + BIG
        assert a.closes == []
        publish_big(broker, 1)  # then live
        a.drain(hub)
        await settle()
        assert a.offsets() == list(range(1, 102))
        assert hub._replays == {} and hub._writable_waiters == {}
    finally:
        await hub.close()


async def test_live_publications_during_a_replay_are_handed_over_without_gap_or_duplicate(
    broker: RecordingBroker,
) -> None:
    hub = await make_hub(broker, max_buffer_bytes=200_000)
    try:
        published = publish_big(broker, 30)
        follower = FakeSubscriber("live")
        await join(hub, follower)  # the channel is live on this node
        a = FakeSubscriber("a", reading=False)
        await join(hub, a, CH, (0, published[0].epoch))
        for _ in range(60):
            publish_big(broker, 1)  # live, while the replay waits for the socket
            a.drain(hub)
            await settle(10)
        for _ in range(50):
            a.drain(hub)
            await settle(10)
        assert a.offsets() == list(range(1, 91))
        assert follower.offsets() == list(range(31, 91))
        assert CH in hub._live and a in hub._live[CH]
    finally:
        await hub.close()


async def test_a_replay_history_no_longer_holds_closes_the_connection(
    broker: RecordingBroker,
) -> None:
    """History trimmed under a replay: the connection is closed so that its next resume tells
    it `recovered: false`; what it received is a gap-free prefix."""
    small = RecordingBroker(limits=HistoryLimits(size=40))
    hub = await make_hub(small, max_buffer_bytes=200_000)
    try:
        published = publish_big(small, 30)
        a = FakeSubscriber("a", reading=False)
        await join(hub, a, CH, (0, published[0].epoch))
        await settle(50)
        received = a.offsets()
        assert 0 < len(received) < 30
        publish_big(small, 40)  # trims what the replay has not read yet
        a.drain(hub)
        await settle(50)
        assert a.closes == [CloseCode.TRY_AGAIN_LATER]
        assert a.offsets() == list(range(1, len(a.offsets()) + 1))
        assert hub.replays_abandoned == 1
    finally:
        await hub.close()
        await small.close()


async def test_memory_of_a_replay_does_not_grow_with_the_recovery_limit(
    broker: RecordingBroker,
) -> None:
    """One history read of a replay asks for at most PAGE_MAX_COUNT publications."""
    reads: list[int] = []

    class Counting(RecordingBroker):
        async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
            reads.append(limit)
            return await super().history(channel, since_offset, limit)

    counting = Counting(limits=HistoryLimits(size=5000))
    hub = await make_hub(counting, recovery_limit=100_000)
    try:
        published = publish(counting, 3000)
        a = FakeSubscriber("a")
        await join(hub, a, CH, (0, published[0].epoch))
        await settle(500)
        assert a.offsets() == list(range(1, 3001))
        assert max(reads) <= 64
    finally:
        await hub.close()
        await counting.close()


# --- D1: a stream nobody published, offset 0 -----------------------------------------------------


async def test_a_follower_from_offset_0_continues_with_the_first_publications_epoch() -> None:
    """On main the first publication of a new stream (an epoch other than the one reported at
    join) closed a joining follower with 1012."""
    empty = EmptyEpochBroker()
    hub = await make_hub(empty)
    try:
        a, b = FakeSubscriber("a"), FakeSubscriber("b")
        result = await join(hub, a)
        assert (result.state.offset, result.state.epoch) == (0, EMPTY_EPOCH)
        # b resumes from that position while the channel still has no stream: nothing missed.
        recovered = await join(hub, b, CH, (0, EMPTY_EPOCH))
        assert recovered.state.recovered is True
        first = publish(empty, 2)
        await settle()
        assert a.closes == [] and b.closes == []
        assert a.offsets() == [1, 2] and b.offsets() == [1, 2]
        assert {f["epoch"] for f in a.frames()} == {first[0].epoch}
        assert hub.position_of(a, CH) == (2, first[0].epoch)
    finally:
        await hub.close()
        await empty.close()


async def test_recovery_from_no_stream_replays_the_whole_stream(
    hub: Hub, broker: RecordingBroker
) -> None:
    """D1: (0, "none") has seen nothing; a real epoch at offset 0 is held to its life."""
    publish(broker, 4)
    a, b = FakeSubscriber("a"), FakeSubscriber("b")
    result = await join(hub, a, CH, (0, EMPTY_EPOCH))
    assert (result.state.recovered, result.state.offset) == (True, 4)
    assert (await join(hub, b, CH, (0, "a-lost-life"))).state.recovered is False
    publish(broker, 1)
    await settle()
    assert a.offsets() == [1, 2, 3, 4, 5]
    assert b.offsets() == [5]


# --- bounds of everything keyed by client input --------------------------------------------------


async def test_a_resync_holds_a_bounded_number_of_bytes(broker: RecordingBroker) -> None:
    hub = await make_hub(broker, join_buffer_bytes=5 * (BIG + 200))
    try:
        a = FakeSubscriber("a")
        await join(hub, a)
        publish(broker, 1)
        broker.lose_subscription(CH)
        publish(broker, 1)
        broker.restore_subscription(CH)
        broker.gate.clear()
        publish_big(broker, 1)  # a gap: the resync waits on history
        publish_big(broker, 10)  # held: past the bytes bound, the followers must reconnect
        assert a.closes == [CloseCode.SERVICE_RESTART]
        assert CH not in hub._syncing and CH not in hub._syncing_bytes
        broker.gate.set()
        await settle()
    finally:
        await hub.close()


async def test_nothing_is_left_after_everyone_leaves(hub: Hub, broker: RecordingBroker) -> None:
    """Every map of the hub is keyed by a followed channel or by a connection: when the last
    follower of every channel leaves, whatever it did (join, recover, replay, gap), all are
    empty."""
    subs = [FakeSubscriber(f"s{i}", reading=i % 2 == 0) for i in range(6)]
    publish(broker, 5)
    epoch = (await broker.position(CH)).epoch
    for index, sub in enumerate(subs):
        await join(hub, sub, f"game:made-up-{index}")
        await join(hub, sub, CH, (index % 3, epoch))
    publish_big(broker, 20)
    broker.lose_subscription(CH)
    publish(broker, 1)
    broker.restore_subscription(CH)
    publish(broker, 1)
    await settle()
    for index, sub in enumerate(subs):
        sub.open = False
        for channel in (CH, f"game:made-up-{index}"):
            hub.leave(sub, channel)
    await settle(50)
    maps = {
        "live": hub._live,
        "joining": hub._joining,
        "last": hub._last,
        "syncing": hub._syncing,
        "syncing_bytes": hub._syncing_bytes,
        "broker_subs": hub._broker_subs,
        "replays": hub._replays,
        "writable_waiters": hub._writable_waiters,
        "flush_waiters": hub._flush_waiters,
    }
    assert {name: len(value) for name, value in maps.items() if value} == {}
    assert hub.channel_count == 0


async def test_a_late_delivery_after_the_last_follower_left_is_not_remembered(
    hub: Hub, broker: RecordingBroker
) -> None:
    """Found by tests/e2e/test_resume_sdk.py: the broker delivered a publication between the hub's
    release of the channel and its unsubscribe; the hub remembered it as the node's position,
    so the next follower's first live publication looked like a gap, the resync could not fill
    it from a short history, and the followers were closed (or stalled). Also a `_last` entry
    for a channel nobody follows."""
    a = FakeSubscriber("a")
    await join(hub, a)
    (first,) = publish(broker, 1)
    hub.leave(a, CH)
    late = publish(broker, 1)  # published now; the broker still delivers it once, late
    hub.on_publication(late[0])
    assert CH not in hub._last
    await settle()
    publish(broker, 20)
    b = FakeSubscriber("b")
    await join(hub, b, CH, (first.offset, first.epoch))
    publish(broker, 1)
    await settle()
    assert b.closes == [] and hub.resyncs == 0
    assert b.offsets() == list(range(2, 24))
