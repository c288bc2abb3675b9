"""The transactional outbox: publications committed in PostgreSQL, published exactly once.

A backend that changes a wallet and must tell the user inserts the publish body into the outbox
table *in the same transaction* as the wallet change. If the transaction rolls back, the row never
existed; once it commits, the gateway publishes it, even if the backend crashes right after:

    INSERT INTO igratech_ws_outbox (body) VALUES ('{"event": "balance", "userId": "u-1", ...}');

The body is exactly what ``POST /api/v1/publish`` takes (``idempotencyKey`` included). The
gateway creates the table, a dead-letter table ``<table>_dead`` and a statement-level trigger that
notifies ``<table>`` on insert, when any of them is missing (the DDL is in ``docs/publishing.md``
for teams that manage their schema; PostgreSQL 14 or later).

Guarantees and how they hold:

- **Exactly once.** A row is published with an idempotency key (its own ``idempotencyKey``, else
  one derived from the table, the row id and its ``created_at``), then deleted. A consumer killed
  between the two leaves the row in place; the next consumer publishes it again with the same key
  and the broker answers "duplicate" (within its idempotency window, 300 s by default: a row left
  behind longer than that by a gateway that is down is published twice).
- **Order.** Rows are read in ``id`` order and each channel's rows are published one after the
  other in that order. One consumer is active per table at a time: the one holding a PostgreSQL
  session-level advisory lock keyed by the table (the others retry every `lease_retry` seconds).
  A consumer that dies loses its session and with it the lock, so another node takes over within
  about `lease_retry` seconds. Partitioning rows among several active consumers
  (``FOR UPDATE SKIP LOCKED``) would let a second consumer publish row 11 of a channel while the
  first still publishes row 10; a single active consumer keeps per-channel order without a
  per-channel lock table, and its throughput (the broker's, in batches) is far above what one
  database's wallet transactions produce. ``id`` order is commit order for rows whose
  transactions are serialized (a wallet row lock held until commit, as wallet updates do):
  ``bigserial`` values are taken at insert, so two *concurrent* transactions writing one
  channel may commit in the other order, and the later-committed, smaller id is then published
  after the larger one.
- **Rolled back rows never go out**: only committed rows are visible to the consumer.
- **Invalid rows do not block.** A row that fails validation (the same as the HTTP API's) is moved
  to ``<table>_dead`` with the error, in the transaction that deletes the published rows.
- **Latency.** The trigger's NOTIFY wakes the consumer at once; without it (a lost connection, a
  table without the trigger) it polls every `poll_interval` seconds.

Broker failures keep the rows (from the first failed row of each channel on) for the next pass,
after a backoff. Database failures reconnect with a backoff; a consumer that loses its connection
loses the lease with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from igratech_ws.brokers.base import BrokerError, PublishResult
from igratech_ws.core.codec import ProtocolError
from igratech_ws.core.publishing import ValidatedPublication, parse_publish_body, validate_publish

log = logging.getLogger("igratech_ws.outbox")

#: What `outbox_table` may be: an unquoted SQL identifier, optionally schema-qualified.
TABLE_RE = re.compile(r"^(?:[a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,57}$")
#: Rows read (and published) per pass.
BATCH_ROWS = 500
#: Seconds between two polls when no notification arrives.
POLL_INTERVAL = 1.0
#: Seconds between two attempts to take the lease while another node holds it.
LEASE_RETRY = 0.5
#: Backoff after a database or broker failure, doubling up to the maximum.
BACKOFF_MIN = 0.2
BACKOFF_MAX = 5.0


class OutboxNode(Protocol):
    """What the outbox needs of a node: `Node.publish` (D2)."""

    async def publish(
        self, publication: ValidatedPublication, *, idempotency_key: str | None = None
    ) -> PublishResult:
        """Publish, at most once per key and channel within the window. Raises `BrokerError`."""
        ...


@dataclass
class OutboxStats:
    """Counters for metrics (read at scrape time)."""

    active: bool = False
    rows_published: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    errors: int = 0
    #: Seconds between the oldest row's ``created_at`` and the database's clock at the last pass
    #: (0 when the table was empty).
    lag_seconds: float = 0.0
    passes: int = 0


def validate_table(table: str) -> str | None:
    """A sentence saying what is wrong with `table` as `outbox_table`, or None."""
    if TABLE_RE.fullmatch(table):
        return None
    return (
        "outbox_table must be a lowercase SQL identifier (a-z 0-9 _, not starting with a digit), "
        f"optionally schema-qualified, not {table[:80]!r}"
    )


def derived_key(table: str, row_id: int, created_at: datetime) -> str:
    """The idempotency key of a row without its own: stable across consumers and retries, and
    different for a recreated table's rows (``created_at`` in microseconds). The table is named
    by a short hash, so every key fits the 128 characters of `IdempotencyKey`."""
    micros = int(created_at.timestamp() * 1_000_000)
    tag = hashlib.blake2b(table.encode(), digest_size=6).hexdigest()
    return f"outbox.{tag}.{row_id}.{micros}"


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    key: str
    publication: ValidatedPublication


class Outbox:
    """Consumes one outbox table for a node. `start` once, `close` once.

    `dsn` is a libpq connection string or URI. `table` must pass `validate_table`. Rows larger
    than `max_body_bytes` (as JSON text) are dead letters, like the HTTP API's 413.
    """

    def __init__(
        self,
        node: OutboxNode,
        dsn: str,
        table: str = "igratech_ws_outbox",
        *,
        max_body_bytes: int = 1_048_576,
        batch_rows: int = BATCH_ROWS,
        poll_interval: float = POLL_INTERVAL,
        lease_retry: float = LEASE_RETRY,
    ) -> None:
        problem = validate_table(table)
        if problem is not None:
            raise ValueError(problem)
        self.node = node
        self.dsn = dsn
        self.table = table
        self.max_body_bytes = max_body_bytes
        self.batch_rows = batch_rows
        self.poll_interval = poll_interval
        self.lease_retry = lease_retry
        self.stats = OutboxStats()
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start consuming in the background (connection failures are retried there)."""
        import psycopg  # noqa: F401  (fail at start, not in the task, if the driver is missing)

        self._task = asyncio.ensure_future(self._run_forever())

    async def close(self) -> None:
        """Stop consuming; the lease goes with the connection. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.stats.active = False

    # --- SQL -------------------------------------------------------------------------------

    def _sql(self) -> dict[str, Any]:
        from psycopg import sql

        parts = self.table.split(".")
        dead_parts = [*parts[:-1], parts[-1] + "_dead"]
        return {
            "table": sql.Identifier(*parts),
            "dead": sql.Identifier(*dead_parts),
            "trigger": sql.Identifier(parts[-1] + "_notify"),
            "channel": sql.Identifier(self.table),
            "channel_literal": sql.Literal(self.table),
            "function": sql.Identifier(*parts[:-1], "igratech_ws_outbox_notify"),
        }

    def ddl(self) -> list[Any]:
        """The statements that create what the outbox needs (each idempotent)."""
        from psycopg import sql

        names = self._sql()
        return [
            sql.SQL(statement).format(**names)
            for statement in (
                "CREATE TABLE IF NOT EXISTS {table} ("
                " id bigserial PRIMARY KEY,"
                " body jsonb NOT NULL,"
                " created_at timestamptz NOT NULL DEFAULT now())",
                "CREATE TABLE IF NOT EXISTS {dead} ("
                " id bigint PRIMARY KEY,"
                " body jsonb NOT NULL,"
                " created_at timestamptz NOT NULL,"
                " error text NOT NULL,"
                " failed_at timestamptz NOT NULL DEFAULT now())",
                "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS"
                " $$BEGIN PERFORM pg_notify(TG_ARGV[0], ''); RETURN NULL; END$$",
                "CREATE OR REPLACE TRIGGER {trigger} AFTER INSERT ON {table}"
                " FOR EACH STATEMENT EXECUTE FUNCTION {function}({channel_literal})",
            )
        ]

    async def _ensure_schema(self, conn: Any) -> None:
        """Create the tables and the trigger if any is missing (serialized across nodes)."""
        from psycopg import sql

        present = await conn.execute(
            "SELECT to_regclass(%(t)s) IS NOT NULL, to_regclass(%(d)s) IS NOT NULL,"
            " EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(%(t)s)"
            " AND tgname = %(g)s)",
            {
                "t": self.table,
                "d": self.table + "_dead",
                "g": self.table.split(".")[-1] + "_notify",
            },
        )
        row = await present.fetchone()
        if row is not None and all(row):
            return
        async with conn.transaction():
            # Two nodes starting at once would race on CREATE: one takes this lock, the other
            # waits and then finds everything in place.
            await conn.execute(
                sql.SQL("SELECT pg_advisory_xact_lock(hashtextextended({name}, 1))").format(
                    name=sql.Literal("igratech-ws outbox ddl")
                )
            )
            for statement in self.ddl():
                await conn.execute(statement)
        log.info("outbox tables ready", extra={"table": self.table})

    # --- the consumer ----------------------------------------------------------------------

    async def _run_forever(self) -> None:
        import psycopg

        backoff = BACKOFF_MIN
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
                    await self._ensure_schema(conn)
                    await self._take_lease(conn)
                    backoff = BACKOFF_MIN
                    await self._consume(conn)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                self.stats.errors += 1
                log.warning("outbox: database unavailable", extra={"error": str(exc)[:300]})
            except Exception:
                self.stats.errors += 1
                log.exception("outbox: unexpected error")
            finally:
                self.stats.active = False
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _take_lease(self, conn: Any) -> None:
        """Wait until this node holds the table's advisory lock (held until the session ends)."""
        key = "igratech-ws outbox " + self.table
        while True:
            cursor = await conn.execute(
                "SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)
            )
            row = await cursor.fetchone()
            if row is not None and row[0]:
                self.stats.active = True
                log.info("outbox: consuming", extra={"table": self.table})
                return
            await asyncio.sleep(self.lease_retry)

    async def _consume(self, conn: Any) -> None:
        from psycopg import sql

        names = self._sql()
        await conn.execute(sql.SQL("LISTEN {channel}").format(**names))
        select = sql.SQL(
            "SELECT id, created_at,"
            " CASE WHEN octet_length(body::text) <= %(max)s THEN body::text END,"
            " extract(epoch FROM now() - created_at)"
            " FROM {table} ORDER BY id LIMIT %(limit)s"
        ).format(**names)
        delete = sql.SQL("DELETE FROM {table} WHERE id = ANY(%(ids)s)").format(**names)
        move = sql.SQL(
            "WITH dead AS (INSERT INTO {dead} (id, body, created_at, error)"
            " SELECT t.id, t.body, t.created_at, e.error FROM {table} t"
            " JOIN unnest(%(dead_ids)s::bigint[], %(errors)s::text[]) AS e(id, error) USING (id)"
            " ON CONFLICT (id) DO NOTHING)"
            " DELETE FROM {table} WHERE id = ANY(%(ids)s)"
        ).format(**names)
        backoff = BACKOFF_MIN
        while True:
            cursor = await conn.execute(
                select, {"max": self.max_body_bytes, "limit": self.batch_rows}
            )
            rows = await cursor.fetchall()
            self.stats.passes += 1
            self.stats.lag_seconds = float(rows[0][3]) if rows else 0.0
            done, dead, failed = await self._publish_rows(rows)
            if dead:
                # One statement, so atomic: the dead letters move and the published rows go.
                await conn.execute(
                    move,
                    {
                        "dead_ids": [row_id for row_id, _ in dead],
                        "errors": [error for _, error in dead],
                        "ids": [*done, *(row_id for row_id, _ in dead)],
                    },
                )
                self.stats.dead_letters += len(dead)
            elif done:
                await conn.execute(delete, {"ids": done})
            if failed:
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            backoff = BACKOFF_MIN
            if len(rows) < self.batch_rows:
                # Caught up: sleep until a commit notifies, or poll.
                async for _ in conn.notifies(timeout=self.poll_interval, stop_after=1):
                    pass

    async def _publish_rows(
        self, rows: list[tuple[int, datetime, str | None, Any]]
    ) -> tuple[list[int], list[tuple[int, str]], bool]:
        """Publish `rows` (in id order): ids published, (id, error) of invalid rows, and whether
        the broker failed (the rows from each channel's failed one on stay for the next pass)."""
        dead: list[tuple[int, str]] = []
        chains: dict[str, list[_Row]] = {}
        for row_id, created_at, text, _age in rows:
            if text is None:
                dead.append((row_id, f"body larger than {self.max_body_bytes} bytes"))
                continue
            try:
                request = parse_publish_body(text.encode())
                validated = validate_publish(request)
            except ProtocolError as exc:
                field = f" (field {exc.field})" if exc.field else ""
                dead.append((row_id, f"{exc.code}: {exc.message[:500]}{field}"))
                continue
            key = request.idempotencyKey or derived_key(self.table, row_id, created_at)
            chains.setdefault(validated.channel, []).append(_Row(row_id, key, validated))
        if dead:
            log.warning("outbox: invalid rows moved to the dead-letter table", extra={"rows": dead})
        results = await asyncio.gather(*(self._publish_chain(chain) for chain in chains.values()))
        done = [row_id for ids, _ in results for row_id in ids]
        return done, dead, any(failed for _, failed in results)

    async def _publish_chain(self, chain: list[_Row]) -> tuple[list[int], bool]:
        """Publish one channel's rows in order; stop at the first broker failure."""
        done: list[int] = []
        for row in chain:
            try:
                outcome = await self.node.publish(row.publication, idempotency_key=row.key)
            except BrokerError as exc:
                self.stats.errors += 1
                log.warning("outbox: broker unavailable", extra={"error": str(exc)[:300]})
                return done, True
            done.append(row.id)
            self.stats.rows_published += 1
            if outcome.duplicate:
                self.stats.duplicates += 1
        return done, False


class OutboxCollector(Collector):
    """The outbox's metrics, read from `Outbox.stats` at scrape time (register it in the node's
    metrics registry)."""

    def __init__(self, outbox: Outbox, node_id: str) -> None:
        self.outbox = outbox
        self.node_id = node_id

    def collect(self) -> Iterator[Metric]:
        stats = self.outbox.stats
        figures: list[tuple[type[GaugeMetricFamily | CounterMetricFamily], str, str, float]] = [
            (GaugeMetricFamily, "active", "1 while this node consumes.", stats.active),
            (
                GaugeMetricFamily,
                "lag_seconds",
                "Age of the oldest outbox row at the last pass (0: caught up).",
                stats.lag_seconds,
            ),
            (
                CounterMetricFamily,
                "rows_published",
                "Outbox rows published (duplicates after a takeover included).",
                stats.rows_published,
            ),
            (
                CounterMetricFamily,
                "duplicates",
                "Outbox rows the broker had already published (a takeover).",
                stats.duplicates,
            ),
            (
                CounterMetricFamily,
                "dead_letters",
                "Invalid outbox rows moved to the dead-letter table.",
                stats.dead_letters,
            ),
            (CounterMetricFamily, "errors", "Database or broker failures.", stats.errors),
        ]
        for family, name, doc, value in figures:
            metric = family(f"igratech_ws_outbox_{name}", doc, labels=["node", "table"])
            metric.add_metric([self.node_id, self.outbox.table], float(value))
            yield metric
