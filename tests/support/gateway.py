"""A real gateway on 127.0.0.1 (random ports): its settings, and helpers for an independent client
library (`websockets`).

Every frame a test receives through `recv` is checked against the AsyncAPI document, so each test
also proves that the server's real output matches the contract.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from typing import Any

import aiohttp
import websockets
from websockets.asyncio.client import ClientConnection

from igratech_ws.app import App
from igratech_ws.auth import mint_token
from igratech_ws.config import Config
from igratech_ws.contract import validate_frame

SECRET = "e2e-secret-that-is-long-enough-for-hs256!"
API_KEY = "e2e-api-key"
NOW = "2026-11-23T19:45:00Z"


def base_config(**overrides: Any) -> Config:
    return Config(
        host="127.0.0.1",
        port=0,
        api_host="127.0.0.1",
        api_port=0,
        jwt_secret=SECRET,
        api_key=API_KEY,
    ).with_overrides(overrides)


def token(user: str, ttl: float = 3600.0) -> str:
    return mint_token(SECRET, user, ttl=ttl)


def connect(app: App, user: str | None = None, **query: str) -> Any:
    """Open a client with `websockets` (not the server's own library) as `user` or anonymous."""
    params = dict(query)
    if user is not None:
        params["token"] = token(user)
    from urllib.parse import urlencode

    url = app.ws_url + ("?" + urlencode(params) if params else "")
    return websockets.connect(url, open_timeout=5, close_timeout=2)


async def recv(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame, parsed and checked against the contract."""
    raw = await asyncio.wait_for(ws.recv(), timeout)
    validate_frame(raw, sender="server")
    frame: dict[str, Any] = json.loads(raw)
    return frame


async def recv_event(ws: ClientConnection, event: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame, which must be `event`."""
    frame = await recv(ws, timeout)
    assert frame["event"] == event, frame
    return frame


async def send(ws: ClientConnection, event: str, data: Any = None) -> None:
    frame: dict[str, Any] = {"event": event}
    if data is not None:
        frame["data"] = data
    await ws.send(json.dumps(frame))


async def settings(ws: ClientConnection, **data: Any) -> dict[str, Any]:
    await send(ws, "settings", data)
    answer = await recv_event(ws, "settings")
    return answer["data"]  # type: ignore[no-any-return]


async def publish(app: App, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            app.api_url + "/api/v1/publish",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as answer,
    ):
        return answer.status, await answer.json()


def incident(game: str, n: int) -> dict[str, Any]:
    return {
        "event": "incident",
        "gameId": game,
        "data": {
            "gameId": game,
            "incidentId": f"inc-{n}",
            "type": "corner",
            "occurredAt": NOW,
            "minute": n % 90,
            "side": "home",
        },
    }


def bet_payload(game: str, n: int, bets: int = 20) -> bytes:
    """A `bet` payload of `bets` bets (about 2.9 KB for 20), encoded: a large stream event."""
    items = [
        {
            "betId": f"b-{n}-{i}",
            "market": "match_winner",
            "selection": "home",
            "odds": "2.10",
            "stake": "5.00",
            "currency": "EUR",
            "placedAt": NOW,
        }
        for i in range(bets)
    ]
    return json.dumps({"gameId": game, "bets": items}, separators=(",", ":")).encode()


def balance(user: str, amount: str) -> dict[str, Any]:
    return {
        "event": "balance",
        "userId": user,
        "data": {"balance": amount, "currency": "EUR", "updatedAt": NOW, "reason": "bet_settled"},
    }


def raw_upgrade(port: int, *, query: str = "", rcvbuf: int | None = None) -> socket.socket:
    """A blocking raw socket past a valid upgrade; the 101 answer is read byte by byte so that no
    frame pushed right after it is consumed. `rcvbuf` (set before connecting) keeps the
    advertised TCP window small, for a client that will stop reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /wspublic{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, head
        head += byte
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def rss_kib() -> int:
    """This process's resident memory (the in-process server's), in KiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")
