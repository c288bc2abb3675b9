"""A client that never reads, on a real socket, while its game floods stats (issue 12): it stays
connected (conflation keeps its queue under the budget), and when it finally reads it has every
incident, in order, and the newest stats. The same client on a bet flood is closed 1013."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from igratech_ws.app import App
from tests.support.conflation import bet_data, incident_data, stats_data
from tests.support.gateway import raw_upgrade
from tests.support.raw_ws import next_frame

BUDGET = 64 * 1024


def read_all(sock: socket.socket) -> tuple[list[dict[str, Any]], int | None]:
    """Every text frame until a second of silence, and the close code if a close came."""
    sock.settimeout(1.0)
    data = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except TimeoutError:
        pass
    frames, code, at = [], None, 0
    while (parsed := next_frame(data, at)) is not None:
        opcode, payload, at = parsed
        if opcode == 0x1:
            frames.append(json.loads(payload))
        elif opcode == 0x8:
            code = int.from_bytes(payload[:2], "big")
    return frames, code


async def _flood(
    app: App, stream_every: int, count: int
) -> tuple[list[Any], list[Any], int | None]:
    port = app.port
    sock = await asyncio.to_thread(
        raw_upgrade, port, query="?settings=%7B%22games%22%3A%5B%22g-1%22%5D%7D", rcvbuf=4096
    )
    await asyncio.sleep(0.3)
    broker = app.node.broker
    published = []
    for n in range(count):
        if stream_every == 1:
            published.append(await broker.publish("game:g-1", "bet", bet_data(n)))
        elif n % stream_every == 0:
            published.append(await broker.publish("game:g-1", "incident", incident_data(n)))
        else:
            published.append(await broker.publish("game:g-1", "stats", stats_data(n)))
        if n % 20 == 0:
            await asyncio.sleep(0.01)  # let the node write and the kernel fill
    await asyncio.sleep(0.5)
    frames, code = await asyncio.to_thread(read_all, sock)
    sock.close()
    return [r.publication for r in published], frames, code


async def test_a_never_reading_client_on_a_stats_flood_stays_and_loses_no_incident(
    make_gateway: Callable[..., AbstractAsyncContextManager[App]],
) -> None:
    async with make_gateway(max_write_buffer_bytes=BUDGET) as app:
        # 10 incidents in 3,000 publications: each must stay queued with the stats before it,
        # which fits the budget; a client that never reads a real stream is closed (below).
        published, frames, code = await _flood(app, stream_every=300, count=3000)
        assert code is None, "closed although only state overflowed"
        assert app.node.hub.conflated_frames > 0, "the flood never put the client behind"
        assert app.node.hub.slow_consumers == 0
        pushes = [f for f in frames if f.get("channel") == "game:g-1" and not f.get("snapshot")]
        offsets = [f["offset"] for f in pushes]
        assert offsets == sorted(set(offsets))
        incidents = [p.offset for p in published if p.event == "incident"]
        assert [f["offset"] for f in pushes if f["event"] == "incident"] == incidents
        assert pushes[-1]["offset"] == published[-1].offset  # the newest stats, at the end
        assert any(f.get("conflated") for f in pushes)


async def test_the_same_client_on_a_bet_flood_is_closed_as_a_slow_consumer(
    make_gateway: Callable[..., AbstractAsyncContextManager[App]],
) -> None:
    async with make_gateway(max_write_buffer_bytes=BUDGET) as app:
        published, frames, code = await _flood(app, stream_every=1, count=1500)
        assert app.node.hub.conflated_frames == 0
        assert code == 1013 or app.node.hub.slow_consumers == 1
        # What it got before the close is the stream's beginning, without a hole.
        offsets = [f["offset"] for f in frames if f.get("channel") == "game:g-1"]
        assert offsets == list(range(1, len(offsets) + 1)) and len(offsets) < len(published)
