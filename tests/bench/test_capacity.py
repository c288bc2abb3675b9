"""The capacity model (`bench/capacity.py`) and its report (`bench/broker_report.py`): the
arithmetic on made-up costs, so that a wrong formula shows here and not in the docs."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.brokers import split_costs

from bench import broker_report, capacity

COSTS = capacity.Costs(
    broker="redis-3",
    recv_us=20.0,
    wake_us=300.0,
    deliver_burst_us=0.4,
    deliver_paced_us=10.0,
    api_us=150.0,
    broker_pub_us=30.0,
    broker_wake_us=200.0,
    broker_fanout_us=2.0,
)


def test_split_costs_solves_the_two_runs() -> None:
    # 100 publications at 20 µs each, deliveries at 0.5 µs: 20 and 2,000 followers.
    small = {"events": 100, "delivered": 2_000, "cpu_s": (100 * 20 + 2_000 * 0.5) / 1e6}
    big = {"events": 100, "delivered": 200_000, "cpu_s": (100 * 20 + 200_000 * 0.5) / 1e6}
    recv, deliver = split_costs(big, small) or (0.0, 0.0)
    assert recv == pytest.approx(20.0) and deliver == pytest.approx(0.5)


def test_reached_nodes() -> None:
    assert capacity.reached(1, 200) == pytest.approx(1.0)
    assert capacity.reached(10, 200) == pytest.approx(10.0, rel=1e-6)  # every node
    assert capacity.reached(1_000, 1) == pytest.approx(1.0)


@pytest.mark.parametrize("affinity", [None, 1])
def test_the_plan_is_the_smallest_that_fits(affinity: int | None) -> None:
    work = capacity.Workload()
    plan = capacity.plan(COSTS, work, affinity)
    assert plan["feasible"]
    nodes = plan["nodes"]
    assert capacity.node_cpu(COSTS, work, nodes, affinity)["total"] <= work.utilization
    # The search steps by 2%: a node count 3% smaller must not fit.
    fewer = int(nodes * 0.97)
    assert capacity.node_cpu(COSTS, work, fewer, affinity)["total"] > work.utilization


def test_game_affinity_needs_fewer_nodes_and_broker_servers() -> None:
    work = capacity.Workload()
    uniform, affine = capacity.plan(COSTS, work, None), capacity.plan(COSTS, work, 1)
    assert affine["nodes"] < uniform["nodes"]
    assert affine["redis_shards"] < uniform["redis_shards"]
    # With affinity a game publication is delivered to one node: pub + wake share, no fan-out.
    pub_us = COSTS.broker_pub_us + (1 - work.utilization) * COSTS.broker_wake_us
    assert affine["broker_cpu_s_per_s"] == pytest.approx(work.publications_per_s * pub_us / 1e6)


def test_an_impossible_load_says_so() -> None:
    work = capacity.Workload(publications_per_s=1e9)
    assert not capacity.plan(COSTS, work, None)["feasible"]


def test_the_three_node_check_counts_every_part() -> None:
    row = {
        "duration_s": 5.0,
        "publications": 1_500,
        "idle_cpu_per_s": [0.0, 0.0, 0.0],
        "deliveries_per_node": [50_000] * 3,
        "node_cpu_s": [1.0] * 3,
        "broker_idle_cpu_per_s": 0.0,
        "broker_cpu_s": 0.3,
    }
    check = capacity.check_three_nodes(COSTS, row)
    base = (1_500 * 20 + 500 * 150 + 50_000 * 10) / 1e6
    wakes = 1_500 * 300 / 1e6
    assert check["predicted_node_cpu_s"][0] == pytest.approx((base + wakes) / (1 + wakes / 5))


def test_the_capacity_block_of_the_docs_is_replaced_and_nothing_else(tmp_path: Path) -> None:
    doc = tmp_path / "deployment.md"
    doc.write_text(f"before\n{broker_report.BEGIN}\nold figures\n{broker_report.END}\nafter\n")
    broker_report.write_capacity([], doc)
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith(f"{broker_report.END}\nafter\n")
    assert "old figures" not in text and "Not computed" in text
