"""The test suite's layout, as a contributor is promised it (issue 14): every test module in the
folder of its layer, every helper in the one `tests/support/` package, and no test module or
helper importing from a test module or a conftest (conftests keep only fixtures and hooks).

The imports are read with `ast` from every file under tests/, so a helper imported from another
test file (``from tests.hub.test_hub import FakeSubscriber``) or from a conftest (``from
.conftest import WAIT_S``) fails here, naming the file and the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.schedule import SLOW_FILES

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
#: The layer folders, each a package. A new one is added here and in README.md's layout.
LAYERS = {
    "adversarial": "attacks on every bound (hub and transport)",
    "auth": "JWT verification and the settings it reads",
    "autobahn": "the Autobahn|Testsuite against the gateway's listener",
    "bench": "the benchmark harness and the capacity model",
    "brokers": "one contract suite for every broker, and each broker's own tests",
    "client": "the Python and JavaScript SDKs",
    "config": "the settings model, the CLI's config, their documentation",
    "conformance": "one scenario table against both SDKs",
    "contract": "the AsyncAPI document and the protocol doc",
    "core": "the pure core (no I/O)",
    "e2e": "real gateways, in process or as processes",
    "hub": "the hub and the node, on fakes",
    "ops": "operations: CLI errors, container, deploy files, docs snippets, logs, the suite itself",
    "outbox": "the PostgreSQL outbox",
    "publisher": "the backend-side publisher",
    "transport": "the HTTP API, metrics and the console listener",
}
SUPPORT = "support"


def python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def module_of(path: Path) -> tuple[str, ...]:
    """The dotted module name of a file under the repository, as a tuple."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(path: Path, source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every module `source` imports, relative imports resolved against
    `path`'s package; for ``from m import n`` both ``m`` and ``m.n`` (n may be a module)."""
    package = module_of(path) if path.name == "__init__.py" else module_of(path)[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def forbidden(name: str) -> bool:
    """A test module or a conftest of this suite: nothing may import it."""
    parts = name.split(".")
    return parts[0] == "tests" and any(
        part == "conftest" or part.startswith("test_") for part in parts[1:]
    )


def bad_imports(path: Path, source: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for line, name in imported_modules(path, source)
        if forbidden(name)
    ]


# --- the rules ----------------------------------------------------------------------------------


def test_no_file_imports_a_test_module_or_a_conftest() -> None:
    problems = [
        problem
        for path in python_files()
        for problem in bad_imports(path, path.read_text(encoding="utf-8"))
    ]
    assert not problems, "import helpers from tests/support/ instead:\n" + "\n".join(problems)


def test_every_test_module_is_in_a_layer_folder() -> None:
    misplaced = []
    for path in python_files():
        if not path.name.startswith("test_"):
            continue
        folder = path.relative_to(TESTS).parts
        if len(folder) != 2 or folder[0] not in LAYERS:
            misplaced.append(str(path.relative_to(ROOT)))
    assert not misplaced, f"test modules outside the layer folders {sorted(LAYERS)}: {misplaced}"


def test_helpers_live_in_tests_support_only() -> None:
    """Outside tests/support/, a tests/ folder holds test modules, a conftest and __init__.py;
    tests/support/ holds no test module (pytest would collect it there)."""
    stray = []
    for path in python_files():
        where = path.relative_to(TESTS).parts
        if where[0] == SUPPORT:
            if path.name.startswith("test_") or path.name == "conftest.py":
                stray.append(str(path.relative_to(ROOT)))
        elif not (path.name.startswith("test_") or path.name in ("conftest.py", "__init__.py")):
            stray.append(str(path.relative_to(ROOT)))
    assert not stray, f"helpers belong in tests/support/, tests outside it: {stray}"


def test_every_folder_is_a_package_of_the_layout() -> None:
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {*LAYERS, SUPPORT}, "update LAYERS (and README.md's layout)"
    missing = [name for name in sorted(folders) if not (TESTS / name / "__init__.py").is_file()]
    assert not missing, (
        f"folders without __init__.py (imports are tests.<folder>.<module>): {missing}"
    )


def test_conftests_define_no_helpers_for_others() -> None:
    """What a conftest defines at module level is fixtures and pytest hooks only: a helper there
    would be one that tests cannot import (the rule above) and so gets copied."""
    problems = []
    for path in python_files():
        if path.name != "conftest.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            fixture = any("fixture" in ast.unparse(decorator) for decorator in node.decorator_list)
            hook = node.name.startswith("pytest_")
            private = node.name.startswith("_")
            if not (fixture or hook or private):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not problems, f"move these to tests/support/: {problems}"


def test_the_readme_names_every_test_folder() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("tests/ ") :].split("\nbench/", 1)[0]
    missing = [name for name in sorted({*LAYERS, SUPPORT}) if f"{name}/" not in layout]
    assert not missing, f"README.md's layout of tests/ does not name {missing}"


def test_every_file_of_the_parallel_schedule_exists() -> None:
    missing = [path for path in SLOW_FILES if not (ROOT / path).is_file()]
    assert not missing, f"tests/support/schedule.py names files that are gone: {missing}"
    assert len(set(SLOW_FILES)) == len(SLOW_FILES)


# --- the checker catches what it is meant to ----------------------------------------------------


@pytest.mark.parametrize(
    ("where", "source"),
    [
        ("tests/hub/test_node.py", "from tests.hub.test_hub import FakeSubscriber\n"),
        ("tests/e2e/test_x.py", "from tests.e2e.conftest import base_config\n"),
        ("tests/brokers/test_x.py", "from .conftest import WAIT_S\n"),
        ("tests/brokers/test_x.py", "from . import test_redis\n"),
        ("tests/adversarial/test_x.py", "from ..e2e.conftest import recv\n"),
        ("tests/support/cluster.py", "import tests.e2e.test_cluster\n"),
        ("tests/support/cluster.py", "import tests.conftest as services\n"),
        (
            "tests/e2e/test_x.py",
            "def f():\n    from tests.e2e.test_resume_faults import quick_broker\n",
        ),
    ],
)
def test_an_import_from_a_test_module_or_conftest_is_caught(where: str, source: str) -> None:
    assert bad_imports(ROOT / where, source)


@pytest.mark.parametrize(
    "source",
    [
        "from tests.support.fakes import FakeSubscriber, settle\n",
        "from tests.support import gateway\n",
        "import tests.support.cluster\n",
        "from igratech_ws.node import Node\n",
        "from .helpers_elsewhere import thing\n",
    ],
)
def test_imports_from_support_and_the_package_pass(source: str) -> None:
    assert not bad_imports(ROOT / "tests/e2e/test_x.py", source)
