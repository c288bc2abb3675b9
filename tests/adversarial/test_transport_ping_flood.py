"""A client that never reads and floods WebSocket PING frames (issue 9, class 1).

On the old listener picows answered every ping itself, past `max_write_buffer_bytes` and outside
the rate limit: 150 MB of pings grew the server by about 220 MB and the connection stayed open.
Now every ping takes a token and its pong goes through the outbound budget: with the default
limits the flooder is closed 1008 after `STRIKES` refused pings in a row; with the rate limit
raised out of the way, its unread pongs pause the socket (the server stops reading it) and it is
closed 1013 as a slow consumer. Either way the server's memory stays bounded and a bystander's
pings keep their answers.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from igratech_ws.app import App, running_app
from tests.support.gateway import base_config, recv_event, rss_kib, send
from tests.support.gateway import connect as ws_connect
from tests.support.raw_ws import LOOPS, connect, frame, in_thread, read_frames, run_on

PING = frame(0x9, b"p" * 125)
CHUNK = PING * 512  # 67 KB of pings per send
FLOOD_BYTES = 40 * 1024 * 1024
#: A pong slower than this is a bystander hurt by the flood (normal: a few ms; a liveness bound
#: for a shared 2-core machine, not a speed target).
BYSTANDER_BOUND_S = 2.0


def flood(port: int) -> tuple[int, int | None]:
    """Flood pings without reading (4 KiB receive buffer) until the server stops taking them or
    FLOOD_BYTES went; then read: (bytes sent, the server's close code or None)."""
    sock = connect(port, rcvbuf=4096)
    sent = 0
    sock.settimeout(2.0)  # the server stopped reading us: the flood is over
    try:
        while sent < FLOOD_BYTES:
            sock.sendall(CHUNK)
            sent += len(CHUNK)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    try:
        _frames, code = read_frames(sock)
    finally:
        sock.close()
    return sent, code


async def bystander(app: App, stop: asyncio.Event) -> list[float]:
    """A well-behaved client pinging every 50 ms; its round trips."""
    rtts: list[float] = []
    async with ws_connect(app) as ws:
        await recv_event(ws, "connected")
        n = 0
        while not stop.is_set():
            started = time.monotonic()
            await send(ws, "ping", {"ts": n})
            await recv_event(ws, "pong", timeout=BYSTANDER_BOUND_S)
            rtts.append(time.monotonic() - started)
            n += 1
            await asyncio.sleep(0.05)
    return rtts


async def _flood_case(aiofastnet: bool, rate_limited: bool) -> None:
    overrides: dict[str, object] = {"use_aiofastnet": aiofastnet}
    if not rate_limited:
        # The rate limit out of the way: only the outbound budget and backpressure remain.
        overrides.update(max_message_rate=1e9, message_burst=1e9, ping_interval=1, idle_timeout=2)
    async with running_app(base_config(**overrides)) as app:
        stop = asyncio.Event()
        watcher = asyncio.ensure_future(bystander(app, stop))
        await asyncio.sleep(0.2)
        before = rss_kib()
        sent, code = await in_thread(flood, app.port)
        grown = rss_kib() - before
        stop.set()
        rtts = await watcher
        for _ in range(500):  # bounded: the node forgets the flooder
            if app.node.connection_count <= 1:
                break
            await asyncio.sleep(0.01)
        expected = 1008 if rate_limited else 1013
        assert app.node.closes.get(expected) == 1, (app.node.closes, code, sent)
        if rate_limited:
            assert code == 1008, code  # the close frame reached the flooder once it read
        # Pongs held for the flooder are bounded by the budget (1 MiB), not by what it sent.
        assert grown < 8 * 1024, f"server grew {grown} KiB after {sent >> 20} MiB of pings"
        assert rtts and max(rtts) < BYSTANDER_BOUND_S, rtts


@pytest.mark.parametrize("loop", LOOPS)
def test_a_ping_flood_is_rate_limited_and_closed_1008(loop: str) -> None:
    run_on(loop, lambda aiofastnet: _flood_case(aiofastnet, rate_limited=True))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_ping_flood_past_the_rate_limit_is_a_slow_consumer_1013(loop: str) -> None:
    run_on(loop, lambda aiofastnet: _flood_case(aiofastnet, rate_limited=False))
