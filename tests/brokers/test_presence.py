"""Presence across nodes: each node reports its counts over the broker; every node sums them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from igratech_ws.config import Config
from igratech_ws.node import Node
from tests.support.brokers import BrokerFactory


class _Follower:
    """Just enough of a connection for the hub to count it as a follower."""

    pending: list[bytes] | None = None
    is_open = True

    def write_wire(self, data: bytes) -> None:
        pass

    def close_with(self, code: Any) -> None:
        pass


async def _wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - the state changes in broker callbacks
            await asyncio.sleep(0.02)


async def _node(make_broker: BrokerFactory) -> Node:
    node = Node(Config(), (await make_broker(start=False)).broker)
    await node.start()
    return node


async def test_a_node_alone_reports_itself(make_broker: BrokerFactory) -> None:
    node = await _node(make_broker)
    try:
        await node.hub.join(_Follower(), "game:g-1", None)
        assert node.cluster_presence() == {
            "nodes": [node.node_id],
            "connections": 0,
            "users": 0,
            "games": {"g-1": 1},
        }
    finally:
        await node.close()


def _sees_games(node: Node, games: dict[str, int]) -> bool:
    return bool(node.cluster_presence()["games"] == games)


async def test_every_node_sees_the_totals_of_all_nodes(make_broker: BrokerFactory) -> None:
    first = await _node(make_broker)
    second = await _node(make_broker)
    nodes = [first, second]
    try:
        await first.hub.join(_Follower(), "game:g-1", None)
        await second.hub.join(_Follower(), "game:g-1", None)
        await second.hub.join(_Follower(), "game:g-2", None)
        for node in nodes:
            await node.broker.publish_control(node.local_presence())
        for node in nodes:
            await _wait_for(partial(_sees_games, node, {"g-1": 2, "g-2": 1}))
            assert sorted(node.cluster_presence()["nodes"]) == sorted(n.node_id for n in nodes)
        # A node that stops reporting drops out after three report intervals.
        assert first.cluster_presence(now=time.monotonic() + 3600)["nodes"] == [first.node_id]
    finally:
        for node in nodes:
            await node.close()
