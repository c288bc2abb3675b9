"""State slots (decision D3 of the plan), on every broker.

Per channel and state event (`stats`, `balance`), the broker keeps the latest publication with its
real offset and epoch, written with the append, surviving history trimming by size and by age, with
its own ttl, and dropped when the stream starts a new epoch. `latest_state` answers them oldest
offset first and creates nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from igratech_ws.brokers.base import HistoryLimits, Publication
from tests.support.brokers import WAIT_S, BrokerFactory, Node

GAME = "game:g-1"


def stats(i: int) -> bytes:
    return b'{"minute":%d}' % i


async def _poll(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait (bounded) for a condition that depends on the clock, not on an event."""
    try:
        async with asyncio.timeout(WAIT_S):
            while not await check():  # noqa: ASYNC110 - a clock, not an event
                await asyncio.sleep(0.1)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def test_the_latest_of_each_state_event_with_its_real_position(
    make_broker: BrokerFactory,
) -> None:
    broker = (await make_broker()).broker
    await broker.publish(GAME, "stats", stats(1))
    await broker.publish(GAME, "incident", b"{}")
    newest_stats = (await broker.publish(GAME, "stats", stats(2))).publication
    await broker.publish(GAME, "bet", b"{}")
    assert await broker.latest_state(GAME) == [newest_stats]
    assert newest_stats.offset == 3
    balance = (await broker.publish("user:u-1", "balance", b'{"b":1}')).publication
    assert await broker.latest_state("user:u-1") == [balance]
    # Oldest offset first, whatever the event.
    bal_in_game = (await broker.publish(GAME, "balance", b'{"b":2}')).publication
    assert await broker.latest_state(GAME) == [newest_stats, bal_in_game]
    assert await broker.latest_state("game:only-bets") == []


async def test_state_survives_history_trimmed_by_size(make_broker: BrokerFactory) -> None:
    broker = (await make_broker(limits=HistoryLimits(size=5, ttl=30.0))).broker
    state = (await broker.publish(GAME, "stats", stats(1))).publication
    for i in range(20):
        await broker.publish(GAME, "bet", b'{"i":%d}' % i)
    page = await broker.history(GAME, 0, 100)
    assert [p.offset for p in page.publications] == list(range(17, 22))
    assert await broker.latest_state(GAME) == [state]


async def test_state_survives_history_expired_by_age(make_broker: BrokerFactory) -> None:
    broker = (await make_broker(limits=HistoryLimits(size=50, ttl=1.0))).broker
    state = (await broker.publish(GAME, "stats", stats(1))).publication
    await broker.publish(GAME, "bet", b"{}")

    async def history_gone() -> bool:
        return not (await broker.history(GAME, 0, 100)).publications

    await _poll(history_gone, "history to expire")
    assert await broker.latest_state(GAME) == [state]


async def test_state_has_its_own_ttl(make_broker: BrokerFactory) -> None:
    broker = (await make_broker(state_ttl=1.0)).broker
    await broker.publish(GAME, "stats", stats(1))
    assert len(await broker.latest_state(GAME)) == 1

    async def state_gone() -> bool:
        return await broker.latest_state(GAME) == []

    await _poll(state_gone, "state to expire")
    # The stream and its history go on.
    assert (await broker.position(GAME)).offset == 1
    assert len((await broker.history(GAME, 0, 10)).publications) == 1


async def _lose_the_stream(make_broker: BrokerFactory, node: Node) -> None:
    """What a lost stream looks like on each broker (evicted, keys lost, stream deleted)."""
    broker = node.broker
    if make_broker.family == "memory":
        await broker.publish("game:other", "bet", b"{}")  # max_channels=1: evicts GAME
    elif make_broker.family == "redis":
        from igratech_ws.brokers.redis import meta_key

        # The meta alone: the state key is still there, and must not be served.
        async with make_broker.redis_client_for(GAME) as client:
            await client.delete(meta_key(make_broker.namespace + ":", GAME))
    else:
        from igratech_ws.brokers.nats import NatsBroker

        assert isinstance(broker, NatsBroker)
        await broker.delete_stream()


async def test_state_belongs_to_the_epoch(make_broker: BrokerFactory) -> None:
    node = await make_broker(max_channels=1)
    broker = node.broker
    old = (await broker.publish(GAME, "stats", stats(1))).publication
    await broker.publish(GAME, "balance", b'{"b":1}')
    await _lose_the_stream(make_broker, node)
    assert await broker.latest_state(GAME) == []
    fresh: Publication = (await broker.publish(GAME, "stats", stats(2))).publication
    assert fresh.epoch != old.epoch and fresh.offset == 1
    assert await broker.latest_state(GAME) == [fresh]


async def test_direct_publishers_write_state(make_broker: BrokerFactory) -> None:
    node = await make_broker()
    if make_broker.family == "redis":
        from igratech_ws.brokers.redis import publish_direct

        async with make_broker.redis_clients() as clients:
            sent = await publish_direct(
                clients, make_broker.namespace + ":", GAME, "stats", stats(7)
            )
    elif make_broker.family == "nats":
        import nats

        from igratech_ws.brokers.nats import publish_event

        nc = await nats.connect(make_broker.url().partition("?")[0])
        try:
            sent = await publish_event(nc, GAME, "stats", stats(7), prefix=make_broker.namespace)
        finally:
            await nc.close()
    else:
        sent = await node.broker.publish(GAME, "stats", stats(7))
    assert await node.broker.latest_state(GAME) == [sent.publication]
