"""The acceptance test of the proxy wiring (issue 14): behind a trusted proxy, the per-address
limit counts the client named by X-Forwarded-For, and a proxy that names nobody is exempt.

The pure logic is in core/client_address.py (tests/ops/test_client_address.py); the wiring is in
transport/wsconnection.py (the address is resolved at the upgrade request) and node.py (the
limit). tests/ops/test_proxy_attacks.py attacks it with raw sockets.
"""

from __future__ import annotations

import asyncio
import json
import pathlib

import pytest
import websockets

from igratech_ws.app import running_app
from igratech_ws.config import Config, ConfigError, resolve


def config(**overrides: object) -> Config:
    return Config(host="127.0.0.1", port=0, api_port=0, max_connections_per_ip=1).with_overrides(
        overrides
    )


async def greeted(url: str, forwarded_for: str | None) -> bool:
    """Whether a connection (from 127.0.0.1, a trusted proxy by default) is greeted."""
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else None
    ws = await websockets.connect(url, additional_headers=headers)
    try:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        return bool(frame["event"] == "connected")
    except websockets.ConnectionClosed:
        return False
    finally:
        await ws.close()


async def test_the_limit_counts_the_forwarded_client() -> None:
    async with running_app(config()) as app:
        first = await websockets.connect(
            app.ws_url, additional_headers={"X-Forwarded-For": "203.0.113.9"}
        )
        try:
            await first.recv()
            assert await greeted(app.ws_url, "198.51.100.7")  # another client: accepted
            assert not await greeted(app.ws_url, "203.0.113.9")  # the same client: over its limit
        finally:
            await first.close()


async def test_a_proxy_that_names_nobody_is_not_limited() -> None:
    async with running_app(config()) as app:
        held = [await websockets.connect(app.ws_url) for _ in range(3)]
        try:
            for ws in held:
                assert json.loads(await ws.recv())["event"] == "connected"
        finally:
            for ws in held:
                await ws.close()


async def test_an_untrusted_peer_cannot_escape_its_limit() -> None:
    async with running_app(config(trusted_proxies="")) as app:
        first = await websockets.connect(
            app.ws_url, additional_headers={"X-Forwarded-For": "203.0.113.9"}
        )
        try:
            await first.recv()
            assert not await greeted(app.ws_url, "198.51.100.7")
        finally:
            await first.close()


def test_the_proxy_settings_come_from_every_source_and_bad_ones_name_theirs(
    tmp_path: pathlib.Path,
) -> None:
    resolved = resolve(
        environ={"IGRATECH_WS_PROXY_PROTOCOL": "on", "IGRATECH_WS_TRUSTED_PROXIES": ""}
    )
    assert resolved.config.proxy_protocol is True
    assert resolved.config.trusted_proxy_list.networks == ()  # empty: trust nobody
    assert resolved.sources["trusted_proxies"] == "environment IGRATECH_WS_TRUSTED_PROXIES"
    with pytest.raises(ConfigError) as bad:
        resolve(environ={"IGRATECH_WS_TRUSTED_PROXIES": "10.0.0.0/8, 10.0.0.1/8"})
    assert bad.value.problems == [
        "IGRATECH_WS_TRUSTED_PROXIES: '10.0.0.1/8' has host bits set: write an address "
        "(192.0.2.7) or a network (10.0.0.0/8)"
    ]
    file = tmp_path / "node.toml"
    file.write_text('trusted_proxies = "nginx"\nproxy_protocol = true\n')
    with pytest.raises(ConfigError, match=f"^{file}: trusted_proxies: 'nginx' is not an address"):
        resolve(file=str(file), environ={})
