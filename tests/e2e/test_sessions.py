"""Handshake refusals, single session, forced logout, token expiry, idle timeout, frame limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import jwt
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from igratech_ws.app import App
from tests.support.gateway import API_KEY, SECRET, connect, recv_event, send, token

MakeGateway = Callable[..., AbstractAsyncContextManager[App]]


async def _refused(url: str, **kwargs: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as caught:
        async with websockets.connect(url, open_timeout=5, **kwargs):
            pass
    return caught.value


async def test_invalid_or_expired_tokens_are_refused_with_401(gateway: App) -> None:
    expired = jwt.encode({"sub": "u-1", "exp": int(time.time()) - 60}, SECRET, algorithm="HS256")
    wrong_key = jwt.encode(
        {"sub": "u-1"}, "another-secret-of-sufficient-length!!", algorithm="HS256"
    )
    no_sub = jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    for bad in ("garbage", expired, wrong_key, no_sub):
        refusal = await _refused(f"{gateway.ws_url}?token={bad}")
        assert refusal.response.status_code == 401
        assert json.loads(refusal.response.body or b"{}")["error"]["code"] == "unauthorized"


async def test_bearer_header_authenticates_too(gateway: App) -> None:
    headers = {"Authorization": f"Bearer {token('u-9')}"}
    async with websockets.connect(gateway.ws_url, additional_headers=headers) as ws:
        assert (await recv_event(ws, "connected"))["data"]["userId"] == "u-9"
    refusal = await _refused(gateway.ws_url, additional_headers={"Authorization": "Bearer nope"})
    assert refusal.response.status_code == 401


async def test_anonymous_access_can_be_switched_off(make_gateway: MakeGateway) -> None:
    async with make_gateway(allow_anonymous=False) as app:
        refusal = await _refused(app.ws_url)
        assert refusal.response.status_code == 401
        async with connect(app, "u-1") as ws:
            await recv_event(ws, "connected")


async def test_other_paths_and_bad_handshake_settings_are_refused(gateway: App) -> None:
    base = gateway.ws_url.removesuffix("/wspublic")
    assert (await _refused(base + "/other")).response.status_code == 404
    refusal = await _refused(gateway.ws_url + '?settings={"games":[1]}')
    assert refusal.response.status_code == 400
    assert json.loads(refusal.response.body or b"{}")["error"]["field"] == "settings.games[0]"
    forbidden = '?settings={"recover":{"user:u-2":{"offset":1,"epoch":"e"}}}'
    assert (await _refused(gateway.ws_url + forbidden)).response.status_code == 403


async def test_second_login_logs_out_the_first_connection(gateway: App) -> None:
    async with connect(gateway, "u-1") as first:
        await recv_event(first, "connected")
        async with connect(gateway, "u-1") as second:
            await recv_event(second, "connected")
            logout = await recv_event(first, "logout")
            assert logout["data"]["reason"] == "logged_in_elsewhere"
            assert logout["data"]["code"] == 4001
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(first.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
            # The newest connection is unaffected.
            await send(second, "ping")
            await recv_event(second, "pong")
        assert gateway.node.user_connection_count("u-1") == 0


async def test_forced_logout_through_the_api_closes_every_connection_of_the_user(
    gateway: App,
) -> None:
    async with connect(gateway, "u-5") as ws, connect(gateway, "u-6") as bystander:
        await recv_event(ws, "connected")
        await recv_event(bystander, "connected")
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                gateway.api_url + "/api/v1/users/u-5/logout",
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as answer,
        ):
            assert answer.status == 200
            assert (await answer.json())["closedLocal"] == 1
        logout = await recv_event(ws, "logout")
        assert logout["data"]["reason"] == "forced"
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4002
        await send(bystander, "ping")
        await recv_event(bystander, "pong")


async def test_token_expiry_logs_the_connection_out(gateway: App) -> None:
    url = f"{gateway.ws_url}?token={token('u-7', ttl=1.5)}"
    async with websockets.connect(url) as ws:
        await recv_event(ws, "connected")
        logout = await recv_event(ws, "logout", timeout=6)
        assert logout["data"]["reason"] == "token_expired"
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4003


async def test_a_silent_connection_is_closed_after_the_idle_timeout(
    make_gateway: MakeGateway,
) -> None:
    async with (
        make_gateway(ping_interval=1, idle_timeout=2) as app,
        connect(app) as pinging,
        connect(app) as silent,
    ):
        await recv_event(pinging, "connected")
        connected = await recv_event(silent, "connected")
        assert connected["data"]["idleTimeout"] == 2
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(10):
                await send(pinging, "ping")
                await recv_event(pinging, "pong")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(silent.recv(), 0.5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4004
        await send(pinging, "ping")
        await recv_event(pinging, "pong")


async def test_a_frame_over_the_limit_closes_with_1009(make_gateway: MakeGateway) -> None:
    async with make_gateway(max_frame_bytes=1024) as app, connect(app) as ws:
        await recv_event(ws, "connected")
        await ws.send(json.dumps({"event": "ping", "data": {"ts": "x" * 2000}}))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_fragmented_messages_are_reassembled(gateway: App) -> None:
    async with connect(gateway) as ws:
        await recv_event(ws, "connected")
        await ws.send(iter(['{"event":"ping",', '"data":{"ts":7}}']))
        assert (await recv_event(ws, "pong"))["data"]["ts"] == 7
