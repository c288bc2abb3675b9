"""Outbox tests: a private table per test on the real PostgreSQL, dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import sql

from igratech_ws.brokers.memory import MemoryBroker
from tests.support.outbox import DedupNode


@pytest.fixture
async def node() -> AsyncIterator[DedupNode]:
    broker = MemoryBroker(node_id="outbox-test")
    await broker.start(lambda _p: None, lambda _c: None)
    yield DedupNode(broker)
    await broker.close()


@pytest.fixture
async def table(postgres_dsn: str) -> AsyncIterator[str]:
    """A fresh table name; the table, its dead-letter table and trigger are dropped afterwards."""
    name = "igws_outbox_" + uuid.uuid4().hex[:12]
    yield name
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        for drop in (name, name + "_dead"):
            await conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(drop))
            )
