"""The Makefile's promises, read from `make -n -B` (what it would run from scratch): `make run`
installs only what running needs, `make test` the dev tools and reports durations, and `make
test-quick` stays on the tests that need no server or service."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def planned(target: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # Run as a newcomer would: not as a sub-make of `make test` (which would print
    # "Entering directory" lines and pass its own flags down).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(
        ["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=30,
        check=True, env=env,
    )  # fmt: skip
    return result.stdout


def test_run_installs_only_what_running_needs() -> None:
    commands = planned("run")
    assert "install --quiet --python .venv/bin/python -e .\n" in commands
    assert "[dev]" not in commands and "playwright" not in commands
    assert commands.rstrip().endswith(".venv/bin/igratech-ws demo")


def test_test_installs_the_dev_tools_and_reports_durations() -> None:
    commands = planned("test")
    assert "-e '.[dev]'" in commands
    assert "pytest -q --durations=15" in commands
    assert "ruff check src tests bench" in commands and ".venv/bin/mypy" in commands


def test_test_quick_runs_no_service_or_server_test() -> None:
    commands = planned("test-quick")
    line = next(c for c in commands.splitlines() if "pytest" in c)
    for heavy in ("tests/e2e", "tests/brokers", "tests/ops/test_container", "tests/ops/test_docs"):
        assert heavy not in line
    assert "tests/core" in line and "tests/contract" in line
