"""The outbox consumer against the real PostgreSQL, before a node test double (D2's publish).

Every wait is bounded; nothing asserts speed (the NOTIFY test only tells a wake-up from a poll
that is configured 60 s away).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import sql

from igratech_ws.outbox import Outbox, OutboxCollector, derived_key, validate_table
from tests.support.outbox import DedupNode, count, incident, insert

WAIT_S = 20.0


async def until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                if condition():
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"not within {WAIT_S} s: {what}")


async def drained(dsn: str, table: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while True:
            try:
                if await count(dsn, table) == 0:
                    return
            except psycopg.errors.UndefinedTable:
                pass  # not created yet
            await asyncio.sleep(0.05)


async def history(node: DedupNode, channel: str) -> list[str]:
    page = await node.broker.history(channel, 0, 10_000)
    return [json.loads(p.data)["incidentId"] for p in page.publications]


async def test_committed_rows_are_published_once_in_id_order_and_rolled_back_never(
    postgres_dsn: str, table: str, node: DedupNode
) -> None:
    outbox = Outbox(node, postgres_dsn, table, batch_rows=7)
    await outbox.start()
    try:
        await until(lambda: outbox.stats.active, "the outbox takes its lease")
        expected: dict[str, list[str]] = {"g-1": [], "g-2": []}
        for n in range(40):
            game = f"g-{n % 2 + 1}"
            committed = n % 5 != 3
            await insert(postgres_dsn, table, incident(game, n), commit=committed)
            if committed:
                expected[game].append(f"i-{n}")
        await drained(postgres_dsn, table)
        await until(lambda: outbox.stats.rows_published == 32, "every committed row is published")
        for game, ids in expected.items():
            assert await history(node, f"game:{game}") == ids
        assert outbox.stats.duplicates == 0
    finally:
        await outbox.close()


async def test_invalid_rows_go_to_the_dead_letter_table_and_never_block(
    postgres_dsn: str, table: str, node: DedupNode
) -> None:
    outbox = Outbox(node, postgres_dsn, table, max_body_bytes=2000)
    await outbox.start()
    try:
        await until(lambda: outbox.stats.active, "lease")
        bad = [
            {"event": "jackpot", "gameId": "g-1", "data": {}},
            incident("g-1", 99, channel="x"),
            {**incident("g-1", 98), "data": {"gameId": "g-1"}},
            "[1, 2, 3]",
            '"just a string"',
            incident("g-1", 97, idempotencyKey="bad key with spaces"),
            {
                **incident("g-1", 96),
                "data": {**incident("g-1", 96)["data"], "description": "x" * 3000},
            },
        ]
        ids = await insert(postgres_dsn, table, incident("g-1", 1), *bad, incident("g-1", 2))
        await drained(postgres_dsn, table)
        assert await history(node, "game:g-1") == ["i-1", "i-2"]
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
            cursor = await conn.execute(
                sql.SQL("SELECT id, error FROM {} ORDER BY id").format(
                    sql.Identifier(table + "_dead")
                )
            )
            dead = await cursor.fetchall()
        assert [row[0] for row in dead] == ids[1:-1]
        errors = [row[1] for row in dead]
        assert errors[0].startswith("unknown_event")
        assert "channel" in errors[1]
        assert "incidentId" in errors[2]
        assert all(error for error in errors)
        assert "larger than 2000 bytes" in errors[-1]
        assert outbox.stats.dead_letters == len(bad)
    finally:
        await outbox.close()


async def test_a_row_key_or_the_body_key_makes_a_repeat_a_duplicate(
    postgres_dsn: str, table: str, node: DedupNode
) -> None:
    outbox = Outbox(node, postgres_dsn, table)
    await outbox.start()
    try:
        await until(lambda: outbox.stats.active, "lease")
        await insert(
            postgres_dsn,
            table,
            incident("g-1", 1, idempotencyKey="wallet-tx-1"),
            incident("g-1", 2, idempotencyKey="wallet-tx-1"),
            incident("g-1", 3),
        )
        await drained(postgres_dsn, table)
        assert await history(node, "game:g-1") == ["i-1", "i-3"]
        assert outbox.stats.duplicates == 1
        assert ("game:g-1", "wallet-tx-1") in node.keys
        # The other row went out under a key derived from the table and its id.
        assert any(key.startswith("outbox.") for _, key in node.keys)
    finally:
        await outbox.close()


async def test_one_consumer_at_a_time_and_a_takeover_loses_and_doubles_nothing(
    postgres_dsn: str, table: str, node: DedupNode
) -> None:
    first = Outbox(node, postgres_dsn, table, batch_rows=5, lease_retry=0.05)
    second = Outbox(node, postgres_dsn, table, batch_rows=5, lease_retry=0.05)
    await first.start()
    await until(lambda: first.stats.active, "the first takes the lease")
    await second.start()
    try:
        await asyncio.sleep(0.3)
        assert not second.stats.active, "two consumers at once"
        # Cut the first consumer off after its 13th publish: rows 10-12 of its third batch (ids
        # 10-14) are published, not deleted, and its lease goes with its connection.
        publish = node.publish
        cut = asyncio.Event()

        async def slow_publish(*args: object, **kwargs: object) -> object:
            await asyncio.sleep(0.005)
            result = await publish(*args, **kwargs)  # type: ignore[arg-type]
            if node.calls == 13:
                cut.set()
            return result

        node.publish = slow_publish  # type: ignore[method-assign]
        expected = [f"i-{n}" for n in range(60)]
        await insert(postgres_dsn, table, *(incident("g-1", n) for n in range(60)))
        async with asyncio.timeout(WAIT_S):
            await cut.wait()
        await first.close()
        await until(lambda: second.stats.active, "the second takes over")
        await drained(postgres_dsn, table)
        assert await history(node, "game:g-1") == expected
        # The second republished what the first had published but not deleted: as duplicates.
        assert second.stats.duplicates >= 1
    finally:
        await first.close()
        await second.close()


async def test_broker_failures_keep_the_rows_in_order(
    postgres_dsn: str, table: str, node: DedupNode
) -> None:
    node.broker_down = True
    outbox = Outbox(node, postgres_dsn, table)
    await outbox.start()
    try:
        await until(lambda: outbox.stats.active, "lease")
        await insert(postgres_dsn, table, *(incident("g-1", n) for n in range(5)))
        await until(lambda: outbox.stats.errors >= 2, "the broker refuses")
        assert await count(postgres_dsn, table) == 5
        node.broker_down = False
        await drained(postgres_dsn, table)
        assert await history(node, "game:g-1") == [f"i-{n}" for n in range(5)]
    finally:
        await outbox.close()


async def test_notify_wakes_the_consumer_without_waiting_for_the_poll(
    postgres_dsn: str, table: str, node: DedupNode
) -> None:
    outbox = Outbox(node, postgres_dsn, table, poll_interval=60.0)
    await outbox.start()
    try:
        await until(lambda: outbox.stats.active, "lease")
        await asyncio.sleep(0.2)  # let it reach the wait
        await insert(postgres_dsn, table, incident("g-1", 1))
        await drained(postgres_dsn, table)  # within WAIT_S, far below the 60 s poll
        assert await history(node, "game:g-1") == ["i-1"]
    finally:
        await outbox.close()


async def test_metrics(postgres_dsn: str, table: str, node: DedupNode) -> None:
    outbox = Outbox(node, postgres_dsn, table)
    await outbox.start()
    try:
        await until(lambda: outbox.stats.active, "lease")
        await insert(postgres_dsn, table, incident("g-1", 1), {"event": "nope"})
        await drained(postgres_dsn, table)
        families = {m.name: m for m in OutboxCollector(outbox, "n-1").collect()}
        assert families["igratech_ws_outbox_active"].samples[0].value == 1
        assert families["igratech_ws_outbox_rows_published"].samples[0].value == 1
        assert families["igratech_ws_outbox_dead_letters"].samples[0].value == 1
        assert families["igratech_ws_outbox_rows_published"].samples[0].labels == {
            "node": "n-1",
            "table": table,
        }
    finally:
        await outbox.close()


async def test_an_unreachable_database_is_retried_not_fatal(node: DedupNode) -> None:
    outbox = Outbox(node, "postgresql://postgres@127.0.0.1:1/test?connect_timeout=1", "t_x")
    await outbox.start()
    try:
        await until(lambda: outbox.stats.errors >= 2, "it keeps trying")
        assert not outbox.stats.active
    finally:
        await outbox.close()


@pytest.mark.parametrize(
    "name", ["", "Outbox", "1abc", "a-b", "a;drop table x", "a.b.c", "x" * 59, 'a"b']
)
def test_table_names_are_plain_identifiers(name: str) -> None:
    assert validate_table(name) is not None
    with pytest.raises(ValueError, match="outbox_table"):
        Outbox(DedupNode.__new__(DedupNode), "postgresql://", name)


@pytest.mark.parametrize("name", ["igratech_ws_outbox", "app.outbox_1", "_x"])
def test_plain_and_schema_qualified_names_are_accepted(name: str) -> None:
    assert validate_table(name) is None


def test_the_derived_key_is_stable_and_fits_the_key_format() -> None:
    created = datetime(2026, 11, 23, 19, 45, 0, 123456, tzinfo=UTC)
    key = derived_key("app.outbox_1", 42, created)
    assert key == derived_key("app.outbox_1", 42, created)
    assert key != derived_key("app.outbox_1", 42, created.replace(microsecond=123457))
    assert key != derived_key("app.outbox_2", 42, created)
    import re

    from igratech_ws.core.messages import IdempotencyKey

    meta = IdempotencyKey.__metadata__[0]
    assert re.search(meta.pattern, key) and len(key) <= meta.max_length
    assert len(derived_key("s" * 63 + "." + "t" * 57, 2**63 - 1, created)) <= meta.max_length


def test_the_ddl_in_the_docs_is_the_gateway_s() -> None:
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "publishing.md").read_text()
    block = docs.split("apply yourself instead:\n\n```sql\n", 1)[1].split("```", 1)[0]
    ours = [s.as_string(None) + ";" for s in Outbox(DedupNode.__new__(DedupNode), "x").ddl()]
    assert block.strip().splitlines() == ours


@pytest.mark.parametrize(
    "name",
    ["igratech_ws_outbox", "app.outbox_1", "_x", "", "Outbox", "1abc", "a-b", "a.b.c", "x" * 59],
)
def test_the_setting_and_the_outbox_accept_the_same_table_names(name: str) -> None:
    from igratech_ws.config import Config, ConfigError

    try:
        Config(outbox_table=name)
        setting_ok = True
    except ConfigError:
        setting_ok = False
    assert setting_ok == (validate_table(name) is None)
