"""Nothing a reader does creates lasting state (issue 9, item 8).

A connection that follows 100 made-up games and then closes must leave the node's memory where it
was. On main about 430 KB stayed after such a connection closed. Measured here with tracemalloc
around one such connection, after a warm-up: the hub and the node give everything back (every map
keyed by client input is keyed by a followed channel or a live connection); what stayed on main
is the memory broker's: `position()` of a never-published channel created a stream (D1, the
brokers' side).
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.config import Config
from igratech_ws.core.close_codes import CloseCode
from igratech_ws.node import Node
from tests.support.fakes import EmptyEpochBroker, connect, settle, text

GAMES = 100
ROUNDS = 60
#: Bytes ROUNDS closed readers may leave behind together: allocator noise (~3 KB measured); a
#: leak of 270 bytes per connection (a few channel names) would pass it.
LEFT_BEHIND = 16 * 1024


class QuietBroker(EmptyEpochBroker):
    """The D1 test broker without the call log (which would keep every channel name)."""

    async def subscribe(self, channel: str) -> None:
        await MemoryBroker.subscribe(self, channel)

    async def unsubscribe(self, channel: str) -> None:
        await MemoryBroker.unsubscribe(self, channel)


async def _node(broker: MemoryBroker) -> Node:
    config = Config(max_games_per_connection=GAMES, message_burst=1000, max_flush_delay=0.0)
    node = Node(config, broker)
    await broker.start(node.hub.on_publication, node.on_control, node.on_broker_state)
    return node


async def _follow_and_close(node: Node, tag: str, user: str | None) -> None:
    connection = connect(node, user, settings={"games": [f"{tag}-{i}" for i in range(GAMES // 2)]})
    await settle()
    text(node, connection, "settings", {"follow": [f"{tag}-x{i}" for i in range(GAMES // 2)]})
    text(node, connection, "ping", {})
    await settle(50)
    assert node.hub.channel_count == GAMES + (user is not None)
    connection.close_with(CloseCode.IDLE_TIMEOUT)
    await settle(50)


async def _left_behind(node: Node) -> int:
    """Bytes still allocated after ROUNDS readers came and went, once as many warmed up the
    caches (allocator pools, dict capacities, bounded caches of interned names reach a plateau;
    a per-connection leak would not). Traced from before the warm-up, so that what a bounded
    cache evicts counts as given back."""
    tracemalloc.start()
    try:
        for round_ in range(ROUNDS):
            await _follow_and_close(node, f"warm{round_}", f"u-warm-{round_}")
        gc.collect()
        before = tracemalloc.take_snapshot()
        for round_ in range(ROUNDS):
            await _follow_and_close(node, f"made-up{round_}", f"u-reader-{round_}")
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return sum(stat.size_diff for stat in after.compare_to(before, "filename"))


def _node_maps(node: Node) -> dict[str, int]:
    hub = node.hub
    maps = {
        "connections": node._connections,
        "users": node._users,
        "by_address": node._by_address,
        "greeting": node._greeting,
        "hub.live": hub._live,
        "hub.joining": hub._joining,
        "hub.last": hub._last,
        "hub.syncing": hub._syncing,
        "hub.broker_subs": hub._broker_subs,
        "hub.replays": hub._replays,
        "hub.writable_waiters": hub._writable_waiters,
    }
    return {name: len(value) for name, value in maps.items() if value}


@pytest.fixture
async def d1_node() -> AsyncIterator[Node]:
    broker = QuietBroker()
    node = await _node(broker)
    yield node
    await node.close()


async def test_the_hub_and_the_node_give_back_what_a_reader_took(d1_node: Node) -> None:
    """With a broker that creates nothing on reads (D1), a closed reader leaves nothing."""
    left = await _left_behind(d1_node)
    assert _node_maps(d1_node) == {}
    assert left < LEFT_BEHIND, f"{left} bytes left behind by {ROUNDS} closed connections"


async def test_a_reader_leaves_nothing_in_the_memory_broker() -> None:
    """The whole node on the real memory broker: reads create no stream (D1), so nothing at all
    stays (main: ~430 KB after such a connection closed)."""
    broker = MemoryBroker(node_id="n-maps")
    node = await _node(broker)
    try:
        await _follow_and_close(node, "first", "u-first")
        assert broker.channel_count == 0, f"{broker.channel_count} streams made by reading"
        left = await _left_behind(node)
        assert _node_maps(node) == {}
        assert left < LEFT_BEHIND, f"{left} bytes left behind by {ROUNDS} closed connections"
    finally:
        await node.close()
