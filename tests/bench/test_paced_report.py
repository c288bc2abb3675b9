"""The paced p99 targets of the bench report: both rates are judged against soketi in the same
run, and a miss is explained from that run's figures, never hidden."""

from __future__ import annotations

from typing import Any

from bench import report


def _rows(ours_p99: float, soketi_p99: float, limit_p99: float) -> list[dict[str, Any]]:
    return [
        {"scenario": "paced", "server": server, "rate": rate, "p99_ms": p99, "us_per_msg": 10.0}
        for rate in (10.0, 50.0)
        for server, p99 in (
            (report.OURS, ours_p99),
            ("soketi", soketi_p99),
            (report.PICOWS, limit_p99),
        )
    ]


def _paced_verdicts(rows: list[dict[str, Any]]) -> dict[str, str]:
    return {name: verdict for name, _, verdict in report.targets(rows) if "paced p99" in name}


def test_a_miss_at_either_rate_is_shown_and_explained() -> None:
    rows = _rows(ours_p99=165.9, soketi_p99=92.9, limit_p99=123.0)
    assert _paced_verdicts(rows) == {
        "paced p99 at 10 ev/s, 5,000 clients ≤ soketi's": "NOT met",
        "paced p99 at 50 ev/s, 5,000 clients ≤ soketi's": "NOT met",
    }
    paragraphs = [line for line in report._paced_gap_lines(rows) if line]
    assert len(paragraphs) == 2
    assert paragraphs[0].startswith("At 10 ev/s igratech-ws's p99 (165.9 ms)")
    assert "stands above soketi here before any gateway logic" in paragraphs[0]
    assert "1.35\u00d7 the broadcaster's p99" in paragraphs[0]


def test_a_gap_the_broadcaster_does_not_have_is_put_on_the_gateway() -> None:
    paragraph = report._paced_gap_lines(_rows(ours_p99=120.0, soketi_p99=100.0, limit_p99=80.0))
    assert "the rest of the gap is the gateway's own work" in paragraph[0]


def test_a_met_target_needs_no_explanation() -> None:
    rows = _rows(ours_p99=90.0, soketi_p99=92.9, limit_p99=80.0)
    assert set(_paced_verdicts(rows).values()) == {"met"}
    assert report._paced_gap_lines(rows) == []
