"""Attacks on the synchronous handshake path (node `_join_now`, the memory broker's
`subscribe_now`/`state_now`, the 101 written with `connected`, `HandshakeDeadlines`), over real
sockets on a real gateway (memory broker).

What must hold: frames sent in the same segment as the upgrade request are served after
`connected`; a second login of the same user logs the first out (`logout`, then a close) even
while both race with `settings`; a client that closes right after its upgrade leaves nothing
behind; a slowloris upgrade is dropped at `HANDSHAKE_TIMEOUT` however it trickles; a
connect-and-close flood does not grow the server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import socket
import time
from collections.abc import AsyncIterator

import pytest

from igratech_ws.app import App, running_app
from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.transport import wsconnection
from tests.support.gateway import base_config, incident, publish, token
from tests.support.raw_ws import WAIT_S, frame, in_thread, read_frames, texts


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with running_app(base_config()) as running:
        yield running


def upgrade_request(query: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /wspublic{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def settings_frame(**data: object) -> bytes:
    return frame(0x1, json.dumps({"event": "settings", "data": data}).encode())


def read_head(sock: socket.socket) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    return head


async def all_gone(app: App) -> None:
    """Wait (bounded) until the node holds no connection."""
    for _ in range(int(WAIT_S / 0.02)):
        if not app.node.connection_count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{app.node.connection_count} connections left")


def events(frames: list[tuple[int, bytes]]) -> list[str]:
    return [json.loads(text)["event"] for text in texts(frames)]


# --- frames in the upgrade's segment -------------------------------------------------------------


async def test_settings_in_the_same_segment_as_the_upgrade(app: App) -> None:
    def talk() -> list[tuple[int, bytes]]:
        with socket.create_connection(("127.0.0.1", app.port), timeout=WAIT_S) as sock:
            sock.sendall(
                upgrade_request(f"?token={token('u-seg')}")
                + settings_frame(games=["g-seg"])
                + settings_frame(games=["g-seg", "g-seg2"], stats=True)
            )
            assert read_head(sock).startswith(b"HTTP/1.1 101")
            frames, _ = read_frames(sock, until=b'"g-seg2"', timeout=5)
            return frames

    frames = await in_thread(talk)
    got = events(frames)
    assert got[0] == "connected", got
    assert got.count("settings") == 2, got


async def test_settings_then_a_publication_in_the_same_segment(app: App) -> None:
    """Subscribed at once (subscribe_now): a publication right after the settings answer
    reaches the client."""
    loop = asyncio.get_running_loop()
    got_settings = asyncio.Event()

    def talk() -> list[tuple[int, bytes]]:
        with socket.create_connection(("127.0.0.1", app.port), timeout=WAIT_S) as sock:
            sock.sendall(upgrade_request() + settings_frame(games=["g-pub"]))
            assert read_head(sock).startswith(b"HTTP/1.1 101")
            first, _ = read_frames(sock, until=b'"settings"', timeout=5)
            loop.call_soon_threadsafe(got_settings.set)
            rest, _ = read_frames(sock, until=b'"incident"', timeout=5)
            return first + rest

    talking = asyncio.ensure_future(in_thread(talk))
    await asyncio.wait_for(got_settings.wait(), WAIT_S)
    status, _ = await publish(app, incident("g-pub", 1))
    assert status == 200
    frames = await asyncio.wait_for(talking, WAIT_S)
    assert events(frames)[-1] == "incident", events(frames)


# --- single session racing with settings ---------------------------------------------------------


async def test_a_second_login_logs_the_first_out_while_both_send_settings(app: App) -> None:
    user = "u-single"

    def login() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", app.port), timeout=WAIT_S)
        sock.sendall(
            upgrade_request(f"?token={token(user)}")
            + b"".join(settings_frame(games=[f"g-{i}"]) for i in range(5))
        )
        assert read_head(sock).startswith(b"HTTP/1.1 101")
        return sock

    for _round in range(5):
        first = await in_thread(login)
        second = await in_thread(login)
        try:
            frames, code = await in_thread(read_frames, first, None, 5)
            assert "logout" in events(frames), events(frames)
            assert code is not None or frames, "the first session was neither logged out nor closed"
            # The second session lives on and is served.
            await in_thread(second.sendall, settings_frame(games=["g-last"]))
            frames2, code2 = await in_thread(read_frames, second, b'"g-last"', 5)
            assert code2 is None and "logout" not in events(frames2), events(frames2)
        finally:
            first.close()
            second.close()
    assert app.node.connection_count <= 1


# --- a client that goes away at once -------------------------------------------------------------


async def test_a_client_that_closes_right_after_the_upgrade_leaves_nothing(app: App) -> None:
    def hit(count: int) -> None:
        for i in range(count):
            with socket.create_connection(("127.0.0.1", app.port), timeout=WAIT_S) as sock:
                data = upgrade_request(f"?token={token(f'u-gone-{i % 7}')}")
                if i % 3 == 0:
                    data += settings_frame(games=["g-gone"])
                if i % 3 == 1:
                    data += frame(0x8, b"\x03\xe8")
                sock.sendall(data)
                if i % 2:
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )

    await in_thread(hit, 200)
    await all_gone(app)
    # No user, channel or broker subscription left behind by the gone clients.
    info = app.node.info()
    assert (info["users"], info["channels"]) == (0, 0), info
    assert isinstance(app.node.broker, MemoryBroker)
    assert app.node.broker.subscription_count == 0
    status, answer = await publish(app, incident("g-gone", 1))
    assert status == 200, answer


# --- slowloris -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pace", [0.05, 0.3])
async def test_a_slowloris_upgrade_is_dropped_at_the_deadline(
    app: App, monkeypatch: pytest.MonkeyPatch, pace: float
) -> None:
    monkeypatch.setattr(wsconnection, "HANDSHAKE_TIMEOUT", 1.0)
    data = upgrade_request() + b"X-Pad: " + b"a" * 4000 + b"\r\n\r\n"

    def trickle() -> float:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", app.port), timeout=WAIT_S) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Strip the request's blank line so the head never ends, then trickle headers.
            sock.sendall(data[: data.index(b"\r\n\r\n") + 2])
            with contextlib.suppress(OSError):
                while time.monotonic() - started < 6:
                    sock.sendall(b"X")
                    sock.settimeout(pace)
                    try:
                        if sock.recv(1024) == b"":
                            return time.monotonic() - started
                    except TimeoutError:
                        pass
                return 99.0
            return time.monotonic() - started

    took = await in_thread(trickle)
    assert took < 3.0, took


# --- connect/close flood --------------------------------------------------------------------------


async def test_a_connect_close_flood_does_not_grow_the_server(app: App) -> None:
    def flood(count: int) -> None:
        for i in range(count):
            with socket.create_connection(("127.0.0.1", app.port), timeout=WAIT_S) as sock:
                if i % 2:
                    sock.sendall(upgrade_request(f"?token={token(f'u-f{i % 5}')}"))
                    read_head(sock)

    async def settle() -> int:
        await all_gone(app)
        await asyncio.sleep(0.1)
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o).__name__ == "WebSocketConnection")

    await in_thread(flood, 200)  # warm up
    before = await settle()
    for _ in range(3):
        await in_thread(flood, 300)
    after = await settle()
    assert after <= before + 5, (before, after)


async def test_two_logins_of_one_user_at_once_leave_exactly_one(app: App) -> None:
    """Both upgrade requests (each with settings behind it) sent back to back, before either
    answer is read: the later session wins, the other gets `logout` and a close."""
    user = "u-both"

    def race() -> tuple[list[str], list[str]]:
        socks = [socket.create_connection(("127.0.0.1", app.port), timeout=WAIT_S) for _ in "ab"]
        try:
            for sock in socks:
                sock.sendall(
                    upgrade_request(f"?token={token(user)}") + settings_frame(games=["g-both"])
                )
            seen = []
            for sock in socks:
                assert read_head(sock).startswith(b"HTTP/1.1 101")
                frames, _ = read_frames(sock, b'"logout"', 0.5)
                seen.append(events(frames))
            return seen[0], seen[1]
        finally:
            for sock in socks:
                sock.close()

    for _round in range(4):
        first, second = await in_thread(race)
        logged_out = ["logout" in first, "logout" in second]
        assert logged_out == [True, False], (first, second)
        await all_gone(app)
        assert app.node.info()["users"] == 0
