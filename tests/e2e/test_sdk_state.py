"""The Python SDK on a real gateway: the state is there at once on follow and connect, and
`follow(history=N)` yields the game's last stream events as snapshots (issue 12)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from igratech_ws.app import App
from igratech_ws.client import connect as sdk_connect
from tests.support.gateway import NOW, balance, incident, publish, token


async def _next(events: AsyncIterator[Any], wanted: str) -> Any:
    async with asyncio.timeout(10):
        async for event in events:
            if event.event == wanted:
                return event
    raise AssertionError(f"iteration ended before {wanted}")


def stats(game: str, n: int) -> dict[str, Any]:
    data = {"scope": "game", "gameId": game, "updatedAt": NOW, "values": {"n": n}}
    return {"event": "stats", "gameId": game, "data": data}


async def test_follow_with_history_yields_state_and_last_incidents_at_once(gateway: App) -> None:
    for n in range(5):
        assert (await publish(gateway, incident("g-h", n)))[0] == 200
    assert (await publish(gateway, stats("g-h", 7)))[0] == 200
    assert (await publish(gateway, balance("u-h", "12.00")))[0] == 200
    async with sdk_connect(gateway.ws_url, token("u-h")) as client:
        events = aiter(client)
        await _next(events, "connected")
        snapshot = await _next(events, "balance")
        assert snapshot.snapshot and client.state("user:u-h")["balance"].balance == "12.00"
        answer = await client.follow("g-h", history=2)
        assert [c.offset for c in answer.channels if c.channel == "game:g-h"] == [6]
        got = []
        async with asyncio.timeout(10):
            async for event in events:
                if event.channel == "game:g-h":
                    got.append(event)
                if len(got) == 3:
                    break
        assert [(e.event, e.offset, e.snapshot) for e in got] == [
            ("incident", 4, True),
            ("incident", 5, True),
            ("stats", 6, True),
        ]
        assert client.state("game:g-h")["stats"].values == {"n": 7}
        assert client.positions["game:g-h"][0] == 6  # snapshots never move the position


@pytest.mark.parametrize("value", [101, -1, True, "3"])
async def test_follow_refuses_a_bad_history_before_sending(gateway: App, value: Any) -> None:
    async with sdk_connect(gateway.ws_url, None) as client:
        with pytest.raises(ValueError, match="history"):
            await client.follow("g-1", history=value)
        assert client.games == []
