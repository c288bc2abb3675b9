"""The lifecycle contract (decision D4 of the plan), the same on every broker.

- `start` against a dead port raises `BrokerError` naming host:port (Redis, Redis Sentinel, NATS;
  the memory broker has no address to be dead);
- a handler that raises is logged (rate limited) and counted in `handler_errors`, and delivery
  goes on (memory, Redis, NATS);
- an outage is reported CONNECTED -> DISCONNECTED -> CONNECTED, calls fail with `BrokerError`
  meanwhile, and subscriptions come back (Redis and NATS, each on a private server process that
  the test kills and restarts, never the shared one).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import pytest

from igratech_ws.brokers import BrokerOptions, from_url
from igratech_ws.brokers.base import (
    BrokerError,
    BrokerState,
    ControlKinds,
    HistoryLimits,
    Publication,
    UserLogout,
)
from tests.support.brokers import WAIT_S, BrokerFactory, Node
from tests.support.servers import free_port, private_server

GAME = "game:g-1"
#: Short timeouts and backoff, so that failures show within the tests' bounds.
FAST = {
    "op_timeout": 1.0,
    "ping_interval": 0.2,
    "backoff_min": 0.05,
    "backoff_max": 0.3,
    "limits": HistoryLimits(size=50, ttl=30.0),
}


def _ignore_publication(_: Publication) -> None:
    return None


def _ignore_control(_: ControlKinds) -> None:
    return None


# --- start against a dead port ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["redis", "redis+sentinel", "nats"])
async def test_start_against_a_dead_port_raises_broker_error_naming_it(scheme: str) -> None:
    port = free_port()
    url = {
        "redis": f"redis://127.0.0.1:{port}/0?prefix=never:",
        "redis+sentinel": f"redis+sentinel://127.0.0.1:{port}/m/0?prefix=never:",
        "nats": f"nats://127.0.0.1:{port}?prefix=never",
    }[scheme]
    broker = from_url(url, BrokerOptions(node_id="n1", **FAST))
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(BrokerError, match=f"127.0.0.1:{port}"):
            await broker.start(_ignore_publication, _ignore_control)
        assert broker.state is BrokerState.CLOSED
        with pytest.raises(BrokerError):
            await broker.publish(GAME, "incident", b"{}")
        with pytest.raises(BrokerError):
            await broker.position(GAME)
        await broker.close()
        await broker.close()  # idempotent
    assert broker.state is BrokerState.CLOSED


# --- handlers that raise ---------------------------------------------------------------------


async def test_a_publication_handler_that_raises_is_logged_counted_and_delivery_goes_on(
    make_broker: BrokerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    node = await make_broker(start=False)
    broker = node.broker

    def buggy(publication: Publication) -> None:
        node.on_publication(publication)
        if publication.offset % 2:
            raise RuntimeError("a bug in the hub")

    with caplog.at_level(logging.WARNING, logger="igratech_ws.brokers"):
        await broker.start(buggy, node.on_control, node.on_state)
        await broker.subscribe(GAME)
        for i in range(30):
            await broker.publish(GAME, "incident", b'{"i":%d}' % i)
        received = await node.wait_for_publications(GAME, 30)
    assert [p.offset for p in received] == list(range(1, 31))
    assert broker.handler_errors == 15
    assert broker.state is BrokerState.CONNECTED
    failures = [r for r in caplog.records if "handler failed" in r.getMessage()]
    assert failures, "a handler error must never be silent"
    assert failures[0].exc_info is not None and "a bug in the hub" in caplog.text
    assert len(failures) <= 5, "rate limited: a bug per publication must not flood the log"


async def test_a_control_handler_that_raises_is_counted_and_control_goes_on(
    make_broker: BrokerFactory,
) -> None:
    sender = await make_broker()
    node = await make_broker(start=False)  # skips on memory: control is between nodes

    def buggy(message: ControlKinds) -> None:
        node.on_control(message)
        raise RuntimeError("a bug in the node")

    await node.broker.start(node.on_publication, buggy, node.on_state)
    for user in ("u-1", "u-2", "u-3"):
        await sender.broker.publish_control(UserLogout(origin=sender.node_id, user_id=user))
    await node.wait_until(lambda: len(node.controls) == 3, "three control messages")
    assert node.broker.handler_errors == 3


async def test_a_state_handler_that_raises_does_not_fail_start(make_broker: BrokerFactory) -> None:
    node = await make_broker(start=False)

    def buggy(state: BrokerState) -> None:
        node.on_state(state)
        raise RuntimeError("a bug in the node")

    await node.broker.start(node.on_publication, node.on_control, buggy)
    assert node.broker.state is BrokerState.CONNECTED
    assert node.states == [BrokerState.CONNECTED]
    assert node.broker.handler_errors == 1


# --- an outage on a private server -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_an_outage_is_reported_disconnected_then_connected(kind: str, tmp_path: Path) -> None:
    with private_server(kind, tmp_path) as server:
        await server.start()
        prefix = f"t{uuid.uuid4().hex[:8]}" + (":" if kind == "redis" else "")
        broker = from_url(
            f"{server.url}?prefix={prefix}",
            BrokerOptions(node_id="n1", **FAST),
        )
        node = Node(broker)
        await broker.start(node.on_publication, node.on_control, node.on_state)
        try:
            await broker.subscribe(GAME)
            await broker.publish(GAME, "incident", b'{"i":1}')
            await node.wait_for_publications(GAME, 1)

            server.stop()
            await node.wait_until(lambda: BrokerState.DISCONNECTED in node.states, "DISCONNECTED")
            async with asyncio.timeout(WAIT_S):
                with pytest.raises(BrokerError):
                    await broker.publish(GAME, "incident", b'{"i":2}')
                with pytest.raises(BrokerError):
                    await broker.history(GAME, 0, 10)

            await server.start()
            await node.wait_until(
                lambda: node.states[-1] is BrokerState.CONNECTED, "CONNECTED again"
            )
            assert node.states == [
                BrokerState.CONNECTED,
                BrokerState.DISCONNECTED,
                BrokerState.CONNECTED,
            ]
            # The subscription came back with the connection.
            after = (await broker.publish(GAME, "incident", b'{"i":3}')).publication
            await node.wait_until(lambda: after in node.received(GAME), "delivery after it")
            assert broker.handler_errors == 0
        finally:
            await broker.close()
