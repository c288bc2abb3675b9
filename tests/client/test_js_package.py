"""The JavaScript package: `npm pack` works and ships the module, its types and README; the node
serves the very same module at /console/static/igratech-ws-client.js (one source of truth)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from importlib import resources
from pathlib import Path

import aiohttp
import pytest

from igratech_ws.app import running_app
from tests.support.gateway import base_config
from tests.support.nodejs import CLIENT_MODULE, JS_DIR, node

EXPORTS = [
    "Backoff",
    "CLOSE_CODES",
    "FINAL_CLOSE_CODES",
    "IgratechWsClient",
    "PUSH_EVENTS",
    "STATE_EVENTS",
    "shouldReconnect",
]


def test_npm_pack_ships_the_module_its_types_and_readme(tmp_path: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        node()  # skips (or fails in CI) with the reason
        pytest.skip("npm is not installed")
    result = subprocess.run(
        [npm, "pack", "--json", "--pack-destination", str(tmp_path)],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    [packed] = json.loads(result.stdout)
    with tarfile.open(tmp_path / packed["filename"]) as tar:
        names = sorted(tar.getnames())
        module = tar.extractfile("package/igratech-ws-client.js")
        assert module is not None and module.read() == CLIENT_MODULE.read_bytes()
    assert names == [
        "package/README.md",
        "package/igratech-ws-client.d.ts",
        "package/igratech-ws-client.js",
        "package/package.json",
    ]
    manifest = json.loads((JS_DIR / "package.json").read_text())
    assert manifest["type"] == "module" and not manifest.get("dependencies")
    assert manifest["exports"]["."]["types"] == "./igratech-ws-client.d.ts"


def test_the_module_loads_and_exports_the_documented_names() -> None:
    script = (
        f"const m = await import({json.dumps(CLIENT_MODULE.as_uri())});"
        "console.log(JSON.stringify(Object.keys(m).sort()));"
    )
    result = subprocess.run(
        [node(), "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == EXPORTS


def test_the_packaged_static_file_is_the_client_module() -> None:
    """`static/igratech-ws-client.js` is a link to clients/js/ (a wheel carries its content)."""
    static = resources.files("igratech_ws").joinpath("static", "igratech-ws-client.js")
    assert static.read_bytes() == CLIENT_MODULE.read_bytes()


async def test_the_node_serves_the_client_module() -> None:
    async with (
        running_app(base_config()) as app,
        aiohttp.ClientSession() as http,
        http.get(app.api_url + "/console/static/igratech-ws-client.js") as answer,
    ):
        assert answer.status == 200
        assert await answer.read() == CLIENT_MODULE.read_bytes()
