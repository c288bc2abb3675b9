"""Section 5 of the bench report quotes bench/publish_cost.py's instruction count from its row,
and the harness's port allocator stays in the range it was given."""

from __future__ import annotations

from bench.servers import Ports

from bench import report


def test_the_publish_cost_is_quoted_from_its_row() -> None:
    row = {
        "scenario": "publish_cost",
        "requests": 2000,
        "instructions": 152_000_000,
        "instructions_per_request": 76_083.2,
        "syscalls_per_request": 5.34,
    }
    (sentence, blank) = report._publish_cost_lines([row])
    assert "76,083 user-space instructions and 5.3 system calls per request" in sentence
    assert blank == ""
    row["syscalls_per_request"] = None  # callgrind without system call counts
    assert "76,083 user-space instructions per request" in report._publish_cost_lines([row])[0]
    assert report._publish_cost_lines([]) == []


def test_ports_wrap_within_their_own_range() -> None:
    """A run given its own base (a second bench beside another) never falls back into the
    default range, where the other run's servers are."""
    ports = Ports(47000)
    taken = [ports.take() for _ in range(5)]
    assert all(47000 <= port < 47000 + 9901 for port in taken), taken
    ports.next = 47000 + 9900
    assert 47000 <= ports.take() <= 47000 + 9900 and ports.next == 47000


def test_the_broker_bursts_show_their_rounds_and_writes() -> None:
    from bench import broker_report

    def burst(
        broker: str, version: str, rounds: list[float], writes: list[float]
    ) -> dict[str, object]:
        return {
            "scenario": "broker_burst",
            "broker": broker,
            "version": version,
            "rounds": 3,
            "rounds_us_per_msg": rounds,
            "us_per_msg": sorted(rounds)[1],
            "broker_us_per_pub": 0.0,
            "rounds_writes_per_follower": writes,
        }

    memory = burst("memory", "", [0.2, 0.2, 0.2], [1.0, 1.0, 1.0])
    fine = burst("redis", "7.0.15", [0.22, 0.22, 0.22], [1.0, 1.0, 1.0])
    split = burst("nats-new", "2.15.1", [0.24, 0.34, 0.30], [1.0, 2.0, 1.0])
    text = "\n".join(broker_report.section([memory, fine, split]))
    times = "\u00d7"  # as the report writes it
    assert f"NATS 2.15.1 1.20{times}, 1.70{times}, 1.50{times}" in text
    assert f"Redis 1.10{times}, 1.10{times}, 1.10{times}" in text
    assert "for 3 rounds" in text
    assert "NATS 2.15.1 1 of 3" in text and "Redis 0 of 3" in text
    assert "costs each follower one more write" in text
    whole = "\n".join(broker_report.section([memory, fine]))
    assert "Every burst reached each follower in one write" in whole
