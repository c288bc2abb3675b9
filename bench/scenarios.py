"""The benchmark scenarios. Each runs one server at a time, pinned to the server CPU, with the load
client pinned to the other, and returns rows of figures (plain dicts, JSON-ready). The exception is
``workers`` (igratech-ws ``--workers N`` on a Redis broker): nothing is pinned there, since the
workers must be free to use both cores.

Every wait is bounded: a server that cannot finish a burst within its time limit is measured on
what it delivered by then, and its row says ``complete: false``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import secrets
import socket
import sys
import time
from array import array
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.pool import PER_WORKER_MAX, LoadPool, WorkerProc
from bench.servers import (
    JWT_SECRET,
    LIVE_GROUPS,
    OURS,
    ROOT,
    SOKETI,
    CpuMeter,
    Kind,
    Ports,
    Publisher,
    Server,
    TreeCpu,
    find_redis_pid,
    process_tree,
    publisher_for,
    redis_clean,
    rss_kb,
    socket_inodes,
    ws_url,
)

Row = dict[str, Any]


@dataclass
class Context:
    """What every scenario needs: which servers, which CPUs, where to log, and the time left."""

    kinds: list[Kind]
    server_cpu: int | None
    client_cpu: int | None
    log_dir: Path
    deadline: float
    quick: bool = False
    ports: Ports = field(default_factory=Ports)
    notes: list[str] = field(default_factory=list)
    progress: Callable[[str], None] = print

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


@contextlib.asynccontextmanager
async def running(
    ctx: Context, kind: Kind, n_clients: int
) -> AsyncIterator[tuple[Server, LoadPool, Publisher]]:
    """A fresh server, a load pool sized for `n_clients`, and an open publisher; all torn down."""
    port = ctx.ports.take()
    api_port = ctx.ports.take()
    ctx.ports.take()  # soketi's cluster port is api_port + 1
    server = Server(kind, port, api_port, ctx.server_cpu, ctx.log_dir)
    pool: LoadPool | None = None
    publisher: Publisher | None = None
    try:
        await server.start()
        workers = max(1, math.ceil(n_clients / PER_WORKER_MAX))
        pool = await LoadPool.start(workers, ctx.client_cpu)
        publisher = publisher_for(server)
        await publisher.open()
        yield server, pool, publisher
    finally:
        if publisher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publisher.close(), 5)
        server.stop()
        if pool is not None:
            pool.stop()


def _row(scenario: str, kind: Kind, **values: Any) -> Row:
    return {"scenario": scenario, "server": kind.name, **values}


async def _connect(
    ctx: Context, server: Server, pool: LoadPool, n: int, games: list[str], **kw: Any
) -> dict[str, Any]:
    answer = await pool.connect(ws_url(server), server.kind.proto, n, games, **kw)
    if answer["ready"] < n:
        ctx.progress(
            f"  {server.kind.name}: only {answer['ready']}/{n} subscribed "
            f"(failures {answer['fail_reasons']})"
        )
    return answer


async def _burst_once(
    server: Server,
    pool: LoadPool,
    publisher: Publisher,
    items: list[tuple[str, int]],
    per_client: int,
    limit: float,
    check: bool = False,
) -> Row:
    armed, client_cpu0 = await pool.arm(per_client, check=check)
    meter = CpuMeter(server.pid)
    t0 = time.monotonic()
    await publisher.publish_many(items)
    t_published = time.monotonic()
    waited = await pool.wait(limit)
    cpu_s, cpu_stat_s = meter.read()
    t_end = waited["t_done"] if waited["t_done"] is not None else waited["t_last_rx"]
    elapsed = max(1e-6, t_end - t0)
    delivered = waited["received"]
    expected = armed * per_client
    return {
        "delivered": delivered,
        "expected": expected,
        "complete": delivered == expected and waited["complete"] == armed,
        "elapsed_s": elapsed,
        "publish_s": t_published - t0,
        "msgs_per_s": delivered / elapsed,
        "cpu_s": cpu_s,
        "cpu_stat_s": cpu_stat_s,
        "us_per_msg": (cpu_s * 1e6 / delivered) if delivered else None,
        "us_per_msg_stat": (cpu_stat_s * 1e6 / delivered) if delivered else None,
        "client_cpu_frac": (waited["cpu"] - client_cpu0) / elapsed,
        "min_per_client": waited["min_n"],
        "max_per_client": waited["max_n"],
        "order_errors": waited["errors"],
        "closed_by_server": waited["closed_by_server"],
    }


def _median_row(rounds: list[Row]) -> Row:
    """The round with the median CPU per message, plus every round's figures for the record."""
    ranked = sorted(rounds, key=lambda r: r["us_per_msg"] if r["us_per_msg"] is not None else 1e18)
    chosen = dict(ranked[len(ranked) // 2])
    chosen["rounds"] = len(rounds)
    chosen["rounds_msgs_per_s"] = [r["msgs_per_s"] for r in rounds]
    chosen["rounds_us_per_msg"] = [r["us_per_msg"] for r in rounds]
    return chosen


# --- 1. burst fan-out ----------------------------------------------------------------------------


async def burst(
    ctx: Context,
    kind: Kind,
    clients: int,
    events: int = 200,
    rounds: int = 1,
    limit: float = 25.0,
) -> Row:
    """`clients` follow one game; `events` incidents are published at once; count deliveries."""
    async with running(ctx, kind, clients) as (server, pool, publisher):
        conn = await _connect(ctx, server, pool, clients, ["g-1"], limit=90)
        results = []
        for r in range(rounds):
            items = [("g-1", r * events + i + 1) for i in range(events)]
            results.append(await _burst_once(server, pool, publisher, items, events, limit))
            if not results[-1]["complete"]:
                break
            await asyncio.sleep(0.2)
        row = _median_row(results)
        return _row("burst", kind, clients=clients, subscribed=conn["ready"], events=events, **row)


# --- 2. paced latency ----------------------------------------------------------------------------


def _percentiles(files: list[Path]) -> dict[str, float | int | None]:
    values = array("q")
    for path in files:
        with open(path, "rb") as handle:
            values.frombytes(handle.read())
        path.unlink(missing_ok=True)
    if not values:
        return {"samples": 0, "p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

    return {
        "samples": len(ordered),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "max_ms": ordered[-1] / 1e6,
    }


async def paced(
    ctx: Context, kind: Kind, clients: int, rate: float, duration: float, drain: float = 10.0
) -> Row:
    """`rate` incidents/s for `duration` s to `clients` followers; publish-to-receive latency."""
    count = max(1, int(rate * duration))
    async with running(ctx, kind, clients) as (server, pool, publisher):
        conn = await _connect(ctx, server, pool, clients, ["g-1"], limit=90)
        sample_every = max(1, clients // 1000)
        armed, client_cpu0 = await pool.arm(count, sample_every=sample_every)
        meter = CpuMeter(server.pid)
        pending: set[asyncio.Future[None]] = set()
        errors = 0

        def finished(task: asyncio.Future[None]) -> None:
            nonlocal errors
            pending.discard(task)
            if not task.cancelled() and task.exception() is not None:
                errors += 1

        t0 = time.monotonic()
        for i in range(count):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(publisher.publish_one("g-1", i + 1))
            pending.add(task)
            task.add_done_callback(finished)
            if len(pending) > 256:  # a server that cannot keep up; don't pile up requests
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            _done, late = await asyncio.wait(set(pending), timeout=drain)
            # Requests the server never answered: cancel them and count them as failed.
            for leftover in late:
                leftover.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            errors += len(late)
        t_published = time.monotonic()
        lat_dir = ctx.log_dir
        waited = await pool.wait(drain, lat_dir=lat_dir)
        cpu_s, cpu_stat_s = meter.read()
        wall = time.monotonic() - t0
        delivered = waited["received"]
        row = _row(
            "paced",
            kind,
            clients=clients,
            subscribed=conn["ready"],
            rate=rate,
            events=count,
            duration_s=duration,
            delivered=delivered,
            expected=armed * count,
            complete=delivered == armed * count,
            publish_errors=errors,
            publish_s=t_published - t0,
            cpu_s=cpu_s,
            cpu_stat_s=cpu_stat_s,
            server_cpu_frac=cpu_s / wall,
            us_per_msg=(cpu_s * 1e6 / delivered) if delivered else None,
            client_cpu_frac=(waited["cpu"] - client_cpu0) / wall,
            **_percentiles(waited["lat_files"]),
        )
        return row


# --- 3. idle memory and most connections ---------------------------------------------------------


async def idle_memory(ctx: Context, kind: Kind, clients: int, games: int = 100) -> Row:
    """RSS growth per idle subscribed connection at `clients` connections."""
    async with running(ctx, kind, clients) as (server, pool, _publisher):
        await asyncio.sleep(0.5)
        rss0 = rss_kb(server.pid)
        conn = await _connect(
            ctx, server, pool, clients, [f"g-{i}" for i in range(games)], limit=120
        )
        await asyncio.sleep(2.0)
        rss1 = rss_kb(server.pid)
        held = conn["ready"]
        return _row(
            "idle",
            kind,
            clients=clients,
            subscribed=held,
            rss_before_kb=rss0,
            rss_after_kb=rss1,
            kb_per_conn=((rss1 - rss0) / held) if held else None,
        )


async def most_connections(ctx: Context, kind: Kind, target: int, step: int = 2000) -> Row:
    """Open connections in steps up to `target` (bounded by the open-file limit); what is held."""
    async with running(ctx, kind, target) as (server, pool, _publisher):
        await asyncio.sleep(0.5)
        rss0 = rss_kb(server.pid)
        failures: dict[str, int] = {}
        opened = 0
        while opened < target and ctx.time_left() > 30:
            n = min(step, target - opened)
            answer = await pool.connect(
                ws_url(server),
                kind.proto,
                n,
                [f"g-{i}" for i in range(100)],
                limit=60,
                first_index=opened,
            )
            opened += n
            for k, v in answer["fail_reasons"].items():
                failures[k] = failures.get(k, 0) + v
            if answer["failed"]:
                break
        await asyncio.sleep(1.0)
        # Each worker answers with its own running total of subscribed connections.
        held, _cpu = await pool.arm(0)
        rss1 = rss_kb(server.pid)
        return _row(
            "max_conns",
            kind,
            attempted=opened,
            held=held,
            failures=failures,
            rss_after_kb=rss1,
            kb_per_conn=((rss1 - rss0) / held) if held else None,
        )


# --- 4. connect storm ----------------------------------------------------------------------------


async def storm(ctx: Context, kind: Kind, clients: int, concurrency: int = 500) -> Row:
    """`clients` connect at once (with a JWT each for igratech-ws); handshakes per second."""
    async with running(ctx, kind, clients) as (server, pool, _publisher):
        meter = CpuMeter(server.pid)
        answer = await _connect(
            ctx,
            server,
            pool,
            clients,
            ["g-1"],
            limit=60,
            concurrency=concurrency,
            jwt_secret=JWT_SECRET if kind is OURS else None,
        )
        cpu_s, cpu_stat_s = meter.read()
        elapsed = max(1e-6, answer["t_handshakes_done"] - answer["t_start"])
        ready_elapsed = max(1e-6, answer["t_ready"] - answer["t_start"])
        done = answer["connected"]
        return _row(
            "storm",
            kind,
            clients=clients,
            jwt=kind is OURS,
            connected=done,
            subscribed=answer["ready"],
            failed=answer["failed"],
            elapsed_s=elapsed,
            handshakes_per_s=done / elapsed,
            subscribed_per_s=answer["ready"] / ready_elapsed,
            cpu_s=cpu_s,
            cpu_stat_s=cpu_stat_s,
            us_per_handshake=(cpu_s * 1e6 / done) if done else None,
            per_core_capacity=(done / cpu_s) if cpu_s else None,
        )


# --- 5. publish API throughput -------------------------------------------------------------------


async def publish_api(
    ctx: Context,
    kind: Kind,
    batch: int,
    duration: float = 4.0,
    concurrency: int = 32,
) -> Row:
    """Publish requests (`batch` events each; 1 = the single route) as fast as the client can."""
    async with running(ctx, kind, 1) as (server, _pool, publisher):
        games = [f"g-{i}" for i in range(100)]
        published = 0
        failures = 0
        seq = 0
        stop_at = time.monotonic() + duration

        async def client() -> None:
            nonlocal published, failures, seq
            while time.monotonic() < stop_at:
                seq += 1
                base = seq
                try:
                    if batch == 1:
                        await publisher.publish_one(games[base % 100], base)
                    else:
                        items = [(games[(base + i) % 100], base * batch + i) for i in range(batch)]
                        await publisher.publish_many(items)
                    published += batch
                except Exception:
                    failures += 1
                    await asyncio.sleep(0.01)

        meter = CpuMeter(server.pid)
        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
        cpu_s, cpu_stat_s = meter.read()
        return _row(
            "publish_api",
            kind,
            batch=batch,
            published=published,
            failures=failures,
            elapsed_s=elapsed,
            events_per_s=published / elapsed,
            cpu_s=cpu_s,
            cpu_stat_s=cpu_stat_s,
            server_cpu_frac=cpu_s / elapsed,
            us_per_event=(cpu_s * 1e6 / published) if published else None,
        )


# --- 6. many games -------------------------------------------------------------------------------


async def many_games(
    ctx: Context, kind: Kind, games: int, per_game: int, events: int, limit: float = 25.0
) -> Row:
    """`games` games with `per_game` followers each; `events` incidents per game, interleaved."""
    clients = games * per_game
    names = [f"g-{i}" for i in range(games)]
    async with running(ctx, kind, clients) as (server, pool, publisher):
        conn = await _connect(ctx, server, pool, clients, names, limit=90)
        items = [(names[g], e + 1) for e in range(events) for g in range(games)]
        row = await _burst_once(server, pool, publisher, items, events, limit)
        return _row(
            "many_games",
            kind,
            games=games,
            per_game=per_game,
            clients=clients,
            subscribed=conn["ready"],
            events=events,
            **row,
        )


# --- 7. workers: igratech-ws --workers N on a shared Redis broker --------------------------------

REDIS_HOST_PORT = ("127.0.0.1", 6379)
REDIS_DB_URL = "redis://127.0.0.1:6379/12"
# Handshakes in flight across the load processes. Each subscription reads the channel's position
# from Redis through a 32-connection pool that gives up after 3 s; at 200 in flight the storm of
# settings on one busy worker overruns it ("settings failed: broker unavailable") and clients are
# left unsubscribed. 50 keeps every subscription and is not what these runs measure.
WORKERS_CONNECT_CONCURRENCY = 50


def sourced_loadclient(argv: list[str]) -> int:
    """Entry of a load worker whose connections leave from the loopback address ``argv[0]``
    (e.g. 127.0.0.3); the rest of `argv` goes to `bench.loadclient.main`.

    Why: every connection from 127.0.0.1 to one server port needs its own ephemeral source port,
    and the range (``net.ipv4.ip_local_port_range``, 32768-60999 here) holds ~28,000: fewer than the
    30,000 connections of the idle run. A distinct source address per load process lifts that
    without touching the machine's settings. The load client's ``picows.ws_connect`` is wrapped to
    pass a `socket_factory` that binds the source address (the port is left to connect time)."""
    import picows

    from bench import loadclient

    source = argv[0]

    def bound_socket(_url: Any) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with contextlib.suppress(OSError, AttributeError):
            # IP_BIND_ADDRESS_NO_PORT: pick the port at connect(), by the full 4-tuple.
            sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24), 1)
        sock.bind((source, 0))
        return sock

    setattr(  # noqa: B010 - loadclient looks the function up on the module at each call
        picows, "ws_connect", functools.partial(picows.ws_connect, socket_factory=bound_socket)
    )
    return loadclient.main(argv[1:])


_SOURCED_ENTRY = (
    "import sys; from bench.scenarios import sourced_loadclient; "
    "sys.exit(sourced_loadclient(sys.argv[1:]))"
)


async def _sourced_pool(sources: list[str]) -> LoadPool:
    """One unpinned load worker per source address (each its own process group)."""
    workers: list[WorkerProc] = []
    try:
        for source in sources:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _SOURCED_ENTRY,
                source,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=str(ROOT),
                start_new_session=True,
                limit=1 << 22,
            )
            LIVE_GROUPS.add(proc.pid)
            worker = WorkerProc(proc)
            workers.append(worker)
            hello = await worker._read(30)
            if "hello" not in hello:
                raise RuntimeError(f"load worker did not start: {hello}")
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return LoadPool(workers)


@contextlib.asynccontextmanager
async def running_workers(
    ctx: Context, workers: int, pool_factory: Callable[[], Any]
) -> AsyncIterator[tuple[Server, LoadPool, Publisher, int | None]]:
    """igratech-ws ``--workers N`` (not pinned) on Redis db 12 under a fresh random key prefix,
    a load pool from `pool_factory`, an open publisher and the Redis server's pid (None if not
    found); all torn down, and the prefix's keys deleted, on the way out."""
    with socket.socket() as probe:
        probe.settimeout(1.0)
        if probe.connect_ex(REDIS_HOST_PORT) != 0:
            raise RuntimeError("Redis is not reachable at 127.0.0.1:6379")
    prefix = f"igws-bench-{secrets.token_hex(4)}:"
    port = ctx.ports.take()
    api_port = ctx.ports.take()
    server = Server(
        OURS,
        port,
        api_port,
        None,
        ctx.log_dir,
        workers=workers,
        broker=f"{REDIS_DB_URL}?prefix={prefix}",
        # The load client never sends a message after subscribing; building 30,000 connections
        # and measuring must not race the default 60 s idle timeout.
        extra_env={"IGRATECH_WS_IDLE_TIMEOUT": "600"},
    )
    pool: LoadPool | None = None
    publisher: Publisher | None = None
    try:
        await server.start()
        pool = await pool_factory()
        publisher = publisher_for(server)
        await publisher.open()
        yield server, pool, publisher, find_redis_pid(REDIS_HOST_PORT[1])
    finally:
        if publisher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publisher.close(), 5)
        server.stop()
        if pool is not None:
            pool.stop()
        try:
            await asyncio.wait_for(asyncio.to_thread(redis_clean, REDIS_DB_URL, prefix), 30)
        except Exception as exc:
            ctx.notes.append(f"could not delete the Redis keys {prefix}*: {exc}"[:300])


def _socket_counts(pids: list[int]) -> list[int]:
    return [len(socket_inodes(pid)) for pid in pids]


def _open_files_limit(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return None


async def workers_burst(
    ctx: Context,
    workers: int,
    clients: int = 5000,
    events: int = 200,
    rounds: int = 3,
    load_procs: int = 2,
    limit: float = 25.0,
) -> Row:
    """Burst fan-out against ``--workers N`` on Redis: `clients` follow one game, `events`
    incidents are published at once, `rounds` times (the median round by server CPU per message
    is the row). Server CPU is the sum over the server's process tree (the parent, its workers
    and multiprocessing's resource tracker); the Redis server's and the load client's CPU are
    measured over the same window and reported separately. Nothing is pinned: `load_procs` load
    processes and the workers share both cores, as the scheduler decides."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    async def make_pool() -> LoadPool:
        return await LoadPool.start(load_procs, None)

    async with running_workers(ctx, workers, make_pool) as (server, pool, publisher, redis_pid):
        pids = server.worker_pids()
        sockets0 = _socket_counts(pids)
        # In steps of 1,000, so that a storm of subscriptions never piles up on one worker.
        ready = 0
        for first in range(0, clients, 1000):
            answer = await pool.connect(
                ws_url(server),
                OURS.proto,
                min(1000, clients - first),
                ["g-1"],
                limit=15,
                first_index=first,
                concurrency=WORKERS_CONNECT_CONCURRENCY,
            )
            ready = answer["ready"]  # each load process answers with its running total
        if ready < clients:
            ctx.progress(f"  --workers {workers}: only {ready}/{clients} subscribed")
        conn = {"ready": ready}
        per_worker = [b - a for a, b in zip(sockets0, _socket_counts(pids), strict=True)]
        results = []
        for r in range(rounds):
            items = [("g-1", r * events + i + 1) for i in range(events)]
            tree = process_tree(server.pid)
            server_meter = TreeCpu(tree)
            worker_meter = TreeCpu(pids)
            redis_meter = TreeCpu([redis_pid] if redis_pid else [])
            self_cpu0 = time.process_time()
            row = await _burst_once(server, pool, publisher, items, events, limit)
            server_cpu = sum(server_meter.read())
            redis_cpu = sum(redis_meter.read()) if redis_pid else None
            publisher_cpu = time.process_time() - self_cpu0
            delivered = row["delivered"]
            elapsed = row["elapsed_s"]
            client_cpu = row["client_cpu_frac"] * elapsed
            busy = server_cpu + (redis_cpu or 0.0) + client_cpu + publisher_cpu
            row.update(
                cpu_s=server_cpu,
                cpu_stat_s=None,  # the parent's /proc stat alone would mislead: see cpu_s
                us_per_msg=(server_cpu * 1e6 / delivered) if delivered else None,
                us_per_msg_stat=None,
                worker_cpu_s=worker_meter.read(),
                redis_cpu_s=redis_cpu,
                redis_us_per_msg=(redis_cpu * 1e6 / delivered)
                if delivered and redis_cpu is not None
                else None,
                client_cpu_s=client_cpu,
                # Per load process: each is one thread, so >= 85% of a core is client-bound.
                client_cpu_frac=row["client_cpu_frac"] / load_procs,
                publisher_cpu_s=publisher_cpu,
                machine_busy_frac=busy / (elapsed * (cores or 1)),
            )
            results.append(row)
            if not row["complete"]:
                break
            await asyncio.sleep(0.2)
        chosen = _median_row(results)
        return _row(
            "workers_burst",
            OURS,
            workers=workers,
            clients=clients,
            subscribed=conn["ready"],
            events=events,
            load_procs=load_procs,
            cores=cores,
            conns_per_worker=per_worker,
            redis_found=redis_pid is not None,
            **chosen,
        )


async def workers_idle(
    ctx: Context,
    workers: int = 2,
    clients: int = 30_000,
    games: int = 100,
    step: int = 15_000,
) -> Row:
    """Hold `clients` idle subscribed connections against ``--workers N`` on Redis. Load
    processes hold at most `PER_WORKER_MAX` each and leave from distinct loopback addresses
    (127.0.0.2, .3, ...: see `sourced_loadclient`). Memory is the growth of the workers' summed
    RSS over their idle size; per-worker connection counts are the growth of their open sockets."""
    procs = max(1, math.ceil(clients / PER_WORKER_MAX))
    sources = [f"127.0.0.{2 + i}" for i in range(procs)]

    async def make_pool() -> LoadPool:
        return await _sourced_pool(sources)

    async with running_workers(ctx, workers, make_pool) as (server, pool, _publisher, _redis):
        await asyncio.sleep(0.5)
        pids = server.worker_pids()
        rss0 = [rss_kb(pid) for pid in pids]
        sockets0 = _socket_counts(pids)
        names = [f"g-{i}" for i in range(games)]
        failures: dict[str, int] = {}
        opened = 0
        t0 = time.monotonic()
        while opened < clients and ctx.time_left() > 30:
            n = min(step, clients - opened)
            answer = await pool.connect(
                # A connection whose subscription failed is waited for until `limit`: keep it short.
                ws_url(server),
                OURS.proto,
                n,
                names,
                limit=45,
                first_index=opened,
                concurrency=WORKERS_CONNECT_CONCURRENCY,
            )
            opened += n
            for k, v in answer["fail_reasons"].items():
                failures[k] = failures.get(k, 0) + v
            ctx.progress(f"  workers idle: {answer['ready']:,} of {opened:,} subscribed")
            if answer["failed"]:
                break
        connect_s = time.monotonic() - t0
        await asyncio.sleep(2.0)
        held, _cpu = await pool.arm(0)  # each load process: its subscribed connections now
        rss1 = [rss_kb(pid) for pid in pids]
        per_worker = [b - a for a, b in zip(sockets0, _socket_counts(pids), strict=True)]
        grown = sum(rss1) - sum(rss0)
        return _row(
            "workers_idle",
            OURS,
            workers=workers,
            clients=clients,
            attempted=opened,
            held=held,
            failures=failures,
            connect_s=connect_s,
            load_procs=procs,
            conns_per_worker=per_worker,
            rss_before_kb=sum(rss0),
            rss_after_kb=sum(rss1),
            rss_after_per_worker_kb=rss1,
            kb_per_conn=(grown / held) if held else None,
            open_files_limit=[_open_files_limit(pid) for pid in pids],
        )


# --- the smoke run -------------------------------------------------------------------------------


async def smoke(ctx: Context, clients: int = 20, events: int = 10) -> Row:
    """A tiny exact-count run against igratech-ws: every client must get every message in order."""
    async with running(ctx, OURS, clients) as (server, pool, publisher):
        conn = await _connect(ctx, server, pool, clients, ["g-1"], limit=15)
        items = [("g-1", i + 1) for i in range(events)]
        row = await _burst_once(server, pool, publisher, items, events, 10.0, check=True)
        return _row("smoke", OURS, clients=clients, subscribed=conn["ready"], events=events, **row)


__all__ = [
    "SOKETI",
    "Context",
    "burst",
    "idle_memory",
    "many_games",
    "most_connections",
    "paced",
    "publish_api",
    "smoke",
    "storm",
    "workers_burst",
    "workers_idle",
]
