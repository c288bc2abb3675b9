"""Helpers of the outbox and publisher tests: publish bodies, a node test double that dedups on a
MemoryBroker, and rows of a private outbox table on the real PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from igratech_ws.brokers.base import BrokerError, PublishResult
from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.core.publishing import ValidatedPublication

TS = "2026-11-23T19:45:00Z"


def incident(game: str, n: int, **extra: Any) -> dict[str, Any]:
    """A valid publish body: incident number `n` of `game`."""
    data = {"gameId": game, "incidentId": f"i-{n}", "type": "goal", "occurredAt": TS, "minute": 1}
    return {"event": "incident", "gameId": game, "data": data, **extra}


class DedupNode:
    """A node test double: D2's `publish` straight onto a MemoryBroker (which keeps the
    idempotency window), with a switch that makes the broker fail, and a count of calls."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.keys: set[tuple[str, str]] = set()
        self.broker_down = False
        self.calls = 0

    async def publish(
        self, publication: ValidatedPublication, *, idempotency_key: str | None = None
    ) -> PublishResult:
        self.calls += 1
        if self.broker_down:
            raise BrokerError("broker down (test)")
        if idempotency_key is not None:
            self.keys.add((publication.channel, idempotency_key))
        return await self.broker.publish(
            publication.channel,
            publication.event,
            publication.data_json,
            idempotency_key=idempotency_key,
        )

    async def publish_many(
        self, items: Sequence[tuple[ValidatedPublication, str | None]]
    ) -> list[PublishResult]:
        """`publish` of each item, as one call (the HTTP API's batch route)."""
        self.calls += 1
        if self.broker_down:
            raise BrokerError("broker down (test)")
        for publication, key in items:
            if key is not None:
                self.keys.add((publication.channel, key))
        return await self.broker.publish_many(
            [(p.channel, p.event, p.data_json, key) for p, key in items]
        )


async def insert(dsn: str, table: str, *bodies: Any, commit: bool = True) -> list[int]:
    """Insert `bodies` (JSON values, or raw JSON text for str) in one transaction; roll it back
    unless `commit`. Returns the ids taken."""
    ids = []
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        for body in bodies:
            text = body if isinstance(body, str) else psycopg.types.json.Jsonb(body)
            cursor = await conn.execute(
                sql.SQL("INSERT INTO {} (body) VALUES (%s::jsonb) RETURNING id").format(
                    sql.Identifier(table)
                ),
                (text,),
            )
            row = await cursor.fetchone()
            assert row is not None
            ids.append(row[0])
        if commit:
            await conn.commit()
        else:
            await conn.rollback()
    return ids


async def count(dsn: str, table: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cursor = await conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
        )
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])
