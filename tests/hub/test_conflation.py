"""Conflation of state frames for a connection that is behind (issue 12, decision D9).

Written as the unlucky user on a slow phone: its socket is full, a game floods stats, and bets or
incidents come in between. What it must see once it reads again: every stream frame, in order;
the newest state of each channel; offsets that only skip superseded state frames, the frame
after a skip marked `conflated`; and nothing past the budget (no 1013 for a stats flood).
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igratech_ws.brokers.base import Publication
from igratech_ws.core.close_codes import CloseCode
from tests.support.conflation import (
    GAME,
    OTHER,
    big_stats,
    check_view,
    fall_behind,
    followed,
    incident,
    read_and_check,
    stats,
)
from tests.support.fakes import FakeSubscriber, RecordingBroker, make_hub, settle

BUDGET = 64 * 1024


async def test_a_behind_connection_gets_only_the_newest_stats_marked_conflated() -> None:
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        sub = FakeSubscriber("slow")
        await followed(hub, sub, GAME)
        incident(broker, 0)
        await settle()
        fall_behind(sub, hub)
        published = [stats(broker, n) for n in range(500)]
        await settle()
        assert len(sub.queued()) <= 2  # the socket's first frame that held it, and one stats
        assert sub.closes == []
        assert hub.conflated_frames >= 498
        sub.reading = True
        sub.drain(hub)
        await settle()
        frames = sub.frames()
        assert frames[-1]["offset"] == published[-1].offset
        assert frames[-1]["conflated"] is True
        assert frames[-1]["data"]["values"] == {"n": 499}
    finally:
        await hub.close()
        await broker.close()


async def test_a_stream_frame_between_two_stats_keeps_both_sides() -> None:
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        sub = FakeSubscriber("slow")
        await followed(hub, sub, GAME)
        fall_behind(sub, hub)
        incident(broker, -1)  # queued while behind is not known yet: the flush finds out
        await settle()
        published = [
            stats(broker, 1),
            stats(broker, 2),
            incident(broker, 3),
            stats(broker, 4),
            stats(broker, 5),
        ]
        await settle()
        sub.reading = True
        sub.drain(hub)
        await settle()
        view = [(f["event"], f["offset"], f.get("conflated")) for f in sub.frames()]
        assert view == [
            ("incident", 1, None),
            ("stats", 3, True),
            ("incident", 4, None),
            ("stats", 6, True),
        ]
        assert published[-1].offset == 6
    finally:
        await hub.close()
        await broker.close()


async def test_an_answer_between_two_stats_is_a_barrier() -> None:
    """A frame that is not a live push (an answer, a pong) is never overtaken: the stats before
    it stay, so what the client sees around it is what was true then."""
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        sub = FakeSubscriber("slow")
        await followed(hub, sub, GAME)
        fall_behind(sub, hub)
        incident(broker, 0)
        await settle()
        stats(broker, 1)
        hub.send(sub, b'{"event":"pong","data":{"serverTime":"2026-11-23T19:45:00Z"}}')
        stats(broker, 2)
        stats(broker, 3)
        await settle()
        sub.reading = True
        sub.drain(hub)
        await settle()
        view = [(f["event"], f.get("offset"), f.get("conflated")) for f in sub.frames()]
        assert view == [
            ("incident", 1, None),
            ("stats", 2, None),
            ("pong", None, None),
            ("stats", 4, True),
        ]
    finally:
        await hub.close()
        await broker.close()


async def test_a_stream_flood_is_never_conflated_but_closed_as_a_slow_consumer() -> None:
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        sub = FakeSubscriber("slow", reading=False)
        await followed(hub, sub, GAME)
        for n in range(2000):
            incident(broker, n)
            if n % 50 == 0:
                await settle(2)
        await settle()
        assert sub.closes and int(sub.closes[0]) == 1013
        assert hub.conflated_frames == 0
    finally:
        await hub.close()
        await broker.close()


async def test_a_never_reading_client_on_a_stats_flood_stays_under_the_budget() -> None:
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        sub = FakeSubscriber("never", reading=False)
        await followed(hub, sub, GAME, OTHER)
        published: list[Publication] = []
        for n in range(3000):
            published.append(stats(broker, n, GAME if n % 2 else OTHER))
            if n % 100 == 0:
                published.append(incident(broker, n))
            if n % 25 == 0:
                await settle(2)
                outbox = sub.pending
                assert outbox is None or outbox.size <= BUDGET
        await settle()
        assert sub.closes == []
        assert sub.backlog + (sub.pending.size if sub.pending else 0) <= 2 * BUDGET
        await read_and_check(hub, sub, published)
    finally:
        await hub.close()
        await broker.close()


# --- the property: never a stream frame dropped, never a reorder ---------------------------------

OPS = st.lists(
    st.sampled_from(
        [
            ("stats", GAME),
            ("stats", GAME),
            ("stats", OTHER),
            ("incident", GAME),
            ("incident", OTHER),
            ("behind", ""),
            ("drain", ""),
            ("tick", ""),
            ("pong", ""),
        ]
    ),
    max_size=80,
)


async def _run(ops: list[tuple[str, str]]) -> None:
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        sub = FakeSubscriber("prop")
        await followed(hub, sub, GAME, OTHER)
        published: list[Publication] = []
        for n, (op, channel) in enumerate(ops):
            if op == "stats":
                published.append(stats(broker, n, channel))
            elif op == "incident":
                published.append(incident(broker, n, channel))
            elif op == "behind":
                fall_behind(sub, hub)
            elif op == "drain":
                sub.reading = True
                sub.drain(hub)
            elif op == "pong":
                hub.send(sub, b'{"event":"pong","data":{"serverTime":"2026-11-23T19:45:00Z"}}')
            else:
                await settle(3)
        await settle()
        sub.reading = True
        sub.drain(hub)
        await settle()
        assert sub.closes == []
        if published:
            check_view(sub.frames(), published)
    finally:
        await hub.close()
        await broker.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_conflation_never_drops_a_stream_frame_nor_reorders(ops: list[tuple[str, str]]) -> None:
    asyncio.run(_run(ops))


async def test_state_records_and_behind_connections_do_not_outlive_their_keys() -> None:
    """Nothing a reader does may leave shared state behind: once the followers are gone, the
    channel's state record and the held connection are forgotten."""
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        sub = FakeSubscriber("gone")
        stats(broker, 0)
        await followed(hub, sub, GAME, OTHER)
        incident(broker, 1)
        await settle()
        fall_behind(sub, hub)
        for n in range(5):
            stats(broker, n)
        await settle()
        assert hub._states and hub._behind
        sub.close_with(CloseCode.TRY_AGAIN_LATER)
        for channel in (GAME, OTHER):
            hub.leave(sub, channel)
        await settle()
        assert hub._states == {} and hub._behind == set()
    finally:
        await hub.close()
        await broker.close()


# --- what the socket already holds cannot be conflated: it must leave room for the stream --------


async def test_a_tick_of_stats_that_fills_the_socket_leaves_room_for_the_stream() -> None:
    """The client stops reading (its kernel buffers are full from now on) just as one tick queues
    twenty stats of 3 KB: 60 KB, under the 64 KB budget. Handed to the socket in one write they
    would all sit in its buffer, where nothing can replace them, and the next few incidents (each
    kept with the stats before it) would pass the budget: 1013 for a stats flood. The socket
    gets at most a quarter of the budget (and a frame) while it is behind; the rest stays queued,
    conflatable."""
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        sub = FakeSubscriber("stalled")
        await followed(hub, sub, GAME)
        sub.reading = False  # from here on every byte written stays in the socket's buffer
        published = [big_stats(broker, n) for n in range(20)]
        await settle()
        for n in range(10):
            published.append(incident(broker, 100 + n))
            published.extend(big_stats(broker, 1000 * n + k) for k in range(30))
            await settle()
        assert sub.closes == []
        assert sub.backlog <= hub.low_water + max(len(p.data) for p in published) + 300
        await read_and_check(hub, sub, published)
    finally:
        await hub.close()
        await broker.close()


STALL_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("burst"), st.sampled_from([GAME, OTHER]), st.integers(1, 30)),
        st.tuples(st.just("incident"), st.sampled_from([GAME, OTHER]), st.just(0)),
        st.tuples(st.sampled_from(["stop", "drain", "tick"]), st.just(""), st.just(0)),
    ),
    max_size=40,
)


async def _run_stalls(ops: list[tuple[str, str, int]]) -> None:
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        sub = FakeSubscriber("stalls")
        await followed(hub, sub, GAME, OTHER)
        published: list[Publication] = []
        incidents_unread = 0
        for n, (op, channel, count) in enumerate(ops):
            if op == "burst":  # `count` stats in one tick
                published.extend(big_stats(broker, 100 * n + k, channel) for k in range(count))
            elif op == "incident":
                published.append(incident(broker, n, channel))
                incidents_unread += not sub.reading
            elif op == "stop":
                sub.reading = False
            elif op == "drain":
                sub.reading = True
                sub.drain(hub)
                incidents_unread = 0
            else:
                await settle(3)
        await settle()
        # What conflation cannot shrink while the client does not read: the socket's share (a
        # quarter of the budget and a frame), each incident with the stats before it, and the
        # newest stats of each channel.
        frame = max((len(p.data) for p in published), default=0) + 300  # and the envelope
        unshrinkable = hub.low_water + frame + incidents_unread * (frame + 200) + 2 * frame
        if unshrinkable <= BUDGET:
            assert sub.closes == [], (incidents_unread, unshrinkable)
        if sub.closes:
            return  # a slow consumer for its stream: the socket test checks what it got
        if published:
            await read_and_check(hub, sub, published)
    finally:
        await hub.close()
        await broker.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STALL_OPS)
def test_a_stalled_socket_never_makes_a_stats_flood_a_slow_consumer(
    ops: list[tuple[str, str, int]],
) -> None:
    asyncio.run(_run_stalls(ops))


async def test_a_held_queue_counts_the_socket_as_it_is_now_before_giving_up_conflation() -> None:
    """The client fell behind with 30 KB in its socket, then read 20 KB of it without the
    transport reporting a drain (that comes only at a quarter of the budget's half). The held
    queue still counted the socket at 30 KB: the next incident looked over the budget, and the
    hub handed everything to the socket (where no stats can be replaced any more) to decide.
    Counted as it is now, the incident simply joins the queue, which stays conflatable."""
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        sub = FakeSubscriber("sipping", reading=False)
        await followed(hub, sub, GAME)
        sub.backlog = 30_000
        published = []
        while sub.pending is None or sub.pending.size < BUDGET - 3_600:
            published.append(incident(broker, len(published)))
            published.append(big_stats(broker, len(published)))
            await settle()
        assert sub.pending is not None and sub.pending.tracked is not None  # held
        sub.backlog -= 20_000  # read by the client; no `on_writable`, no poll yet
        published.append(incident(broker, len(published)))
        published.append(big_stats(broker, len(published)))
        published.append(big_stats(broker, len(published)))
        assert sub.backlog == 10_000, "the queue was dumped into the socket"
        assert sub.pending.tracked is not None and hub.conflated_frames >= 1
        assert sub.closes == []
        await read_and_check(hub, sub, published)
    finally:
        await hub.close()
        await broker.close()
