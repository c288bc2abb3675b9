# ruff: noqa: RUF001 - the report is typeset for people: its signs and dashes are meant.
"""Turns the figures of one run (bench/results/latest.json) into docs/benchmarks.md and PNG plots.

``python -m bench.report [results.json]`` rewrites the report from saved figures without rerunning.
Plots need matplotlib (the ``bench`` extra); without it the report has tables only and says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench import broker_report, conflation
from bench.servers import NODE_MODULES, RESULTS, ROOT

Row = dict[str, Any]
OURS = "igratech-ws"
PICOWS = "picows-coalesce"
CLIENT_BOUND = 0.85  # the load client used this share of its CPU or more


# --- formatting ----------------------------------------------------------------------------------


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if digits == 0:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}"
    return str(value)


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "–"
    return f"{a / b:.2f}×"


def _table(head: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return [*lines, ""]


def _pick(rows: list[Row], scenario: str, **match: Any) -> list[Row]:
    return [
        r
        for r in rows
        if r["scenario"] == scenario and all(r.get(k) == v for k, v in match.items())
    ]


def _one(rows: list[Row], scenario: str, **match: Any) -> Row | None:
    found = _pick(rows, scenario, **match)
    return found[0] if found else None


# --- the machine ---------------------------------------------------------------------------------


def machine(results_load: dict[str, Any] | None = None) -> dict[str, str]:
    results_load = results_load or {}
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cores"] = str(os.cpu_count())
    try:
        with open("/proc/meminfo") as handle:
            kb = int(handle.readline().split()[1])
            info["memory"] = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    info["kernel"] = platform.release()
    load = results_load.get("load")
    if load:
        info["load average at start / end"] = load
    info["python"] = platform.python_version()
    if shutil.which("node"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["node"] = subprocess.run(
                ["node", "--version"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
    try:
        import resource

        info["open files limit"] = str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError):
        pass
    versions = []
    from importlib import metadata

    for dist in ("picows", "uvloop", "msgspec", "aiohttp", "python-socketio", "matplotlib"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{dist} {metadata.version(dist)}")
    for package in ("ws", "socket.io", "@soketi/soketi", "uWebSockets.js"):
        path = NODE_MODULES / package / "package.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            versions.append(f"{package} {json.loads(path.read_text())['version']}")
    info["packages"] = ", ".join(versions)
    return info


# --- plots ---------------------------------------------------------------------------------------


def _plots(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Draw the PNGs; {name: path relative to docs/}. Empty without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = results["rows"]
    servers: list[str] = results["servers"]
    labels: dict[str, str] = results["labels"]
    made: dict[str, str] = {}

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[name] = f"benchmarks/{name}.png"

    bursts = _pick(rows, "burst")
    sizes = sorted({r["clients"] for r in bursts})
    if bursts:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        width = 0.8 / max(1, len(servers))
        for i, server in enumerate(servers):
            xs, rate, cpu = [], [], []
            for j, size in enumerate(sizes):
                row = _one(rows, "burst", server=server, clients=size)
                if row:
                    xs.append(j + i * width)
                    rate.append(row["msgs_per_s"] / 1000)
                    cpu.append(row["us_per_msg"] or 0)
            axes[0].bar(xs, rate, width, label=labels.get(server, server))
            axes[1].bar(xs, cpu, width, label=labels.get(server, server))
        for ax, title in zip(
            axes,
            ("delivered messages/s (thousands)", "server CPU µs per delivered message"),
            strict=True,
        ):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))])
            ax.set_xticklabels([f"{s:,} clients" for s in sizes])
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=8)
        save(fig, "burst")

    paced = _pick(rows, "paced")
    if paced:
        rates = sorted({r["rate"] for r in paced})
        fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4.5), squeeze=False)
        for ax, rate in zip(axes[0], rates, strict=True):
            names, p50, p99, p999 = [], [], [], []
            for server in servers:
                row = _one(rows, "paced", server=server, rate=rate)
                if row and row.get("p50_ms") is not None:
                    names.append(labels.get(server, server).split(" (")[0])
                    p50.append(row["p50_ms"])
                    p99.append(row["p99_ms"])
                    p999.append(row["p999_ms"])
            pos = list(range(len(names)))
            ax.bar([x - 0.27 for x in pos], p50, 0.27, label="p50")
            ax.bar(pos, p99, 0.27, label="p99")
            ax.bar([x + 0.27 for x in pos], p999, 0.27, label="p99.9")
            ax.set_xticks(pos)
            ax.set_xticklabels(names, rotation=20, fontsize=8)
            ax.set_yscale("log")
            ax.set_title(f"publish-to-receive ms, {rate:g} events/s, 5,000 clients")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "paced")

    simple = [
        ("idle", "kb_per_conn", "RSS per idle connection (KB), 10,000 connections"),
        ("storm", "handshakes_per_s", "handshakes/s, 5,000 clients connecting at once"),
    ]
    for scenario, key, title in simple:
        found = [(s, _one(rows, scenario, server=s)) for s in servers]
        got = [(s, r) for s, r in found if r is not None and r.get(key) is not None]
        if not got:
            continue
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar([labels.get(s, s).split(" (")[0] for s, _ in got], [r[key] for _, r in got])
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        save(fig, scenario)
    return made


# --- the report ----------------------------------------------------------------------------------


def _fanout_cells(name: str, row: Row, ours: Row | None) -> list[str]:
    """One server's cells of a fan-out table (burst, many games): throughput and CPU per
    message, each with its ratio to ours, delivered of expected, client CPU, what bound it."""
    return [
        name,
        _num(row["msgs_per_s"]),
        _ratio(ours["msgs_per_s"], row["msgs_per_s"]) if ours else "–",
        _num(row["us_per_msg"], 2),
        _ratio(ours["us_per_msg"], row["us_per_msg"]) if ours else "–",
        f"{row['delivered']:,}/{row['expected']:,}",
        f"{row['client_cpu_frac']:.0%}",
        _bound(row),
    ]


def _bound(row: Row) -> str:
    notes = []
    if not row.get("complete", True):
        notes.append("incomplete (time limit)")
    frac = row.get("client_cpu_frac")
    if frac is not None and frac >= CLIENT_BOUND:
        notes.append("client-bound")
    return ", ".join(notes)


def targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the issue's goals."""
    out: list[tuple[str, str, str]] = []
    # burst CPU vs the coalescing broadcaster
    parts, ok = [], True
    for ours in _pick(rows, "burst", server=OURS):
        peer = _one(rows, "burst", server=PICOWS, clients=ours["clients"])
        if peer and ours["us_per_msg"] and peer["us_per_msg"]:
            ratio = ours["us_per_msg"] / peer["us_per_msg"]
            ok = ok and ratio <= 1.3
            parts.append(f"{ours['clients']:,}: {ratio:.2f}×")
    out.append(
        (
            "burst CPU per delivery ≤ 1.3× the coalescing broadcaster",
            "; ".join(parts) or "not measured",
            ("met" if ok else "NOT met") if parts else "–",
        )
    )
    # msgs/s at 5000 clients
    ours5 = _one(rows, "burst", server=OURS, clients=5000)
    for peer_name, factor in (("node-ws", 5), ("soketi", 5), ("python-socketio", 20)):
        peer = _one(rows, "burst", server=peer_name, clients=5000)
        if ours5 and peer:
            ratio = ours5["msgs_per_s"] / peer["msgs_per_s"]
            note = " (ours client-bound)" if _bound(ours5) else ""
            out.append(
                (
                    f"msgs/s at 5,000 clients ≥ {factor}× {peer_name}",
                    f"{ratio:.2f}×{note}",
                    "met" if ratio >= factor else "NOT met",
                )
            )
        else:
            out.append((f"msgs/s at 5,000 clients ≥ {factor}× {peer_name}", "not measured", "–"))
    for rate in (10, 50):
        name = f"paced p99 at {rate} ev/s, 5,000 clients ≤ soketi's"
        ours_p = _one(rows, "paced", server=OURS, rate=float(rate))
        soketi_p = _one(rows, "paced", server="soketi", rate=float(rate))
        if ours_p and soketi_p and ours_p.get("p99_ms") is not None and soketi_p.get("p99_ms"):
            out.append(
                (
                    name,
                    f"{ours_p['p99_ms']:.1f} ms vs {soketi_p['p99_ms']:.1f} ms",
                    "met" if ours_p["p99_ms"] <= soketi_p["p99_ms"] else "NOT met",
                )
            )
        else:
            out.append((name, "not measured", "–"))
    idle = _one(rows, "idle", server=OURS)
    if idle and idle.get("kb_per_conn") is not None:
        out.append(
            (
                "idle memory ≤ 12 KB/conn at 10,000",
                f"{idle['kb_per_conn']:.1f} KB",
                "met" if idle["kb_per_conn"] <= 12 else "NOT met",
            )
        )
    else:
        out.append(("idle memory ≤ 12 KB/conn at 10,000", "not measured", "–"))
    st = _one(rows, "storm", server=OURS)
    if st and st.get("per_core_capacity"):
        best = max(st["handshakes_per_s"], 0)
        cap = st["per_core_capacity"]
        out.append(
            (
                "≥ 5,000 JWT handshakes/s on one core",
                f"observed {best:,.0f}/s; server CPU allows {cap:,.0f}/s per core",
                "met" if cap >= 5000 else "NOT met",
            )
        )
    else:
        out.append(("≥ 5,000 JWT handshakes/s on one core", "not measured", "–"))
    out.extend(_handshake_target(rows))
    out.extend(_worker_targets(rows))
    out.extend(_publish_targets(rows))
    out.extend(broker_report.targets(rows))
    return out


def _handshake_target(rows: list[Row]) -> list[tuple[str, str, str]]:
    """Issue 11: the JWT handshake's server CPU against the bare picows server's, from the storm
    (CPU time) and from the handshake cost (instructions, which a busy machine does not move)."""
    goal = "JWT handshake server CPU ≤ 1.3× the bare picows server's"
    parts, verdicts = [], []
    ours, peer = _one(rows, "storm", server=OURS), _one(rows, "storm", server=PICOWS)
    if ours and peer and ours.get("us_per_handshake") and peer.get("us_per_handshake"):
        ratio = ours["us_per_handshake"] / peer["us_per_handshake"]
        parts.append(
            f"storm CPU {ours['us_per_handshake']:.0f} vs {peer['us_per_handshake']:.0f} µs "
            f"({ratio:.2f}×)"
        )
        verdicts.append(ratio <= 1.3)
    jwt = _one(rows, "handshake_cost", variant="jwt")
    bare = _one(rows, "handshake_cost", variant="picows")
    if jwt and bare:
        ratio = jwt["instructions_per_handshake"] / bare["instructions_per_handshake"]
        parts.append(f"instructions {ratio:.2f}×")
        verdicts.append(ratio <= 1.3)
    if not parts:
        return [(goal, "not measured", "–")]
    return [(goal, "; ".join(parts), "met" if all(verdicts) else "NOT met")]


def _handshake_cost_section(rows: list[Row]) -> list[str]:
    """The handshake counted in instructions, and what the gap to picows is made of."""
    by = {r["variant"]: r for r in _pick(rows, "handshake_cost")}
    jwt, anon, bare, verify = by.get("jwt"), by.get("anon"), by.get("picows"), by.get("verify")
    if not (jwt and bare):
        return []
    per = {v: r["instructions_per_handshake"] for v, r in by.items()}
    calls = {v: r.get("syscalls_per_handshake") for v, r in by.items()}
    lines = [
        f"**The same handshake counted in instructions** (`bench/handshake_cost.py`: each server "
        f"under callgrind, {jwt['handshakes']:,} handshakes + a `settings` request following one "
        "game each, 100 in flight, after 100 to warm up; user-space instructions of the server "
        "process per handshake, and its system calls, whose kernel work the count leaves out). "
        "A busy machine moves CPU times; these counts move by up to 2% from run to run.",
        "",
    ]
    names = {
        "jwt": "igratech-ws, a JWT each (the storm)",
        "anon": "igratech-ws, no token",
        "picows": "picows broadcaster",
    }
    body = [
        [names[v], _num(per[v]), _ratio(per[v], per["picows"]), _num(calls[v], 1)]
        for v in ("jwt", "anon", "picows")
        if v in per
    ]
    lines += _table(["server", "instructions/handshake", "vs picows", "system calls"], body)
    gap = per["jwt"] - per["picows"]
    text = (
        f"What the token adds: igratech-ws with a JWT spends {gap:,.0f} instructions per "
        "handshake more than the bare picows server. "
    )
    if anon:
        token = per["jwt"] - per["anon"]
        protocol = per["anon"] - per["picows"]
        text += (
            f"Without a token it spends {abs(protocol):,.0f} {'more' if protocol > 0 else 'fewer'}"
        )
        text += (
            " (the gateway's protocol: the `connected` frame with the channels' positions, the "
            "session and its settings plans, the hub's join of the game, the per-address and "
            "per-node limits, the RFC 6455 parser and rate budget of each connection). "
        )
        text += f"The token costs {token:,.0f}: "
        if verify:
            channel = token - per["verify"]
            text += (
                f"{per['verify']:,.0f} verify the HS256 JWT (`TokenVerifier.verify` measured "
                "alone: split, base64, JSON, HMAC-SHA256 in OpenSSL, the claim checks), and "
                f"{channel:,.0f} are the rest of what an authenticated connection does: joining "
                "the user's own channel (at once, without a task, on a broker that can answer at "
                "once, as the memory broker here; Redis and NATS need a round trip), and the "
                "single-session bookkeeping. "
            )
        else:
            text += "the JWT's verification and the join of the user's own channel. "
    text += (
        "The upgrade itself is not picows's in igratech-ws: it reads the request and writes the "
        "101 itself, while the bare server pays picows's per-connection protocol object, logger, "
        "timer and socket options."
    )
    return [*lines, text, ""]


def _syscalls(per_request: float | None) -> str:
    return "" if per_request is None else f" and {per_request:.1f} system calls"


def _publish_cost_lines(rows: list[Row]) -> list[str]:
    """Section 5's sentence on bench/publish_cost.py's count (none without its row)."""
    cost = _one(rows, "publish_cost")
    if not cost:
        return []
    return [
        "**The single publish counted in instructions** (`bench/publish_cost.py`: igratech-ws "
        "under callgrind, 2,000 single-event publishes from 32 keep-alive clients after 500 to "
        f"warm up): {cost['instructions_per_request']:,.0f} user-space instructions"
        f"{_syscalls(cost.get('syscalls_per_request'))} per request. A busy machine moves "
        "the CPU column above; this count moves by a few percent at most.",
        "",
    ]


def _publish_targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """Issue 13: single-publish server CPU, batch throughput, outbox commit-to-client p50."""
    out: list[tuple[str, str, str]] = []
    single = _one(rows, "publish_api", server=OURS, batch=1)
    if single and single.get("us_per_event") is not None:
        out.append(
            (
                "single publish ≤ 80 µs server CPU per request",
                f"{single['us_per_event']:.1f} µs",
                "met" if single["us_per_event"] <= 80 else "NOT met",
            )
        )
    else:
        out.append(("single publish ≤ 80 µs server CPU per request", "not measured", "–"))
    batch = _one(rows, "publish_api", server=OURS, batch=100)
    if batch and batch.get("us_per_event"):
        capacity = 1e6 / batch["us_per_event"]
        out.append(
            (
                "batches of 100: ≥ 100,000 events/s per node",
                f"observed {batch['events_per_s']:,.0f}/s at {batch['server_cpu_frac']:.0%} "
                f"server CPU; server CPU allows {capacity:,.0f}/s",
                "met" if capacity >= 100_000 else "NOT met",
            )
        )
    else:
        out.append(("batches of 100: ≥ 100,000 events/s per node", "not measured", "–"))
    outbox = _one(rows, "outbox_latency", server=OURS)
    if outbox and outbox.get("p50_ms") is not None:
        out.append(
            (
                "outbox commit-to-client p50 < 150 ms",
                f"{outbox['p50_ms']:.1f} ms",
                "met" if outbox["p50_ms"] < 150 and outbox["complete"] else "NOT met",
            )
        )
    else:
        out.append(("outbox commit-to-client p50 < 150 ms", "not measured", "–"))
    return out


def _worker_targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """The two `--workers` goals (scenario ``workers``, run only when asked for)."""
    out: list[tuple[str, str, str]] = []
    idle = _one(rows, "workers_idle", workers=2)
    goal = "idle: 30,000 connections held by `--workers 2`"
    if idle:
        out.append(
            (
                goal,
                f"{idle['held']:,} of {idle['attempted']:,} held, "
                f"{_num(idle['kb_per_conn'], 1)} KB each (summed over the workers)",
                "met" if idle["held"] >= 30_000 else "NOT met",
            )
        )
    else:
        out.append((goal, "not measured (`--scenarios workers`)", "–"))
    one = _one(rows, "workers_burst", workers=1)
    two = _one(rows, "workers_burst", workers=2)
    goal = "`--workers 2` at least 1.7× one worker (burst msgs/s)"
    if one and two and one["msgs_per_s"] and two["us_per_msg"] and one["us_per_msg"]:
        ratio = two["msgs_per_s"] / one["msgs_per_s"]
        cpu_ratio = 2 * one["us_per_msg"] / two["us_per_msg"]
        bound = _workers_bound(one) or _workers_bound(two)
        measured = (
            f"observed {ratio:.2f}×; server CPU per message allows {cpu_ratio:.2f}× "
            "with a core per worker"
        )
        if bound:
            measured += " (observed run CPU-bound: client and server share 2 cores)"
        verdict = "met" if ratio >= 1.7 else ("not shown on this machine" if bound else "NOT met")
        out.append((goal, measured, verdict))
    else:
        out.append((goal, "not measured (`--scenarios workers`)", "–"))
    return out


def _workers_bound(row: Row) -> str:
    """Why a `workers` burst's msgs/s says little about the server: client or machine CPU."""
    notes = []
    if not row.get("complete", True):
        notes.append("incomplete (time limit)")
    if (row.get("client_cpu_frac") or 0) >= CLIENT_BOUND:
        notes.append("client-bound")
    if (row.get("machine_busy_frac") or 0) >= CLIENT_BOUND:
        notes.append("CPU-saturated (both cores busy)")
    return ", ".join(notes)


def _paced_gap_lines(rows: list[Row]) -> list[str]:
    """A paragraph per rate at which igratech-ws's p99 is above soketi's: what stands in the way,
    from this run's figures."""
    lines: list[str] = []
    for rate in sorted({r["rate"] for r in _pick(rows, "paced", server=OURS)}):
        ours = _one(rows, "paced", server=OURS, rate=rate)
        soketi = _one(rows, "paced", server="soketi", rate=rate)
        limit = _one(rows, "paced", server=PICOWS, rate=rate)
        if not (ours and soketi and limit) or ours["p99_ms"] <= soketi["p99_ms"]:
            continue
        where = (
            ", so a Python server on picows stands above soketi here before any gateway logic"
            if limit["p99_ms"] > soketi["p99_ms"]
            else ", below soketi's: the rest of the gap is the gateway's own work"
        )
        lines += [
            f"At {rate:g} ev/s igratech-ws's p99 ({ours['p99_ms']:.1f} ms) is above soketi's "
            f"({soketi['p99_ms']:.1f} ms): the target is not met. The coalescing picows "
            f"broadcaster, which does nothing per event but write the frame to each socket, "
            f"reaches {limit['p99_ms']:.1f} ms in the same run{where}; igratech-ws is "
            f"{ours['p99_ms'] / limit['p99_ms']:.2f}× the broadcaster's p99. At this rate no two "
            f"events arrive together, so nothing coalesces: each event is one send per socket "
            f"(server CPU per delivery: igratech-ws {ours['us_per_msg']:.2f} µs, the broadcaster "
            f"{limit['us_per_msg']:.2f} µs, soketi {soketi['us_per_msg']:.2f} µs), and the p99 is "
            f"the walk over 5,000 sockets plus the load client's own queueing. Closing the gap "
            f"means a cheaper walk than one Python-level send per socket.",
            "",
        ]
    return lines


def render(results: dict[str, Any], plots: dict[str, str]) -> str:
    rows: list[Row] = results["rows"]
    servers: list[str] = results["servers"]
    labels: dict[str, str] = results["labels"]
    name = {s: labels.get(s, s) for s in servers}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(results["started"]))
    took = results["finished"] - results["started"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`python -m bench.run{' --quick' if results['quick'] else ''}`)"
        f" on {when}, in {took / 60:.1f} minutes. Do not edit by hand: rerun the bench.",
        "",
        "## The machine",
        "",
    ]
    for key, value in machine(results).items():
        lines.append(f"- **{key}**: {value}")
    lines += [
        f"- **pinning**: every server on CPU {results['server_cpu']}, the load client (and the "
        f"publisher) on CPU {results['client_cpu']}; nothing is pinned in section 7 (workers)",
        "",
        "## How it is measured",
        "",
        "Each server runs alone, freshly started, pinned to one core; the load client is picows "
        "(`bench/loadclient.py`), one or more processes pinned to the other core, each holding at "
        "most 12,000 connections. All traffic is on 127.0.0.1. The same ~250-byte incident frame "
        "goes to every server's clients: igratech-ws builds it from a publish through its HTTP "
        "API (`/api/v1/publish/batch` for bursts, `/api/v1/publish` when paced); soketi gets it "
        "through the Pusher HTTP API (10 events per batch request, its limit); the other peers "
        "receive it on a publisher WebSocket and relay it.",
        "",
        "- **server CPU µs per delivered message**: the server's CPU time over the measurement "
        "(the sum of `/proc/<pid>/task/*/schedstat` run time, in ns; the coarser `utime+stime` "
        "of `/proc/<pid>/stat` is kept in the raw figures and agrees) divided by the messages "
        "the clients counted. It does not depend on how fast the client is.",
        "- **delivered messages/s**: messages counted by all clients ÷ (time the last client got "
        "its last message − time the publish began). When the load client's CPU was ≥ "
        f"{CLIENT_BOUND:.0%} busy, the figure is marked *client-bound*: the server could go "
        "faster, and the CPU figure is the one to compare.",
        "- **ratios** are igratech-ws's figure divided by the other server's, in the same run.",
        "- A run that did not deliver everything within its time limit is measured on what was "
        "delivered and marked *incomplete*.",
        "",
    ]
    if results["skipped"]:
        lines += ["**Peers not run:**", ""]
        lines += [f"- {k}: {v}" for k, v in results["skipped"].items()]
        lines.append("")
    if results["notes"]:
        lines += ["**Notes from the run:**", ""]
        lines += [f"- {n}" for n in results["notes"]]
        lines.append("")

    lines += ["## Targets", ""]
    lines += _table(["target", "measured", "verdict"], [list(t) for t in targets(rows)])

    bursts = _pick(rows, "burst")
    if bursts:
        lines += [
            "## 1. Burst fan-out",
            "",
            "N clients follow one game; 200 incidents are published at once.",
            "",
        ]
        if "burst" in plots:
            lines += [f"![burst]({plots['burst']})", ""]
        for size in sorted({r["clients"] for r in bursts}):
            ours = _one(rows, "burst", server=OURS, clients=size)
            lines += [f"### {size:,} clients", ""]
            body = []
            for server in servers:
                row = _one(rows, "burst", server=server, clients=size)
                if not row:
                    continue
                body.append(_fanout_cells(name[server], row, ours))
            lines += _table(
                [
                    "server",
                    "delivered msgs/s",
                    "ours ÷ this",
                    "CPU µs/msg",
                    "ours ÷ this",
                    "delivered",
                    "client CPU",
                    "note",
                ],
                body,
            )

    paced = _pick(rows, "paced")
    if paced:
        lines += [
            "## 2. Paced latency",
            "",
            "5,000 clients follow one game; incidents are published one by one at a steady rate. "
            "Latency is publish-to-receive: the publisher's `time.time_ns()` travels in the "
            "payload and every k-th client (about 1,000 of them) subtracts it from its own clock "
            "on receipt. It includes the publish request and the client's own queueing.",
            "",
        ]
        if "paced" in plots:
            lines += [f"![paced]({plots['paced']})", ""]
        body = []
        for rate in sorted({r["rate"] for r in paced}):
            for server in servers:
                row = _one(rows, "paced", server=server, rate=rate)
                if not row:
                    continue
                body.append(
                    [
                        f"{rate:g}/s",
                        name[server],
                        _num(row["p50_ms"], 2),
                        _num(row["p99_ms"], 2),
                        _num(row["p999_ms"], 2),
                        _num(row["max_ms"], 1),
                        f"{row['delivered'] / max(1, row['expected']):.1%}",
                        _num(row["us_per_msg"], 2),
                        f"{row['server_cpu_frac']:.0%}",
                    ]
                )
        lines += _table(
            [
                "rate",
                "server",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "max ms",
                "delivered",
                "CPU µs/msg",
                "server CPU",
            ],
            body,
        )
        lines += _paced_gap_lines(rows)

    idle = _pick(rows, "idle")
    if idle:
        lines += [
            "## 3. Idle memory",
            "",
            "10,000 connections, each following one of 100 games, then idle for 2 s. Memory is "
            "the growth of the server's RSS (`VmRSS`) over its idle size before the clients came.",
            "",
        ]
        if "idle" in plots:
            lines += [f"![idle]({plots['idle']})", ""]
        ours = _one(rows, "idle", server=OURS)
        body = []
        for server in servers:
            row = _one(rows, "idle", server=server)
            if row:
                body.append(
                    [
                        name[server],
                        f"{row['subscribed']:,}",
                        _num(row["kb_per_conn"], 1),
                        _ratio(ours["kb_per_conn"], row["kb_per_conn"]) if ours else "–",
                        _num(row["rss_before_kb"] / 1024, 1),
                        _num(row["rss_after_kb"] / 1024, 1),
                    ]
                )
        lines += _table(
            ["server", "connections", "KB/conn", "ours ÷ this", "RSS before MiB", "RSS after MiB"],
            body,
        )
        most = _one(rows, "max_conns", server=OURS)
        if most:
            fails = ", ".join(f"{k}: {v}" for k, v in most["failures"].items()) or "none"
            lines += [
                f"**Most connections one igratech-ws node held:** {most['held']:,} of "
                f"{most['attempted']:,} attempted (failures: {fails}), "
                f"{_num(most['kb_per_conn'], 1)} KB each. The ceiling here is the open-file "
                "limit of the server process (20,000 on this machine), not memory or CPU; "
                "raise `ulimit -n` to go further.",
                "",
            ]

    storms = _pick(rows, "storm")
    if storms:
        lines += [
            "## 4. Connect storm",
            "",
            "5,000 clients connect at once (500 handshakes in flight), each then subscribes to a "
            "game. igratech-ws clients carry a distinct HS256 JWT each (verified on the "
            "handshake); the peers have no token check. *Per core* is 1 ÷ the server's CPU "
            "seconds per handshake (handshake + subscription): what one fully busy core would "
            "sustain; the observed rate is limited by the single-process client too.",
            "",
        ]
        if "storm" in plots:
            lines += [f"![storm]({plots['storm']})", ""]
        body = []
        for server in servers:
            row = _one(rows, "storm", server=server)
            if row:
                body.append(
                    [
                        name[server],
                        _num(row["jwt"]),
                        f"{row['connected']:,}/{row['clients']:,}",
                        _num(row["handshakes_per_s"]),
                        _num(row["us_per_handshake"], 1),
                        _num(row["per_core_capacity"]),
                    ]
                )
        lines += _table(
            ["server", "JWT", "connected", "handshakes/s", "CPU µs/handshake", "per core/s"],
            body,
        )
    lines += _handshake_cost_section(rows)

    pubs = _pick(rows, "publish_api")
    if pubs:
        lines += [
            "## 5. Publish API throughput",
            "",
            "Publish requests over HTTP from 32 concurrent aiohttp clients (on the client core) "
            "for 4 s, to 100 games without subscribers: the cost of taking a publication in. "
            "igratech-ws batches hold 100 events, soketi's 10 (its limit). The client is usually "
            "the limit here; the CPU column is the server's cost.",
            "",
        ]
        body = [
            [
                str(labels.get(r["server"]) or r["server"]),
                _num(r["batch"]),
                _num(r["events_per_s"]),
                _num(r["us_per_event"], 1),
                f"{r['server_cpu_frac']:.0%}",
                _num(r["failures"]),
            ]
            for r in pubs
        ]
        lines += _table(
            [
                "server",
                "events per request",
                "events/s",
                "CPU µs/event",
                "server CPU",
                "failed requests",
            ],
            body,
        )
    lines += _publish_cost_lines(rows)
    outbox = [r for r in _pick(rows, "outbox_latency") if "p50_ms" in r]
    if outbox:
        lines += [
            "PostgreSQL outbox (`IGRATECH_WS_OUTBOX_DSN`): a writer commits one row per "
            "transaction at a steady rate; one WebSocket client follows the game on the same node "
            "(memory broker). Latency runs from the writer sending `COMMIT` to the client "
            "receiving the push.",
            "",
        ]
        lines += _table(
            ["rows/s", "rows", "delivered", "p50 ms", "p99 ms", "max ms", "server CPU µs/row"],
            [
                [
                    _num(r["rate"]),
                    _num(r["rows"]),
                    _num(r["delivered"]),
                    _num(r["p50_ms"], 1),
                    _num(r["p99_ms"], 1),
                    _num(r["max_ms"], 1),
                    _num(r["server_cpu_us_per_row"]),
                ]
                for r in outbox
            ],
        )

    many = _pick(rows, "many_games")
    if many:
        lines += [
            "## 6. Many games",
            "",
            "100 games × 100 clients (10,000 connections); 20 incidents per game published at "
            "once, interleaved across games (2,000 publications, 200,000 deliveries).",
            "",
        ]
        ours = _one(rows, "many_games", server=OURS)
        body = []
        for server in servers:
            row = _one(rows, "many_games", server=server)
            if row:
                body.append(_fanout_cells(name[server], row, ours))
        lines += _table(
            [
                "server",
                "delivered msgs/s",
                "ours ÷ this",
                "CPU µs/msg",
                "ours ÷ this",
                "delivered",
                "client CPU",
                "note",
            ],
            body,
        )
    lines += _workers_section(rows)
    lines += broker_report.section(rows)
    lines += conflation.section(rows)
    if not plots:
        lines += ["*Plots were not drawn: matplotlib is not installed (`make bench-peers`).*", ""]
    lines += [
        "## Reproduce",
        "",
        "<!-- not-run: installs the peers and runs for about 30 minutes -->",
        "```sh",
        "make bench-peers   # once: Node peers into bench/peers/, python-socketio + matplotlib",
        "make bench         # about 30 minutes; writes this file, docs/benchmarks/*.png and the capacity model of docs/deployment.md",
        ".venv/bin/python -m bench.run --quick   # 1,000 clients, igratech-ws vs the limit",
        ".venv/bin/python -m bench.run --scenarios workers   # --workers 1 vs 2 on Redis (~2 min)",
        ".venv/bin/python -m bench.run --scenarios brokers   # section 8 and the capacity model",
        ".venv/bin/python -m bench.conflation   # section 9 alone (~45 s), spliced into this file",
        "```",
        "",
        "Raw figures of the last run: `bench/results/latest.json` (not committed).",
        "",
    ]
    return "\n".join(lines)


def _workers_section(rows: list[Row]) -> list[str]:
    bursts = sorted(_pick(rows, "workers_burst"), key=lambda r: r["workers"])
    idle = _one(rows, "workers_idle")
    lines = ["## 7. Workers (`serve --workers N`, Redis broker)", ""]
    if not bursts and not idle:
        return [
            *lines,
            "Not run: this scenario runs only when asked for "
            "(`python -m bench.run --scenarios workers`, about 2 minutes), because the "
            "default run already fills its time budget.",
            "",
        ]
    lines += [
        "igratech-ws with `--workers 1` and `--workers 2` on a local Redis (database 12, a "
        "random key prefix, its keys deleted afterwards); the workers share the ports with "
        "SO_REUSEPORT. **Nothing is pinned** here: the workers, the Redis server and the load "
        "client (2 processes) share the machine's 2 cores as the scheduler decides, so delivered "
        "msgs/s is bounded by the machine, not by the server. The figure to compare is the "
        "server CPU per delivered message: the sum of the scheduler run time of the server's "
        "whole process tree (parent, workers, multiprocessing's resource tracker); the Redis "
        "server's CPU is shown apart (it is a cost of the shared broker, usually on another "
        "host). *Machine busy* is all of it (server, Redis, load client, publisher) over 2 cores. "
        "Connections are made 50 at a time.",
        "",
    ]
    if bursts:
        clients = bursts[0]["clients"]
        lines += [
            f"Burst: {clients:,} clients follow one game, {bursts[0]['events']} incidents "
            "published at once (one batch request), 3 rounds, the median round by CPU "
            "per message.",
            "",
        ]
        body = []
        for row in bursts:
            redis = row.get("redis_us_per_msg")
            body.append(
                [
                    str(row["workers"]),
                    f"{row['subscribed']:,}",
                    " / ".join(f"{n:,}" for n in row["conns_per_worker"]),
                    _num(row["msgs_per_s"]),
                    _num(row["us_per_msg"], 2),
                    " / ".join(f"{c:.2f}" for c in row["worker_cpu_s"]),
                    _num(redis, 3),
                    _num(row["publish_s"], 2),
                    f"{row['client_cpu_frac']:.0%}",
                    f"{row['machine_busy_frac']:.0%}",
                    f"{row['delivered']:,}/{row['expected']:,}",
                    _workers_bound(row),
                ]
            )
        lines += _table(
            [
                "workers",
                "subscribed",
                "connections per worker",
                "delivered msgs/s",
                "server CPU µs/msg",
                "CPU s per worker",
                "Redis CPU µs/msg",
                "publish s",
                "client CPU (per process)",
                "machine busy",
                "delivered",
                "note",
            ],
            body,
        )
        one = _one(rows, "workers_burst", workers=1)
        two = _one(rows, "workers_burst", workers=2)
        if one and two and one["us_per_msg"] and two["us_per_msg"] and one["msgs_per_s"]:
            ratio = two["msgs_per_s"] / one["msgs_per_s"]
            cpu_ratio = 2 * one["us_per_msg"] / two["us_per_msg"]
            lines += [
                f"**1.7× target.** Observed: `--workers 2` delivered {ratio:.2f}× the msgs/s "
                "of one worker. On this 2-core machine the target cannot be demonstrated as a "
                "throughput: the load client needs about as much CPU as the server (it reads "
                "every frame), so with two workers there is no free core for the second one. "
                f"What the CPU figures imply: one message costs {one['us_per_msg']:.2f} µs of "
                f"server CPU with one worker and {two['us_per_msg']:.2f} µs with two, so with "
                f"a core per worker (and the clients elsewhere) two workers would deliver "
                f"{cpu_ratio:.2f}× one worker, i.e. about "
                f"{2e6 / two['us_per_msg']:,.0f} msgs/s against "
                f"{1e6 / one['us_per_msg']:,.0f} msgs/s (2 × the one-worker µs/msg ÷ the "
                "two-worker µs/msg; it leaves out Redis and the publisher, and single rounds "
                "vary by up to ±30%: see `rounds_us_per_msg` in the raw figures). Each worker "
                "receives every "
                "publication from Redis and frames it once for its own clients; that "
                "per-publication work is repeated per worker but shared by thousands of "
                "deliveries.",
                "",
            ]
    if idle:
        fails = ", ".join(f"{k}: {v}" for k, v in idle["failures"].items()) or "none"
        per_worker = " / ".join(f"{n:,}" for n in idle["conns_per_worker"])
        lines += [
            f"Idle: {idle['attempted']:,} connections (each following one of 100 games) "
            f"against `--workers {idle['workers']}`, from {idle['load_procs']} load processes "
            "(at most 12,000 each) that connect from 127.0.0.2, .3, … (one source address per "
            "process: the ephemeral port range of 127.0.0.1 holds only ~28,000 ports). "
            "Memory is the growth of the workers' summed RSS over their idle size.",
            "",
        ]
        lines += _table(
            [
                "workers",
                "held",
                "connections per worker",
                "KB/conn",
                "RSS before MiB",
                "RSS after MiB",
                "open-file limit per worker",
                "failures",
            ],
            [
                [
                    str(idle["workers"]),
                    f"{idle['held']:,}/{idle['attempted']:,}",
                    per_worker,
                    _num(idle["kb_per_conn"], 1),
                    _num(idle["rss_before_kb"] / 1024, 1),
                    _num(idle["rss_after_kb"] / 1024, 1),
                    " / ".join(str(n) for n in idle["open_files_limit"]),
                    fails,
                ]
            ],
        )
    return lines


def write(results: dict[str, Any], out: Path) -> None:
    """Write the report to `out` and its plots to a `benchmarks/` folder beside it."""
    plots = _plots(results, out.parent / "benchmarks")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(results, plots))
    broker_report.write_capacity(results["rows"], out.parent / "deployment.md")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else RESULTS / "latest.json"
    write(json.loads(source.read_text()), ROOT / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
