"""Every message of the contract, end to end: a real server, the `websockets` client library."""

from __future__ import annotations

import json

from websockets.asyncio.client import ClientConnection

from igratech_ws.app import App
from tests.support.gateway import (
    NOW,
    balance,
    connect,
    incident,
    publish,
    recv,
    recv_event,
    send,
    settings,
)


async def test_connected_greets_an_authenticated_client(gateway: App) -> None:
    async with connect(gateway, "u-1") as ws:
        frame = await recv_event(ws, "connected")
    data = frame["data"]
    assert data["status"] == "connected"
    assert data["userId"] == "u-1"
    assert data["pingInterval"] == 25 and data["idleTimeout"] == 60
    assert data["protocolVersion"] == "1.0"
    assert data["node"] == gateway.node.node_id
    assert len(data["sessionId"]) >= 16


async def test_connected_greets_an_anonymous_client_without_user(gateway: App) -> None:
    async with connect(gateway) as ws:
        frame = await recv_event(ws, "connected")
    assert frame["data"]["userId"] is None  # explicitly null, as the protocol says


async def test_ping_is_answered_with_pong_echoing_the_timestamp(gateway: App) -> None:
    async with connect(gateway) as ws:
        await recv_event(ws, "connected")
        await send(ws, "ping", {"ts": 1732390000123})
        pong = await recv_event(ws, "pong")
        await send(ws, "ping")
        bare = await recv_event(ws, "pong")
    assert pong["data"]["ts"] == 1732390000123
    assert pong["data"]["serverTime"].endswith("Z")
    assert "ts" not in bare["data"]


async def test_settings_follow_unfollow_stats_and_query(gateway: App) -> None:
    async with connect(gateway, "u-1") as ws:
        await recv_event(ws, "connected")
        first = await settings(ws, games=["g-1", "g-2"], stats=True)
        assert first["games"] == ["g-1", "g-2"] and first["stats"] is True
        assert [c["channel"] for c in first["channels"]] == [
            "user:u-1",
            "game:g-1",
            "game:g-2",
            "global",
        ]
        changed = await settings(ws, follow=["g-3"], unfollow=["g-1"], stats=False)
        assert changed["games"] == ["g-2", "g-3"] and changed["stats"] is False
        queried = await settings(ws)
    assert queried["games"] == ["g-2", "g-3"]
    assert [c["channel"] for c in queried["channels"]] == ["user:u-1", "game:g-2", "game:g-3"]


async def _follow(ws: ClientConnection, games: list[str], stats: bool = False) -> None:
    await recv_event(ws, "connected")
    await settings(ws, games=games, stats=stats)


async def test_every_pushed_event_reaches_its_followers_and_matches_the_contract(
    gateway: App,
) -> None:
    bet = {
        "event": "bet",
        "gameId": "g-7",
        "data": {
            "gameId": "g-7",
            "bets": [
                {
                    "betId": "b-1",
                    "market": "match_winner",
                    "selection": "home",
                    "odds": "2.10",
                    "stake": "25.00",
                    "currency": "EUR",
                    "placedAt": NOW,
                    "player": "j***n",
                }
            ],
        },
    }
    game_stats = {
        "event": "stats",
        "gameId": "g-7",
        "data": {
            "scope": "game",
            "gameId": "g-7",
            "updatedAt": NOW,
            "values": {"possession_home": 55},
        },
    }
    global_stats = {
        "event": "stats",
        "data": {"scope": "global", "updatedAt": NOW, "values": {"online_players": 1200}},
    }
    result = {
        "event": "bets-result",
        "userId": "u-1",
        "data": {
            "results": [
                {
                    "betId": "b-1",
                    "gameId": "g-7",
                    "status": "won",
                    "stake": "25.00",
                    "payout": "52.50",
                    "currency": "EUR",
                    "settledAt": NOW,
                    "odds": "2.10",
                }
            ]
        },
    }
    async with connect(gateway, "u-1") as ws:
        await _follow(ws, ["g-7"], stats=True)
        sent = [incident("g-7", 1), bet, game_stats, global_stats, result, balance("u-1", "152.50")]
        for body in sent:
            status, answer = await publish(gateway, body)
            assert status == 200, answer
        received = [await recv(ws) for _ in sent]
    assert [f["event"] for f in received] == [b["event"] for b in sent]
    for frame, body in zip(received, sent, strict=True):
        assert frame["data"] == body["data"]
    assert [f["offset"] for f in received] == [1, 2, 3, 1, 1, 2]
    assert [f["channel"] for f in received] == [
        "game:g-7",
        "game:g-7",
        "game:g-7",
        "global",
        "user:u-1",
        "user:u-1",
    ]


async def test_user_channel_is_private_to_that_user(gateway: App) -> None:
    async with (
        connect(gateway, "u-1") as mine,
        connect(gateway, "u-2") as other,
        connect(gateway) as anonymous,
    ):
        for ws in (mine, other, anonymous):
            await recv_event(ws, "connected")
            await settings(ws, games=["g-1"])
        await publish(gateway, balance("u-1", "10.00"))
        await publish(gateway, incident("g-1", 1))
        assert (await recv(mine))["event"] == "balance"
        assert (await recv(mine))["event"] == "incident"
        # The others see the public incident next: no balance was queued before it.
        assert (await recv(other))["event"] == "incident"
        assert (await recv(anonymous))["event"] == "incident"


async def test_bad_input_gets_an_error_and_the_connection_keeps_working(gateway: App) -> None:
    cases = [
        ("not json", "bad_json", None),
        (json.dumps({"data": {}}), "bad_message", None),
        (json.dumps({"event": "subscribe", "data": {}}), "unknown_event", None),
        (
            json.dumps({"event": "settings", "data": {"games": [1]}}),
            "invalid_settings",
            "data.games[0]",
        ),
        (
            json.dumps({"event": "settings", "data": {"stats": "yes"}}),
            "invalid_settings",
            "data.stats",
        ),
        (
            json.dumps(
                {
                    "event": "settings",
                    "data": {"recover": {"user:u-2": {"offset": 1, "epoch": "x"}}},
                }
            ),
            "forbidden_channel",
            "data.recover.user:u-2",
        ),
        (
            json.dumps({"event": "settings", "data": {"games": [f"g{i}" for i in range(101)]}}),
            "too_many_games",
            "data.games",
        ),
        (
            json.dumps(
                {
                    "event": "settings",
                    "data": {"recover": {"game:g-9": {"offset": 1, "epoch": "e"}}},
                }
            ),
            "invalid_settings",
            "data.recover.game:g-9",
        ),
    ]
    async with connect(gateway, "u-1") as ws:
        await recv_event(ws, "connected")
        for frame, code, field in cases:
            await ws.send(frame)
            error = await recv_event(ws, "error")
            assert error["data"]["code"] == code, (frame, error)
            assert error["data"].get("field") == field, (frame, error)
            assert error["data"]["message"]
        await ws.send(b"\x00binary")
        assert (await recv_event(ws, "error"))["data"]["code"] == "bad_message"
        # Still usable, and the invalid settings changed nothing.
        await send(ws, "ping", {"ts": "still-here"})
        assert (await recv_event(ws, "pong"))["data"]["ts"] == "still-here"
        assert (await settings(ws))["games"] == []


async def test_publish_validation_errors_name_the_field_and_publish_nothing(gateway: App) -> None:
    async with connect(gateway) as ws:
        await _follow(ws, ["g-1"])
        bad = incident("g-1", 1)
        bad["data"]["occurredAt"] = "yesterday"
        status, answer = await publish(gateway, bad)
        assert status == 400
        assert answer["error"]["field"] == "data.occurredAt"
        status, answer = await publish(gateway, {**incident("g-1", 2), "gameId": "g-2"})
        assert status == 400 and answer["error"]["field"] == "data.gameId"
        status, answer = await publish(gateway, {"event": "balance", "data": {}})
        assert status == 400
        status, _ = await publish(gateway, incident("g-1", 3))
        assert status == 200
        first = await recv_event(ws, "incident")
    assert first["offset"] == 1 and first["data"]["incidentId"] == "inc-3"
