"""How a node appends to JetStream (`brokers.nats.appender`): one message per publish once the
channel's tail is known, atomic batches on servers that have them, and the ways that can go wrong
(another publisher moved the tail, the stream stopped allowing batches, a keyed duplicate)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest

from igratech_ws.brokers import BrokerOptions
from igratech_ws.brokers.base import HistoryLimits, Publication
from igratech_ws.brokers.nats import NatsBroker, publish_event, stream_name
from igratech_ws.brokers.nats.appender import Appender
from tests.support.brokers import WAIT_S

GAME = "game:g-1"

MakeBroker = Callable[..., Awaitable[NatsBroker]]


@pytest.fixture(params=["nats_url", "newer_nats_url"], ids=["nats", "nats-new"])
def server_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param))


@pytest.fixture
def prefix() -> str:
    return f"ap-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def make_broker(server_url: str, prefix: str) -> AsyncIterator[MakeBroker]:
    brokers: list[NatsBroker] = []

    async def make(
        on_publication: Callable[[Publication], None] | None = None, node_id: str = "n1"
    ) -> NatsBroker:
        broker = NatsBroker(
            f"{server_url}?prefix={prefix}",
            BrokerOptions(node_id=node_id, limits=HistoryLimits(size=1000, ttl=300)),
        )
        await broker.start(on_publication or (lambda p: None), lambda c: None)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        await broker.close()
    nc = await nats.connect(server_url)
    try:
        await nc.jetstream().delete_stream(stream_name(prefix))
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await nc.close()


def appender_of(broker: NatsBroker) -> Appender:
    appender = broker._appender
    assert appender is not None
    return appender


def out_msgs(broker: NatsBroker) -> int:
    nc = broker._nc
    assert nc is not None
    return int(nc.stats["out_msgs"])


async def test_a_publish_to_a_known_channel_is_one_message(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    await broker.publish(GAME, "incident", b'{"i":0}')  # reads the tail once
    before = out_msgs(broker)
    for i in range(1, 11):
        result = await broker.publish(GAME, "incident", b'{"i":%d}' % i)
        assert result.publication.offset == i + 1
    # One message out per publish: no read of the tail first (the acks come in on the inbox).
    assert out_msgs(broker) - before == 10


async def test_a_burst_to_one_channel_goes_in_few_appends_on_a_server_with_batches(
    make_broker: MakeBroker,
) -> None:
    received: list[Publication] = []
    all_in = asyncio.Event()

    def on_publication(publication: Publication) -> None:
        received.append(publication)
        if len(received) == 300:
            all_in.set()

    broker = await make_broker(on_publication)
    await broker.subscribe(GAME)
    appender = appender_of(broker)
    results = await asyncio.gather(
        *(broker.publish(GAME, "incident", b'{"i":%d}' % i) for i in range(300))
    )
    assert [r.publication.offset for r in results] == list(range(1, 301))
    if broker.atomic_batches:
        assert appender.batches >= 1
        assert appender.appends < 300 // 2
    else:
        assert appender.appends == 300
    async with asyncio.timeout(WAIT_S):
        await all_in.wait()
    assert [p.offset for p in received] == list(range(1, 301))


async def test_state_slots_are_written_by_a_batch_too(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    events = ["stats", "incident", "balance", "stats", "bet", "balance", "incident"]
    results = await asyncio.gather(
        *(broker.publish(GAME, e, b'{"i":%d}' % i) for i, e in enumerate(events))
    )
    published = [r.publication for r in results]
    newest = {p.event: p for p in published if p.event in ("stats", "balance")}
    assert await broker.latest_state(GAME) == sorted(newest.values(), key=lambda p: p.offset)
    # And a single state event after the batch.
    alone = (await broker.publish(GAME, "stats", b'{"i":99}')).publication
    assert alone in await broker.latest_state(GAME)


async def test_a_tail_moved_by_another_publisher_is_read_again(
    make_broker: MakeBroker, server_url: str, prefix: str
) -> None:
    broker = await make_broker()
    other = await make_broker(node_id="n2")
    await broker.publish(GAME, "incident", b"{}")
    await other.publish(GAME, "incident", b"{}")  # the first node's tail is now stale
    nc = await nats.connect(server_url)
    try:
        await publish_event(nc, GAME, "incident", b"{}", prefix=prefix)
    finally:
        await nc.close()
    results = await asyncio.gather(*(broker.publish(GAME, "bet", b"{}") for _ in range(20)))
    assert [r.publication.offset for r in results] == list(range(4, 24))
    assert len({r.publication.epoch for r in results}) == 1


async def test_a_stream_that_stops_taking_batches_is_appended_one_by_one(
    make_broker: MakeBroker, server_url: str, prefix: str
) -> None:
    broker = await make_broker()
    if not broker.atomic_batches:
        pytest.skip("this server has no atomic batches")
    await broker.publish(GAME, "incident", b"{}")
    # What a node of an earlier version does at start: its configuration has no allow_atomic.
    nc = await nats.connect(server_url)
    try:
        await nc.jetstream().update_stream(broker.stream_config(atomic=False))
    finally:
        await nc.close()
    results = await asyncio.gather(
        *(broker.publish(GAME, "stats", b'{"i":%d}' % i) for i in range(10))
    )
    assert [r.publication.offset for r in results] == list(range(2, 12))
    assert not appender_of(broker).atomic
    assert await broker.latest_state(GAME) == [results[-1].publication]


async def test_a_keyed_state_event_that_was_made_is_a_duplicate(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    first = await broker.publish("user:u-1", "balance", b'{"b":1}', idempotency_key="k-1")
    again = await broker.publish("user:u-1", "balance", b'{"b":1}', idempotency_key="k-1")
    assert again.duplicate and not first.duplicate
    assert (again.publication.offset, again.publication.epoch) == (
        first.publication.offset,
        first.publication.epoch,
    )
    assert (await broker.position("user:u-1")).offset == 1
