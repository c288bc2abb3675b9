"""Idempotent publish across gateway processes on Redis and on NATS (issue 13, D2).

The same key published through two nodes is one event for a client on a third; the second
answer is a duplicate with the first one's position. A publisher retrying through a proxy that
swallows the first answer also makes one event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import websockets

from igratech_ws.core.messages import IncidentData
from igratech_ws.publisher import Publisher
from tests.support.cluster import BrokerSpace, node_group
from tests.support.gateway import API_KEY, incident, recv, recv_event, settings
from tests.support.publisher import BlackHoleOnce

pytestmark = [pytest.mark.services]


@pytest.fixture(params=["redis", "nats"])
async def space(request: pytest.FixtureRequest) -> AsyncIterator[BrokerSpace]:
    kind = str(request.param)
    base = str(request.getfixturevalue("redis_url" if kind == "redis" else "nats_url"))
    namespace = BrokerSpace(kind, base)
    try:
        yield namespace
    finally:
        await namespace.cleanup()


async def no_more_frames(ws: websockets.ClientConnection) -> None:
    """Nothing else arrives (a bounded wait: a duplicate would be here by then)."""
    with pytest.raises(TimeoutError):
        frame = await recv(ws, 1.0)
        pytest.fail(f"unexpected frame: {frame}")


async def test_the_same_key_on_two_nodes_is_one_event(space: BrokerSpace, tmp_path: Path) -> None:
    async with (
        node_group(space.url, ["A", "B", "C"], tmp_path) as nodes,
        aiohttp.ClientSession() as http,
        nodes["C"].connect() as fan,
    ):
        await recv_event(fan, "connected")
        await settings(fan, games=["g-1"])
        body = {**incident("g-1", 1), "idempotencyKey": "bet-settled-77"}
        status, first = await nodes["A"].publish(body, http)
        assert status == 200 and first["duplicate"] is False, first
        # A retry through another node, even with a changed payload: the key wins.
        status, second = await nodes["B"].publish(
            {**incident("g-1", 2), "idempotencyKey": "bet-settled-77"}, http
        )
        assert status == 200 and second["duplicate"] is True, second
        assert (second["channel"], second["offset"], second["epoch"]) == (
            first["channel"],
            first["offset"],
            first["epoch"],
        )
        pushed = await recv_event(fan, "incident")
        assert (pushed["offset"], pushed["data"]["incidentId"]) == (first["offset"], "inc-1")
        # The same key on another channel is another publication (keys are per channel).
        status, other = await nodes["B"].publish(
            {**incident("g-2", 3), "idempotencyKey": "bet-settled-77"}, http
        )
        assert status == 200 and other["duplicate"] is False
        # A batch item repeating the key is a duplicate too; its neighbours are published.
        status, batch = await nodes["A"].post(
            "/api/v1/publish/batch",
            {
                "items": [
                    {**incident("g-1", 4), "idempotencyKey": "bet-settled-77"},
                    incident("g-1", 5),
                ]
            },
            http,
        )
        assert status == 200, batch
        assert [r["duplicate"] for r in batch["results"]] == [True, False]
        pushed = await recv_event(fan, "incident")
        assert pushed["data"]["incidentId"] == "inc-5"
        await no_more_frames(fan)


async def test_a_publisher_retry_after_a_lost_answer_is_one_event(
    space: BrokerSpace, tmp_path: Path
) -> None:
    async with (
        node_group(space.url, ["A", "B"], tmp_path) as nodes,
        nodes["B"].connect() as fan,
    ):
        await recv_event(fan, "connected")
        await settings(fan, games=["g-1"])
        port = int(nodes["A"].api_url.rsplit(":", 1)[1])
        proxy = BlackHoleOnce(port)
        proxy_port = await proxy.start()
        try:
            async with Publisher(
                f"http://127.0.0.1:{proxy_port}", API_KEY, timeout=1.0, backoff_min=0.01
            ) as publisher:
                answer = await publisher.publish(
                    IncidentData(
                        gameId="g-1",
                        incidentId="inc-1",
                        type="goal",
                        occurredAt="2026-11-23T19:45:00Z",
                    ),
                    game_id="g-1",
                )
        finally:
            await proxy.close()
        assert proxy.connections >= 2 and answer.duplicate is True
        pushed = await recv_event(fan, "incident")
        assert pushed["offset"] == answer.offset
        await no_more_frames(fan)
