"""Streams nobody published cost nothing (decision D1 of the plan), on every broker.

Reading a channel (`position`, `history`, `latest_state`) creates and refreshes nothing: a reader
of made-up channels leaves no key in Redis, no message or consumer in NATS, no stream in memory,
and cannot push a published stream out of the memory broker's cap. The maps a broker keys by its
caller's input are bounded, each with a test here (idempotency keys: test_idempotency.py).

Memory reads 100,000 made-up channels (the attack that evicted real channels); Redis and NATS read
fewer, since each read there is a round trip and there is no cap to fill: a read either creates
state or it does not.
"""

from __future__ import annotations

import asyncio
from typing import Any

from igratech_ws.brokers.base import EMPTY_EPOCH, HistoryLimits, StreamPosition
from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.config import Config
from igratech_ws.node import Node as GatewayNode
from tests.support.brokers import WAIT_S, BrokerFactory

MADE_UP = {"memory": 100_000, "redis": 2_000, "nats": 2_000}
GAME = "game:g-1"


async def _read_made_up(broker: Any, count: int, chunk: int = 500) -> None:
    for start in range(0, count, chunk):
        names = [f"game:made-up-{i}" for i in range(start, min(count, start + chunk))]
        positions = await asyncio.gather(*(broker.position(n) for n in names))
        assert set(positions) == {StreamPosition(0, EMPTY_EPOCH)}
        pages = await asyncio.gather(*(broker.history(n, 0, 100) for n in names[:50]))
        assert all(p.publications == [] for p in pages)
        states = await asyncio.gather(*(broker.latest_state(n) for n in names[:50]))
        assert all(s == [] for s in states)


async def test_reading_made_up_channels_creates_nothing(make_broker: BrokerFactory) -> None:
    node = await make_broker()
    await _read_made_up(node.broker, MADE_UP[make_broker.family])
    assert await make_broker.stored_items() == 0


async def test_readers_cannot_disturb_a_published_stream(make_broker: BrokerFactory) -> None:
    node = await make_broker(max_channels=100)  # the memory broker's cap; others have none
    broker = node.broker
    published = [
        (await broker.publish(GAME, "incident", b'{"i":%d}' % i)).publication for i in range(3)
    ]
    await broker.publish(GAME, "stats", b'{"s":1}')
    await _read_made_up(broker, MADE_UP[make_broker.family])
    page = await broker.history(GAME, 0, 100)
    assert page.top == StreamPosition(4, published[0].epoch)
    assert page.publications[:3] == published
    assert [p.event for p in await broker.latest_state(GAME)] == ["stats"]
    later = (await broker.publish(GAME, "incident", b'{"i":4}')).publication
    assert (later.offset, later.epoch) == (5, published[0].epoch)


async def test_memory_cap_drops_the_least_recently_published_never_by_reads() -> None:
    broker = MemoryBroker(node_id="n1", max_channels=100, limits=HistoryLimits(10, 30.0))
    await broker.start(lambda p: None, lambda m: None)
    try:
        old = broker.publish_now("game:a", "incident", b"{}")
        broker.publish_now("game:b", "incident", b"{}")
        for _ in range(10):  # reads of "a" must not make it "recent"
            await broker.position("game:a")
            await broker.history("game:a", 0, 10)
            await broker.latest_state("game:a")
        for i in range(99):
            broker.publish_now(f"game:c-{i}", "incident", b"{}")
        assert broker.channel_count == 100
        assert await broker.position("game:a") == StreamPosition(0, EMPTY_EPOCH)
        assert (await broker.position("game:b")).offset == 1
        again = broker.publish_now("game:a", "incident", b"{}")
        assert (again.offset, again.epoch != old.epoch) == (1, True)
        for i in range(1000):  # the bound holds whatever is published
            broker.publish_now(f"game:d-{i}", "incident", b"{}")
        assert broker.channel_count == 100
    finally:
        await broker.close()


async def test_subscriptions_are_released_by_unsubscribe(make_broker: BrokerFactory) -> None:
    node = await make_broker()
    broker: Any = node.broker
    names = [f"game:s-{i}" for i in range(300)]
    for name in names:
        await broker.subscribe(name)
    assert broker.subscription_count == 300
    for name in names:
        await broker.unsubscribe(name)
    assert broker.subscription_count == 0


class _Follower:
    pending: list[bytes] | None = None
    is_open = True

    def write_wire(self, data: bytes) -> None:
        pass

    def close_with(self, code: Any) -> None:
        pass


async def test_a_follower_of_made_up_games_leaves_nothing_in_the_broker(
    make_broker: BrokerFactory,
) -> None:
    """What a connection following 100 made-up games costs the broker after it closes: nothing."""
    gateway = GatewayNode(Config(), (await make_broker(start=False)).broker)
    await gateway.start()
    try:
        follower = _Follower()
        games = [f"game:made-up-{i}" for i in range(100)]
        for game in games:
            result = await gateway.hub.join(follower, game, None)
            gateway.hub.finish_join(follower, result)
        broker: Any = gateway.broker
        assert broker.subscription_count == 100
        for game in games:
            gateway.hub.leave(follower, game)
        async with asyncio.timeout(WAIT_S):
            while broker.subscription_count:  # noqa: ASYNC110 - released by hub tasks
                await asyncio.sleep(0.01)
        assert await make_broker.stored_items() == 0
    finally:
        await gateway.close()
