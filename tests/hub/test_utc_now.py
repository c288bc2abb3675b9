"""`node.utc_now` formats the date once per second: its readings must still be the clock's, to
the millisecond, across second (and day) boundaries."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

import pytest

from igratech_ws.node import utc_now

TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


def rendered(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@pytest.mark.parametrize(
    "instants",
    [
        [1_764_633_599.998, 1_764_633_599.9995, 1_764_633_600.0, 1_764_633_600.001],  # midnight
        [1_000.25, 1_000.75, 1_001.0005, 999.5, 1_000.999, 1_000.9999996],  # and back
    ],
)
def test_each_reading_is_the_clocks_to_the_millisecond(
    monkeypatch: pytest.MonkeyPatch, instants: list[float]
) -> None:
    for instant in instants:
        monkeypatch.setattr(time, "time", lambda instant=instant: instant)
        assert utc_now() == rendered(instant), instant


def test_live_readings_fall_between_the_clocks() -> None:
    for _ in range(200):
        before = rendered(time.time())
        reading = utc_now()
        after = rendered(time.time())
        assert TIMESTAMP.fullmatch(reading), reading
        assert before <= reading <= after
