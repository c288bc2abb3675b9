"""Settings requests cost CPU linear in their size, and oversize ones are refused before the work
(issue 9, item 4).

On main `{"games":[1000 ids],"follow":[1000 ids]}` cost ~16 ms of CPU per frame (a list membership
test per id) and was refused (`too_many_games`) only afterwards: six connections sending such
frames inside the message rate limit pushed another client's ping round trip to 3 s. Here the
same six attackers run while a victim pings; its round trips must stay sane. This is a fairness
check with a generous bound, not a speed benchmark. The gateway runs as its own process (as in
production): in this process its stalls would slow the attackers down too.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import websockets

from tests.support.cluster import node_group
from tests.support.gateway import recv_event

ATTACKERS = 6
ATTACK_S = 3.0
RATE = 18.0  # frames per second per attacker: inside the default limit (20/s, burst 40)
#: p99 of the victim's ping round trip; generous (main measured seconds).
BOUND_S = 0.3


async def _attack(url: str, frame: str, stop: asyncio.Event, refused: list[int]) -> None:
    async with websockets.connect(url, open_timeout=5, close_timeout=2, max_size=None) as ws:
        await recv_event(ws, "connected")

        async def read() -> None:
            async for raw in ws:
                message = json.loads(raw)
                if message["event"] == "error":
                    refused.append(1)
                    assert message["data"]["code"] == "too_many_games", message

        reader = asyncio.ensure_future(read())
        try:
            while not stop.is_set():
                await ws.send(frame)
                await asyncio.sleep(1 / RATE)
        finally:
            reader.cancel()


async def test_oversize_settings_cannot_starve_other_clients(tmp_path: Path) -> None:
    async with node_group("memory://", ["A"], tmp_path) as nodes:
        app = nodes["A"]
        ids = [f"g-{i:05d}" for i in range(1000)]
        frame = json.dumps(
            {"event": "settings", "data": {"games": ids, "follow": [i + "x" for i in ids]}}
        )
        stop = asyncio.Event()
        refused: list[int] = []
        attackers = [
            asyncio.ensure_future(_attack(app.ws_url, frame, stop, refused))
            for _ in range(ATTACKERS)
        ]
        round_trips: list[float] = []
        try:
            async with websockets.connect(app.ws_url, open_timeout=5, close_timeout=2) as victim:
                await recv_event(victim, "connected")
                await asyncio.sleep(0.3)  # the attack is under way
                deadline = time.monotonic() + ATTACK_S
                while time.monotonic() < deadline:
                    sent = time.perf_counter()
                    await victim.send(json.dumps({"event": "ping", "data": {"ts": sent}}))
                    await recv_event(victim, "pong", timeout=30)
                    round_trips.append(time.perf_counter() - sent)
                    await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*attackers, return_exceptions=True)
        assert len(refused) > ATTACKERS * 10, "the attack did not run"
        round_trips.sort()
        p99 = round_trips[int(len(round_trips) * 0.99) - 1]
        assert p99 < BOUND_S, f"victim's ping p99 {p99 * 1000:.0f} ms under the attack"
