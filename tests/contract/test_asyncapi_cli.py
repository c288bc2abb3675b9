"""The document is valid for the official AsyncAPI tooling (`@asyncapi/cli validate`).

Runs when Node.js is present. The CLI (about 1.5 GB of npm packages) is installed once per machine
into ``~/.cache/igratech-ws/asyncapi-cli`` (or ``IGRATECH_WS_ASYNCAPI_CLI_DIR``) and reused; its
usage analytics are switched off, so the check talks to no host but the npm registry at install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from igratech_ws.contract import DOCUMENT_PATH

CLI_VERSION = "4.1.1"
CLI_DIR = Path(
    os.environ.get("IGRATECH_WS_ASYNCAPI_CLI_DIR", Path.home() / ".cache/igratech-ws/asyncapi-cli")
)


def _cli() -> Path:
    binary = CLI_DIR / "node_modules/.bin/asyncapi"
    if binary.exists():
        return binary
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: cannot install @asyncapi/cli")
    CLI_DIR.mkdir(parents=True, exist_ok=True)
    (CLI_DIR / "package.json").write_text(json.dumps({"private": True}))
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", f"@asyncapi/cli@{CLI_VERSION}"],
        cwd=CLI_DIR,
        check=True,
        timeout=600,
        capture_output=True,
    )
    return binary


@pytest.mark.slow
def test_the_official_asyncapi_cli_finds_the_document_valid(tmp_path: Path) -> None:
    if shutil.which("node") is None:
        if os.environ.get("IGRATECH_WS_REQUIRE_SERVICES") == "1":
            pytest.fail("Node.js is required to validate the AsyncAPI document in CI")
        pytest.skip("Node.js is not installed")
    analytics = tmp_path / "analytics.json"
    analytics.write_text(json.dumps({"analyticsEnabled": "false", "infoMessageShown": "true", "userID": "ci"}))
    env = {**os.environ, "CI": "true", "ASYNCAPI_METRICS_CONFIG_PATH": str(analytics)}
    result = subprocess.run(
        [str(_cli()), "validate", str(DOCUMENT_PATH), "--fail-severity", "error"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "is valid" in output, output
    assert " 0 errors" in output or "0 errors" in output, output
