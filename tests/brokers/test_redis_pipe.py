"""The Redis broker's pipelined publishing (`brokers.redis.pipe.CommandPipe`).

Written as the unlucky user: many publishes in flight when Redis dies, stalls or forgets its
scripts; the pipe must keep call order, fail every call in flight (never hang one), stay bounded,
and come back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import ConnectionPool, Redis

from igratech_ws.brokers import BrokerOptions
from igratech_ws.brokers.base import BrokerError, HistoryLimits
from igratech_ws.brokers.redis import RedisBroker
from igratech_ws.brokers.redis.pipe import CommandPipe, RedisReplyError
from tests.support.brokers import WAIT_S, Node
from tests.support.servers import Proxy, private_server

GAME = "game:g-1"
FAST = BrokerOptions(
    node_id="pipe",
    limits=HistoryLimits(size=500, ttl=30.0),
    op_timeout=0.5,
    ping_interval=0.2,
    backoff_min=0.05,
    backoff_max=0.3,
)


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
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
async def nodes() -> AsyncIterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        await node.broker.close()


async def start(nodes: list[Node], url: str, node_id: str) -> Node:
    node = Node(RedisBroker(url, replace(FAST, node_id=node_id)))
    nodes.append(node)
    await node.broker.start(node.on_publication, node.on_control, node.on_state)
    return node


def with_prefix(url: str, prefix: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


async def test_concurrent_publishes_get_offsets_in_call_order(
    redis_url: str, prefix: str, nodes: list[Node]
) -> None:
    node = await start(nodes, with_prefix(redis_url, prefix), "n1")
    await node.broker.subscribe(GAME)
    data = [f'{{"i":{i}}}'.encode() for i in range(300)]
    results = await asyncio.gather(
        *(node.broker.publish(GAME, "incident", d) for d in data),
        *(node.broker.publish("game:g-2", "incident", d) for d in data[:50]),
    )
    mine = [r.publication for r in results[:300]]
    assert [p.offset for p in mine] == list(range(1, 301))
    assert [p.data for p in mine] == data
    received = await node.wait_for_publications(GAME, 300)
    assert [p.offset for p in received] == list(range(1, 301))


async def test_a_killed_redis_fails_every_call_in_flight_and_the_pipe_comes_back(
    tmp_path: Path, nodes: list[Node]
) -> None:
    with private_server("redis", tmp_path) as server:
        await server.start()
        node = await start(nodes, server.url, "n1")
        await node.broker.publish(GAME, "incident", b'{"i":0}')
        calls = [
            asyncio.ensure_future(node.broker.publish(GAME, "incident", b'{"i":1}'))
            for _ in range(200)
        ]
        await asyncio.sleep(0)  # queued and written
        server.stop()
        async with asyncio.timeout(WAIT_S):
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        # Each one either made it before the kill or failed: none is left hanging.
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert all(isinstance(o, BrokerError) for o in failed)
        assert failed, "SIGKILL with 200 calls in flight failed none of them"

        await server.start()
        async with asyncio.timeout(WAIT_S):
            while True:
                try:
                    result = await node.broker.publish(GAME, "incident", b'{"i":2}')
                    break
                except BrokerError:
                    await asyncio.sleep(0.05)
        # A Redis without persistence starts the stream over.
        assert result.publication.offset == 1


async def test_a_stalled_redis_fails_calls_within_the_deadline_then_recovers(
    redis_url: str, prefix: str, nodes: list[Node]
) -> None:
    proxy = Proxy(6379)
    await proxy.start()
    try:
        node = await start(nodes, with_prefix(proxy.url(redis_url), prefix), "n1")
        await node.broker.publish(GAME, "incident", b'{"i":0}')
        proxy.freeze()  # no FIN, no RST: only the deadline tells
        async with asyncio.timeout(WAIT_S):
            outcomes = await asyncio.gather(
                *(node.broker.publish(GAME, "incident", b"{}") for _ in range(20)),
                return_exceptions=True,
            )
        assert all(isinstance(o, BrokerError) for o in outcomes)
        await proxy.restore()
        async with asyncio.timeout(WAIT_S):
            result = await node.broker.publish(GAME, "incident", b'{"i":1}')
        # The stalled calls may have run after all (Redis got them): offsets go on from there.
        assert result.publication.offset >= 2
    finally:
        await proxy.stop()


async def test_calls_in_flight_are_bounded_and_waiting_callers_keep_their_order(
    redis_url: str, prefix: str
) -> None:
    proxy = Proxy(6379)
    await proxy.start()
    factory = ConnectionPool.from_url(proxy.url(redis_url), protocol=2)
    pipe = CommandPipe(factory, op_timeout=5.0, max_in_flight=4)
    key = prefix + "list"
    try:
        await pipe.call("PING")
        proxy.freeze()
        calls = [asyncio.ensure_future(pipe.call("RPUSH", key, str(i))) for i in range(20)]
        for _ in range(5):
            await asyncio.sleep(0.01)
        assert pipe.in_flight == 4
        await proxy.restore()  # the frozen bytes were dropped: the 4 in flight never answer
        await pipe.abort()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, BrokerError) for o in outcomes[:4])
        async with asyncio.timeout(WAIT_S):
            lengths = [o for o in outcomes[4:] if not isinstance(o, BaseException)]
            while len(lengths) < 16:  # a waiter may have met the reset too: run the rest again
                lengths.append(await pipe.call("RPUSH", key, "x"))
        client = Redis.from_url(redis_url)
        try:
            stored = await client.lrange(key, 0, -1)
            await client.delete(key)
        finally:
            await client.aclose()
        firsts = [int(v) for v in stored if v != b"x"]
        assert firsts == sorted(firsts), "callers that waited for a slot overtook each other"
        assert pipe.in_flight == 0
    finally:
        await pipe.close()
        await factory.aclose()
        await proxy.stop()


async def test_a_script_flush_on_a_live_connection_does_not_fail_publishes(
    redis_url: str, prefix: str, nodes: list[Node]
) -> None:
    node = await start(nodes, with_prefix(redis_url, prefix), "n1")
    await node.broker.publish(GAME, "incident", b'{"i":1}')
    client = Redis.from_url(redis_url)
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    result = await node.broker.publish(GAME, "incident", b'{"i":2}')
    assert result.publication.offset == 2


async def test_an_error_reply_fails_only_its_own_call(redis_url: str, prefix: str) -> None:
    factory = ConnectionPool.from_url(redis_url, protocol=2)
    pipe = CommandPipe(factory, op_timeout=2.0)
    key = prefix + "n"
    try:
        ok, bad, after = await asyncio.gather(
            pipe.call("INCR", key),
            pipe.call("HGET", key, "x"),  # WRONGTYPE
            pipe.call("INCR", key),
            return_exceptions=True,
        )
        assert (ok, after) == (1, 2)
        assert isinstance(bad, RedisReplyError) and "WRONGTYPE" in str(bad)
        await pipe.call("DEL", key)
    finally:
        await pipe.close()
        await factory.aclose()


async def test_closed_pipe_refuses_calls(redis_url: str) -> None:
    factory = ConnectionPool.from_url(redis_url, protocol=2)
    pipe = CommandPipe(factory, op_timeout=2.0)
    await pipe.call("PING")
    await pipe.close()
    await factory.aclose()
    with pytest.raises(BrokerError):
        await pipe.call("PING")


async def test_a_burst_is_one_script_call_with_each_result_its_own(
    tmp_path: Path, nodes: list[Node]
) -> None:
    with private_server("redis", tmp_path) as server:
        await server.start()
        node = await start(nodes, server.url, "n1")
        await node.broker.publish(GAME, "incident", b'{"i":0}')
        admin = Redis(port=server.port)
        try:
            before = (await admin.info("commandstats"))["cmdstat_evalsha"]["calls"]
            results = await asyncio.gather(
                *(
                    node.broker.publish(
                        f"game:g-{i % 3}",
                        "bet",
                        b'{"i":%d}' % i,
                        idempotency_key=f"k-{i % 10}" if i % 2 else None,
                    )
                    for i in range(100)
                )
            )
            after = (await admin.info("commandstats"))["cmdstat_evalsha"]["calls"]
        finally:
            await admin.aclose()
        assert after - before <= 2, "a burst of publishes was not sent as one script call"
        # Each result is its own: per channel consecutive offsets in call order, and a key used
        # twice on one channel (k-1 on game:g-1 at i=1 and i=31, ...) is a duplicate the second time.
        seen: dict[tuple[str, str], int] = {}
        offsets: dict[str, list[int]] = {}
        for i, result in enumerate(results):
            channel = f"game:g-{i % 3}"
            key = f"k-{i % 10}" if i % 2 else None
            if key is not None and (channel, key) in seen:
                assert result.duplicate
                assert result.publication.offset == seen[(channel, key)]
                continue
            assert not result.duplicate and result.publication.channel == channel
            assert result.publication.data == b'{"i":%d}' % i
            offsets.setdefault(channel, []).append(result.publication.offset)
            if key is not None:
                seen[(channel, key)] = result.publication.offset
        first = {"game:g-1": 2}  # game:g-1 was published once before the burst
        for channel, got in offsets.items():
            start_at = first.get(channel, 1)
            assert got == list(range(start_at, start_at + len(got)))
