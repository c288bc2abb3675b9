"""The benchmark harness counts correctly: a tiny run where every client must get every message.

Speed is never asserted here (the machine is shared); only the counts are.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_run_counts_every_message_exactly() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--clients", "20", "--events", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["subscribed"] == 20
    assert row["expected"] == 20 * 10
    assert row["delivered"] == 20 * 10
    assert row["min_per_client"] == row["max_per_client"] == 10
    assert row["order_errors"] == 0
    assert row["closed_by_server"] == 0
    assert row["us_per_msg"] is not None and row["us_per_msg"] > 0
