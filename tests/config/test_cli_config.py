"""Configuration precedence (defaults < TOML < environment < flags) and the CLI that shows it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from igratech_ws.cli import main
from igratech_ws.config import Config, ConfigError, resolve


def test_precedence_is_defaults_then_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('port = 9000\napi_port = 9001\nbroker = "redis://r:6379/0"\nhistory_ttl = 60\n')
    env = {"IGRATECH_WS_API_PORT": "9101", "IGRATECH_WS_HISTORY_SIZE": "50"}
    config = Config.load(
        file=str(path), environ=env, flags={"broker": "nats://n:4222", "host": None}
    )
    assert config.port == 9000  # file
    assert config.api_port == 9101  # environment over file
    assert config.broker == "nats://n:4222"  # flag over file
    assert config.history_ttl == 60.0 and config.history_size == 50
    assert config.host == "0.0.0.0"  # a None flag changes nothing


def test_the_file_can_come_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("idle_timeout = 90\n")
    assert Config.load(environ={"IGRATECH_WS_CONFIG": str(path)}).idle_timeout == 90


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "unknown setting 'prot' (did you mean port?)"),
        ('port = "8080"\n', "bad.toml: port must be an integer from 0 to 65535, not '8080'"),
        ("allow_anonymous = 1\n", "bad.toml: allow_anonymous must be true or false, not 1"),
        ('api_key = "k"\n', "api_key is a secret; set IGRATECH_WS_API_KEY instead"),
        ("port = \n", "is not valid TOML"),
    ],
)
def test_bad_files_are_explained(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        Config.load(file=str(path), environ={})
    assert len(caught.value.problems) == 1
    assert message in caught.value.problems[0]


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the configuration file /nowhere\.toml"):
        Config.load(environ={"IGRATECH_WS_CONFIG": "/nowhere.toml"})


def test_every_source_is_checked_by_the_same_model(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("history_size = 0\n")
    with pytest.raises(ConfigError) as caught:
        Config.load(
            file=str(path),
            environ={"IGRATECH_WS_HISTORY_SIZE": "-1"},
            flags={"port": "70000"},
        )
    assert caught.value.problems == [
        f"{path}: history_size must be a positive integer, not 0",
        "IGRATECH_WS_HISTORY_SIZE must be a positive integer, not '-1'",
        "--port must be an integer from 0 to 65535, not '70000'",
    ]


def test_sources_are_remembered(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("port = 9000\nhistory_ttl = 60\n")
    secret = tmp_path / "key"
    secret.write_text("k")
    resolved = resolve(
        file=str(path),
        environ={"IGRATECH_WS_HISTORY_TTL": "30", "IGRATECH_WS_API_KEY_FILE": str(secret)},
        flags={"host": "127.0.0.1", "port": None},
    )
    assert resolved.sources["port"] == f"file {path}"
    assert resolved.sources["history_ttl"] == "environment IGRATECH_WS_HISTORY_TTL"
    assert resolved.sources["api_key"] == "environment IGRATECH_WS_API_KEY_FILE"
    assert resolved.sources["host"] == "flag --host"
    assert resolved.sources["broker"] == "default"
    assert (resolved.config.port, resolved.config.history_ttl) == (9000, 30.0)


@pytest.mark.parametrize(
    ("variable", "hint"),
    [
        ("IGRATECH_WS_PROT", "did you mean IGRATECH_WS_PORT?"),
        ("IGRATECH_WS_API_KEY_FIEL", "did you mean IGRATECH_WS_API_KEY_FILE?"),
        ("IGRATECH_WS_MAX_CONNECTION_PER_IP", "did you mean IGRATECH_WS_MAX_CONNECTIONS_PER_IP?"),
        ("IGRATECH_WS_WHATEVER", ""),
    ],
)
def test_misspelled_variables_are_reported(variable: str, hint: str) -> None:
    warnings = resolve(environ={variable: "1", "IGRATECH_WS_REQUIRE_SERVICES": "1"}).warnings
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{variable} is not a setting and is ignored")
    assert warnings[0].endswith(f"({hint})" if hint else "ignored")


def test_config_command_masks_secrets_and_explains_invalid_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IGRATECH_WS_API_KEY", "very-secret-key")
    monkeypatch.setenv("IGRATECH_WS_HISTROY_SIZE", "5")
    assert main(["config", "--port", "9000"]) == 0
    out, err = capsys.readouterr()
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "'***'" in lines["api_key"] and "very-secret-key" not in out
    assert lines["api_key"].endswith("# environment IGRATECH_WS_API_KEY")
    assert lines["port"].split("=")[1].split("#")[0].strip() == "9000"
    assert lines["port"].endswith("# flag --port")
    assert lines["broker"].endswith("# default")
    assert "IGRATECH_WS_HISTROY_SIZE is not a setting" in err and "IGRATECH_WS_HISTORY_SIZE?" in err
    assert main(["config", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "--port must be an integer from 0 to 65535, not '70000'" in err
    assert "idle_timeout (10) must be greater than ping_interval (20)" not in err  # one at a time
    monkeypatch.setenv("IGRATECH_WS_PORT", "eighty")
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert "IGRATECH_WS_PORT must be an integer from 0 to 65535, not 'eighty'" in err
    monkeypatch.delenv("IGRATECH_WS_PORT")
    monkeypatch.setenv("IGRATECH_WS_IDLE_TIMEOUT", "10")
    monkeypatch.setenv("IGRATECH_WS_PING_INTERVAL", "20")
    assert main(["config"]) == 2
    assert "idle_timeout (10) must be greater than ping_interval (20)" in capsys.readouterr().err


def test_workers_need_a_shared_broker(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--workers", "2", "--port", "18555", "--api-port", "18556"]) == 2
    assert "--workers needs a shared broker" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_workers_share_the_ports_and_drain_on_sigterm(redis_url: str) -> None:
    port, api_port = _free_port(), _free_port()
    env = {**os.environ, "IGRATECH_WS_API_KEY": "k", "IGRATECH_WS_JWT_SECRET": "s" * 32}
    broker = redis_url + "?prefix=igws-workers-test:"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "igratech_ws.cli",
            "serve",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--api-port",
            str(api_port),
            "--broker",
            broker,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        nodes: set[str] = set()
        deadline = time.monotonic() + 20
        while len(nodes) < 2 and time.monotonic() < deadline:
            request = urllib.request.Request(
                f"http://127.0.0.1:{api_port}/api/v1/info", headers={"Authorization": "Bearer k"}
            )
            try:
                # A new connection each time: the kernel picks a worker per connection.
                with urllib.request.urlopen(request, timeout=2) as answer:
                    nodes.add(__import__("json").loads(answer.read())["node"])
            except OSError:
                time.sleep(0.1)
        assert len(nodes) == 2, nodes
        assert all(node.endswith(("-w0", "-w1")) for node in nodes)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_token_mints_a_token_the_server_accepts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from igratech_ws.auth import TokenVerifier

    monkeypatch.setenv("IGRATECH_WS_JWT_SECRET", "t" * 40)
    assert main(["token", "--user", "u-42", "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenVerifier(secret="t" * 40).verify(token).user_id == "u-42"
    monkeypatch.delenv("IGRATECH_WS_JWT_SECRET")
    assert main(["token", "--user", "u-42"]) == 1


async def test_publish_goes_through_the_api_and_reports_validation_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import json

    from igratech_ws.app import running_app

    monkeypatch.setenv("IGRATECH_WS_API_KEY", "cli-key")
    config = Config(host="127.0.0.1", port=0, api_port=0, api_key="cli-key")
    data = {"balance": "10.00", "currency": "EUR", "updatedAt": "2026-11-23T19:45:00Z"}
    async with running_app(config) as app:
        args = ["publish", "--api", app.api_url, "--event", "balance", "--user", "u-1"]
        assert await asyncio.to_thread(main, [*args, "--data", json.dumps(data)]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert (answer["channel"], answer["offset"]) == ("user:u-1", 1)
        bad = {**data, "balance": 10}
        assert await asyncio.to_thread(main, [*args, "--data", json.dumps(bad)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "HTTP 400: bad_message:" in err
        assert err.rstrip().endswith("(data.balance)")
