"""A tiny gateway that speaks the wire protocol, for testing the client SDK on real sockets.

It keeps a per-channel history with offsets and one epoch, answers ping and settings (including
``recover``), applies the handshake's ``settings`` query before any push, reports the positions of
the connection's own channels in ``connected`` (protocol decision D5; ``d5=False`` acts as a server
before it), and lets a test publish, send state snapshots, drop connections without a close frame,
close them with a code, log a user out, or refuse handshakes that recover given channels.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from igratech_ws.core.codec import event_frame, publication_frame


async def wait_until(condition: Callable[[], object], timeout: float = 10) -> None:
    """Poll `condition` (state changed by socket callbacks) until true, within `timeout`."""
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def incident(game_id: str, n: int) -> dict[str, Any]:
    return {"gameId": game_id, "incidentId": f"i-{n}", "type": "corner", "occurredAt": now()}


def balance(amount: str) -> dict[str, Any]:
    return {"balance": amount, "currency": "EUR", "updatedAt": now()}


class FakeConnection(WSListener):
    def __init__(self, server: FakeGateway, user_id: str | None, handshake: dict[str, Any] | None):
        self.server = server
        self.user_id = user_id
        self.handshake = handshake
        self.games: list[str] = []
        self.stats = False
        self.joined: dict[str, dict[str, Any]] = {}
        self.transport: WSTransport | None = None

    @property
    def channels(self) -> list[str]:
        names = [f"user:{self.user_id}"] if self.user_id else []
        names += [f"game:{g}" for g in self.games]
        return names + (["global"] if self.stats else [])

    def send(self, frame: bytes) -> None:
        assert self.transport is not None
        if not self.transport.is_close_frame_sent:
            self.transport.send(WSMsgType.TEXT, frame)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.server.connections.append(self)
        answer, missed = self.plan(self.handshake or {})
        status: dict[str, Any] = {
            "status": "connected",
            "sessionId": f"s-{len(self.server.connections)}",
            "userId": self.user_id,
            "serverTime": now(),
            "pingInterval": self.server.ping_interval,
            "idleTimeout": 60,
            "protocolVersion": "1.0",
            "node": "fake",
        }
        if self.server.d5:
            status["channels"] = answer["channels"]
        self.send(event_frame("connected", status))
        if self.handshake is not None:
            self.send(event_frame("settings", answer))
        for frame in missed:
            self.send(frame)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        message = json.loads(frame.get_payload_as_bytes())
        self.server.received.append((message["event"], message.get("data", {})))
        data = message.get("data", {})
        if message["event"] == "ping":
            self.send(event_frame("pong", {"serverTime": now(), "ts": data.get("ts")}))
        elif message["event"] == "settings":
            if self.server.reject_settings:
                error = {"code": "too_many_games", "message": "no", "event": "settings"}
                self.send(event_frame("error", error))
            else:
                self.apply_settings(data)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self in self.server.connections:
            self.server.connections.remove(self)

    def apply_settings(self, data: dict[str, Any]) -> None:
        answer, missed = self.plan(data)
        self.send(event_frame("settings", answer))
        for frame in missed:
            self.send(frame)

    def plan(self, data: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
        """Apply a settings request: the answer, and the frames recovery replays after it."""
        before = set(self.joined)
        if data.get("games") is not None:
            self.games = list(dict.fromkeys(data["games"]))
        for game in data.get("follow") or []:
            if game not in self.games:
                self.games.append(game)
        self.games = [g for g in self.games if g not in (data.get("unfollow") or [])]
        if data.get("stats") is not None:
            self.stats = data["stats"]
        recover = data.get("recover") or {}
        states, missed = [], []
        for channel in self.channels:
            if channel in before:  # already joined: listed at the position it was joined at
                states.append(self.joined[channel])
                continue
            top = self.server.top.get(channel, 0)
            state: dict[str, Any] = {"channel": channel, "offset": top, "epoch": self.server.epoch}
            self.joined[channel] = {**state}
            if channel in recover:
                position = recover[channel]
                history = self.server.history.get(channel, [])
                oldest = history[0][0] if history else top + 1
                ok = position["epoch"] == self.server.epoch and position["offset"] <= top
                ok = ok and (position["offset"] >= oldest - 1 or position["offset"] == top)
                state["recovered"] = ok
                if ok:
                    missed += [f for offset, f in history if offset > position["offset"]]
            states.append(state)
        answer = {"games": self.games, "stats": self.stats, "channels": states}
        return answer, missed


class FakeGateway:
    def __init__(
        self, *, ping_interval: int = 25, history_limit: int = 100, d5: bool = True
    ) -> None:
        self.d5 = d5
        self.forbidden_recover: set[str] = set()
        self.ping_interval = ping_interval
        self.history_limit = history_limit
        self.epoch = "e1"
        self.top: dict[str, int] = {}
        self.history: dict[str, list[tuple[int, bytes]]] = {}
        self.connections: list[FakeConnection] = []
        self.handshakes: list[dict[str, Any] | None] = []
        self.auth_headers: list[str | None] = []
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.reject_status: int | None = None
        self.reject_settings = False
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> str:
        self._server = await ws_create_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/wspublic"
        return self.url

    async def stop(self) -> None:
        for conn in list(self.connections):
            assert conn.transport is not None
            conn.transport.disconnect(graceful=False)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _accept(self, request: WSUpgradeRequest) -> Any:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path.decode()).query)
        handshake = json.loads(query["settings"][0]) if "settings" in query else None
        self.handshakes.append(handshake)
        auth = request.headers.get("Authorization")
        self.auth_headers.append(auth)
        if self.reject_status is not None:
            response = WSUpgradeResponse.create_error_response(self.reject_status, b"no")
            return WSUpgradeResponseWithListener(response, None)
        for channel in (handshake or {}).get("recover") or {}:
            if channel in self.forbidden_recover:
                error = {
                    "code": "forbidden_channel",
                    "message": "not yours",
                    "field": f"settings.recover.{channel}",
                }
                body = json.dumps({"error": error}).encode()
                response = WSUpgradeResponse.create_error_response(403, body)
                return WSUpgradeResponseWithListener(response, None)
        # the fake "verifies" a token by taking it as the user id
        user_id = auth.removeprefix("Bearer ") if auth else None
        return FakeConnection(self, user_id, handshake)

    def publish(self, channel: str, event: str, data: dict[str, Any]) -> int:
        offset = self.top.get(channel, 0) + 1
        self.top[channel] = offset
        frame = publication_frame(event, channel, offset, self.epoch, json.dumps(data).encode())
        history = self.history.setdefault(channel, [])
        history.append((offset, frame))
        del history[: -self.history_limit]
        for conn in self.connections:
            if channel in conn.channels:
                conn.send(frame)
        return offset

    def send_raw(self, channel: str, frame: dict[str, Any]) -> None:
        """Send `frame` (a whole publication frame, e.g. a snapshot) to the channel's followers."""
        encoded = json.dumps(frame).encode()
        for conn in self.connections:
            if channel in conn.channels:
                conn.send(encoded)

    def drop_all(self) -> None:
        """End every connection without a close frame, as a network failure would; nothing
        published afterwards reaches them."""
        for conn in list(self.connections):
            assert conn.transport is not None
            conn.transport.disconnect(graceful=False)
            self.connections.remove(conn)

    def close_all(self, code: int, reason: str = "") -> None:
        for conn in list(self.connections):
            assert conn.transport is not None
            conn.transport.send_close(WSCloseCode(code), reason.encode())
            conn.transport.disconnect()

    def logout(self, code: int = 4001) -> None:
        reasons = {4001: "logged_in_elsewhere", 4002: "forced", 4003: "token_expired"}
        data = {"status": "logout", "reason": reasons[code], "code": code, "serverTime": now()}
        for conn in list(self.connections):
            conn.send(event_frame("logout", data))
        self.close_all(code, reasons[code])
