"""Every start failure and every refused `listen`/`publish`/`token` is one line on stderr that
names the host, port, file or variable and says what to do: no traceback, a non-zero exit.

The CLI runs as a subprocess, as an operator runs it; log lines (JSON) may precede the message,
the message is the only other line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from igratech_ws.app import App, running_app
from igratech_ws.config import Config

SECRET = "cli-errors-secret-that-is-long-enough-for-hs256"


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, str]:
    """Exit status and the single non-log line of stderr (asserted to be alone)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IGRATECH_WS_")}
    result = subprocess.run(
        [sys.executable, "-m", "igratech_ws.cli", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line and not line.startswith("{")]
    assert len(lines) == 1, result.stderr
    return result.returncode, lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def listening() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_the_websocket_port_in_use() -> None:
    with listening() as port:
        code, line = run("serve", "--port", str(port), "--api-port", "0")
    assert code != 0
    assert line.startswith(f"igratech-ws serve: port {port} on 0.0.0.0 is already in use")
    assert line.endswith("choose another port with --port / IGRATECH_WS_PORT")


def test_the_api_port_in_use() -> None:
    with listening() as port:
        code, line = run("serve", "--port", "0", "--api-port", str(port))
    assert code != 0
    assert f"port {port} on 127.0.0.1 is already in use" in line
    assert "--api-port / IGRATECH_WS_API_PORT" in line


def test_an_address_not_of_this_machine() -> None:
    code, line = run("serve", "--host", "192.0.2.1", "--port", "0", "--api-port", "0")
    assert code != 0
    assert "cannot listen on 192.0.2.1:0: 192.0.2.1 is not an address of this machine" in line
    assert "--host / IGRATECH_WS_HOST" in line


def test_an_unreachable_broker_is_named_without_its_password() -> None:
    port = free_port()
    code, line = run(
        "serve",
        "--broker",
        f"nats://user:hunter2@127.0.0.1:{port}",
        "--port",
        "0",
        "--api-port",
        "0",
    )
    assert code != 0
    assert line.startswith(f"igratech-ws serve: cannot reach the broker nats://127.0.0.1:{port}")
    assert "hunter2" not in line
    assert line.endswith("--broker / IGRATECH_WS_BROKER at a running one")


def test_an_unknown_broker_scheme() -> None:
    code, line = run("serve", "--broker", "kafka://k:9092", "--port", "0", "--api-port", "0")
    assert code != 0
    assert "unknown broker URL scheme 'kafka'" in line and "--broker" in line


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        (
            {"IGRATECH_WS_PORT": "eighty"},
            (),
            "IGRATECH_WS_PORT must be an integer from 0 to 65535, not 'eighty'",
        ),
        ({}, ("--port", "70000"), "--port must be an integer from 0 to 65535, not '70000'"),
        (
            {"IGRATECH_WS_CONFIG": "/nowhere/gateway.toml"},
            (),
            "cannot read the configuration file /nowhere/gateway.toml",
        ),
        (
            {"IGRATECH_WS_API_KEY_FILE": "/nowhere/key"},
            (),
            "IGRATECH_WS_API_KEY_FILE: cannot read /nowhere/key",
        ),
        ({"IGRATECH_WS_ALLOW_ANONYMOUS": "false"}, (), "allow_anonymous is off but no jwt_secret"),
    ],
)
def test_configuration_errors(env: dict[str, str], args: tuple[str, ...], expected: str) -> None:
    code, line = run("serve", *args, env=env)
    assert code == 2
    assert line == f"igratech-ws: {expected}" or line.startswith(f"igratech-ws: {expected}")


def test_a_bad_configuration_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("prot = 8080\n")
    code, line = run("serve", "--config", str(path))
    assert code == 2
    assert line == f"igratech-ws: {path}: unknown setting 'prot' (did you mean port?)"
    path.write_text("port = [\n")
    code, line = run("serve", "--config", str(path))
    assert code == 2 and line.startswith(f"igratech-ws: {path} is not valid TOML")


def test_a_missing_jwks_file() -> None:
    env = {"IGRATECH_WS_JWT_JWKS_FILE": "/nowhere/jwks.json"}
    code, line = run("serve", "--port", "0", "--api-port", "0", env=env)
    assert code != 0
    assert line == (
        "igratech-ws serve: cannot use the JWKS file /nowhere/jwks.json: No such file or "
        "directory; fix the file or IGRATECH_WS_JWT_JWKS_FILE"
    )


def test_a_broken_jwks_file(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": []}')
    code, line = run(
        "demo", "--port", "0", "--api-port", "0", env={"IGRATECH_WS_JWT_JWKS_FILE": str(path)}
    )
    assert code != 0
    assert line.startswith(f"igratech-ws demo: cannot use the JWKS file {path}:")


def test_a_public_key_that_is_not_pem(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    env = {"IGRATECH_WS_JWT_PUBLIC_KEY_FILE": str(path)}
    code, line = run("serve", "--port", "0", "--api-port", "0", env=env)
    assert code != 0
    assert "IGRATECH_WS_JWT_PUBLIC_KEY" in line and "is not an RSA or P-256 EC public key" in line


def test_a_misspelled_variable_is_a_warning_at_start() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IGRATECH_WS_")}
    result = subprocess.run(
        [sys.executable, "-m", "igratech_ws.cli", "demo", "--port", "0", "--api-port", "0",
         "--duration", "0.3"],
        env={**clean, "IGRATECH_WS_PROT": "9000"}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == (
        "igratech-ws: warning: IGRATECH_WS_PROT is not a setting and is ignored "
        "(did you mean IGRATECH_WS_PORT?)"
    )
    code, line = run("config", env={"IGRATECH_WS_PROT": "9000"})
    assert code == 0
    assert line == (
        "warning: IGRATECH_WS_PROT is not a setting and is ignored (did you mean IGRATECH_WS_PORT?)"
    )


# --- token ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (("--user", "u-1"), {}, "set IGRATECH_WS_JWT_SECRET to the gateway's secret"),
        (
            ("--user", "user 1"),
            {"IGRATECH_WS_JWT_SECRET": SECRET},
            "--user 'user 1' is not a user id",
        ),
        (
            ("--user", "x" * 65),
            {"IGRATECH_WS_JWT_SECRET": SECRET},
            "is not a user id the gateway accepts",
        ),
        (
            ("--user", "u-1", "--ttl", "0"),
            {"IGRATECH_WS_JWT_SECRET": SECRET},
            "--ttl 0 must be from 1",
        ),
        (
            ("--user", "u-1", "--ttl", "-5"),
            {"IGRATECH_WS_JWT_SECRET": SECRET},
            "--ttl -5 must be from 1",
        ),
        (
            ("--user", "u-1", "--ttl", "nan"),
            {"IGRATECH_WS_JWT_SECRET": SECRET},
            "--ttl nan must be from 1",
        ),
        (
            ("--user", "u-1", "--ttl", "1e300"),
            {"IGRATECH_WS_JWT_SECRET": SECRET},
            "--ttl 1e+300 must be",
        ),
        (
            ("--user", "u-1", "--audience", "app"),
            {"IGRATECH_WS_JWT_SECRET": SECRET, "IGRATECH_WS_JWT_AUDIENCE": "web"},
            "--audience 'app' would be refused: the gateway expects 'web'",
        ),
        (("--user", "u-1"), {"IGRATECH_WS_JWT_PUBLIC_KEY": "PEM"}, "verifies RS256/ES256 tokens"),
    ],
)
def test_token_refuses_what_the_gateway_would_refuse(
    args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    code, line = run("token", *args, env=env)
    assert code == 1
    assert line.startswith("igratech-ws token: ") and expected in line


def test_token_takes_audience_and_issuer_from_the_gateway_settings() -> None:
    from igratech_ws.auth import TokenVerifier

    env = {
        "IGRATECH_WS_JWT_SECRET": SECRET,
        "IGRATECH_WS_JWT_AUDIENCE": "web",
        "IGRATECH_WS_JWT_ISSUER": "https://id.example",
    }
    result = subprocess.run(
        [sys.executable, "-m", "igratech_ws.cli", "token", "--user", "u-7"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    verifier = TokenVerifier(secret=SECRET, audience="web", issuer="https://id.example")
    assert verifier.verify(result.stdout.strip()).user_id == "u-7"


# --- listen and publish against a real gateway ------------------------------------------------


@pytest.fixture
async def gateway() -> App:
    config = Config(
        host="127.0.0.1",
        port=0,
        api_port=0,
        jwt_secret=SECRET,
        api_key="cli-key",
        allow_anonymous=False,
    )
    async with running_app(config) as app:
        yield app  # type: ignore[misc]


async def arun(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    import asyncio

    return await asyncio.to_thread(run, *args, env=env)


async def test_listen_prints_the_server_reason(gateway: App) -> None:
    code, line = await arun(
        "listen", "--url", gateway.ws_url, "--token", "not-a-jwt", "--max-events", "1"
    )
    assert code == 1
    assert line.startswith(
        "igratech-ws listen: the gateway refused the connection: malformed token"
    )
    assert "--token / IGRATECH_WS_TOKEN" in line
    code, line = await arun("listen", "--url", gateway.ws_url, "--max-events", "1")
    assert code == 1
    assert "A token is required" in line
    wrong_path = gateway.ws_url.replace("/wspublic", "/ws")
    code, line = await arun("listen", "--url", wrong_path, "--max-events", "1")
    assert code == 1 and "The WebSocket endpoint is /wspublic" in line


async def test_listen_to_a_closed_port_names_it() -> None:
    port = free_port()
    code, line = await arun(
        "listen", "--url", f"ws://127.0.0.1:{port}/wspublic", "--max-events", "1"
    )
    assert code == 1
    assert line.startswith(f"igratech-ws listen: cannot connect to ws://127.0.0.1:{port}/wspublic")
    assert line.endswith("is the gateway running? check --url")


async def test_publish_prints_the_server_reason(gateway: App) -> None:
    data = json.dumps({"balance": "1.00", "currency": "EUR", "updatedAt": "2026-11-23 19:45"})
    args = (
        "publish",
        "--api",
        gateway.api_url,
        "--event",
        "balance",
        "--user",
        "u-1",
        "--data",
        data,
    )
    code, line = await arun(*args, env={"IGRATECH_WS_API_KEY": "wrong"})
    assert code == 1
    assert line.startswith("igratech-ws publish: the gateway answered HTTP 401: unauthorized")
    assert line.endswith("IGRATECH_WS_API_KEY must be the gateway's API key")
    code, line = await arun(*args, env={"IGRATECH_WS_API_KEY": "cli-key"})
    assert code == 1
    assert line.startswith("igratech-ws publish: the gateway answered HTTP 400: bad_message")
    assert line.endswith("(data.updatedAt)")
    code, line = await arun(*args)
    assert (code, line) == (
        1,
        "igratech-ws publish: set IGRATECH_WS_API_KEY to the gateway's API key",
    )


async def test_publish_to_a_closed_port_names_it() -> None:
    port = free_port()
    code, line = await arun(
        "publish",
        "--api",
        f"http://127.0.0.1:{port}",
        "--event",
        "stats",
        "--data",
        "{}",
        env={"IGRATECH_WS_API_KEY": "k"},
    )
    assert code == 1
    assert line.startswith(f"igratech-ws publish: cannot reach http://127.0.0.1:{port}:")


async def test_health_says_whether_the_node_answers(gateway: App) -> None:
    env = {"IGRATECH_WS_API_PORT": str(gateway.api_port)}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "igratech_ws.cli", "health"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    port = free_port()
    code, line = await arun("health", env={"IGRATECH_WS_API_PORT": str(port)})
    assert code == 1
    assert line.startswith(f"igratech-ws health: http://127.0.0.1:{port}/healthz does not answer")
