# ruff: noqa: RUF002 - typeset for people: the multiplication sign and µ are meant.
"""The capacity model: nodes, Redis shards and NATS cores for a target load, from measured costs.

Nothing here is typed in: every cost comes from the broker rows of one bench run
(`bench.brokers`), and `plan` turns them into a deployment for a `Workload`. The costs:

- ``recv_us``: a node's CPU per publication it receives from the broker (framing it once, the
  hub's pass), and ``deliver_burst_us`` per delivery when a burst shares one write per
  connection: from two bursts through another node, with 20 and with N followers
  (`brokers.split_costs`).
- ``wake_us`` and ``deliver_paced_us``: what a publication costs more when it comes alone and
  finds the node's loop asleep (the wake-up), and the cost per delivery when each publication is
  its own write to each follower (as live updates of one game are): the same split of two paced
  runs, less ``recv_us``.
- ``api_us``: a node's CPU per publish request on its HTTP API (32 requests in flight).
- ``broker_pub_us``: the broker server's CPU per publication with one node subscribed, and
  ``broker_fanout_us`` per further subscribed node (`brokers.fanout`: bursts with one, then two
  nodes subscribed); ``broker_wake_us`` what a publication costs more alone (a paced run).

Wake-ups: a process at utilization u finds its loop asleep for about 1 − u of the events, so an
event costs ``(1 − u) × wake_us`` on top (at the planned utilization; in the check, the
utilization that follows from it: ``c = (base + W) / (1 + W / wall)``). Idle CPU is left out of
every cost.

How a load spreads (the model's assumptions, stated in the docs with the result):

- Each connection follows one game (and its user channel); followers spread evenly over games.
- A share of the publications goes to games, the rest to user channels (one follower each).
- A node receives a game's publications iff at least one of its connections follows the game. With
  *uniform* balancing, F followers of a game over N nodes reach 1 − (1 − 1/N)^F of the nodes
  (every node, for F ≫ N). With *game-affine* balancing (the load balancer hashes the game id, so
  a game's followers land on `affinity` nodes), a game reaches `affinity` nodes.
- Each delivery is its own write (the paced cost): live updates of one game are spaced out.
- Nodes run one per core at `utilization` of it; a Redis shard is one core (Redis is
  single-threaded); NATS uses as many cores as it needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class Workload:
    connections: int = 1_000_000
    publications_per_s: float = 50_000.0
    games: int = 5_000
    game_share: float = 0.9
    utilization: float = 0.6
    #: A node's connections at most (file descriptors, memory: see docs/deployment.md#sizing).
    max_connections_per_node: int = 100_000

    @property
    def followers_per_game(self) -> float:
        return self.connections / self.games

    @property
    def game_publications(self) -> float:
        return self.publications_per_s * self.game_share

    @property
    def user_publications(self) -> float:
        return self.publications_per_s - self.game_publications

    @property
    def deliveries_per_s(self) -> float:
        return self.game_publications * self.followers_per_game + self.user_publications


@dataclass(frozen=True)
class Costs:
    """Measured costs of one broker (µs; see the module docstring)."""

    broker: str
    recv_us: float
    wake_us: float
    deliver_burst_us: float
    deliver_paced_us: float
    api_us: float
    broker_pub_us: float
    broker_wake_us: float
    broker_fanout_us: float


def _one(rows: list[Row], scenario: str, **match: Any) -> Row | None:
    found = [
        r
        for r in rows
        if r["scenario"] == scenario and all(r.get(k) == v for k, v in match.items())
    ]
    return found[-1] if found else None


def costs_of(rows: list[Row], broker: str) -> Costs | None:
    """The model's costs for `broker` from a run's rows; None if a measurement is missing."""
    from bench.brokers import SMALL_CLIENTS, split_costs

    def fanin(mode: str, small: bool, nodes: int = 1) -> Row | None:
        found = [
            r
            for r in rows
            if r["scenario"] == "broker_fanin"
            and r["broker"] == broker
            and r["mode"] == mode
            and (r["clients"] == SMALL_CLIENTS) == small
            and r.get("broker_nodes", 1) == nodes
        ]
        return found[-1] if found else None

    burst_small, burst_big = fanin("burst", True), fanin("burst", False)
    paced_small, paced_big = fanin("paced", True), fanin("paced", False)
    publish = _one(rows, "broker_publish", broker=broker)
    fanout = _one(rows, "broker_fanout", broker=broker)
    if not (burst_small and burst_big and paced_small and paced_big and publish and fanout):
        return None
    bursts = split_costs(burst_big, burst_small)
    paced = split_costs(paced_big, paced_small)
    if bursts is None or paced is None or not publish["us_per_publish"]:
        return None
    broker_burst = fanout["broker_us_per_pub_1"]
    return Costs(
        broker=broker,
        recv_us=bursts[0],
        wake_us=max(0.0, paced[0] - bursts[0]),
        deliver_burst_us=bursts[1],
        deliver_paced_us=paced[1],
        api_us=float(publish["us_per_publish"]),
        broker_pub_us=broker_burst,
        broker_wake_us=max(0.0, paced_small["broker_net_us_per_pub"] - broker_burst),
        broker_fanout_us=max(0.0, fanout["broker_fanout_us"]),
    )


def reached(nodes: int, followers: float) -> float:
    """Expected nodes that have at least one of `followers` (placed uniformly at random)."""
    return nodes * (1.0 - (1.0 - 1.0 / nodes) ** followers)


def node_cpu(costs: Costs, w: Workload, nodes: int, affinity: int | None) -> dict[str, float]:
    """CPU seconds per second of one node, by cause, for `nodes` nodes."""
    per_game = float(min(affinity, nodes)) if affinity else reached(nodes, w.followers_per_game)
    received = w.game_publications * per_game / nodes + w.user_publications / nodes
    wake = (1.0 - w.utilization) * costs.wake_us
    parts = {
        "receive": received * (costs.recv_us + wake),
        "deliver": w.deliveries_per_s / nodes * costs.deliver_paced_us,
        "api": w.publications_per_s / nodes * costs.api_us,
    }
    parts = {k: v / 1e6 for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    parts["received_per_s"] = received
    return parts


def plan(costs: Costs, w: Workload, affinity: int | None = None) -> dict[str, Any]:
    """The smallest deployment that keeps every node at `w.utilization` or less; the broker
    servers that follow. ``feasible`` is False when no node count does (a node's share of the
    publications alone exceeds a core's budget)."""
    nodes = max(1, math.ceil(w.connections / w.max_connections_per_node))
    limit = 200_000
    while nodes <= limit and node_cpu(costs, w, nodes, affinity)["total"] > w.utilization:
        nodes = nodes + max(1, nodes // 50)
    feasible = nodes <= limit
    cpu = node_cpu(costs, w, nodes, affinity)
    per_game = float(min(affinity, nodes)) if affinity else reached(nodes, w.followers_per_game)
    # Broker servers: each publication once, plus one fan-out per further subscribed node.
    pub_us = costs.broker_pub_us + (1.0 - w.utilization) * costs.broker_wake_us
    broker_us = (
        w.game_publications * (pub_us + (per_game - 1) * costs.broker_fanout_us)
        + w.user_publications * pub_us
    )
    broker_cores = broker_us / 1e6 / w.utilization
    return {
        "workload": asdict(w),
        "costs": asdict(costs),
        "affinity": affinity,
        "feasible": feasible,
        "nodes": nodes if feasible else None,
        "connections_per_node": w.connections / nodes if feasible else None,
        "node_cpu": cpu,
        "nodes_per_game": per_game,
        "deliveries_per_s": w.deliveries_per_s,
        "broker_cpu_s_per_s": broker_us / 1e6,
        # Redis runs a shard on one core; NATS spreads over cores.
        "redis_shards": math.ceil(broker_cores) if costs.broker.startswith("redis") else None,
        "nats_cores": math.ceil(broker_cores) if costs.broker.startswith("nats") else None,
        "receive_floor": w.game_publications * costs.recv_us / 1e6,
    }


def _with_wakes(base: float, wakes: float, wall: float) -> float:
    """CPU seconds of a process whose wake-ups cost `wakes` if it were always asleep: the busier
    it is, the fewer find it asleep (see the module docstring)."""
    return (base + wakes) / (1.0 + wakes / wall)


def check_three_nodes(costs: Costs, row: Row) -> dict[str, Any]:
    """Predicted against measured CPU of a three-node run (`brokers.three_nodes`): each node
    receives every publication, takes a third of them on its API and delivers to its followers."""
    wall = row["duration_s"]
    pubs = row["publications"]
    predicted_nodes = []
    for idle, deliveries in zip(row["idle_cpu_per_s"], row["deliveries_per_node"], strict=True):
        base = (
            idle * wall
            + (pubs * costs.recv_us + pubs / 3 * costs.api_us + deliveries * costs.deliver_paced_us)
            / 1e6
        )
        predicted_nodes.append(_with_wakes(base, pubs * costs.wake_us / 1e6, wall))
    base = (
        row["broker_idle_cpu_per_s"] * wall
        + pubs * (costs.broker_pub_us + 2 * costs.broker_fanout_us) / 1e6
    )
    predicted_broker = _with_wakes(base, pubs * costs.broker_wake_us / 1e6, wall)
    return {
        "predicted_node_cpu_s": predicted_nodes,
        "measured_node_cpu_s": row["node_cpu_s"],
        "predicted_broker_cpu_s": predicted_broker,
        "measured_broker_cpu_s": row["broker_cpu_s"],
    }
