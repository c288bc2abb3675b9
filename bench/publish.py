"""Publish-side scenario beyond the HTTP API's throughput (section 5 of the report): the
PostgreSQL outbox's commit-to-client latency.

A writer commits one outbox row per transaction at a steady rate; one WebSocket client follows
the game on the same igratech-ws server (memory broker, pinned to the server CPU); latency is the
client's receive time minus the time the writer sent ``COMMIT`` (so it includes the commit
itself). The table is private to the run and dropped afterwards. Skipped, with a note, when
PostgreSQL is not reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
import uuid
from typing import Any

from bench.scenarios import Context, Row
from bench.servers import OURS, CpuMeter, Server, ws_url

POSTGRES_DSN = os.environ.get(
    "IGRATECH_WS_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
OCCURRED = "2026-11-23T19:45:00Z"


def _row(**values: Any) -> Row:
    return {"scenario": "outbox_latency", "server": OURS.name, **values}


async def _postgres_ok() -> str | None:
    import psycopg

    try:
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, connect_timeout=3):
            return None
    except (psycopg.Error, OSError) as exc:
        return f"PostgreSQL not reachable at {POSTGRES_DSN}: {str(exc)[:200]}"


async def _drop(table: str) -> None:
    import psycopg
    from psycopg import sql

    with contextlib.suppress(Exception):
        async with await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True) as conn:
            for name in (table, table + "_dead"):
                await conn.execute(
                    sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(name))
                )


async def outbox_latency(ctx: Context, rate: float = 50.0, duration: float = 6.0) -> Row:
    """`rate` rows/s for `duration` s through the outbox to one follower: latency percentiles."""
    import aiohttp
    import psycopg
    from psycopg import sql
    from psycopg.types.json import Jsonb

    problem = await _postgres_ok()
    if problem is not None:
        ctx.notes.append(f"outbox latency skipped: {problem}")
        return _row(skipped=problem)
    table = "bench_outbox_" + uuid.uuid4().hex[:10]
    port, api_port = ctx.ports.take(), ctx.ports.take()
    server = Server(
        OURS, port, api_port, ctx.server_cpu, ctx.log_dir,
        extra_env={"IGRATECH_WS_OUTBOX_DSN": POSTGRES_DSN, "IGRATECH_WS_OUTBOX_TABLE": table},
    )  # fmt: skip
    committed: dict[str, float] = {}
    latencies: list[float] = []
    rows = int(rate * duration)
    try:
        await server.start()
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(ws_url(server), max_msg_size=0) as ws,
        ):
            await ws.receive(timeout=10)  # connected
            await ws.send_str(json.dumps({"event": "settings", "data": {"games": ["g-1"]}}))
            await ws.receive(timeout=10)  # settings
            # The gateway creates the table when it starts consuming: wait for it.
            async with await psycopg.AsyncConnection.connect(POSTGRES_DSN) as conn:
                for _ in range(200):
                    cursor = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
                    found = await cursor.fetchone()
                    await conn.rollback()
                    if found is not None and found[0]:
                        break
                    await asyncio.sleep(0.05)

                async def receive() -> None:
                    while len(latencies) < rows:
                        message = await ws.receive(timeout=10)
                        now = time.time()
                        frame = json.loads(message.data)
                        if frame.get("event") == "incident":
                            sent = committed.get(frame["data"]["incidentId"])
                            if sent is not None:
                                latencies.append(now - sent)

                reader = asyncio.ensure_future(receive())
                meter = CpuMeter(server.pid)
                insert = sql.SQL("INSERT INTO {} (body) VALUES (%s)").format(sql.Identifier(table))
                start = time.monotonic()
                for n in range(rows):
                    incident_id = f"inc-{n}"
                    body = {
                        "event": "incident", "gameId": "g-1",
                        "data": {"gameId": "g-1", "incidentId": incident_id, "type": "goal",
                                 "occurredAt": OCCURRED},
                    }  # fmt: skip
                    await conn.execute(insert, (Jsonb(body),))
                    committed[incident_id] = time.time()
                    await conn.commit()
                    delay = start + (n + 1) / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(reader, 15)
                cpu_s, _stat = meter.read()
    finally:
        server.stop()
        await _drop(table)
    ordered = sorted(latencies)

    def pct(q: float) -> float | None:
        if not ordered:
            return None
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return _row(
        rate=rate, rows=rows, delivered=len(latencies), complete=len(latencies) == rows,
        p50_ms=statistics.median(ordered) * 1000 if ordered else None,
        p99_ms=pct(0.99), max_ms=ordered[-1] * 1000 if ordered else None,
        server_cpu_us_per_row=cpu_s * 1e6 / rows if rows else None,
    )  # fmt: skip
