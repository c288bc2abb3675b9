"""Entry point: ``python -m bench.run [--smoke | --quick] [--scenarios burst,paced,...]``.

Runs igratech-ws and the peers side by side (one at a time, each pinned to the server CPU, the
load client on the other CPU; ``--scenarios workers`` runs igratech-ws ``--workers 1`` and ``2``
on Redis, unpinned), saves the raw figures to bench/results/latest.json and writes
docs/benchmarks.md with plots under docs/benchmarks/. ``--smoke`` is the tiny exact-count check
the test suite runs: it prints one JSON line and exits 0 only if every client got every message.
Only loopback is ever contacted (servers on 127.0.0.1; the 30,000-connection run's load
processes connect from 127.0.0.2-4); every server and load process is killed on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import attacks, brokers, conflation, handshake_cost, publish, publish_cost, scenarios
from bench.servers import (
    ALL_KINDS,
    KINDS,
    OURS,
    PICOWS,
    RESULTS,
    ROOT,
    Kind,
    kill_leftovers,
    missing_reason,
)

SCENARIOS = (
    "burst",
    "paced",
    "idle",
    "storm",
    "handshake",
    "publish",
    "many",
    "brokers",
    "attacks",
    "conflation",
    "workers",
)
# Run only when named in --scenarios: the default run already fills its ~30-minute budget (27
# minutes here with every peer and the callgrind handshake count), and
# `workers` (igratech-ws --workers 1 vs 2 on Redis, 30,000 idle connections) needs ~2 more.
OPT_IN = ("workers",)
DEFAULT_BUDGET_S = 30 * 60


def _cpus() -> tuple[int | None, int | None]:
    """(server CPU, client CPU): two different CPUs when the machine has them."""
    try:
        available = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, None
    if len(available) < 2:
        return None, None
    return available[0], available[1]


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _guard(
    ctx: scenarios.Context,
    rows: list[dict[str, Any]],
    label: str,
    make: Callable[[], Awaitable[dict[str, Any] | list[dict[str, Any]]]],
    need: float = 20.0,
) -> None:
    """Run one measurement (a row, or several measured together) unless the time budget is
    spent; a failure becomes a note, not a crash."""
    if ctx.time_left() < need:
        ctx.notes.append(f"skipped {label}: the time budget was spent")
        _log(f"skip {label} (budget)")
        return
    _log(f"run  {label}")
    started = time.monotonic()
    try:
        made = await asyncio.wait_for(make(), max(need, ctx.time_left()))
    except Exception as exc:
        ctx.notes.append(f"{label} failed: {type(exc).__name__}: {exc}"[:400])
        _log(f"FAIL {label}: {type(exc).__name__}: {exc}")
        return
    for row in made if isinstance(made, list) else [made]:
        row["wall_s"] = time.monotonic() - started
        rows.append(row)
        _log(f"     {label}: {json.dumps(_brief(row), default=str)}")


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    """The figures of a row worth a line in the progress log."""
    return {
        k: row[k]
        for k in (
            "msgs_per_s",
            "us_per_msg",
            "p99_ms",
            "kb_per_conn",
            "handshakes_per_s",
            "events_per_s",
            "held",
            "conns_per_worker",
            "redis_us_per_msg",
            "machine_busy_frac",
            "complete",
        )
        if k in row
    }


async def _handshake_cost(
    ctx: scenarios.Context, rows: list[dict[str, Any]], kinds: list[Kind], log_dir: Path
) -> None:
    """The storm's handshake counted in instructions under callgrind (bench/handshake_cost.py):
    igratech-ws with and without a JWT and the bare picows server, side by side; ~5 minutes."""
    why = handshake_cost.available()
    if why is None and not (OURS in kinds and PICOWS in kinds):
        why = "it compares igratech-ws with the picows broadcaster: both must be run"
    if why is not None:
        ctx.notes.append(f"skipped the handshake cost: {why}")
        return
    need = 600.0
    if ctx.time_left() < need:
        ctx.notes.append("skipped the handshake cost: the time budget was spent")
        return
    _log("run  handshake cost (callgrind: igratech-ws with and without a JWT, picows)")
    out = log_dir / "handshake_cost"
    out.mkdir(parents=True, exist_ok=True)
    try:
        costs = await asyncio.wait_for(
            handshake_cost.run(["jwt", "anon", "picows", "verify"], out, ports=ctx.ports),
            max(need, ctx.time_left()),
        )
    except Exception as exc:
        ctx.notes.append(f"handshake cost failed: {type(exc).__name__}: {exc}"[:400])
        _log(f"FAIL handshake cost: {type(exc).__name__}: {exc}")
        return
    for cost in costs:
        rows.append(cost.row())
        _log(f"     handshake cost {cost.variant}: {cost.per_handshake:,.0f} instructions")


async def _publish_cost(ctx: scenarios.Context, rows: list[dict[str, Any]], log_dir: Path) -> None:
    """The single publish counted in instructions under callgrind (bench/publish_cost.py): the
    figure a busy machine does not move; ~15 s."""
    why = handshake_cost.available()
    if why is None and ctx.time_left() < 120:
        why = "the time budget was spent"
    if why is not None:
        ctx.notes.append(f"skipped the publish cost: {why}")
        return
    _log("run  publish cost (callgrind: igratech-ws, single publishes)")
    out = log_dir / "publish_cost"
    out.mkdir(parents=True, exist_ok=True)
    try:
        row = await asyncio.wait_for(
            publish_cost.measure(2000, 500, 32, out, profile=False, ports=ctx.ports), 120
        )
    except Exception as exc:
        ctx.notes.append(f"publish cost failed: {type(exc).__name__}: {exc}"[:400])
        _log(f"FAIL publish cost: {type(exc).__name__}: {exc}")
        return
    rows.append(row)
    _log(f"     publish cost: {row['instructions_per_request']:,.0f} instructions per request")


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    server_cpu, client_cpu = _cpus()
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    wanted = [KINDS[name] for name in args.servers.split(",")] if args.servers else list(ALL_KINDS)
    if args.quick and not args.servers:
        wanted = [k for k in wanted if k in (OURS, PICOWS)]
    kinds: list[Kind] = []
    skipped: dict[str, str] = {}
    for kind in wanted:
        reason = missing_reason(kind)
        if reason:
            skipped[kind.name] = reason
        else:
            kinds.append(kind)
    ctx = scenarios.Context(
        kinds=kinds,
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        log_dir=log_dir,
        deadline=time.monotonic() + args.budget,
        quick=args.quick,
        progress=_log,
    )
    chosen = (
        args.scenarios.split(",")
        if args.scenarios
        else (["burst"] if args.quick else [s for s in SCENARIOS if s not in OPT_IN])
    )
    rows: list[dict[str, Any]] = []
    started = time.time()
    load_start = _loadavg()
    sizes = [1000] if args.quick else [1000, 5000, 15000]

    if "burst" in chosen:
        for n in sizes:
            for kind in kinds:
                await _guard(
                    ctx,
                    rows,
                    f"burst {kind.name} {n}",
                    functools.partial(
                        scenarios.burst,
                        ctx,
                        kind,
                        n,
                        events=200,
                        rounds=3 if n <= 1000 else 1,
                    ),
                )
    if "idle" in chosen:
        for kind in kinds:
            await _guard(
                ctx,
                rows,
                f"idle {kind.name} 10000",
                functools.partial(scenarios.idle_memory, ctx, kind, 10_000),
                need=40,
            )
        if OURS in kinds:
            await _guard(
                ctx,
                rows,
                "max connections igratech-ws",
                lambda: scenarios.most_connections(ctx, OURS, 19_900),
                need=60,
            )
    if "storm" in chosen:
        for kind in kinds:
            await _guard(
                ctx,
                rows,
                f"storm {kind.name} 5000",
                functools.partial(scenarios.storm, ctx, kind, 5000),
            )
    if "handshake" in chosen:
        await _handshake_cost(ctx, rows, kinds, log_dir)
    if "publish" in chosen:
        for kind in [k for k in kinds if k in (OURS, scenarios.SOKETI)]:
            for batch in (1, 10 if kind is scenarios.SOKETI else 100):
                await _guard(
                    ctx,
                    rows,
                    f"publish {kind.name} batch={batch}",
                    functools.partial(scenarios.publish_api, ctx, kind, batch),
                )
        if OURS in kinds:
            await _publish_cost(ctx, rows, log_dir)
        if OURS in kinds:
            await _guard(
                ctx, rows, "publish outbox latency", functools.partial(publish.outbox_latency, ctx)
            )
    if "many" in chosen:
        for kind in kinds:
            await _guard(
                ctx,
                rows,
                f"many games {kind.name} 100x100",
                functools.partial(scenarios.many_games, ctx, kind, 100, 100, 20),
                need=40,
            )
    if "paced" in chosen:
        for rate in (50.0, 10.0):
            for kind in kinds:
                await _guard(
                    ctx,
                    rows,
                    f"paced {kind.name} {rate:g}/s",
                    functools.partial(
                        scenarios.paced,
                        ctx,
                        kind,
                        5000,
                        rate,
                        duration=5.0,
                        drain=6.0,
                    ),
                    need=40,
                )
    if "attacks" in chosen and OURS in kinds:
        try:  # about a minute; its rows become docs/security.md's figures
            rows += await attacks.run(ctx)
        except Exception as exc:
            ctx.notes.append(f"attacks failed: {type(exc).__name__}: {exc}"[:400])
    if "brokers" in chosen:
        # Issue 11: igratech-ws on memory, Redis (one and three shards) and NATS (bench/brokers.py),
        # with private broker servers; about 5 minutes.
        async def guard(
            label: str,
            make: Callable[[], Awaitable[dict[str, Any] | list[dict[str, Any]]]],
            need: float = 20.0,
        ) -> None:
            await _guard(ctx, rows, label, make, need)

        await brokers.run(ctx, rows, guard)
    if "conflation" in chosen:
        # Issue 12: a slow reader of a stats flood stays (conflation), of a bet flood is closed
        # (1013); about 45 seconds, its own server process.
        if ctx.time_left() < 60:
            ctx.notes.append("skipped conflation: the time budget was spent")
        else:
            _log("run  conflation")
            try:
                rows += await conflation.run(_log)
            except Exception as exc:
                ctx.notes.append(f"conflation failed: {type(exc).__name__}: {exc}"[:400])
    if "workers" in chosen:
        if OURS not in kinds:
            ctx.notes.append("skipped workers: igratech-ws is not among the servers run")
        else:
            for count in (1, 2):
                await _guard(
                    ctx,
                    rows,
                    f"workers burst igratech-ws --workers {count}",
                    functools.partial(scenarios.workers_burst, ctx, count),
                    need=60,
                )
            await _guard(
                ctx,
                rows,
                "workers idle igratech-ws --workers 2 30000",
                functools.partial(scenarios.workers_idle, ctx, 2, 30_000),
                need=120,
            )
    return {
        "started": started,
        "scenarios": chosen,
        "finished": time.time(),
        "quick": args.quick,
        "servers": [k.name for k in kinds],
        "labels": {k.name: k.label for k in ALL_KINDS},
        "skipped": skipped,
        "server_cpu": server_cpu,
        "client_cpu": client_cpu,
        "notes": ctx.notes,
        "rows": rows,
        "load": f"{load_start} / {_loadavg()} (1-minute, all processes of the machine)",
    }


async def run_smoke(args: argparse.Namespace) -> dict[str, Any]:
    server_cpu, client_cpu = _cpus()
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = scenarios.Context(
        kinds=[OURS],
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        log_dir=log_dir,
        deadline=time.monotonic() + 60,
        progress=_log,
    )
    return await scenarios.smoke(ctx, clients=args.clients or 20, events=args.events or 10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny exact-count check (tests)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="igratech-ws vs the picows broadcaster, 1,000 clients, burst",
    )
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all but "
        f"{','.join(OPT_IN)}, which run only when named)",
    )
    parser.add_argument("--servers", help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help="seconds after which remaining measurements are skipped",
    )
    parser.add_argument("--clients", type=int, help="clients for --smoke")
    parser.add_argument("--events", type=int, help="events for --smoke")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="the report to write"
    )
    parser.add_argument("--no-report", action="store_true", help="save the JSON only")
    args = parser.parse_args(argv)
    if args.scenarios:
        unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
        if unknown:
            parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.servers:
        unknown = set(args.servers.split(",")) - set(KINDS)
        if unknown:
            parser.error(f"unknown servers: {', '.join(sorted(unknown))}")

    import uvloop

    runner: Callable[[Any], Any] = uvloop.run

    def _terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(args, runner)
    finally:
        kill_leftovers()


def _main(args: argparse.Namespace, runner: Callable[[Any], Any]) -> int:
    if args.smoke:
        row = runner(run_smoke(args))
        print(json.dumps(row, default=str), flush=True)
        exact = row["complete"] and row["order_errors"] == 0 and row["subscribed"] == row["clients"]
        return 0 if exact else 1

    results = runner(run_all(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / ("quick.json" if args.quick else "latest.json")
    raw.write_text(json.dumps(results, indent=1, default=str))
    _log(f"raw figures: {raw}")
    if not args.no_report:
        from bench import report

        report.write(results, args.out)
        attacks.write_doc(results["rows"])
        _log(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
