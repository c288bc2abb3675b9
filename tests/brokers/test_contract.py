"""The contract every broker meets (see `igratech_ws.brokers.base`), run against each of them.

Negative delivery checks ("not delivered") never sleep: they publish a marker after the unwanted
publication and wait for the marker, relying on per-node delivery order.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from igratech_ws.brokers.base import (
    EMPTY_EPOCH,
    BrokerState,
    HistoryLimits,
    HistoryPage,
    StreamPosition,
    UserLogin,
    UserLogout,
)
from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.core.recovery import decide_recovery
from tests.support.brokers import WAIT_S, BrokerFactory

GAME = "game:g-1"
OTHER = "game:g-2"
MARKER = "global"


def data(i: int) -> bytes:
    return b'{"i":%d}' % i


async def test_offsets_start_at_one_and_are_consecutive_per_channel(
    make_broker: BrokerFactory,
) -> None:
    node = await make_broker()
    broker = node.broker
    game = [(await broker.publish(GAME, "incident", data(i))).publication for i in range(5)]
    other = [(await broker.publish(OTHER, "bet", data(i))).publication for i in range(3)]
    assert [p.offset for p in game] == [1, 2, 3, 4, 5]
    assert [p.offset for p in other] == [1, 2, 3]
    assert len({p.epoch for p in game}) == 1, "epoch must be stable across publishes"
    assert game[0].epoch
    assert await broker.position(GAME) == await broker.position(GAME)
    top = await broker.position(GAME)
    assert (top.offset, top.epoch) == (5, game[0].epoch)


async def test_publication_carries_what_was_published(make_broker: BrokerFactory) -> None:
    node = await make_broker()
    before = time.time()
    publication = (
        await node.broker.publish(GAME, "incident", b'{"a":"\xc3\xa9","b":[1,2]}')
    ).publication
    assert publication.channel == GAME
    assert publication.event == "incident"
    assert publication.data == b'{"a":"\xc3\xa9","b":[1,2]}'
    assert publication.origin == node.node_id
    # Broker clocks may differ a little from ours; this only checks the unit (Unix seconds).
    assert abs(publication.published_at - before) < 60


async def test_a_channel_nobody_published_is_at_offset_zero_of_the_empty_epoch(
    make_broker: BrokerFactory,
) -> None:
    node = await make_broker()
    broker = node.broker
    assert await broker.position("game:never-used") == StreamPosition(0, EMPTY_EPOCH)
    page = await broker.history("game:never-used", 0, 10)
    assert page == HistoryPage([], StreamPosition(0, EMPTY_EPOCH))
    assert await broker.latest_state("game:never-used") == []
    # The first publication starts a stream with a fresh epoch; a client that was at offset 0
    # (it has seen nothing) finds everything from offset 1 in history.
    first = (await broker.publish("game:never-used", "incident", data(1))).publication
    assert first.offset == 1
    assert first.epoch not in ("", EMPTY_EPOCH)
    page = await broker.history("game:never-used", 0, 10)
    assert page.publications == [first]
    assert page.top == StreamPosition(1, first.epoch)


async def test_publish_delivers_to_subscribed_node_in_offset_order(
    make_broker: BrokerFactory,
) -> None:
    node = await make_broker()
    broker = node.broker
    await broker.subscribe(GAME)
    await broker.subscribe(MARKER)
    for i in range(20):
        await broker.publish(GAME, "incident", data(i))
        await broker.publish(OTHER, "bet", data(i))  # nobody here follows OTHER
    await broker.publish(MARKER, "stats", data(0))
    await node.wait_for_publications(MARKER, 1)
    received = await node.wait_for_publications(GAME, 20)
    assert [p.offset for p in received] == list(range(1, 21))
    assert [p.data for p in received] == [data(i) for i in range(20)]
    assert node.received(OTHER) == []


async def test_no_delivery_after_unsubscribe(make_broker: BrokerFactory) -> None:
    node = await make_broker()
    broker = node.broker
    await broker.subscribe(GAME)
    await broker.subscribe(MARKER)
    await broker.publish(GAME, "incident", data(1))
    await node.wait_for_publications(GAME, 1)
    await broker.unsubscribe(GAME)
    await broker.publish(GAME, "incident", data(2))
    await broker.publish(MARKER, "stats", data(0))
    await node.wait_for_publications(MARKER, 1)
    assert [p.offset for p in node.received(GAME)] == [1]
    # And subscribing again resumes delivery.
    await broker.subscribe(GAME)
    await broker.publish(GAME, "incident", data(3))
    received = await node.wait_for_publications(GAME, 2)
    assert [p.offset for p in received] == [1, 3]


async def test_history_returns_offsets_after_since_in_order_and_the_top(
    make_broker: BrokerFactory,
) -> None:
    node = await make_broker()
    broker = node.broker
    published = [(await broker.publish(GAME, "incident", data(i))).publication for i in range(10)]
    epoch = published[0].epoch

    page = await broker.history(GAME, 0, 100)
    assert page.publications == published
    assert (page.top.offset, page.top.epoch) == (10, epoch)

    page = await broker.history(GAME, 4, 3)
    assert [p.offset for p in page.publications] == [5, 6, 7]
    assert (page.top.offset, page.top.epoch) == (10, epoch)

    assert (await broker.history(GAME, 10, 5)).publications == []
    assert (await broker.history(GAME, 3, 0)).publications == []
    empty = await broker.history("game:never-used", 0, 10)
    assert empty.publications == []
    assert empty.top.offset == 0


async def test_history_is_bounded_by_size(make_broker: BrokerFactory) -> None:
    node = await make_broker(limits=HistoryLimits(size=5, ttl=30.0))
    for i in range(12):
        await node.broker.publish(GAME, "incident", data(i))
    page = await node.broker.history(GAME, 0, 100)
    assert [p.offset for p in page.publications] == [8, 9, 10, 11, 12]
    assert page.top.offset == 12


async def test_history_is_bounded_by_ttl(make_broker: BrokerFactory) -> None:
    node = await make_broker(limits=HistoryLimits(size=50, ttl=1.0))
    broker = node.broker
    published = [(await broker.publish(GAME, "incident", data(i))).publication for i in range(3)]
    for _ in range(int(WAIT_S / 0.1)):  # expiry is a clock, not an event: poll, bounded
        if not (await broker.history(GAME, 0, 100)).publications:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("publications older than the ttl are still in history")
    page = await broker.history(GAME, 0, 100)
    # Expiry drops history, not the stream: the position goes on.
    assert (page.top.offset, page.top.epoch) == (3, published[0].epoch)
    later = (await broker.publish(GAME, "incident", data(3))).publication
    assert (later.offset, later.epoch) == (4, published[0].epoch)
    assert [p.offset for p in (await broker.history(GAME, 0, 100)).publications] == [4]


async def test_concurrent_publishes_on_one_node_are_gap_free(make_broker: BrokerFactory) -> None:
    node = await make_broker(limits=HistoryLimits(size=500, ttl=30.0))
    await node.broker.subscribe(GAME)
    results = await asyncio.gather(*(node.broker.publish(GAME, "bet", data(i)) for i in range(200)))
    published = [r.publication for r in results]
    # Pipelined or batched, publications through one broker get offsets in call order.
    assert [p.offset for p in published] == list(range(1, 201))
    assert [p.data for p in published] == [data(i) for i in range(200)]
    received = await node.wait_for_publications(GAME, 200)
    assert [p.offset for p in received] == list(range(1, 201))


async def test_publish_many_is_publish_in_list_order_per_channel(
    make_broker: BrokerFactory,
) -> None:
    node = await make_broker(limits=HistoryLimits(size=500, ttl=30.0))
    broker = node.broker
    await broker.subscribe(GAME)
    await broker.subscribe(OTHER)
    await broker.publish(GAME, "incident", data(-1))  # a stream that already has a top
    # Two channels interleaved (on sharded Redis they may live on two servers).
    items = [(GAME if i % 3 else OTHER, "bet", data(i), None) for i in range(120)]
    results = await broker.publish_many(items)
    assert [r.duplicate for r in results] == [False] * 120
    published = [r.publication for r in results]
    assert [(p.channel, p.event, p.data) for p in published] == [(c, e, d) for c, e, d, _ in items]
    game = [p for p in published if p.channel == GAME]
    other = [p for p in published if p.channel == OTHER]
    assert [p.offset for p in game] == list(range(2, 2 + len(game)))
    assert [p.offset for p in other] == list(range(1, 1 + len(other)))
    # Delivered as published, in offset order, and in history in list order.
    assert await node.wait_for_publications(GAME, 1 + len(game)) == [
        (await broker.history(GAME, 0, 1)).publications[0],
        *game,
    ]
    assert await node.wait_for_publications(OTHER, len(other)) == other
    history = await broker.history(OTHER, 0, 500)
    assert [p.data for p in history.publications] == [p.data for p in other]
    assert await broker.publish_many([]) == []


async def test_publish_many_refuses_a_bad_item_before_publishing_any(
    make_broker: BrokerFactory,
) -> None:
    node = await make_broker()
    broker = node.broker
    good = (GAME, "incident", data(1), None)
    with pytest.raises(ValueError, match="UTF-8"):
        await broker.publish_many([good, (GAME, "incident", b'{"a":"\xff"}', None)])
    with pytest.raises(ValueError, match="idempotency key"):
        await broker.publish_many([good, (GAME, "incident", data(2), "a key")])
    assert await broker.position(GAME) == StreamPosition(0, EMPTY_EPOCH)


async def test_concurrent_publishes_from_two_nodes_are_gap_free_and_delivered_once(
    make_broker: BrokerFactory,
) -> None:
    first = await make_broker(limits=HistoryLimits(size=500, ttl=30.0))
    second = await make_broker(limits=HistoryLimits(size=500, ttl=30.0))
    await first.broker.subscribe(GAME)
    await second.broker.subscribe(GAME)
    results = await asyncio.gather(
        *((first if i % 2 else second).broker.publish(GAME, "bet", data(i)) for i in range(200))
    )
    published = [r.publication for r in results]
    assert sorted(p.offset for p in published) == list(range(1, 201))
    assert len({p.epoch for p in published}) == 1
    by_offset = {p.offset: p for p in published}
    for node in (first, second):
        received = await node.wait_for_publications(GAME, 200)
        # The contract (`Broker`): once each; in offset order only per publishing instance, so
        # the hub treats a skipped offset as a gap (NATS RePublish does swap messages stored
        # from two connections, rarely).
        assert sorted(p.offset for p in received) == list(range(1, 201))
        for origin in (first.node_id, second.node_id):
            mine = [p.offset for p in received if p.origin == origin]
            assert mine == sorted(mine), f"{origin}'s publications out of order"
        # Each node gets every publication, its own included, exactly as published.
        assert received == [by_offset[p.offset] for p in received]
    history = await first.broker.history(GAME, 0, 500)
    assert [p.offset for p in history.publications] == list(range(1, 201))


async def test_publications_reach_other_nodes(make_broker: BrokerFactory) -> None:
    publisher = await make_broker()
    follower = await make_broker()
    bystander = await make_broker()
    await follower.broker.subscribe(GAME)
    await bystander.broker.subscribe(MARKER)
    published = (await publisher.broker.publish(GAME, "incident", data(1))).publication
    assert await follower.wait_for_publications(GAME, 1) == [published]
    await publisher.broker.publish(MARKER, "stats", data(0))
    await bystander.wait_for_publications(MARKER, 1)
    assert bystander.received(GAME) == []
    assert publisher.publications == []


async def test_control_messages_reach_other_nodes_not_the_sender(
    make_broker: BrokerFactory,
) -> None:
    first = await make_broker()
    second = await make_broker()
    login = UserLogin(origin=first.node_id, user_id="u-1", session_id="s-1", connected_at=1.5)
    logout = UserLogout(origin=first.node_id, user_id="u-2", reason="token_expired")
    await first.broker.publish_control(login)
    await first.broker.publish_control(logout)
    await second.wait_until(lambda: len(second.controls) >= 2, "two control messages")
    assert second.controls == [login, logout]
    # A marker sent after the second node saw both: the first node would have had its echo by now.
    marker = UserLogout(origin=second.node_id, user_id="u-3")
    await second.broker.publish_control(marker)
    await first.wait_until(lambda: len(first.controls) >= 1, "the marker control message")
    assert first.controls == [marker]


async def test_control_messages_are_not_echoed_on_a_single_node(
    make_broker: BrokerFactory,
) -> None:
    node = await make_broker()
    await node.broker.subscribe(MARKER)
    await node.broker.publish_control(UserLogout(origin=node.node_id, user_id="u-1"))
    await node.broker.publish(MARKER, "stats", data(0))
    await node.wait_for_publications(MARKER, 1)
    # The marker publication proves the echo would have arrived by now only where control
    # messages and publications share one ordered connection (memory: no bus; Redis: one
    # pub/sub connection). NATS is covered by the two-node test above.
    if make_broker.family in ("memory", "redis"):
        assert node.controls == []


async def test_recovery_succeeds_within_the_window_and_fails_beyond(
    make_broker: BrokerFactory,
) -> None:
    node = await make_broker(limits=HistoryLimits(size=50, ttl=30.0))
    broker = node.broker
    published = [(await broker.publish(GAME, "incident", data(i))).publication for i in range(10)]
    epoch = published[0].epoch

    async def recover(offset: int, client_epoch: str) -> tuple[bool, list[int]]:
        page = await broker.history(GAME, offset, 1000)
        outcome = decide_recovery(
            offset, client_epoch, page.top.epoch, page.top.offset, page.publications
        )
        return outcome.recovered, [p.offset for p in outcome.missed]

    assert await recover(4, epoch) == (True, list(range(5, 11)))
    assert await recover(10, epoch) == (True, [])
    assert await recover(4, "not-the-epoch") == (False, [])
    assert await recover(11, epoch) == (False, [])  # ahead of the stream

    for i in range(60):
        await broker.publish(GAME, "incident", data(i))
    # 70 published, 50 kept: offsets 21..70.
    assert await recover(4, epoch) == (False, [])
    assert await recover(19, epoch) == (False, [])
    assert await recover(20, epoch) == (True, list(range(21, 71)))
    assert await recover(65, epoch) == (True, list(range(66, 71)))


async def test_close_is_idempotent(make_broker: BrokerFactory) -> None:
    node = await make_broker()
    await node.broker.subscribe(GAME)
    await node.broker.close()
    await node.broker.close()
    assert node.broker.state is BrokerState.CLOSED


async def test_data_that_is_not_utf8_is_refused(make_broker: BrokerFactory) -> None:
    node = await make_broker()
    with pytest.raises(ValueError, match="UTF-8"):
        await node.broker.publish(GAME, "incident", b'{"a":"\xff"}')
    assert await node.broker.position(GAME) == StreamPosition(0, EMPTY_EPOCH)


async def test_the_now_shortcuts_do_what_their_awaited_methods_do_or_decline(
    make_broker: BrokerFactory,
) -> None:
    """`subscribe_now`, `unsubscribe_now` and `state_now` are optional: each either does at once
    what its awaited counterpart does, or declines and changes nothing."""
    node = await make_broker()
    broker = node.broker
    await broker.publish(GAME, "stats", data(1))
    await broker.publish(GAME, "incident", data(2))
    read = broker.state_now(GAME)
    if read is not None:
        states, top = read
        assert states == await broker.latest_state(GAME)
        assert top == await broker.position(GAME)
        assert broker.state_now("game:never-used") == ([], StreamPosition(0, EMPTY_EPOCH))
    await broker.subscribe(MARKER)
    at_once = broker.subscribe_now(GAME)
    if type(broker) is MemoryBroker:
        assert at_once and read is not None, "the memory broker answers at once"
    if at_once:
        await broker.publish(GAME, "incident", data(3))
        received = await node.wait_for_publications(GAME, 1)
        assert [p.offset for p in received] == [3]
        assert broker.unsubscribe_now(GAME), "a broker that subscribes at once unsubscribes so"
    await broker.publish(GAME, "incident", data(4))
    await broker.publish(MARKER, "stats", data(0))
    await node.wait_for_publications(MARKER, 1)
    assert [p.offset for p in node.received(GAME)] == ([3] if at_once else [])
