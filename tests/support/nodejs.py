"""Node.js for the tests: `node`, and the npm packages the tests need, installed once per machine.

- The JavaScript client's test packages (`ws`, `typescript`): the devDependencies of
  ``clients/js/package.json``, at its pinned versions, in ``~/.cache/igratech-ws/js-client-deps``
  (or ``IGRATECH_WS_JS_DEPS_DIR``). ES modules ignore NODE_PATH, so test scripts load them with
  `createRequire` from the directory this module passes as ``IGRATECH_WS_NODE_MODULES``.
- The official AsyncAPI CLI (``@asyncapi/cli``, about 1.5 GB of packages, some 190 s to install)
  for tests/contract/test_asyncapi_cli.py, in ``~/.cache/igratech-ws/asyncapi-cli`` (or
  ``IGRATECH_WS_ASYNCAPI_CLI_DIR``).

Nothing is installed into the repository. A test installs what it needs on first use; CI installs
both beforehand (``make test-deps``, i.e. ``python -m tests.support.nodejs --install``), so that no
test spends minutes in npm. Each directory is locked while it is checked and installed
(`tests.support.files.locked`): pytest-xdist workers and a pre-install never run npm into the same
directory together, and a second one finds the first one's packages.

Without node or npm the calling test skips, or fails when IGRATECH_WS_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.files import locked

REPO = Path(__file__).resolve().parents[2]
JS_DIR = REPO / "clients" / "js"
CLIENT_MODULE = JS_DIR / "igratech-ws-client.js"
DEPS_DIR = Path(
    os.environ.get("IGRATECH_WS_JS_DEPS_DIR", Path.home() / ".cache/igratech-ws/js-client-deps")
)
CLI_VERSION = "4.1.1"
CLI_DIR = Path(
    os.environ.get("IGRATECH_WS_ASYNCAPI_CLI_DIR", Path.home() / ".cache/igratech-ws/asyncapi-cli")
)
#: Bound of one npm install (the AsyncAPI CLI takes about 190 s on a fresh machine here).
INSTALL_S = 600
#: Attempts of one install before it counts as failed.
INSTALL_ATTEMPTS = 3


class NpmMissing(Exception):
    """npm is not installed."""


class InstallFailed(Exception):
    """npm install failed (its output is the message)."""


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


def _install(
    directory: Path,
    specs: list[str],
    ready: Callable[[], bool],
    *flags: str,
    mark_ready: Callable[[], object] = lambda: None,
) -> bool:
    """`npm install specs` into `directory` unless `ready()`; True if it installed. Checked again
    under the directory's lock, so that of two processes only the first one installs.
    `mark_ready` runs under the same lock after a successful install: whatever `ready()` reads
    must be written there, or a second process that takes the lock in between installs again."""
    if ready():
        return False
    with locked(directory):
        if ready():
            return False
        npm = shutil.which("npm")
        if npm is None:
            raise NpmMissing(f"npm is not installed: cannot install {' '.join(specs)}")
        (directory / "package.json").write_text(json.dumps({"private": True}))
        # The registry fails now and then (seen here: exit status 217 after minutes of a fresh
        # @asyncapi/cli install, and success on the next try): a failed install is retried.
        for _ in range(INSTALL_ATTEMPTS):
            result = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", *flags, *specs],
                cwd=directory,
                capture_output=True,
                text=True,
                timeout=INSTALL_S,
            )
            if result.returncode == 0:
                mark_ready()
                return True
        raise InstallFailed(
            f"npm install {' '.join(specs)} failed {INSTALL_ATTEMPTS} times; the last time:\n"
            f"{result.stdout}\n{result.stderr}"
        )


def install_js_client_deps() -> bool:
    """Install the JavaScript client's test packages unless present; True if it installed."""
    wanted = dev_dependencies()
    stamp = DEPS_DIR / "installed.json"
    modules = DEPS_DIR / "node_modules"

    def ready() -> bool:
        return stamp.exists() and json.loads(stamp.read_text()) == wanted and modules.is_dir()

    specs = [f"{name}@{version}" for name, version in sorted(wanted.items())]
    return _install(
        DEPS_DIR, specs, ready, "--no-save", mark_ready=lambda: stamp.write_text(json.dumps(wanted))
    )


def install_asyncapi_cli() -> bool:
    """Install ``@asyncapi/cli`` at CLI_VERSION unless present; True if it installed."""

    def ready() -> bool:
        package = CLI_DIR / "node_modules/@asyncapi/cli/package.json"
        return (
            (CLI_DIR / "node_modules/.bin/asyncapi").exists()
            and package.exists()
            and (json.loads(package.read_text()).get("version") == CLI_VERSION)
        )

    return _install(CLI_DIR, [f"@asyncapi/cli@{CLI_VERSION}"], ready)


def node_modules() -> Path:
    """The directory holding the test packages, installed on first use (about 10 s)."""
    try:
        install_js_client_deps()
    except NpmMissing as missing:
        _missing(str(missing))
    except InstallFailed as failure:
        pytest.fail(str(failure))
    return DEPS_DIR / "node_modules"


def asyncapi_cli() -> Path:
    """The ``asyncapi`` binary, installed on first use (minutes: CI installs it beforehand)."""
    try:
        install_asyncapi_cli()
    except NpmMissing as missing:
        pytest.skip(str(missing))
    except InstallFailed as failure:
        pytest.fail(str(failure))
    return CLI_DIR / "node_modules/.bin/asyncapi"


def node_env(**extra: str) -> dict[str, str]:
    """The environment for a node process: ours, plus where the test packages are."""
    env = {k: v for k, v in os.environ.items() if k != "NODE_OPTIONS"}
    env["IGRATECH_WS_NODE_MODULES"] = str(node_modules())
    env.update(extra)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.nodejs",
        description="Install the npm packages the tests need into their shared cache.",
    )
    parser.add_argument("--install", action="store_true", help="install what is missing")
    args = parser.parse_args(argv)
    if not args.install:
        parser.print_help()
        return 2
    if shutil.which("node") is None:
        print("node is not installed: the JavaScript and AsyncAPI tests need Node.js 18+")
        return 1
    for what, directory, install in (
        ("the JavaScript client's test packages", DEPS_DIR, install_js_client_deps),
        (f"@asyncapi/cli {CLI_VERSION}", CLI_DIR, install_asyncapi_cli),
    ):
        try:
            done = install()
        except (NpmMissing, InstallFailed) as problem:
            print(problem, file=sys.stderr)
            return 1
        print(f"{what}: {'installed into' if done else 'already in'} {directory}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
