"""Node.js for the JavaScript client's tests: `node`, and the npm packages the tests need.

The packages (`ws`, `typescript`) are the devDependencies of ``clients/js/package.json``, at its
pinned versions. They are installed once per machine into ``~/.cache/igratech-ws/js-client-deps``
(or ``IGRATECH_WS_JS_DEPS_DIR``) and reused; nothing is installed into the repository. ES modules
ignore NODE_PATH, so test scripts load them with `createRequire` from the directory this module
passes as ``IGRATECH_WS_NODE_MODULES``.

Without node or npm the calling test skips, or fails when IGRATECH_WS_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JS_DIR = REPO / "clients" / "js"
CLIENT_MODULE = JS_DIR / "igratech-ws-client.js"
DEPS_DIR = Path(
    os.environ.get("IGRATECH_WS_JS_DEPS_DIR", Path.home() / ".cache/igratech-ws/js-client-deps")
)


def _missing(what: str) -> None:
    if os.environ.get("IGRATECH_WS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what}, and IGRATECH_WS_REQUIRE_SERVICES=1 requires the JavaScript tests")
    pytest.skip(what)


def node() -> str:
    """The `node` binary (Node.js 18 or newer), or skip."""
    binary = shutil.which("node")
    if binary is None:
        _missing("Node.js is not installed")
    assert binary is not None
    return binary


def dev_dependencies() -> dict[str, str]:
    package = json.loads((JS_DIR / "package.json").read_text())
    deps: dict[str, str] = package["devDependencies"]
    return deps


def node_modules() -> Path:
    """The directory holding the test packages, installed on first use (about 10 s)."""
    wanted = dev_dependencies()
    stamp = DEPS_DIR / "installed.json"
    modules = DEPS_DIR / "node_modules"
    if stamp.exists() and json.loads(stamp.read_text()) == wanted and modules.is_dir():
        return modules
    npm = shutil.which("npm")
    if npm is None:
        _missing("npm is not installed: cannot install the JavaScript test packages")
    assert npm is not None
    DEPS_DIR.mkdir(parents=True, exist_ok=True)
    (DEPS_DIR / "package.json").write_text(json.dumps({"private": True}))
    specs = [f"{name}@{version}" for name, version in sorted(wanted.items())]
    result = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "--no-save", *specs],
        cwd=DEPS_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"npm install {' '.join(specs)} failed:\n{result.stdout}\n{result.stderr}")
    stamp.write_text(json.dumps(wanted))
    return modules


def node_env(**extra: str) -> dict[str, str]:
    """The environment for a node process: ours, plus where the test packages are."""
    env = {k: v for k, v in os.environ.items() if k != "NODE_OPTIONS"}
    env["IGRATECH_WS_NODE_MODULES"] = str(node_modules())
    env.update(extra)
    return env
