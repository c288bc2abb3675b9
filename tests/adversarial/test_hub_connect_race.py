"""A publication right after `connected` reaches the client, whatever the broker's latency
(issue 10, item 1; D5).

On main `connected` went out before the user channel's broker subscription was active: with a
broker that takes a while to subscribe (Redis, NATS: a network round trip), a `balance`
published the moment the client read `connected` was lost. The broker here takes 200 ms to
subscribe, which makes the race certain on main; tests/e2e/test_connect_hole.py runs the same
race on real Redis and NATS clusters.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
import websockets

from igratech_ws.auth import TokenVerifier
from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.core.publishing import parse_publish_body, validate_publish
from igratech_ws.node import Node
from igratech_ws.transport.websocket import start_listener
from tests.support.gateway import balance, base_config, recv_event, token

SUBSCRIBE_LATENCY_S = 0.2


class SlowSubscriptions(MemoryBroker):
    async def subscribe(self, channel: str) -> None:
        await asyncio.sleep(SUBSCRIBE_LATENCY_S)
        await super().subscribe(channel)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Node, str]]:
    config = base_config()
    node = Node(config, SlowSubscriptions(node_id="slow"))
    await node.start()
    server = await start_listener(node, TokenVerifier.from_config(config), "127.0.0.1", 0)
    try:
        yield node, f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/wspublic"
    finally:
        server.close()
        node.drain()
        await node.close()


async def test_a_balance_published_as_connected_arrives_is_delivered(
    served: tuple[Node, str],
) -> None:
    node, url = served
    for round_ in range(3):
        user = f"u-race-{round_}"
        async with websockets.connect(f"{url}?token={token(user)}", open_timeout=5) as ws:
            connected = await recv_event(ws, "connected", timeout=5)
            body = json.dumps(balance(user, f"{round_}.00")).encode()
            publication = (
                await node.publish(validate_publish(parse_publish_body(body)))
            ).publication
            pushed = await recv_event(ws, "balance", timeout=3)
            assert (pushed["offset"], pushed["epoch"]) == (publication.offset, publication.epoch)
            assert (
                connected["data"]["channels"]
                == [{"channel": f"user:{user}", "offset": 0, "epoch": publication.epoch}]
                or connected["data"]["channels"][0]["offset"] == 0
            )
