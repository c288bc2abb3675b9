"""Redis specifics of `RedisBroker` (the shared contract suite covers the rest).

Every test uses its own key prefix in db 11 and deletes its keys at the end. Outages are simulated
without touching the shared Redis: CLIENT KILL on this test's own connections (found by the client
name the broker sets), and a TCP proxy owned by the test that can cut, freeze and restore the path.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from urllib.parse import urlsplit

import msgspec
import pytest
from redis.asyncio import Redis

from igratech_ws.brokers import BrokerOptions, from_url
from igratech_ws.brokers.base import (
    BrokerError,
    BrokerState,
    HistoryLimits,
    Publication,
    UserLogout,
)
from igratech_ws.brokers.redis import (
    DEFAULT_PREFIX,
    RedisBroker,
    control_channel,
    meta_key,
    publish_direct,
    split_prefix,
    state_key,
    stream_key,
)
from igratech_ws.core.recovery import decide_recovery
from tests.support.brokers import WAIT_S, Node
from tests.support.servers import Proxy

GAME = "game:g-1"
LIMITS = HistoryLimits(size=50, ttl=30.0)
#: Short timeouts and backoff for the failure tests.
FAST = BrokerOptions(
    node_id="fast",
    limits=LIMITS,
    op_timeout=1.0,
    ping_interval=0.2,
    backoff_min=0.05,
    backoff_max=0.3,
)


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    """A fresh key prefix; its keys are deleted after the test."""
    value = f"t{uuid.uuid4().hex[:12]}:"
    yield value
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=value + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node]]:
    """Nodes a test starts go here; they are closed afterwards."""
    started: list[Node] = []
    yield started
    for node in started:
        await node.broker.close()


def with_prefix(url: str, prefix: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


async def start_node(nodes: list[Node], url: str, node_id: str, *, fast: bool = False) -> Node:
    """Start a node; `fast` shortens timeouts and backoff for the failure tests."""
    if fast:
        broker = RedisBroker(url, replace(FAST, node_id=node_id))
    else:
        broker = RedisBroker(url, BrokerOptions(node_id=node_id, limits=LIMITS))
    node = Node(broker)
    nodes.append(node)
    await broker.start(node.on_publication, node.on_control, node.on_state)
    return node


def state_of(node: Node) -> BrokerState:
    return node.broker.state


def saw(states: list[BrokerState], *sequence: BrokerState) -> Callable[[], bool]:
    """True once `states` contains `sequence` in order (not necessarily adjacent)."""

    def check() -> bool:
        it = iter(states)
        return all(any(s is wanted for s in it) for wanted in sequence)

    return check


# --- URL and names ---------------------------------------------------------------------------


def test_prefix_is_taken_from_the_url_and_stripped() -> None:
    assert split_prefix("redis://h:6379/3?prefix=app1:&protocol=2") == (
        "redis://h:6379/3?protocol=2",
        "app1:",
    )
    assert split_prefix("redis://h:6379/3") == ("redis://h:6379/3", DEFAULT_PREFIX)
    broker = from_url("redis://127.0.0.1:6379/11?prefix=x:", BrokerOptions(node_id="a b"))
    assert isinstance(broker, RedisBroker)
    assert broker.prefix == "x:"
    assert broker.client_name == "igws-a_b"  # CLIENT SETNAME refuses spaces


def test_keys_of_one_channel_share_a_cluster_hash_tag() -> None:
    assert meta_key("p:", GAME) == "p:meta:{game:g-1}"
    assert stream_key("p:", GAME) == "p:stream:{game:g-1}"


# --- keys, expiry, data loss -------------------------------------------------------------------


async def test_keys_expire_so_abandoned_channels_go_away(
    redis_url: str, prefix: str, admin: Redis, nodes: list[Node]
) -> None:
    node = await start_node(nodes, with_prefix(redis_url, prefix), "n1")
    await node.broker.publish(GAME, "incident", b"{}")
    meta_ttl = await admin.pttl(meta_key(prefix, GAME))
    stream_ttl = await admin.pttl(stream_key(prefix, GAME))
    assert 30_000 * 10 < meta_ttl <= 86_400_000
    assert 0 < stream_ttl <= 30_000
    assert await admin.hget(meta_key(prefix, GAME), "top") == b"1"


async def test_reads_neither_create_nor_refresh_keys(
    redis_url: str, prefix: str, admin: Redis, nodes: list[Node]
) -> None:
    node = await start_node(nodes, with_prefix(redis_url, prefix), "n1")
    await node.broker.publish(GAME, "stats", b"{}")
    keys = [meta_key(prefix, GAME), stream_key(prefix, GAME), state_key(prefix, GAME)]
    for key in keys:
        await admin.pexpire(key, 20_000)
    for _ in range(3):
        await node.broker.position(GAME)
        await node.broker.history(GAME, 0, 10)
        await node.broker.latest_state(GAME)
    for key in keys:
        assert 0 < await admin.pttl(key) <= 20_000, key
    assert sorted(await admin.keys(prefix + "*")) == sorted(k.encode() for k in keys)


async def test_epoch_changes_after_data_loss_and_old_positions_do_not_recover(
    redis_url: str, prefix: str, admin: Redis, nodes: list[Node]
) -> None:
    node = await start_node(nodes, with_prefix(redis_url, prefix), "n1")
    broker = node.broker
    old = [(await broker.publish(GAME, "incident", b'{"i":%d}' % i)).publication for i in range(3)]
    # Redis restarted without persistence, or the keys were evicted.
    await admin.delete(meta_key(prefix, GAME), stream_key(prefix, GAME))
    fresh = (await broker.publish(GAME, "incident", b'{"i":3}')).publication
    assert fresh.offset == 1
    assert fresh.epoch != old[0].epoch
    page = await broker.history(GAME, 2, 100)
    outcome = decide_recovery(2, old[0].epoch, page.top.epoch, page.top.offset, page.publications)
    assert not outcome.recovered
    assert [p.offset for p in (await broker.history(GAME, 0, 100)).publications] == [1]


async def test_missing_meta_drops_a_stale_stream(
    redis_url: str, prefix: str, admin: Redis, nodes: list[Node]
) -> None:
    node = await start_node(nodes, with_prefix(redis_url, prefix), "n1")
    for i in range(3):
        await node.broker.publish(GAME, "incident", b'{"i":%d}' % i)
    await admin.delete(meta_key(prefix, GAME))  # the meta alone is lost
    page = await node.broker.history(GAME, 0, 100)
    assert page.top.offset == 0
    assert page.publications == []  # never old history under a new epoch


async def test_control_is_json_and_msgpack_of_older_nodes_is_still_read(
    redis_url: str, prefix: str, admin: Redis, nodes: list[Node]
) -> None:
    node = await start_node(nodes, with_prefix(redis_url, prefix), "n1")
    channel = control_channel(prefix)
    old = UserLogout(origin="old-node", user_id="u-1")
    new = UserLogout(origin="backend", user_id="u-2")
    await admin.publish(channel, b"\xc1 not ours")
    await admin.publish(channel, msgspec.msgpack.encode(old))  # a node of the previous version
    await admin.publish(channel, b'{"kind":"logout","origin":"backend","user_id":"u-2"}')
    await node.wait_until(lambda: len(node.controls) == 2, "two control messages")
    assert node.controls == [old, new]
    assert node.broker.malformed_messages == 1  # type: ignore[attr-defined]


async def test_history_written_by_older_versions_is_read_and_garbage_skipped(
    redis_url: str, prefix: str, admin: Redis, nodes: list[Node]
) -> None:
    node = await start_node(nodes, with_prefix(redis_url, prefix), "n1")
    first = (await node.broker.publish(GAME, "incident", b'{"i":1}')).publication
    # Offset 2 as a node of the previous version wrote it (an array of 7), offset 3 garbage.
    legacy = Publication(GAME, 2, first.epoch, "bet", b'{"i":2}', first.published_at, "old")
    now_ms = int(first.published_at * 1000)
    await admin.xadd(
        stream_key(prefix, GAME), {"t": now_ms, "p": msgspec.msgpack.encode(legacy)}, id="2-0"
    )
    await admin.xadd(stream_key(prefix, GAME), {"t": now_ms, "p": b"\x01 not ours"}, id="3-0")
    await admin.hset(meta_key(prefix, GAME), "top", 3)
    page = await node.broker.history(GAME, 0, 10)
    assert page.publications == [first, legacy]  # 3 is a gap: recovery across it fails
    after = (await node.broker.publish(GAME, "incident", b'{"i":4}')).publication
    assert (after.offset, after.epoch) == (4, first.epoch)


# --- publishing from outside a node ------------------------------------------------------------


async def test_publish_direct_reaches_subscribed_nodes(
    redis_url: str, prefix: str, admin: Redis, nodes: list[Node]
) -> None:
    node = await start_node(nodes, with_prefix(redis_url, prefix), "n1")
    await node.broker.subscribe(GAME)
    first = (await node.broker.publish(GAME, "incident", b'{"i":1}')).publication
    direct = (
        await publish_direct(
            admin,
            prefix,
            GAME,
            "bet",
            b'{"amount":5}',
            options=BrokerOptions(limits=LIMITS),
            origin="backend",
        )
    ).publication
    assert (direct.offset, direct.epoch, direct.origin) == (2, first.epoch, "backend")
    received = await node.wait_for_publications(GAME, 2)
    assert received == [first, direct]
    assert (await node.broker.history(GAME, 1, 10)).publications == [direct]


# --- failures ----------------------------------------------------------------------------------


async def test_subscriber_survives_client_kill_of_its_pubsub_connection(
    redis_url: str, prefix: str, admin: Redis, nodes: list[Node]
) -> None:
    url = with_prefix(redis_url, prefix)
    node_id = f"kill-{uuid.uuid4().hex[:8]}"
    subscriber = await start_node(nodes, url, node_id, fast=True)
    publisher = await start_node(nodes, url, f"{node_id}-pub", fast=True)
    await subscriber.broker.subscribe(GAME)
    await publisher.broker.publish(GAME, "incident", b'{"i":1}')
    await subscriber.wait_for_publications(GAME, 1)

    assert isinstance(subscriber.broker, RedisBroker)
    name = subscriber.broker.pubsub_client_name
    ours = [c for c in await admin.client_list() if c.get("name") == name]
    assert ours, f"no Redis client named {name}"
    for client in ours:  # only this test's connection: matched by the name the broker set
        await admin.client_kill_filter(_id=client["id"])

    await subscriber.wait_until(
        saw(subscriber.states, BrokerState.DISCONNECTED, BrokerState.CONNECTED),
        "DISCONNECTED then CONNECTED",
    )
    await publisher.broker.publish(GAME, "incident", b'{"i":2}')
    received = await subscriber.wait_for_publications(GAME, 2)
    assert [p.offset for p in received] == [1, 2]
    await publisher.broker.publish_control(UserLogout(origin=publisher.node_id, user_id="u-1"))
    await subscriber.wait_until(lambda: len(subscriber.controls) == 1, "a control message")


# --- a TCP proxy the test can cut, freeze and restore ------------------------------------------


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[Proxy]:
    value = Proxy(urlsplit(redis_url).port or 6379)
    await value.start()
    yield value
    await value.stop()


async def test_outage_disconnects_raises_then_recovers_with_subscriptions(
    redis_url: str, prefix: str, nodes: list[Node], proxy: Proxy
) -> None:
    via_proxy = with_prefix(proxy.url(redis_url), prefix)
    node = await start_node(nodes, via_proxy, "behind-proxy", fast=True)
    publisher = await start_node(nodes, with_prefix(redis_url, prefix), "direct", fast=True)
    await node.broker.subscribe(GAME)
    await publisher.broker.publish(GAME, "incident", b'{"i":1}')
    await node.wait_for_publications(GAME, 1)

    await proxy.cut()
    await node.wait_until(saw(node.states, BrokerState.DISCONNECTED), "DISCONNECTED")
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(BrokerError):
            await node.broker.publish(GAME, "incident", b"{}")
        with pytest.raises(BrokerError):
            await node.broker.history(GAME, 0, 10)
    await node.broker.subscribe("game:g-2")  # while down: subscribed on reconnect
    await publisher.broker.publish(GAME, "incident", b'{"i":2}')  # missed live; in history

    await proxy.restore()
    await node.wait_until(
        saw(node.states, BrokerState.DISCONNECTED, BrokerState.CONNECTED), "CONNECTED again"
    )
    page = await node.broker.history(GAME, 1, 10)  # what the hub does on CONNECTED
    assert [p.offset for p in page.publications] == [2]
    await publisher.broker.publish(GAME, "incident", b'{"i":3}')
    await publisher.broker.publish("game:g-2", "incident", b'{"i":1}')
    await node.wait_for_publications("game:g-2", 1)
    assert [p.offset for p in node.received(GAME)] == [1, 3]


async def test_silent_connection_is_detected_by_ping(
    redis_url: str, prefix: str, nodes: list[Node], proxy: Proxy
) -> None:
    via_proxy = with_prefix(proxy.url(redis_url), prefix)
    node = await start_node(nodes, via_proxy, "frozen", fast=True)
    publisher = await start_node(nodes, with_prefix(redis_url, prefix), "direct", fast=True)
    await node.broker.subscribe(GAME)

    proxy.freeze()  # no RST, no FIN: only the missing PONG tells
    await node.wait_until(saw(node.states, BrokerState.DISCONNECTED), "DISCONNECTED")
    await proxy.restore()
    await node.wait_until(
        saw(node.states, BrokerState.DISCONNECTED, BrokerState.CONNECTED), "CONNECTED again"
    )
    await publisher.broker.publish(GAME, "incident", b'{"i":1}')
    await node.wait_for_publications(GAME, 1)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 200_000])
async def test_payload_sizes_round_trip_through_the_lua_encoder(
    redis_url: str, prefix: str, nodes: list[Node], size: int
) -> None:
    # The script writes msgpack bin headers by hand (8-, 16- and 32-bit lengths).
    node = await start_node(nodes, with_prefix(redis_url, prefix), "n1")
    await node.broker.subscribe(GAME)
    payload = (b'"' + b"x" * max(0, size - 2) + b'"')[:size]
    published = (await node.broker.publish(GAME, "stats", payload)).publication
    assert published.data == payload
    assert (await node.wait_for_publications(GAME, 1)) == [published]
    assert (await node.broker.history(GAME, 0, 1)).publications == [published]
