"""The conflation scenario (bench/conflation.py) runs briefly and reports what the docs show."""

from __future__ import annotations

from pathlib import Path

from bench import conflation

KEYS = {
    "scenario",
    "kind",
    "rate",
    "budget_bytes",
    "read_bytes_per_s",
    "seconds",
    "published",
    "received",
    "conflated_frames_seen",
    "conflated_frames_server",
    "slow_consumer_closes",
    "close_code",
    "closed_after_s",
    "rss_baseline_kb",
    "rss_peak_kb",
    "rss_growth_kb",
    "rss_last_kb",
    "last_is_newest",
}


async def test_a_short_run_has_both_phases_and_renders_its_section(tmp_path: Path) -> None:
    rows = await conflation.run(lambda message: None, seconds=4.0)
    assert [row["kind"] for row in rows] == ["stats", "bets"]
    stats, bets = rows
    for row in rows:
        assert set(row) == KEYS
        assert row["published"] > 0 and row["received"] > 0
    # State: still connected, and what it saw last is the newest stats published.
    assert stats["slow_consumer_closes"] == 0 and stats["close_code"] is None
    assert stats["last_is_newest"] is True
    # Stream: never conflated (closed as a slow consumer when the run is long enough).
    assert bets["conflated_frames_server"] == 0 and bets["conflated_frames_seen"] == 0
    lines = conflation.section(rows)
    assert lines[0] == conflation.SECTION
    table = [line for line in lines if line.startswith("| stats") or line.startswith("| bet")]
    assert len(table) == 2
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## 1. Burst\n\ntext\n\n## Reproduce\n\nsteps\n")
    conflation.splice(doc, lines)
    conflation.splice(doc, lines)  # twice: replaced, not added again
    text = doc.read_text()
    assert text.count(conflation.SECTION) == 1
    assert text.index("## 1. Burst") < text.index(conflation.SECTION) < text.index("## Reproduce")


def test_not_run_says_how_to_run_it() -> None:
    lines = conflation.section([])
    assert "--scenarios conflation" in "\n".join(lines)
