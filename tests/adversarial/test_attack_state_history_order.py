"""Attack on `settings.history` under concurrent publishing (issue 12): followers ask for the last
20 stream events while a game gets stats and bets as fast as the broker takes them. Each must get
snapshot frames at or below its position, in offset order, before any push; the history part
must be exactly the last 20 bets at or below the position (history holds them all); then every
later offset exactly once (no gap, no duplicate across the snapshot and the live stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from igratech_ws.app import App, running_app
from igratech_ws.brokers.base import Publication
from tests.support.gateway import NOW, base_config, connect, recv, recv_event, settings

FOLLOWERS = 6
HISTORY = 20


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with running_app(base_config(history_size=1000)) as gateway:
        yield gateway


def payload(game: str, n: int, event: str) -> bytes:
    if event == "stats":
        data: dict[str, Any] = {
            "scope": "game",
            "gameId": game,
            "updatedAt": NOW,
            "values": {"n": n},
        }
    else:
        data = {
            "gameId": game,
            "bets": [
                {
                    "betId": f"b-{n}",
                    "market": "match_winner",
                    "selection": "home",
                    "odds": "2.10",
                    "stake": "5.00",
                    "currency": "EUR",
                    "placedAt": NOW,
                }
            ],
        }
    return json.dumps(data, separators=(",", ":")).encode()


async def test_history_snapshot_then_live_without_gap_or_duplicate(app: App) -> None:
    game = f"g-{uuid.uuid4().hex[:8]}"
    channel = f"game:{game}"
    published: dict[int, Publication] = {}
    stop = asyncio.Event()
    broker: Any = app.node.broker

    async def publisher() -> None:
        n = 0
        while not stop.is_set():
            for _ in range(4):
                n += 1
                event = "stats" if random.random() < 0.3 else "bet"
                p = broker.publish_now(channel, event, payload(game, n, event))
                published[p.offset] = p
            await asyncio.sleep(0.002)

    async def follower(delay: float) -> tuple[int, list[dict[str, Any]]]:
        await asyncio.sleep(delay)
        frames: list[dict[str, Any]] = []
        async with connect(app) as ws:
            await recv_event(ws, "connected")
            answer = await settings(ws, follow=[game], history=HISTORY)
            start = answer["channels"][0]["offset"]
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    frames.append(await recv(ws, 0.2))
            with contextlib.suppress(TimeoutError):
                while True:
                    frames.append(await recv(ws, 0.5))
            return start, frames

    # Some followers come while the channel is not followed yet (the broker is read), most
    # while it is (the node's record).
    for p in [broker.publish_now(channel, "bet", payload(game, i, "bet")) for i in range(50)]:
        published[p.offset] = p
    task = asyncio.ensure_future(publisher())
    followers = [asyncio.ensure_future(follower(i * 0.15)) for i in range(FOLLOWERS)]
    await asyncio.sleep(1.5)
    stop.set()
    await task
    for start, got in [await f for f in followers]:
        snapshots = [f for f in got if f.get("snapshot")]
        pushes = [f for f in got if not f.get("snapshot")]
        assert got[: len(snapshots)] == snapshots, "a snapshot after a live push"
        offsets = [f["offset"] for f in snapshots]
        assert offsets == sorted(set(offsets)) and all(o <= start for o in offsets), offsets
        bets = [o for o in sorted(published) if o <= start and published[o].event == "bet"]
        assert [f["offset"] for f in snapshots if f["event"] == "bet"] == bets[-HISTORY:]
        stats = [o for o in published if o <= start and published[o].event == "stats"]
        assert [f["offset"] for f in snapshots if f["event"] == "stats"] == (
            [max(stats)] if stats else []
        )
        live = [f["offset"] for f in pushes]
        assert live == list(range(start + 1, start + 1 + len(live))), "a gap or duplicate"
        assert live and live[-1] == max(published)
