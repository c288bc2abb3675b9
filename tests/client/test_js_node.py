"""The JavaScript client's own tests (``clients/js/test/``, Node's test runner) against a real
gateway started here on port 0; node's output is the failure message."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from igratech_ws.app import running_app
from tests.support.gateway import API_KEY, SECRET, base_config
from tests.support.nodejs import JS_DIR, node, node_env


def _websocket_flag(binary: str) -> list[str]:
    """Node 20 has its own WebSocket behind a flag (22 has it on): the tests use it when it is
    there, as the runtime whose WebSocket never reports a refused connection."""
    probe = subprocess.run(
        [binary, "--experimental-websocket", "-e", "0"], capture_output=True, timeout=30
    )
    return ["--experimental-websocket"] if probe.returncode == 0 else []


async def test_node_test_runner_against_a_real_gateway() -> None:
    binary = node()
    env = node_env()
    flags = _websocket_flag(binary)
    async with running_app(base_config()) as app:
        env.update(
            IGRATECH_WS_URL=app.ws_url,
            IGRATECH_WS_API_URL=app.api_url,
            IGRATECH_WS_API_KEY=API_KEY,
            IGRATECH_WS_JWT_SECRET=SECRET,
        )
        proc = await asyncio.create_subprocess_exec(
            binary,
            *flags,
            "--test",
            "--test-reporter=spec",
            "test/",
            cwd=JS_DIR,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(120):
                output, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            output, _ = await proc.communicate()
            pytest.fail(f"node --test did not finish in 120 s:\n{output.decode(errors='replace')}")
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "fail 0" in text, text
    assert "skipped 0" in text, text  # the gateway tests ran, none skipped
