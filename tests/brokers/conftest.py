"""`make_broker`: started brokers of every kind for the contract suite, cleaned up after each test.

Each test gets its own namespace: a unique key prefix in Redis db 11 and a unique stream/subject
prefix in NATS, deleted at the end. Several nodes on one backend are several `make_broker()` calls
within one test; the memory broker is one node per process, so a second call skips the test.
The factory and its helpers are in `tests.support.brokers`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support.brokers import BROKER_KINDS, SHARDS, BrokerFactory
from tests.support.servers import newer_nats_server, private_server


@pytest.fixture(scope="session")
def newer_nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private nats-server of the newer version (see `tests.support.servers.newer_nats_server`), for the
    whole session."""
    with private_server("nats", tmp_path_factory.mktemp("nats-new"), newer_nats_server()) as server:
        server.start_blocking()
        yield server.url


@pytest.fixture(scope="session")
def sharded_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Three private redis-servers on free ports, for the whole session, as one sharded URL."""
    with contextlib.ExitStack() as stack:
        servers = []
        for index in range(SHARDS):
            server = stack.enter_context(
                private_server("redis", tmp_path_factory.mktemp(f"redis-shard-{index}"))
            )
            server.start_blocking()
            servers.append(server)
        hosts = ",".join(f"127.0.0.1:{server.port}" for server in servers)
        yield f"redis://{hosts}/0"


@pytest.fixture(params=BROKER_KINDS)
async def make_broker(request: pytest.FixtureRequest) -> AsyncIterator[BrokerFactory]:
    """Factory of started brokers of one kind (memory, redis, nats), all closed afterwards."""
    factory = BrokerFactory(str(request.param), request)
    try:
        yield factory
    finally:
        await factory.cleanup()
