"""Follow a game, see it now (issue 12): the current state on follow and on connect, the history a
client asks for, on memory, Redis and NATS, through a real gateway and an independent client.

Written as the front-end developer who was burnt: the stats must be there at once even after a
thousand bets pushed them out of history, the balance at connect, no gap and no duplicate between
the snapshot and the live stream while the backend publishes as fast as it can, and a recovered
channel must not get stale state on top of its replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from igratech_ws.app import App
from igratech_ws.brokers.base import Publication
from tests.support.cluster import BrokerSpace
from tests.support.gateway import NOW, connect, recv, recv_event, send, settings

BROKERS = ["memory", "redis", "nats"]


@pytest.fixture(params=BROKERS)
async def app(
    request: pytest.FixtureRequest, make_gateway: Callable[..., AbstractAsyncContextManager[App]]
) -> AsyncIterator[App]:
    kind = str(request.param)
    if kind == "memory":
        async with make_gateway(history_size=100) as gateway:
            yield gateway
        return
    base = str(request.getfixturevalue("redis_url" if kind == "redis" else "nats_url"))
    space = BrokerSpace(kind, base)
    try:
        async with make_gateway(broker=space.url, history_size=100) as gateway:
            yield gateway
    finally:
        await space.cleanup()


def game_stats(game: str, n: int) -> bytes:
    return json.dumps(
        {"scope": "game", "gameId": game, "updatedAt": NOW, "values": {"n": n}},
        separators=(",", ":"),
    ).encode()


def bet(game: str, n: int) -> bytes:
    item = {
        "betId": f"b-{n}",
        "market": "match_winner",
        "selection": "home",
        "odds": "2.10",
        "stake": "5.00",
        "currency": "EUR",
        "placedAt": NOW,
    }
    return json.dumps({"gameId": game, "bets": [item]}, separators=(",", ":")).encode()


def a_balance(amount: str) -> bytes:
    return json.dumps(
        {"balance": amount, "currency": "EUR", "updatedAt": NOW}, separators=(",", ":")
    ).encode()


async def put(app: App, channel: str, event: str, data: bytes) -> Publication:
    return (await app.node.broker.publish(channel, event, data)).publication


async def until_quiet(ws: ClientConnection, wait: float = 0.3) -> list[dict[str, Any]]:
    frames = []
    with contextlib.suppress(TimeoutError):
        while True:
            frames.append(await recv(ws, wait))
    return frames


async def test_following_shows_the_latest_stats_at_once_even_after_a_thousand_bets(
    app: App,
) -> None:
    game = f"g-{uuid.uuid4().hex[:8]}"
    channel = f"game:{game}"
    await put(app, channel, "stats", game_stats(game, 1))
    latest = await put(app, channel, "stats", game_stats(game, 2))
    bets = list(
        await asyncio.gather(*(put(app, channel, "bet", bet(game, n)) for n in range(1000)))
    )
    assert (await app.node.broker.history(channel, 0, 1)).publications[0].offset > latest.offset
    async with connect(app) as ws:
        await recv_event(ws, "connected")
        answer = await settings(ws, follow=[game], history=5)
        (state,) = [c for c in answer["channels"] if c["channel"] == channel]
        assert state["offset"] == bets[-1].offset
        frames = [await recv(ws) for _ in range(6)]
        assert all(f["snapshot"] is True and f["channel"] == channel for f in frames)
        # In offset order: the stats (from the state slot, history trimmed it), then the bets.
        assert [(f["event"], f["offset"]) for f in frames] == [("stats", latest.offset)] + [
            ("bet", p.offset) for p in bets[-5:]
        ]
        assert frames[0]["data"]["values"] == {"n": 2}
        assert frames[0]["epoch"] == state["epoch"]
        live = await put(app, channel, "stats", game_stats(game, 3))
        pushed = await recv(ws)
        assert (pushed["offset"], pushed["data"]["values"]) == (live.offset, {"n": 3})
        assert "snapshot" not in pushed and live.offset == state["offset"] + 1


async def test_connecting_shows_the_balance_at_once(app: App) -> None:
    user = f"u-{uuid.uuid4().hex[:8]}"
    channel = f"user:{user}"
    for amount in ("10.00", "20.00", "30.00"):
        last = await put(app, channel, "balance", a_balance(amount))
    async with connect(app, user) as ws:
        connected = await recv_event(ws, "connected")
        assert connected["data"]["channels"][0]["offset"] == last.offset
        snapshot = await recv_event(ws, "balance")
        assert snapshot["snapshot"] is True
        assert (snapshot["offset"], snapshot["data"]["balance"]) == (last.offset, "30.00")
        assert await until_quiet(ws) == []  # one snapshot per state event, nothing else


async def test_nothing_to_show_sends_no_snapshot(app: App) -> None:
    game = f"g-{uuid.uuid4().hex[:8]}"
    await put(app, f"game:{game}", "bet", bet(game, 1))  # a stream, but no state
    async with connect(app) as ws:
        await recv_event(ws, "connected")
        await settings(ws, follow=[game])
        assert await until_quiet(ws) == []


async def test_a_recovered_channel_gets_its_replay_and_no_snapshot(app: App) -> None:
    game = f"g-{uuid.uuid4().hex[:8]}"
    channel = f"game:{game}"
    first = [await put(app, channel, "stats", game_stats(game, n)) for n in range(3)]
    async with connect(app) as ws:
        await recv_event(ws, "connected")
        position = {"offset": first[0].offset, "epoch": first[0].epoch}
        answer = await settings(ws, follow=[game], recover={channel: position}, history=10)
        assert answer["channels"][0]["recovered"] is True
        frames = await until_quiet(ws)
        assert [(f["offset"], f.get("snapshot")) for f in frames] == [(2, None), (3, None)]
    async with connect(app) as ws:
        await recv_event(ws, "connected")
        stale = {"offset": 1, "epoch": "an-epoch-long-gone"}
        answer = await settings(ws, follow=[game], recover={channel: stale})
        assert answer["channels"][0]["recovered"] is False
        frames = await until_quiet(ws)
        assert [(f["offset"], f.get("snapshot")) for f in frames] == [(3, True)]


@pytest.mark.parametrize("value", [101, -1, "x", True, 2.5, 1000000])
async def test_history_out_of_bounds_is_refused_naming_the_field(app: App, value: Any) -> None:
    async with connect(app) as ws:
        await recv_event(ws, "connected")
        await send(ws, "settings", {"follow": ["g-1"], "history": value})
        error = await recv_event(ws, "error")
        assert error["data"]["code"] == "invalid_settings"
        assert error["data"]["field"] == "data.history"
        # Nothing changed, and the connection goes on.
        answer = await settings(ws)
        assert answer["games"] == []


async def test_no_gap_or_duplicate_after_the_snapshot_under_concurrent_publishing(
    app: App,
) -> None:
    """Clients follow while stats and bets are published as fast as the broker takes them: each
    gets the latest stats at or below its position, then every later publication exactly once."""
    game = f"g-{uuid.uuid4().hex[:8]}"
    channel = f"game:{game}"
    published: dict[int, Publication] = {}
    stop = asyncio.Event()

    async def publisher() -> None:
        n = 0
        while not stop.is_set():
            batch = []
            for _ in range(4):
                n += 1
                if random.random() < 0.5:
                    batch.append(put(app, channel, "stats", game_stats(game, n)))
                else:
                    batch.append(put(app, channel, "bet", bet(game, n)))
            for p in await asyncio.gather(*batch):
                published[p.offset] = p
            await asyncio.sleep(0.002)

    async def follower(delay: float) -> tuple[int, list[dict[str, Any]]]:
        await asyncio.sleep(delay)
        frames: list[dict[str, Any]] = []
        async with connect(app) as ws:
            await recv_event(ws, "connected")
            answer = await settings(ws, follow=[game])
            start = answer["channels"][0]["offset"]
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    frames.append(await recv(ws, 0.2))
            frames.extend(await until_quiet(ws, 1.0))
            return start, frames

    task = asyncio.ensure_future(publisher())
    await asyncio.sleep(0.05)
    followers = [asyncio.ensure_future(follower(i * 0.1)) for i in range(8)]
    await asyncio.sleep(1.5)
    stop.set()
    await task
    results = [await f for f in followers]
    for start, got in results:
        snapshots = [f for f in got if f.get("snapshot")]
        pushes = [f for f in got if not f.get("snapshot")]
        assert got[: len(snapshots)] == snapshots, "a snapshot after a live push"
        stats_at_start = [
            p.offset for p in published.values() if p.event == "stats" and p.offset <= start
        ]
        if stats_at_start:
            assert [(f["event"], f["offset"]) for f in snapshots] == [
                ("stats", max(stats_at_start))
            ]
        else:
            assert snapshots == []
        offsets = [f["offset"] for f in pushes]
        assert offsets == list(range(start + 1, start + 1 + len(offsets))), "a gap or duplicate"
        assert offsets and offsets[-1] == max(published), "the stream did not reach its end"
