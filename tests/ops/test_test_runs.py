"""How the suite runs: `make test` on parallel workers with the slowest files first, the npm
packages installed before it in CI, and installs that two processes never run together.

The install test puts fake `npm` and `node` first on PATH (the fake npm logs each call and takes a
second, as a real install takes minutes), then runs two ``python -m tests.support.nodejs
--install`` at once on empty directories: npm must run once per directory, not twice.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.files import replace_text
from tests.support.schedule import SLOW_FILES, slow_files_first

ROOT = Path(__file__).resolve().parents[2]


def planned(target: str, *assignments: str) -> str:
    """What `make -n -B target` would run, as a newcomer's shell would call it."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(
        ["make", "-n", "-B", target, *assignments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env=env,
    )
    return result.stdout


def pytest_line(commands: str) -> str:
    return next(line for line in commands.splitlines() if "pytest" in line)


def test_make_test_runs_the_files_on_two_workers_and_reports_durations() -> None:
    line = pytest_line(planned("test"))
    assert "-n 2 --dist loadfile" in line and "--durations=15" in line, line
    assert "-n 1 --dist loadfile" in pytest_line(planned("test", "TEST_WORKERS=1"))


def test_pytest_xdist_is_a_dev_dependency() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    dev = pyproject.split("dev = [", 1)[1].split("]", 1)[0]
    assert '"pytest-xdist' in dev


def test_ci_installs_the_npm_packages_before_the_tests() -> None:
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert "make test-deps" in commands and "make test" in commands
    assert commands.index("make test-deps") < commands.index("make test")
    assert "python -m tests.support.nodejs --install" in planned("test-deps")


class FakeItem:
    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid

    def __repr__(self) -> str:
        return self.nodeid


def test_the_slowest_files_go_first_and_nothing_else_moves() -> None:
    slowest, second = SLOW_FILES[0], SLOW_FILES[1]
    ids = [
        "tests/core/test_a.py::test_1",
        f"{second}::test_x",
        "tests/core/test_a.py::test_2",
        f"{slowest}::test_y[1]",
        "tests/ops/test_b.py::test_3",
        f"{slowest}::test_y[2]",
        f"{second}::test_z",
    ]
    items: list[Any] = [FakeItem(i) for i in ids]
    slow_files_first(items)
    assert [item.nodeid for item in items] == [
        f"{slowest}::test_y[1]",
        f"{slowest}::test_y[2]",
        f"{second}::test_x",
        f"{second}::test_z",
        "tests/core/test_a.py::test_1",
        "tests/core/test_a.py::test_2",
        "tests/ops/test_b.py::test_3",
    ]


FAKE_NPM = """#!/bin/sh
# A stand-in for npm install: logs the call, takes a second, leaves what a real install leaves.
echo "$PWD $*" >> "$FAKE_NPM_LOG"
sleep 1
mkdir -p node_modules/.bin node_modules/@asyncapi/cli
for spec in "$@"; do
  case "$spec" in
    @asyncapi/cli@*)
      touch node_modules/.bin/asyncapi
      printf '{"version": "%s"}' "${spec#@asyncapi/cli@}" > node_modules/@asyncapi/cli/package.json
      ;;
  esac
done
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_two_installs_at_once_run_npm_once_per_directory(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "npm", FAKE_NPM)
    _executable(bin_dir / "node", "#!/bin/sh\necho v20.0.0\n")
    log = tmp_path / "npm.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_NPM_LOG": str(log),
        "IGRATECH_WS_JS_DEPS_DIR": str(tmp_path / "js-deps"),
        "IGRATECH_WS_ASYNCAPI_CLI_DIR": str(tmp_path / "asyncapi-cli"),
    }
    command = [sys.executable, "-m", "tests.support.nodejs", "--install"]
    runs = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=60)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    calls = log.read_text().splitlines()
    assert sorted(call.split()[0] for call in calls) == [
        str(tmp_path / "asyncapi-cli"),
        str(tmp_path / "js-deps"),
    ], calls
    # What the second process found, and what a third run (CI, then a test) finds.
    assert "".join(outputs).count("already in") == 2, outputs
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.count("already in") == 2, again.stdout
    assert len(log.read_text().splitlines()) == 2
    stamp = json.loads((tmp_path / "js-deps" / "installed.json").read_text())
    package = json.loads((ROOT / "clients/js/package.json").read_text())
    assert stamp == package["devDependencies"]


def test_a_replaced_file_keeps_its_mode_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("old\n")
    doc.chmod(0o640)
    replace_text(doc, "new\n")
    assert doc.read_text() == "new\n"
    assert stat.S_IMODE(doc.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["doc.md"]
