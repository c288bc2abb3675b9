"""Keep-alive with WebSocket control frames (issue 10, item 3; decision D6).

On the old listener picows answered PING frames itself without telling anyone, so a client that
kept alive with them (the default of most client libraries, Python's websockets included) was
closed with 4004 after the idle timeout on a quiet channel. Now every frame is activity, and the
server's pong goes through the outbound path.
"""

from __future__ import annotations

import asyncio

import pytest
import websockets

from igratech_ws.app import running_app
from tests.support.gateway import base_config, incident, publish, recv_event
from tests.support.gateway import settings as follow
from tests.support.raw_ws import LOOPS, connect, frame, in_thread, read_frames, run_on

IDLE_TIMEOUT = 2  # seconds; the tests stay connected for more than twice this


async def _library_keepalive(aiofastnet: bool) -> None:
    config = base_config(ping_interval=1, idle_timeout=IDLE_TIMEOUT, use_aiofastnet=aiofastnet)
    async with running_app(config) as app:
        # websockets' own keepalive: a PING frame every 0.5 s, and the connection fails (1011)
        # if a pong does not come back within 1 s. Nothing else is sent after `settings`.
        async with websockets.connect(app.ws_url, ping_interval=0.5, ping_timeout=1) as ws:
            await recv_event(ws, "connected")
            await follow(ws, games=["g-quiet"])
            await asyncio.sleep(2.5 * IDLE_TIMEOUT)
            status, answer = await publish(app, incident("g-quiet", 1))
            assert status == 200, answer
            assert (await recv_event(ws, "incident"))["offset"] == 1
        assert 4004 not in app.node.closes, app.node.closes


@pytest.mark.parametrize("loop", LOOPS)
def test_websocket_pings_keep_a_quiet_connection_alive(loop: str) -> None:
    run_on(loop, _library_keepalive)


def pongs_only(port: int, seconds: float) -> list[bytes]:
    """Keep alive with unsolicited PONG frames only, then ask for a `pong` event."""
    sock = connect(port)
    try:
        elapsed = 0.0
        while elapsed < seconds:
            sock.sendall(frame(0xA, b"still here"))
            read_frames(sock, b"never", timeout=0.4)  # also drains what the server sends
            elapsed += 0.4
        sock.sendall(frame(0x1, b'{"event":"ping","data":{"ts":3}}'))
        frames, code = read_frames(sock, b'"pong"')
        assert code is None, code
        return [payload for opcode, payload in frames if opcode == 0x1]
    finally:
        sock.close()


async def test_unsolicited_pongs_are_activity_too() -> None:
    config = base_config(ping_interval=1, idle_timeout=IDLE_TIMEOUT)
    async with running_app(config) as app:
        answers = await in_thread(pongs_only, app.port, 2.5 * IDLE_TIMEOUT)
        assert answers and b'"pong"' in answers[-1]
