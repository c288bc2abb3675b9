"""Inbound limits at the socket: message rate, connections per node and per address, origins."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from igratech_ws.app import App
from tests.support.gateway import connect, recv, recv_event, send

MakeGateway = Callable[..., AbstractAsyncContextManager[App]]


async def test_a_flooding_client_gets_rate_limited_then_closed_with_1008(
    make_gateway: MakeGateway,
) -> None:
    async with make_gateway(max_message_rate=5, message_burst=5) as app, connect(app) as ws:
        await recv_event(ws, "connected")
        for n in range(40):
            await send(ws, "ping", {"ts": n})
        codes = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                frame = await recv(ws)
                codes.append(frame["event"] if frame["event"] == "pong" else frame["data"]["code"])
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        assert codes[:5] == ["pong"] * 5
        assert "rate_limited" in codes
        assert app.node.rate_limited > 0


async def test_a_client_within_its_rate_is_never_limited(make_gateway: MakeGateway) -> None:
    async with make_gateway(max_message_rate=50, message_burst=10) as app, connect(app) as ws:
        await recv_event(ws, "connected")
        for n in range(20):
            await send(ws, "ping", {"ts": n})
            assert (await recv_event(ws, "pong"))["data"]["ts"] == n
            await asyncio.sleep(0.03)


async def test_a_full_node_refuses_handshakes_with_503(make_gateway: MakeGateway) -> None:
    async with make_gateway(max_connections=2) as app, connect(app) as a, connect(app) as b:
        await recv_event(a, "connected")
        await recv_event(b, "connected")
        with pytest.raises(InvalidStatus) as refused:
            async with connect(app):
                pass
        assert refused.value.response.status_code == 503
        assert json.loads(refused.value.response.body or b"{}")["error"]["code"] == "at_capacity"


async def test_too_many_connections_from_one_address_are_closed_with_1013(
    make_gateway: MakeGateway,
) -> None:
    # 127.0.0.1 is a trusted proxy by default (exempt when it names nobody): trust nobody here,
    # so that the test client is the client (tests/ops/test_proxy_attacks.py covers proxies).
    async with (
        make_gateway(max_connections_per_ip=2, trusted_proxies="") as app,
        connect(app) as a,
        connect(app) as b,
    ):
        await recv_event(a, "connected")
        await recv_event(b, "connected")
        async with connect(app) as third:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(third.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        await send(a, "ping")
        await recv_event(a, "pong")


async def test_only_allowed_origins_may_connect(make_gateway: MakeGateway) -> None:
    async with make_gateway(
        allowed_origins="https://play.example.com, https://m.example.com/"
    ) as app:
        async with websockets.connect(app.ws_url, origin="https://m.example.com") as ws:  # type: ignore[arg-type]
            await recv_event(ws, "connected")
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(app.ws_url, origin="https://evil.example.net"):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403
        # Non-browser clients send no Origin and are not affected.
        async with connect(app) as ws:
            await recv_event(ws, "connected")


async def test_binary_frames_and_websocket_pings_count_against_the_rate_limit(
    make_gateway: MakeGateway,
) -> None:
    """Every frame takes a token (not only text messages): after 3 binary frames and 2 pings
    from a burst of 5, the next `ping` event is refused."""
    async with make_gateway(max_message_rate=0.001, message_burst=5) as app, connect(app) as ws:
        await recv_event(ws, "connected")
        for _ in range(3):
            await ws.send(b"\x00\x01")
            assert (await recv_event(ws, "error"))["data"]["code"] == "bad_message"
        for _ in range(2):
            await asyncio.wait_for(await ws.ping(), 5)  # answered: inside the budget
        await send(ws, "ping", {"ts": 1})
        assert (await recv_event(ws, "error"))["data"]["code"] == "rate_limited"
        assert app.node.rate_limited == 1
