"""The document is valid for the official AsyncAPI tooling (`@asyncapi/cli validate`).

Runs when Node.js is present. The CLI (about 1.5 GB of npm packages) is installed once per machine
into ``~/.cache/igratech-ws/asyncapi-cli`` (or ``IGRATECH_WS_ASYNCAPI_CLI_DIR``) and reused, by
`tests.support.nodejs` (CI installs it before the tests: ``make test-deps``); its usage analytics
are switched off, so the check talks to no host but the npm registry at install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from igratech_ws.contract import DOCUMENT_PATH
from tests.support.nodejs import asyncapi_cli


@pytest.mark.slow
@pytest.mark.timeout(2000)  # a first install of the CLI (retried): minutes
def test_the_official_asyncapi_cli_finds_the_document_valid(tmp_path: Path) -> None:
    if shutil.which("node") is None:
        if os.environ.get("IGRATECH_WS_REQUIRE_SERVICES") == "1":
            pytest.fail("Node.js is required to validate the AsyncAPI document in CI")
        pytest.skip("Node.js is not installed")
    analytics = tmp_path / "analytics.json"
    analytics.write_text(
        json.dumps({"analyticsEnabled": "false", "infoMessageShown": "true", "userID": "ci"})
    )
    env = {**os.environ, "CI": "true", "ASYNCAPI_METRICS_CONFIG_PATH": str(analytics)}
    result = subprocess.run(
        [str(asyncapi_cli()), "validate", str(DOCUMENT_PATH), "--fail-severity", "error"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "is valid" in output, output
    assert " 0 errors" in output or "0 errors" in output, output
