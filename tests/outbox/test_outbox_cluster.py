"""Two gateway processes consume one outbox table on Redis; the active one is SIGKILLed while a
writer commits rows (some rolled back): every committed row reaches a WebSocket client exactly
once, in per-channel order, and no rolled-back row ever does."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from tests.support.cluster import BrokerSpace, node_group, stop
from tests.support.gateway import incident, recv, settings
from tests.support.outbox import count

pytestmark = [pytest.mark.services, pytest.mark.slow]

GAMES = ["g-1", "g-2", "g-3"]
ROWS = 240
WAIT_S = 60.0


@pytest.fixture
async def space(redis_url: str) -> AsyncIterator[BrokerSpace]:
    namespace = BrokerSpace("redis", redis_url)
    try:
        yield namespace
    finally:
        await namespace.cleanup()


async def write(
    dsn: str, table: str, committed: dict[str, list[str]], started: asyncio.Event
) -> None:
    """Commit ROWS rows, one transaction each, every fifth one rolled back; record what
    committed, per game, in commit order (= id order: one writer)."""
    rng = random.Random(13)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for n in range(1, ROWS + 1):
            game = GAMES[n % len(GAMES)]
            async with conn.transaction(force_rollback=(n % 5 == 0)):
                await conn.execute(
                    sql.SQL("INSERT INTO {} (body) VALUES (%s)").format(sql.Identifier(table)),
                    (Jsonb(incident(game, n)),),
                )
            if n % 5:
                committed[game].append(f"inc-{n}")
            if n == 20:
                started.set()
            await asyncio.sleep(rng.uniform(0, 0.01))


async def test_a_sigkill_of_the_consuming_node_loses_and_doubles_nothing(
    space: BrokerSpace, postgres_dsn: str, table: str, tmp_path: Path
) -> None:
    outbox = {"outbox_dsn": postgres_dsn, "outbox_table": table}
    # A takes the lease before B starts: B is the standby, and the client's node.
    async with (
        node_group(space.url, ["A"], tmp_path, **outbox) as first,
        node_group(space.url, ["B"], tmp_path, **outbox) as second,
    ):
        a, b = first["A"], second["B"]
        async with b.connect() as fan:
            await recv(fan)  # connected
            await settings(fan, games=GAMES)
            committed: dict[str, list[str]] = {game: [] for game in GAMES}
            started = asyncio.Event()
            writer = asyncio.ensure_future(write(postgres_dsn, table, committed, started))
            received: dict[str, list[str]] = {game: [] for game in GAMES}
            offsets: dict[str, list[int]] = {game: [] for game in GAMES}
            killed = False
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                expected = sum(len(ids) for ids in committed.values())
                if writer.done() and sum(len(r) for r in received.values()) >= expected:
                    break
                try:
                    frame: dict[str, Any] = await recv(fan, 2.0)
                except TimeoutError:
                    continue
                if frame["event"] != "incident":
                    continue
                game = frame["data"]["gameId"]
                received[game].append(frame["data"]["incidentId"])
                offsets[game].append(frame["offset"])
                if not killed and sum(len(r) for r in received.values()) >= 60:
                    await stop(a.proc, signal.SIGKILL)  # mid-stream, no goodbye
                    killed = True
            await writer
            assert killed, "the consuming node was never killed"
            # Anything doubled would arrive now.
            with pytest.raises(TimeoutError):
                extra = await recv(fan, 1.5)
                pytest.fail(f"a frame after every committed row: {extra}")
        assert b.alive
        assert await count(postgres_dsn, table) == 0
    for game in GAMES:
        assert received[game] == committed[game], game
        assert offsets[game] == list(range(1, len(offsets[game]) + 1)), game
    rolled_back = {f"inc-{n}" for n in range(5, ROWS + 1, 5)}
    assert not rolled_back & {i for ids in received.values() for i in ids}
