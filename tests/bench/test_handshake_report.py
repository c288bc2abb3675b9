"""The handshake's place in the bench report (bench/report.py): the issue-11 target from the storm
and from the instruction counts of bench/handshake_cost.py, and the paragraph that splits the gap,
every figure taken from the rows."""

from __future__ import annotations

from typing import Any

from bench.handshake_cost import Cost, summary

from bench import report

TIMES, DASH = "\u00d7", "\u2013"  # as the report writes them


def cost_rows(jwt: int, anon: int, picows: int, verify: int) -> list[dict[str, Any]]:
    costs = [
        Cost("jwt", "igratech-ws", 500, jwt * 500, 14_000),
        Cost("anon", "igratech-ws", 500, anon * 500, 12_500),
        Cost("picows", "picows-coalesce", 500, picows * 500, 16_000),
        Cost("verify", "igratech-ws", 2000, verify * 2000, None),
    ]
    return [c.row() for c in costs]


def storm(server: str, us: float) -> dict[str, Any]:
    return {"scenario": "storm", "server": server, "us_per_handshake": us}


def test_the_target_is_met_only_when_both_measures_are_within_13() -> None:
    rows = [storm("igratech-ws", 390.0), storm("picows-coalesce", 313.0)]
    rows += cost_rows(jwt=440_000, anon=380_000, picows=346_000, verify=64_000)
    (target,) = report._handshake_target(rows)
    assert target[2] == "met" and f"1.25{TIMES}" in target[1] and f"1.27{TIMES}" in target[1]
    rows = [storm("igratech-ws", 600.0), storm("picows-coalesce", 313.0)]
    rows += cost_rows(jwt=440_000, anon=380_000, picows=346_000, verify=64_000)
    assert report._handshake_target(rows)[0][2] == "NOT met"
    assert report._handshake_target([])[0][1:] == ("not measured", DASH)


def test_the_gap_is_split_from_the_rows() -> None:
    rows = cost_rows(jwt=580_000, anon=390_000, picows=346_000, verify=64_000)
    text = "\n".join(report._handshake_cost_section(rows))
    assert "234,000 instructions per handshake more" in text  # 580,000 - 346,000
    assert "64,000" in text and "126,000" in text  # the JWT; the user channel (190,000 - 64,000)
    assert "44,000" in text  # the protocol without a token: 390,000 - 346,000
    assert f"| igratech-ws, a JWT each (the storm) | 580,000 | 1.68{TIMES} | 28.0 |" in text
    assert report._handshake_cost_section(cost_rows(1, 1, 1, 1)[2:]) == []  # no igratech-ws


def test_the_summary_ratios() -> None:
    result = summary([Cost("jwt", "igratech-ws", 2, 1000, 4), Cost("picows", "p", 2, 500, 4)])
    assert result["ratio"] == 2.0
