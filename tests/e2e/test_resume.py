"""Resume after a reconnect: exactly what was missed, in order, before anything new; or a clear no."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from igratech_ws.app import App
from tests.support.gateway import balance, connect, incident, publish, recv, recv_event, settings

MakeGateway = Callable[..., AbstractAsyncContextManager[App]]


async def _publish_incidents(app: App, game: str, numbers: range) -> None:
    for n in numbers:
        status, answer = await publish(app, incident(game, n))
        assert status == 200, answer


async def test_resume_delivers_exactly_the_missed_publications_then_live(gateway: App) -> None:
    async with connect(gateway) as ws:
        await recv_event(ws, "connected")
        await settings(ws, games=["g-1"])
        await _publish_incidents(gateway, "g-1", range(1, 4))
        seen = [await recv_event(ws, "incident") for _ in range(3)]
    last = seen[-1]
    assert [f["offset"] for f in seen] == [1, 2, 3]
    await _publish_incidents(gateway, "g-1", range(4, 9))
    async with connect(gateway) as ws:
        await recv_event(ws, "connected")
        answer = await settings(
            ws,
            games=["g-1"],
            recover={"game:g-1": {"offset": last["offset"], "epoch": last["epoch"]}},
        )
        assert answer["channels"] == [
            {"channel": "game:g-1", "offset": 8, "epoch": last["epoch"], "recovered": True}
        ]
        missed = [await recv_event(ws, "incident") for _ in range(5)]
        await _publish_incidents(gateway, "g-1", range(9, 10))
        live = await recv_event(ws, "incident")
    assert [f["offset"] for f in missed] == [4, 5, 6, 7, 8]
    assert [f["data"]["incidentId"] for f in missed] == [f"inc-{n}" for n in range(4, 9)]
    assert live["offset"] == 9


async def test_the_user_channel_resumes_through_the_handshake_settings(gateway: App) -> None:
    async with connect(gateway, "u-1") as ws:
        await recv_event(ws, "connected")
        await publish(gateway, balance("u-1", "10.00"))
        first = await recv_event(ws, "balance")
    await publish(gateway, balance("u-1", "20.00"))
    await publish(gateway, balance("u-1", "30.00"))
    recover = {"user:u-1": {"offset": first["offset"], "epoch": first["epoch"]}}
    async with connect(gateway, "u-1", settings=json.dumps({"recover": recover})) as ws:
        await recv_event(ws, "connected")
        answer = await recv_event(ws, "settings")
        assert answer["data"]["channels"][0]["recovered"] is True
        missed = [await recv_event(ws, "balance") for _ in range(2)]
    assert [f["data"]["balance"] for f in missed] == ["20.00", "30.00"]
    assert [f["offset"] for f in missed] == [2, 3]


async def test_recovery_with_a_foreign_epoch_fails_and_nothing_is_replayed(gateway: App) -> None:
    await _publish_incidents(gateway, "g-2", range(1, 4))
    async with connect(gateway) as ws:
        await recv_event(ws, "connected")
        answer = await settings(
            ws, games=["g-2"], recover={"game:g-2": {"offset": 1, "epoch": "old"}}
        )
        assert answer["channels"][0]["recovered"] is False
        assert answer["channels"][0]["offset"] == 3
        await _publish_incidents(gateway, "g-2", range(4, 5))
        assert (await recv_event(ws, "incident"))["offset"] == 4


async def test_recovery_beyond_the_history_window_fails(make_gateway: MakeGateway) -> None:
    async with make_gateway(history_size=5) as app:
        await _publish_incidents(app, "g-3", range(1, 3))
        async with connect(app) as ws:
            await recv_event(ws, "connected")
            start = await settings(ws, games=["g-3"])
        epoch = start["channels"][0]["epoch"]
        await _publish_incidents(app, "g-3", range(3, 12))
        async with connect(app) as ws:
            await recv_event(ws, "connected")
            answer = await settings(
                ws, games=["g-3"], recover={"game:g-3": {"offset": 2, "epoch": epoch}}
            )
        assert answer["channels"][0]["recovered"] is False
        # Just inside the window it still works.
        async with connect(app) as ws:
            await recv_event(ws, "connected")
            answer = await settings(
                ws, games=["g-3"], recover={"game:g-3": {"offset": 6, "epoch": epoch}}
            )
            assert answer["channels"][0]["recovered"] is True
            assert [(await recv(ws))["offset"] for _ in range(5)] == [7, 8, 9, 10, 11]


async def test_reconnecting_while_events_flow_loses_and_repeats_nothing(gateway: App) -> None:
    """A publisher never pauses; the client drops and resumes several times mid-stream."""
    total = 120
    received: list[int] = []
    position: dict[str, Any] | None = None

    async def publisher() -> None:
        for n in range(1, total + 1):
            await gateway.node.publish(_validated(incident("g-4", n)))
            if n % 5 == 0:
                await asyncio.sleep(0.002)

    task = asyncio.ensure_future(publisher())
    try:
        for session in range(6):
            recover = {"game:g-4": position} if position else None
            async with connect(gateway) as ws:
                await recv_event(ws, "connected")
                data: dict[str, Any] = {"games": ["g-4"]}
                if recover:
                    data["recover"] = recover
                answer = await settings(ws, **data)
                state = answer["channels"][0]
                if recover:
                    assert state["recovered"] is True, state
                elif position is None:
                    received.extend(range(1, state["offset"] + 1))  # before we ever joined
                position = {"offset": state["offset"], "epoch": state["epoch"]}
                for _ in range(15 if session < 5 else total):
                    if received and received[-1] == total:
                        break
                    frame = await recv_event(ws, "incident")
                    received.append(frame["offset"])
                    position = {"offset": frame["offset"], "epoch": frame["epoch"]}
            if received and received[-1] == total:
                break
    finally:
        await task
    assert received == list(range(1, total + 1))


def _validated(body: dict[str, Any]) -> Any:
    import msgspec

    from igratech_ws.core.publishing import parse_publish_body, validate_publish

    return validate_publish(parse_publish_body(msgspec.json.encode(body)))
