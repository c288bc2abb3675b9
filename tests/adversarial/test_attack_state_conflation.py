"""Attack on conflation (issue 12) through a real socket: a client of two games that stops
reading (4 KiB receive buffer) while each game's stats change thousands of times, with bets and
incidents between them, then reads everything. Conflation may drop superseded stats only: no
stream frame may be lost, no channel's frames reordered (offsets only grow per channel), every
offset skipped must be a stats of that channel replaced by the conflated frame after it, and the
newest stats of each game must arrive. The client must not be closed as a slow consumer (the
stream part fits the budget many times over).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from igratech_ws.app import App, running_app
from igratech_ws.brokers.base import Publication
from tests.support.gateway import NOW, base_config
from tests.support.raw_ws import connect, frame, in_thread, read_frames

STATS = 3000  # per game, ~4 KB each: ~24 MB for two games, far past the kernel's buffers
STREAM_EVERY = 40


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with running_app(base_config(history_size=100)) as gateway:
        yield gateway


def stats(game: str, n: int) -> bytes:
    values = {f"k{i}": n for i in range(300)}
    return json.dumps(
        {"scope": "game", "gameId": game, "updatedAt": NOW, "values": values},
        separators=(",", ":"),
    ).encode()


def incident(game: str, n: int) -> bytes:
    return json.dumps(
        {
            "gameId": game,
            "incidentId": f"inc-{n}",
            "type": "corner",
            "occurredAt": NOW,
            "minute": n % 90,
            "side": "home",
        },
        separators=(",", ":"),
    ).encode()


def _read_all(sock: socket.socket) -> tuple[list[dict[str, Any]], int | None]:
    frames, code = read_frames(sock, None, 8)
    sock.close()
    return [json.loads(payload) for opcode, payload in frames if opcode == 0x1], code


async def test_conflation_drops_only_superseded_stats_and_never_reorders(app: App) -> None:
    games = ["g-ca", "g-cb"]
    broker: Any = app.node.broker

    def open_client() -> socket.socket:
        sock = connect(app.port, rcvbuf=4096)
        read_frames(sock, b"connected")
        request = {"event": "settings", "data": {"follow": games}}
        sock.sendall(frame(0x1, json.dumps(request).encode()))
        read_frames(sock, b'"settings"')
        return sock

    sock = await in_thread(open_client)
    published: list[Publication] = []
    started = time.monotonic()
    for n in range(STATS):
        for game in games:
            published.append(broker.publish_now(f"game:{game}", "stats", stats(game, n)))
            if n % STREAM_EVERY == 0:
                published.append(broker.publish_now(f"game:{game}", "incident", incident(game, n)))
        if n % 5 == 0:
            await asyncio.sleep(0.001)  # let the hub flush and the socket fill
    assert time.monotonic() - started < 25
    conflated_by_server = app.node.hub.conflated_frames
    got, code = await in_thread(_read_all, sock)
    assert code is None, f"closed with {code}"
    assert conflated_by_server > 0, "the client never fell behind: the attack proved nothing"
    by_offset = {(p.channel, p.offset): p for p in published}
    for game in games:
        channel = f"game:{game}"
        mine = [f for f in got if f.get("channel") == channel]
        offsets = [f["offset"] for f in mine]
        assert offsets == sorted(set(offsets)), f"{channel}: reordered or duplicated"
        stream = [p.offset for p in published if p.channel == channel and p.event != "stats"]
        assert set(stream) <= set(offsets), f"{channel}: stream frames lost"
        previous = 0
        for f in mine:
            skipped = range(previous + 1, f["offset"])
            if len(skipped):
                assert f.get("conflated") is True, (channel, f["offset"], "skip without mark")
                assert f["event"] == "stats"
                assert all(by_offset[(channel, o)].event == "stats" for o in skipped)
            previous = f["offset"]
        newest = max(p.offset for p in published if p.channel == channel)
        assert offsets[-1] == newest, f"{channel}: the newest stats never arrived"
