"""``POST /api/v1/publish/batch`` through a real gateway (real sockets) on every broker.

A batch's items reach the broker together (`Broker.publish_many`), so their deliveries come back
together and each follower of a game receives the batch's events for it in a few WebSocket
writes, not one per event; each channel's offsets still follow the list order, and a key
repeated inside the batch is answered as a duplicate of its first item. The writes are counted
at the server's connection (`write_wire`, the one place every frame leaves through).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import websockets

from igratech_ws.app import App, running_app
from igratech_ws.brokers import BrokerOptions
from igratech_ws.brokers.base import BrokerError, Publication, PublishResult
from igratech_ws.brokers.core import BrokerCore
from igratech_ws.transport.websocket import ClientConnection
from tests.support.brokers import BrokerFactory
from tests.support.gateway import API_KEY, base_config, incident

#: Events for the followed game in the batch.
EVENTS = 100
#: At most this many writes per follower for the whole batch. One on the memory broker (one
#: synchronous step); on Redis and NATS the deliveries come back in a socket read or a few (NATS
#: in chains: several per read). Published one round trip after another, it was one write per
#: event (90 here); the margin over the usual 1-6 is for a loaded machine (CI runs two workers).
MAX_WRITES = 15


@pytest.fixture
async def gateway(make_broker: BrokerFactory) -> AsyncIterator[App]:
    async with running_app(base_config(broker=make_broker.url())) as app:
        yield app


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Counter[ClientConnection]:
    """Writes to each client connection, counted from when the test clears it."""
    counted: Counter[ClientConnection] = Counter()
    write_wire = ClientConnection.write_wire

    def counting(self: ClientConnection, data: bytes) -> None:
        counted[self] += 1
        write_wire(self, data)

    monkeypatch.setattr(ClientConnection, "write_wire", counting)
    return counted


async def _follow(app: App, game: str) -> Any:
    ws = await websockets.connect(app.ws_url, open_timeout=5, close_timeout=2, ping_interval=None)
    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["event"] == "connected"
    await ws.send(json.dumps({"event": "settings", "data": {"games": [game]}}))
    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["event"] == "settings"
    return ws


async def _incidents(ws: Any, count: int) -> list[dict[str, Any]]:
    frames = []
    while len(frames) < count:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert frame["event"] == "incident", frame
        frames.append(frame)
    return frames


async def _post_batch(app: App, items: list[dict[str, Any]]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            app.api_url + "/api/v1/publish/batch",
            json={"items": items},
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as answer,
    ):
        assert answer.status == 200, await answer.text()
        body: dict[str, Any] = await answer.json()
        return body


def _keyed(item: dict[str, Any], key: str) -> dict[str, Any]:
    return {**item, "idempotencyKey": key}


async def test_a_batch_reaches_each_follower_in_a_few_writes(
    gateway: App, make_broker: BrokerFactory, writes: Counter[ClientConnection]
) -> None:
    followers = [await _follow(gateway, "g-1") for _ in range(2)]
    try:
        await _post_batch(gateway, [incident("g-1", 0)])  # the stream exists, the followers live
        for ws in followers:
            await _incidents(ws, 1)
        writes.clear()
        # Another game every tenth item (on another Redis shard, maybe; nobody follows it).
        items = [incident("g-1" if n % 10 else "g-2", n) for n in range(1, EVENTS + 1)]
        await _post_batch(gateway, items)
        expected = [f"inc-{n}" for n in range(1, EVENTS + 1) if n % 10]
        for ws in followers:
            frames = await _incidents(ws, len(expected))
            assert [f["data"]["incidentId"] for f in frames] == expected
            assert [f["offset"] for f in frames] == list(range(2, len(expected) + 2))
        counted = sorted(writes.values())
    finally:
        for ws in followers:
            await ws.close()
    assert len(counted) == 2
    assert counted[-1] <= MAX_WRITES, f"writes per follower: {counted}"


async def test_a_batch_keeps_list_order_per_channel_and_answers_repeated_keys_as_duplicates(
    gateway: App,
) -> None:
    follower = await _follow(gateway, "g-1")
    try:
        await _post_batch(gateway, [_keyed(incident("g-1", 0), "before")])
        await _incidents(follower, 1)
        items = []
        for n in range(1, EVENTS + 1):
            items.append(_keyed(incident("g-1", n), f"k-{n}"))
            if n % 10 == 0:
                items.append(incident("g-2", n))
        # Repeats of an earlier item's key, and of an earlier request's: duplicates, not events.
        items.insert(50, _keyed(incident("g-1", 999), "k-7"))
        items.append(_keyed(incident("g-1", 998), "before"))
        answer = await _post_batch(gateway, items)

        results = answer["results"]
        assert len(results) == len(items)
        assert [r["event"] for r in results] == ["incident"] * len(items)
        fresh = [r for r in results if r["channel"] == "game:g-1" and not r["duplicate"]]
        assert [r["offset"] for r in fresh] == list(range(2, EVENTS + 2))
        other = [r for r in results if r["channel"] == "game:g-2"]
        assert [(r["offset"], r["duplicate"]) for r in other] == [
            (n, False) for n in range(1, EVENTS // 10 + 1)
        ]
        repeat, earlier = results[50], results[-1]
        assert repeat["duplicate"] and earlier["duplicate"]
        assert (repeat["offset"], repeat["epoch"]) == (fresh[6]["offset"], fresh[6]["epoch"])
        assert earlier["offset"] == 1

        frames = await _incidents(follower, EVENTS)
        assert [f["data"]["incidentId"] for f in frames] == [
            f"inc-{n}" for n in range(1, EVENTS + 1)
        ]
        assert [f["offset"] for f in frames] == list(range(2, EVENTS + 2))
        # Nothing more (no duplicate went out): a marker published after it is the next frame.
        await _post_batch(gateway, [incident("g-1", 5000)])
        assert [f["data"]["incidentId"] for f in await _incidents(follower, 1)] == ["inc-5000"]
    finally:
        await follower.close()


class _HalfBroken(BrokerCore):
    """`publish` fails on one channel (after the others' first step) and succeeds elsewhere."""

    def __init__(self) -> None:
        super().__init__(BrokerOptions(node_id="half-broken"))
        self.published: list[tuple[str, bytes]] = []
        self.offsets: Counter[str] = Counter()

    async def publish(
        self, channel: str, event: str, data: bytes, *, idempotency_key: str | None = None
    ) -> PublishResult:
        await asyncio.sleep(0.01 if channel == "game:late" else 0)
        if channel == "game:down":
            raise BrokerError("shard down")
        self.offsets[channel] += 1
        self.published.append((channel, data))
        return PublishResult(
            Publication(channel, self.offsets[channel], "e", event, data, 0.0, self.node_id)
        )


async def test_a_failed_item_fails_the_batch_once_every_item_has_settled() -> None:
    broker = _HalfBroken()
    items = [
        ("game:up", "incident", b"1", None),
        ("game:down", "incident", b"2", None),
        ("game:late", "incident", b"3", None),  # after the failed one, and slower
        ("game:up", "incident", b"4", None),
    ]
    with pytest.raises(BrokerError, match="shard down"):
        await broker.publish_many(items)
    # The answer waited for every item: those after the failed one were published too.
    assert sorted(broker.published) == [
        ("game:late", b"3"),
        ("game:up", b"1"),
        ("game:up", b"4"),
    ]
