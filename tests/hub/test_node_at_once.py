"""The node on a broker that answers at once (the plain memory broker: `Broker.subscribe_now`,
`state_now`): connections are greeted and settings answered synchronously, without a task, and
everything else holds as on a broker that needs I/O (tests/hub/test_node.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.config import Config
from igratech_ws.core.close_codes import CloseCode
from igratech_ws.node import Node
from tests.support.fakes import connect, settle, text

BALANCE = b'{"balance":"1.00","currency":"EUR","updatedAt":"2026-11-23T19:45:00Z"}'
STATS = b'{"scope":"game","gameId":"g-1","values":{"bets":3},"updatedAt":"2026-11-23T19:45:00Z"}'


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    broker = MemoryBroker(node_id="n-now")
    config = Config(max_games_per_connection=50, message_burst=1000, max_flush_delay=0.0)
    node = Node(config, broker)
    await broker.start(node.hub.on_publication, node.on_control, node.on_broker_state)
    yield node
    await node.close()


async def test_a_user_is_greeted_at_once_with_the_user_channel_joined(node: Node) -> None:
    broker = node.broker
    assert isinstance(broker, MemoryBroker)
    first = broker.publish_now("user:u-1", "balance", BALANCE)
    a = connect(node, "u-1")
    # No await: `connected` is queued by `accept` itself, with the channel's position.
    frames = a.frames()
    assert [f["event"] for f in frames] == ["connected", "balance"]
    assert frames[0]["data"]["channels"] == [
        {"channel": "user:u-1", "offset": 1, "epoch": first.epoch}
    ]
    assert frames[1]["snapshot"] is True
    assert not node._tasks
    broker.publish_now("user:u-1", "balance", BALANCE)
    await settle()
    assert a.events() == ["connected", "balance", "balance"]


async def test_settings_are_answered_at_once_in_the_order_asked(node: Node) -> None:
    broker = node.broker
    assert isinstance(broker, MemoryBroker)
    broker.publish_now("game:g-1", "stats", STATS)
    a = connect(node, None)
    text(node, a, "settings", {"games": ["g-1"]})
    text(node, a, "ping", {})
    text(node, a, "settings", {"games": []})
    assert a.events() == ["connected", "settings", "stats", "pong", "settings"]
    assert node.hub.subscriber_count("game:g-1") == 0
    assert broker.subscription_count == 0, "the last follower's leave unsubscribes at once"


async def test_the_newest_login_wins_when_greeted_at_once(node: Node) -> None:
    a = connect(node, "u-1", at=1.0)
    b = connect(node, "u-1", at=2.0)
    assert a.events() == ["connected", "logout"]
    assert a.closes == [CloseCode.LOGGED_IN_ELSEWHERE]
    assert b.events() == ["connected"]
    assert node.user_connection_count("u-1") == 1
    assert node.hub.subscriber_count("user:u-1") == 1


async def test_a_closed_connection_releases_its_user_channel_at_once(node: Node) -> None:
    broker = node.broker
    assert isinstance(broker, MemoryBroker)
    a = connect(node, "u-1")
    assert broker.subscription_count == 1
    a.close_with(CloseCode.NORMAL)
    assert broker.subscription_count == 0
    assert node.hub.channel_count == 0
