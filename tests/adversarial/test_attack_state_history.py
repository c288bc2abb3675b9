"""Attacks on `settings.history` (issue 12): the maximum history on the maximum number of games.

docs/protocol.md bounds the history of *each* channel (100 events, a quarter of the outbound
budget, 1,000 publications looked through); docs/security.md promises at most 1,088 KB in the
process per connection under the configured limits, and issue 9's rule is that a request's work
is bounded and an oversize one refused before the work. Here one `settings` follows 100 games
(`max_games_per_connection`) with `history: 100`, each game holding 100 bets of ~2.9 KB, from raw
sockets that do not read (a 4 KiB receive buffer) and from an honest client that reads at full
speed. Everything runs in-process so that tracemalloc sees the gateway's allocations.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets

from igratech_ws.app import App, running_app
from igratech_ws.brokers.base import HistoryPage
from tests.support.cluster import BrokerSpace
from tests.support.gateway import base_config, bet_payload, recv_event
from tests.support.raw_ws import connect, frame, in_thread, read_frames

GAMES = 100
BETS = 100
BUDGET = 1_048_576  # max_write_buffer_bytes (the default)
#: docs/security.md: worst case per connection, one message being assembled plus a full budget.
PER_CONNECTION = 1_088 * 1024
ATTACKERS = 4


GAME_IDS = [f"g-{i:03d}" for i in range(GAMES)]
REQUEST = json.dumps({"event": "settings", "data": {"follow": GAME_IDS, "history": 100}}).encode()


async def _filled(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[App]:
    overrides: dict[str, Any] = {"history_size": 1000}
    space = None
    if kind != "memory":
        space = BrokerSpace(kind, str(request.getfixturevalue("redis_url")))
        overrides["broker"] = space.url
    try:
        async with running_app(base_config(**overrides)) as app:
            for game in GAME_IDS:
                await asyncio.gather(
                    *(
                        app.node.broker.publish(f"game:{game}", "bet", bet_payload(game, n))
                        for n in range(BETS)
                    )
                )
            yield app
    finally:
        if space is not None:
            await space.cleanup()


@pytest.fixture(params=["memory", "redis"])
async def filled(request: pytest.FixtureRequest) -> AsyncIterator[App]:
    async for app in _filled(str(request.param), request):
        yield app


@pytest.fixture
async def filled_memory(request: pytest.FixtureRequest) -> AsyncIterator[App]:
    async for app in _filled("memory", request):
        yield app


def _attack(port: int, count: int) -> list[socket.socket]:
    socks = [connect(port, rcvbuf=4096) for _ in range(count)]
    for sock in socks:
        read_frames(sock, b"connected")
    for sock in socks:
        sock.sendall(frame(0x1, REQUEST))
    return socks


async def _gone(app: App, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05)):
        if not app.node.connection_count or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.05)


async def test_history_on_every_game_stays_within_the_connection_bound(filled: App) -> None:
    app = filled
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        socks = await in_thread(_attack, app.port, ATTACKERS)
        await _gone(app)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        for sock in socks:
            sock.close()
    assert peak / ATTACKERS <= 2 * PER_CONNECTION, (
        f"{peak / ATTACKERS / 1e6:.1f} MB per connection at peak for one settings "
        f"(follow {GAMES} games, history 100); docs/security.md: at most 1,088 KB"
    )


async def test_history_work_is_bounded_by_what_the_budget_can_send(filled_memory: App) -> None:
    app = filled_memory
    broker = app.node.broker
    read = [0]
    original = broker.history

    async def counted(channel: str, since: int, limit: int) -> HistoryPage:
        page = await original(channel, since, limit)
        read[0] += sum(len(p.data) for p in page.publications)
        return page

    broker.history = counted  # type: ignore[method-assign,assignment]
    socks = await in_thread(_attack, app.port, 1)
    try:
        await _gone(app)
    finally:
        for sock in socks:
            sock.close()
    assert read[0] <= 4 * BUDGET, (
        f"one settings read {read[0] / 1e6:.1f} MB of history for a {BUDGET // 1024} KiB budget"
    )


async def test_snapshot_counter_counts_only_what_could_be_sent(filled_memory: App) -> None:
    app = filled_memory
    socks = await in_thread(_attack, app.port, 1)
    try:
        await _gone(app)
    finally:
        for sock in socks:
            sock.close()
    # Each history frame is ~2.9 KB: a 1 MiB budget holds at most ~370 of them.
    assert app.node.hub.snapshot_frames * 2_800 <= BUDGET, app.node.hub.snapshot_frames


async def test_an_honest_fast_reader_asking_history_on_every_game_is_not_closed(
    filled_memory: App,
) -> None:
    app = filled_memory
    async with websockets.connect(app.ws_url, open_timeout=5, close_timeout=2, max_size=None) as ws:
        await recv_event(ws, "connected")
        await ws.send(REQUEST.decode())
        events: list[str] = []
        close_code = None
        try:
            async with asyncio.timeout(25):
                while True:  # until a second of quiet: every snapshot is in
                    message = json.loads(await asyncio.wait_for(ws.recv(), 1.0))
                    events.append(message["event"])
        except TimeoutError:
            pass
        except websockets.ConnectionClosed as closed:
            close_code = closed.rcvd.code if closed.rcvd else None
        assert close_code is None and "settings" in events, (
            f"closed with {close_code} after {len(events)} frames while reading at full speed, "
            f"answer received: {'settings' in events}"
        )
