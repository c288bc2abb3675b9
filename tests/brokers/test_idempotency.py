"""Idempotent publish (decision D2 of the plan), on every broker.

A second publish with the same idempotency key to the same channel within the window publishes
nothing and returns the first publication (`PublishResult.duplicate`), whichever node (broker
instance) receives it; keys are per channel; the window expires; the memory broker's map of keys
is bounded; the direct publishers (`publish_direct`, `publish_event`) take keys too.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import pytest

from igratech_ws.brokers import BrokerOptions
from igratech_ws.brokers.memory import MemoryBroker
from tests.support.brokers import WAIT_S, BrokerFactory

GAME = "game:g-1"
USER = "user:u-1"
OTHER = "game:g-2"
MARKER = "global"
BALANCE = b'{"balance":"1.00"}'


async def test_the_same_key_twice_is_one_publication(make_broker: BrokerFactory) -> None:
    node = await make_broker()
    broker = node.broker
    await broker.subscribe(USER)
    await broker.subscribe(MARKER)
    await broker.publish(USER, "balance", b'{"balance":"0.50"}')
    first = await broker.publish(USER, "balance", BALANCE, idempotency_key="wallet-7")
    again = await broker.publish(USER, "balance", BALANCE, idempotency_key="wallet-7")
    assert not first.duplicate and again.duplicate
    assert again.publication == first.publication  # offset, epoch, time, origin: the first's
    assert first.publication.offset == 2
    assert (await broker.position(USER)).offset == 2
    page = await broker.history(USER, 0, 10)
    assert [p.offset for p in page.publications] == [1, 2]
    # Delivered once: the marker, published after, arrives after everything of the user channel.
    await broker.publish(MARKER, "stats", b"{}")
    await node.wait_for_publications(MARKER, 1)
    assert [p.offset for p in node.received(USER)] == [1, 2]


async def test_a_key_used_on_two_nodes_is_one_publication(make_broker: BrokerFactory) -> None:
    first_node = await make_broker()
    second_node = await make_broker()  # skips on memory: one node
    first = await first_node.broker.publish(USER, "balance", BALANCE, idempotency_key="k-1")
    results = await asyncio.gather(
        *(
            node.broker.publish(USER, "balance", BALANCE, idempotency_key="k-1")
            for node in (second_node, first_node, second_node)
        )
    )
    assert all(r.duplicate and r.publication == first.publication for r in results)
    assert (await second_node.broker.position(USER)).offset == 1


async def test_concurrent_publishes_with_one_key_make_one_publication(
    make_broker: BrokerFactory,
) -> None:
    nodes = [await make_broker()]
    if make_broker.multi_node:
        nodes.append(await make_broker())
    results = await asyncio.gather(
        *(
            nodes[i % len(nodes)].broker.publish(GAME, "bet", b"{}", idempotency_key="bet-1")
            for i in range(10)
        )
    )
    originals = [r for r in results if not r.duplicate]
    assert len(originals) == 1
    assert {r.publication.offset for r in results} == {originals[0].publication.offset}
    assert (await nodes[0].broker.position(GAME)).offset == 1


async def test_a_key_repeated_within_publish_many_is_a_duplicate_of_its_first_item(
    make_broker: BrokerFactory,
) -> None:
    node = await make_broker()
    broker = node.broker
    await broker.publish(GAME, "bet", b"{}", idempotency_key="earlier")
    results = await broker.publish_many(
        [
            (GAME, "bet", b'{"n":1}', "k-1"),
            (GAME, "bet", b'{"n":2}', None),
            (GAME, "bet", b'{"n":3}', "k-1"),  # the first item's key, same channel
            (OTHER, "bet", b'{"n":4}', "k-1"),  # keys are per channel
            (GAME, "bet", b'{"n":5}', "earlier"),  # a key of an earlier publish
            (GAME, "bet", b'{"n":6}', "k-2"),
        ]
    )
    assert [r.duplicate for r in results] == [False, False, True, False, True, False]
    first, second, repeat, other, earlier, last = results
    assert (repeat.publication.offset, repeat.publication.epoch) == (
        first.publication.offset,
        first.publication.epoch,
    )
    assert earlier.publication.offset == 1
    assert [first.publication.offset, second.publication.offset, last.publication.offset] == [
        2,
        3,
        4,
    ]
    assert other.publication.offset == 1
    page = await broker.history(GAME, 0, 10)
    assert [p.data for p in page.publications] == [b"{}", b'{"n":1}', b'{"n":2}', b'{"n":6}']


async def test_keys_are_per_channel(make_broker: BrokerFactory) -> None:
    node = await make_broker()
    a = await node.broker.publish("user:u-1", "balance", BALANCE, idempotency_key="same")
    b = await node.broker.publish("user:u-2", "balance", BALANCE, idempotency_key="same")
    assert not a.duplicate and not b.duplicate
    assert (a.publication.channel, b.publication.channel) == ("user:u-1", "user:u-2")
    # Without a key nothing is deduplicated.
    c = await node.broker.publish("user:u-1", "balance", BALANCE)
    d = await node.broker.publish("user:u-1", "balance", BALANCE)
    assert (c.duplicate, d.duplicate, d.publication.offset) == (False, False, 3)


async def test_the_window_expires(make_broker: BrokerFactory) -> None:
    node = await make_broker(idempotency_window=1.0)
    first = await node.broker.publish(USER, "balance", BALANCE, idempotency_key="k")
    assert (await node.broker.publish(USER, "balance", BALANCE, idempotency_key="k")).duplicate
    async with asyncio.timeout(WAIT_S):  # the window is a clock: poll, bounded
        while True:
            await asyncio.sleep(0.2)
            later = await node.broker.publish(USER, "balance", BALANCE, idempotency_key="k")
            if not later.duplicate:
                break
    assert later.publication.offset == first.publication.offset + 1


@pytest.mark.parametrize("key", ["", "x" * 129, "has space", "new\nline", "é"])
async def test_a_malformed_key_is_refused(make_broker: BrokerFactory, key: str) -> None:
    node = await make_broker()
    with pytest.raises(ValueError):
        await node.broker.publish(USER, "balance", BALANCE, idempotency_key=key)
    assert (await node.broker.position(USER)).offset == 0


@pytest.mark.slow
async def test_memory_keys_are_bounded_under_a_million_distinct_keys() -> None:
    """When full, the oldest key is forgotten first (a retry of it publishes again), counted."""
    capacity = 10_000
    broker = MemoryBroker(BrokerOptions(node_id="n1", max_idempotency_keys=capacity))
    await broker.start(lambda p: None, lambda m: None)
    try:
        for i in range(1_000_000):
            await broker.publish(GAME, "bet", b"{}", idempotency_key=f"k{i}")
        assert broker.idempotency_key_count == capacity
        assert broker.idempotency_keys_dropped == 1_000_000 - capacity
        assert broker.channel_count == 1  # and history is bounded by its size
        # Full, memory stays flat: (tracemalloc sees only blocks allocated since it started, so
        # compare two windows that each replace every remembered key and every history entry)
        tracemalloc.start()
        try:
            traced = []
            for window in range(2):
                for i in range(capacity):
                    await broker.publish(GAME, "bet", b"{}", idempotency_key=f"w{window}-{i}")
                gc.collect()
                traced.append(tracemalloc.get_traced_memory()[0])
        finally:
            tracemalloc.stop()
        assert traced[1] - traced[0] < 100_000, f"{traced}: memory grows with a full key map"
        newest = await broker.publish(GAME, "bet", b"{}", idempotency_key="w1-9999")
        assert newest.duplicate and newest.publication.offset == 1_020_000
        oldest = await broker.publish(GAME, "bet", b"{}", idempotency_key="k0")
        assert not oldest.duplicate
    finally:
        await broker.close()


async def test_the_direct_publishers_take_the_key(make_broker: BrokerFactory) -> None:
    node = await make_broker()
    if make_broker.family == "memory":
        pytest.skip("the memory broker has no direct publisher: it lives in the node")
    via_node = await node.broker.publish(USER, "balance", BALANCE, idempotency_key="d-1")
    if make_broker.family == "redis":
        from igratech_ws.brokers.redis import publish_direct

        async with make_broker.redis_clients() as clients:
            prefix = make_broker.namespace + ":"
            direct = [
                await publish_direct(clients, prefix, USER, "balance", BALANCE, idempotency_key=k)
                for k in ("d-1", "d-2", "d-2")
            ]
    else:
        import nats

        from igratech_ws.brokers.nats import publish_event

        nc = await nats.connect(make_broker.url().partition("?")[0])
        try:
            direct = [
                await publish_event(
                    nc, USER, "balance", BALANCE, prefix=make_broker.namespace, idempotency_key=k
                )
                for k in ("d-1", "d-2", "d-2")
            ]
        finally:
            await nc.close()
    assert [r.duplicate for r in direct] == [True, False, True]
    assert direct[0].publication.offset == via_node.publication.offset
    assert direct[2].publication.offset == direct[1].publication.offset == 2
    again = await node.broker.publish(USER, "balance", BALANCE, idempotency_key="d-2")
    assert again.duplicate and again.publication.offset == 2
