"""The backend publisher against a real API listener (fast path site, D2 test double node)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.core.messages import BalanceData, IncidentData, StatsData
from igratech_ws.publisher import (
    Item,
    Publisher,
    PublishError,
    PublishUnavailable,
)
from igratech_ws.transport.http_api import build_api_app
from igratech_ws.transport.http_fastpath import PublishFastSite
from tests.support.outbox import DedupNode
from tests.support.publisher import BlackHoleOnce

KEY = "publisher-test-key"
TS = "2026-11-23T19:45:00Z"


def goal(n: int, game: str = "g-1") -> IncidentData:
    return IncidentData(gameId=game, incidentId=f"i-{n}", type="goal", occurredAt=TS)


@pytest.fixture
async def node() -> AsyncIterator[DedupNode]:
    broker = MemoryBroker(node_id="publisher-test")
    await broker.start(lambda _p: None, lambda _c: None)
    yield DedupNode(broker)
    await broker.close()


@pytest.fixture
async def api_url(node: DedupNode) -> AsyncIterator[str]:
    app = build_api_app(node, api_key=KEY, asyncapi_yaml="asyncapi: 3.0.0\n", max_batch_items=10)
    runner = web.AppRunner(app)
    await runner.setup()
    site = PublishFastSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{site.port}"
    await runner.cleanup()


async def history(node: DedupNode, channel: str) -> list[dict[str, object]]:
    page = await node.broker.history(channel, 0, 100)
    return [json.loads(p.data) for p in page.publications]


async def test_publish_typed_payloads_to_each_target(api_url: str, node: DedupNode) -> None:
    async with Publisher(api_url, KEY) as publisher:
        answer = await publisher.publish(goal(1), game_id="g-1")
        assert (answer.channel, answer.offset, answer.event, answer.duplicate) == (
            "game:g-1",
            1,
            "incident",
            False,
        )
        balance = BalanceData(balance="10.00", currency="EUR", updatedAt=TS)
        assert (await publisher.publish(balance, user_id="u-1")).channel == "user:u-1"
        stats = StatsData(scope="global", updatedAt=TS, values={"online": 3})
        assert (await publisher.publish(stats)).channel == "global"
    assert (await history(node, "game:g-1"))[0]["incidentId"] == "i-1"


async def test_a_retry_after_a_timeout_is_one_event(api_url: str, node: DedupNode) -> None:
    port = int(api_url.rsplit(":", 1)[1])
    proxy = BlackHoleOnce(port)
    proxy_port = await proxy.start()
    try:
        async with Publisher(
            f"http://127.0.0.1:{proxy_port}", KEY, timeout=0.5, backoff_min=0.01
        ) as publisher:
            answer = await publisher.publish(goal(1), game_id="g-1")
        # The first attempt was published and its answer lost; the retry used the same key.
        assert proxy.connections >= 2
        assert answer.duplicate is True
        assert answer.offset == 1
        assert [p["incidentId"] for p in await history(node, "game:g-1")] == ["i-1"]
        assert len(set(node.keys)) == 1
    finally:
        await proxy.close()


async def test_the_caller_key_is_kept_and_a_repeat_is_a_duplicate(
    api_url: str, node: DedupNode
) -> None:
    async with Publisher(api_url, KEY) as publisher:
        first = await publisher.publish(goal(1), game_id="g-1", idempotency_key="tx-1")
        again = await publisher.publish(goal(2), game_id="g-1", idempotency_key="tx-1")
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.offset == first.offset
    assert ("game:g-1", "tx-1") in node.keys


async def test_publish_many_in_batches_and_in_order(api_url: str, node: DedupNode) -> None:
    items = [Item(goal(n), game_id="g-1") for n in range(25)]  # three batches of at most 10
    async with Publisher(api_url, KEY, max_batch_items=10) as publisher:
        answers = await publisher.publish_many(items)
    assert [a.offset for a in answers] == list(range(1, 26))
    assert [p["incidentId"] for p in await history(node, "game:g-1")] == [
        f"i-{n}" for n in range(25)
    ]


async def test_a_refused_publish_raises_at_once_and_is_not_retried(
    api_url: str, node: DedupNode
) -> None:
    async with Publisher(api_url, KEY) as publisher:
        with pytest.raises(PublishError) as refused:
            await publisher.publish(goal(1, game="g-1"), game_id="g-2")
    assert (refused.value.status, refused.value.code, refused.value.field) == (
        400,
        "bad_message",
        "data.gameId",
    )
    assert node.calls == 0
    async with Publisher(api_url, "wrong") as publisher:
        with pytest.raises(PublishError) as unauthorized:
            await publisher.publish(goal(1), game_id="g-1")
    assert unauthorized.value.status == 401


async def test_a_broker_outage_is_retried_then_reported(api_url: str, node: DedupNode) -> None:
    node.broker_down = True
    async with Publisher(api_url, KEY, attempts=3, backoff_min=0.01) as publisher:
        with pytest.raises(PublishUnavailable, match="HTTP 503"):
            await publisher.publish(goal(1), game_id="g-1")
    assert node.calls == 3


async def test_an_unreachable_gateway_is_reported_after_the_attempts() -> None:
    async with Publisher("http://127.0.0.1:1", KEY, attempts=2, backoff_min=0.01) as publisher:
        with pytest.raises(PublishUnavailable):
            await publisher.publish(goal(1), game_id="g-1")


def test_only_contract_payloads_are_publishable() -> None:
    from igratech_ws.publisher import _request

    with pytest.raises(TypeError, match="not a publishable payload"):
        _request(Item({"gameId": "g-1"}, game_id="g-1"))  # type: ignore[arg-type]
