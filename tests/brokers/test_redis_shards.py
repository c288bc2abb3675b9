"""Sharded Redis: channels spread by jump hashing, control on the first shard, and an outage of
one shard that touches only its channels. (The whole contract suite also runs on three shards:
the ``redis-sharded`` broker kind of `conftest`.)"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from igratech_ws.brokers import BrokerOptions, from_url
from igratech_ws.brokers.base import BrokerError, BrokerState, HistoryLimits, UserLogout
from igratech_ws.brokers.redis import RedisBroker, control_channel, meta_key, publish_direct
from igratech_ws.brokers.redis.shards import (
    fnv1a_64,
    jump_hash,
    shard_index,
    split_shards,
)
from tests.support.brokers import WAIT_S, Node
from tests.support.servers import PrivateServer, Proxy, private_server

FAST = BrokerOptions(
    node_id="s",
    limits=HistoryLimits(size=100, ttl=30.0),
    op_timeout=0.5,
    ping_interval=0.2,
    backoff_min=0.05,
    backoff_max=0.3,
)

# --- the hash and the URL (no server) ------------------------------------------------------------


def test_fnv1a_64_matches_the_reference_vectors() -> None:
    assert fnv1a_64(b"") == 0xCBF29CE484222325
    assert fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64(b"foobar") == 0x85944171F73967E8


def test_jump_hash_matches_the_reference_implementation() -> None:
    # The value the paper's C++ implementation (and its ports) give.
    assert jump_hash(256, 1024) == 520
    assert [jump_hash(key, 1) for key in (0, 1, 2**64 - 1)] == [0, 0, 0]
    with pytest.raises(ValueError):
        jump_hash(1, 0)


def test_channels_spread_evenly_over_the_shards() -> None:
    counts = collections.Counter(shard_index(f"game:g-{i}", 3) for i in range(30_000))
    assert set(counts) == {0, 1, 2}
    assert all(9_000 < n < 11_000 for n in counts.values()), counts


@given(st.text(min_size=1, max_size=40), st.integers(min_value=1, max_value=64))
def test_a_shard_added_at_the_end_moves_channels_only_to_it(channel: str, shards: int) -> None:
    before = shard_index(channel, shards)
    after = shard_index(channel, shards + 1)
    assert 0 <= before < shards
    assert after in (before, shards)


def test_shard_urls_are_split_from_the_host_list() -> None:
    assert split_shards("redis://h:1/0") == ["redis://h:1/0"]
    assert split_shards("redis://u:p@a:1,b:2,c:3/4?ssl_cert_reqs=none") == [
        "redis://u:p@a:1/4?ssl_cert_reqs=none",
        "redis://u:p@b:2/4?ssl_cert_reqs=none",
        "redis://u:p@c:3/4?ssl_cert_reqs=none",
    ]
    assert split_shards("redis+sentinel://s1:26379,s2:26379/ma,mb/2") == [
        "redis+sentinel://s1:26379,s2:26379/ma/2",
        "redis+sentinel://s1:26379,s2:26379/mb/2",
    ]
    assert split_shards("redis+sentinel://s1,s2/ma") == ["redis+sentinel://s1,s2/ma"]
    assert split_shards("unix:///run/a,b.sock?db=1") == ["unix:///run/a,b.sock?db=1"]
    for bad in ("redis://a:1,,b:2/0", "redis+sentinel://s/ma,/0"):
        with pytest.raises(ValueError):
            split_shards(bad)


def test_a_broker_has_one_server_per_shard_and_the_control_on_the_first() -> None:
    broker = RedisBroker("redis://127.0.0.1:1,127.0.0.1:2/0?prefix=x:", FAST)
    assert [s.address for s in broker.servers] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert broker.address == "127.0.0.1:1,127.0.0.1:2"
    assert broker.servers[0].listener._control_name == control_channel("x:").encode()
    assert broker.servers[1].listener._control_name is None
    with pytest.raises(AttributeError):
        _ = broker.store


# --- three private servers ------------------------------------------------------------------------


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[PrivateServer]]:
    with contextlib.ExitStack() as stack:
        started = [
            stack.enter_context(private_server("redis", tmp_path / f"s{i}")) for i in range(3)
        ]
        for index, server in enumerate(started):
            (tmp_path / f"s{index}").mkdir()
            server.start_blocking()
        yield started


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        await node.broker.close()


def url_of(hosts: list[str], prefix: str) -> str:
    return f"redis://{','.join(hosts)}/0?prefix={prefix}"


async def start(nodes: list[Node], url: str, node_id: str) -> Node:
    node = Node(from_url(url, replace(FAST, node_id=node_id)))
    nodes.append(node)
    await node.broker.start(node.on_publication, node.on_control, node.on_state)
    return node


def channel_on(shard: int, shards: int = 3) -> str:
    """A channel name that the hash puts on `shard`."""
    return next(f"game:g-{i}" for i in range(1000) if shard_index(f"game:g-{i}", shards) == shard)


async def test_each_channel_lives_on_its_shard_only(
    servers: list[PrivateServer], nodes: list[Node]
) -> None:
    prefix = "k:"
    node = await start(nodes, url_of([f"127.0.0.1:{s.port}" for s in servers], prefix), "n1")
    channels = [f"game:g-{i}" for i in range(30)]
    for channel in channels:
        await node.broker.publish(channel, "incident", b"{}")
    for index, server in enumerate(servers):
        client = Redis(port=server.port)
        try:
            metas = {key async for key in client.scan_iter(match=f"{prefix}meta:*")}
        finally:
            await client.aclose()
        expected = {meta_key(prefix, c).encode() for c in channels if shard_index(c, 3) == index}
        assert metas == expected
        assert metas, f"no channel of 30 landed on shard {index}"


async def test_control_messages_travel_on_the_first_shard(
    servers: list[PrivateServer], nodes: list[Node]
) -> None:
    url = url_of([f"127.0.0.1:{s.port}" for s in servers], "c:")
    a = await start(nodes, url, "a")
    b = await start(nodes, url, "b")
    await a.broker.publish_control(UserLogout(origin="a", user_id="u-1"))
    await b.wait_until(lambda: len(b.controls) == 1, "the logout on b")
    counts = []
    for server in servers:
        client = Redis(port=server.port)
        try:
            counts.append(
                dict(await client.pubsub_numsub(control_channel("c:")))[
                    control_channel("c:").encode()
                ]
            )
        finally:
            await client.aclose()
    assert counts == [2, 0, 0]


async def test_a_shard_outage_touches_only_its_channels_and_its_followers_catch_up(
    servers: list[PrivateServer], nodes: list[Node]
) -> None:
    # Node a reaches shard 2 through a proxy that the test cuts; node b reaches it directly and
    # keeps publishing there meanwhile.
    proxy = Proxy(servers[2].port)
    await proxy.start()
    try:
        direct = [f"127.0.0.1:{s.port}" for s in servers]
        prefix = f"o{uuid.uuid4().hex[:6]}:"
        a = await start(nodes, url_of([*direct[:2], f"127.0.0.1:{proxy.port}"], prefix), "a")
        b = await start(nodes, url_of(direct, prefix), "b")
        lost, kept = channel_on(2), channel_on(0)
        await a.broker.subscribe(lost)
        await a.broker.subscribe(kept)
        await b.broker.publish(lost, "incident", b'{"i":1}')
        await a.wait_for_publications(lost, 1)
        assert isinstance(a.broker, RedisBroker)

        await proxy.cut()
        async with asyncio.timeout(WAIT_S):  # shard states are not the node's: poll them
            while a.broker.shard_states[2] is not BrokerState.DISCONNECTED:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(BrokerError):
                await a.broker.publish(lost, "incident", b"{}")
            with pytest.raises(BrokerError):
                await a.broker.position(lost)
        # The other shards carry on, and the node as a whole stays CONNECTED (it stays ready).
        await a.broker.publish(kept, "incident", b'{"k":1}')
        await a.wait_for_publications(kept, 1)
        assert a.states == [BrokerState.CONNECTED]
        for i in (2, 3):
            await b.broker.publish(lost, "incident", b'{"i":%d}' % i)

        await proxy.restore()
        # Back: the newest publication of the followed channel is delivered again, so that the
        # hub sees the gap (offset 2 missing) and fills it from history.
        received = await a.wait_for_publications(lost, 2)
        assert [p.offset for p in received] == [1, 3]
        assert a.states == [BrokerState.CONNECTED]
        await b.broker.publish(lost, "incident", b'{"i":4}')
        received = await a.wait_for_publications(lost, 3)
        assert [p.offset for p in received] == [1, 3, 4]
    finally:
        await proxy.stop()


async def test_start_needs_the_control_shard_and_tolerates_another_one_down(
    servers: list[PrivateServer], nodes: list[Node], tmp_path: Path
) -> None:
    ports = [s.port for s in servers]
    down = PrivateServer("redis", tmp_path / "late")
    (tmp_path / "late").mkdir()
    with pytest.raises(BrokerError, match=f"127.0.0.1:{down.port}"):
        await start(nodes, url_of([f"127.0.0.1:{down.port}", f"127.0.0.1:{ports[0]}"], "d:"), "x")

    node = await start(
        nodes, url_of([f"127.0.0.1:{ports[0]}", f"127.0.0.1:{down.port}"], "d:"), "y"
    )
    late = next(f"game:g-{i}" for i in range(1000) if shard_index(f"game:g-{i}", 2) == 1)
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(BrokerError):
            await node.broker.publish(late, "incident", b"{}")
    try:
        await down.start()
        async with asyncio.timeout(WAIT_S):
            while True:
                try:
                    result = await node.broker.publish(late, "incident", b"{}")
                    break
                except BrokerError:
                    await asyncio.sleep(0.05)
        assert result.publication.offset == 1
    finally:
        down.stop()


async def test_a_backend_publishes_to_the_right_shard(
    servers: list[PrivateServer], nodes: list[Node]
) -> None:
    prefix = "p:"
    node = await start(nodes, url_of([f"127.0.0.1:{s.port}" for s in servers], prefix), "n1")
    channel = channel_on(1)
    await node.broker.subscribe(channel)
    clients = [Redis(port=s.port) for s in servers]
    try:
        sent = await publish_direct(clients, prefix, channel, "incident", b'{"d":1}')
    finally:
        for client in clients:
            await client.aclose()
    received = await node.wait_for_publications(channel, 1)
    assert received == [sent.publication]
    assert (await node.broker.position(channel)).offset == 1
