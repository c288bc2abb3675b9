"""The Python SDK against the real server: typed events, helpers, and resume across a node restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from igratech_ws.app import App
from igratech_ws.client import connect as sdk_connect
from igratech_ws.core.messages import BalanceData, IncidentData, Settings, Status
from tests.support.gateway import balance, incident, publish, token


async def _next(events: AsyncIterator[Any], wanted: str) -> Any:
    """The next event named `wanted`, skipping lifecycle events."""
    async with asyncio.timeout(10):
        async for event in events:
            if event.event == wanted:
                return event
    raise AssertionError(f"iteration ended before {wanted}")


async def test_the_sdk_receives_typed_events_and_follows_games(gateway: App) -> None:
    async with sdk_connect(gateway.ws_url, token("u-1"), games=["g-1"]) as client:
        events = aiter(client)
        connected = await _next(events, "connected")
        assert isinstance(connected.data, Status) and connected.data.userId == "u-1"
        await publish(gateway, incident("g-1", 1))
        await publish(gateway, balance("u-1", "42.00"))
        pushed = await _next(events, "incident")
        assert isinstance(pushed.data, IncidentData)
        assert (pushed.channel, pushed.offset) == ("game:g-1", 1)
        assert isinstance((await _next(events, "balance")).data, BalanceData)
        answer = await client.follow("g-2")
        assert isinstance(answer, Settings) and answer.games == ["g-1", "g-2"]
        await publish(gateway, incident("g-2", 1))
        assert (await _next(events, "incident")).channel == "game:g-2"


async def test_the_sdk_resumes_after_the_server_drops_it(gateway: App) -> None:
    async with sdk_connect(gateway.ws_url, token("u-2"), games=["g-5"]) as client:
        events = aiter(client)
        await _next(events, "connected")
        await publish(gateway, incident("g-5", 1))
        assert (await _next(events, "incident")).offset == 1
        # The node restarts this client (1012 asks it to reconnect); events flow meanwhile.
        for connection in list(gateway.node._connections):
            connection.close_with(1012)  # type: ignore[arg-type]
        for n in range(2, 6):
            await publish(gateway, incident("g-5", n))
        await publish(gateway, balance("u-2", "7.00"))
        # Order holds per channel; the recovered user channel may come before or after the game.
        received: dict[str, list[Any]] = {"game:g-5": [], "user:u-2": []}
        async with asyncio.timeout(10):
            async for event in events:
                if event.channel in received:
                    received[event.channel].append(event)
                if len(received["game:g-5"]) == 4 and received["user:u-2"]:
                    break
        assert [e.offset for e in received["game:g-5"]] == [2, 3, 4, 5]
        assert [e.data.balance for e in received["user:u-2"]] == ["7.00"]
