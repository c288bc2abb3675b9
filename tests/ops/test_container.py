"""The container image: built from the Dockerfile with podman, it serves `/healthz` and a
WebSocket client as a non-root user, with a working HEALTHCHECK.

The base image comes from ``IGRATECH_WS_TEST_PYTHON_IMAGE`` if set, else a Debian image with
Python made locally by ``deploy/debian-python-base.sh`` (these machines reach no container
registry); it is built once and reused, and podman caches the dependency layer, so a run with the
base present takes well under two minutes. Skips where podman (or, to make the base, mmdebstrap)
is missing, unless ``IGRATECH_WS_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from igratech_ws.auth import mint_token

ROOT = Path(__file__).resolve().parents[2]
#: A fresh machine builds the Debian base and the image first: minutes, not the suite's 300 s.
pytestmark = pytest.mark.timeout(1800)

BASE_IMAGE = "localhost/debian-python:bookworm"
IMAGE = "localhost/igratech-ws:ops-test"
SECRET = "container-secret-that-is-long-enough-for-hs256"
API_KEY = "container-api-key"

pytestmark = pytest.mark.slow


def _missing(reason: str) -> None:
    if os.environ.get("IGRATECH_WS_REQUIRE_SERVICES") == "1":
        pytest.fail(
            f"{reason}, and IGRATECH_WS_REQUIRE_SERVICES=1 requires it (.ci/run installs it)"
        )
    pytest.skip(reason)


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if shutil.which("podman") is None:
        _missing("podman is not installed")
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env:
        # What podman needs in this kind of sandbox (no systemd, runc rather than crun, no
        # ulimits to set); harmless on a full machine.
        conf = tmp_path_factory.mktemp("podman") / "containers.conf"
        runtime = '\nruntime = "runc"' if shutil.which("runc") else ""
        conf.write_text(
            '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"'
            + runtime
            + "\n"
        )
        env["CONTAINERS_CONF"] = str(conf)
    return env


def podman(env: dict[str, str], *args: str, timeout: float = 60, check: bool = True) -> str:
    """podman's stdout (`podman logs` also gets the container's stderr: logs are on stderr)."""
    result = subprocess.run(
        ["podman", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + (result.stderr if args[0] == "logs" else "")


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str]) -> str:
    base = os.environ.get("IGRATECH_WS_TEST_PYTHON_IMAGE", BASE_IMAGE)
    exists = subprocess.run(
        ["podman", "image", "exists", base], env=podman_env, timeout=30, check=False
    )
    if exists.returncode != 0:
        if base != BASE_IMAGE:
            _missing(f"the base image {base} is not present")
        if shutil.which("mmdebstrap") is None:
            _missing("mmdebstrap is not installed (it makes the Debian base image)")
        subprocess.run(
            [str(ROOT / "deploy" / "debian-python-base.sh"), base],
            env=podman_env,
            check=True,
            timeout=300,
            capture_output=True,
        )
    podman(
        podman_env, "build", "--format", "docker", "--network=host",
        "-v", "/etc/ssl/certs:/etc/ssl/certs:ro",  # the machine's CA bundle, for PyPI
        "--build-arg", f"PYTHON_IMAGE={base}", "-t", IMAGE, str(ROOT),
        timeout=480,
    )  # fmt: skip
    return IMAGE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def container(podman_env: dict[str, str], image: str) -> Iterator[tuple[str, int, int]]:
    port, api_port = free_port(), free_port()
    name = f"igws-ops-test-{os.getpid()}-{port}"
    podman(
        podman_env, "run", "-d", "--name", name, "--network=host",
        "-e", f"IGRATECH_WS_PORT={port}", "-e", f"IGRATECH_WS_API_PORT={api_port}",
        "-e", f"IGRATECH_WS_JWT_SECRET={SECRET}", "-e", f"IGRATECH_WS_API_KEY={API_KEY}",
        image,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/healthz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    logs = podman(podman_env, "logs", name, check=False)
                    raise AssertionError(f"the container never served /healthz:\n{logs}") from None
                time.sleep(0.2)
        yield name, port, api_port
    finally:
        podman(podman_env, "rm", "-f", "-t", "5", name, check=False)


def test_the_image_is_built_as_documented(podman_env: dict[str, str], image: str) -> None:
    inspected = json.loads(podman(podman_env, "image", "inspect", image))[0]
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert config["Cmd"] == ["igratech-ws", "serve"]
    assert inspected["Healthcheck"]["Test"] == ["CMD", "igratech-ws", "health"]
    assert {"8080/tcp", "8081/tcp"} <= set(config["ExposedPorts"])


def test_the_container_serves_health_and_websockets_as_a_non_root_user(
    podman_env: dict[str, str], container: tuple[str, int, int]
) -> None:
    name, port, api_port = container
    uid = podman(podman_env, "exec", name, "id", "-u").strip()
    assert uid == "10001"
    # The gateway process itself (PID 1) runs as that user, not only `podman exec`.
    status = podman(podman_env, "exec", name, "cat", "/proc/1/status")
    assert any(line.split()[:2] == ["Uid:", "10001"] for line in status.splitlines()), status
    health = subprocess.run(
        ["podman", "healthcheck", "run", name],
        env=podman_env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert health.returncode == 0, health.stderr

    async def client() -> tuple[dict[str, object], dict[str, object]]:
        token = mint_token(SECRET, "u-container", ttl=300)
        url = f"ws://127.0.0.1:{port}/wspublic?token={token}"
        async with websockets.connect(url, open_timeout=10) as ws:
            connected = json.loads(await asyncio.wait_for(ws.recv(), 10))
            body = json.dumps({
                "event": "balance", "userId": "u-container",
                "data": {"balance": "1.00", "currency": "EUR", "updatedAt": "2026-11-23T19:45:00Z"},
            }).encode()  # fmt: skip
            request = urllib.request.Request(
                f"http://127.0.0.1:{api_port}/api/v1/publish", data=body, method="POST",
                headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
            )  # fmt: skip
            await asyncio.to_thread(urllib.request.urlopen, request, None, 10)
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if frame["event"] == "balance":
                    return connected, frame

    connected, push = asyncio.run(client())
    assert connected["event"] == "connected"
    assert push["channel"] == "user:u-container" and push["data"]["balance"] == "1.00"


def test_sigterm_drains_and_stops_the_container(
    podman_env: dict[str, str], container: tuple[str, int, int]
) -> None:
    name, _, _ = container
    started = time.monotonic()
    podman(podman_env, "stop", "-t", "20", name, timeout=40)
    assert time.monotonic() - started < 15  # stopped by SIGTERM, not killed after the timeout
    state = json.loads(podman(podman_env, "inspect", name))[0]["State"]
    assert state["ExitCode"] == 0, state
    logs = podman(podman_env, "logs", name)
    assert '"msg":"draining"' in logs
