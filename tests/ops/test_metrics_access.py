"""Who may read ``/metrics`` and who may publish: Prometheus needs no key that can publish.

By default ``/metrics`` answers without a key (the internal listener is private); with a
`metrics_key`, it needs that read-only key (or the API key). The metrics key never publishes,
logs out or reads ``/api/v1/info``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from igratech_ws.app import App, running_app
from igratech_ws.config import Config

API_KEY = "access-api-key"
METRICS_KEY = "access-metrics-key"
BALANCE = {
    "event": "balance",
    "userId": "u-1",
    "data": {"balance": "1.00", "currency": "EUR", "updatedAt": "2026-11-23T19:45:00Z"},
}


def config() -> Config:
    return Config(host="127.0.0.1", port=0, api_host="127.0.0.1", api_port=0, api_key=API_KEY)


@pytest.fixture
async def default_gateway() -> AsyncIterator[App]:
    async with running_app(config()) as app:
        yield app


@pytest.fixture
async def keyed_gateway() -> AsyncIterator[App]:
    async with running_app(config().with_overrides({"metrics_key": METRICS_KEY})) as app:
        yield app


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def status(app: App, method: str, path: str, headers: dict[str, str] | None = None) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method,
            app.api_url + path,
            headers=headers,
            json=BALANCE if path.endswith("/publish") else None,
        ) as answer,
    ):
        if answer.status == 200 and path == "/metrics":
            assert "igratech_ws_connections" in await answer.text()
        return answer.status


async def test_without_a_metrics_key_metrics_need_no_key(default_gateway: App) -> None:
    assert await status(default_gateway, "GET", "/metrics") == 200
    assert await status(default_gateway, "GET", "/metrics", bearer("anything")) == 200
    # ... and nothing else became public
    assert await status(default_gateway, "GET", "/api/v1/info") == 401
    assert await status(default_gateway, "POST", "/api/v1/publish") == 401


async def test_a_metrics_key_guards_metrics_and_only_reads(keyed_gateway: App) -> None:
    app = keyed_gateway
    assert await status(app, "GET", "/metrics") == 401
    assert await status(app, "GET", "/metrics", bearer("wrong")) == 401
    assert await status(app, "GET", "/metrics", bearer(METRICS_KEY)) == 200
    assert await status(app, "GET", "/metrics", bearer(API_KEY)) == 200
    # The read-only key cannot publish, log out or read the node's info.
    assert await status(app, "POST", "/api/v1/publish", bearer(METRICS_KEY)) == 401
    assert await status(app, "POST", "/api/v1/users/u-1/logout", bearer(METRICS_KEY)) == 401
    assert await status(app, "GET", "/api/v1/info", bearer(METRICS_KEY)) == 401
    # The API key alone publishes and logs out.
    assert await status(app, "POST", "/api/v1/publish", bearer(API_KEY)) == 200
    assert await status(app, "POST", "/api/v1/users/u-1/logout", bearer(API_KEY)) == 200


async def test_metrics_path_variants_are_not_a_way_around_the_key(keyed_gateway: App) -> None:
    for path in ("/metrics/", "/Metrics", "/metrics/../api/v1/info", "/metrics%2F..%2Fapi"):
        assert await status(keyed_gateway, "GET", path, bearer(METRICS_KEY)) in (401, 404), path


def test_the_metrics_key_is_a_secret() -> None:
    text = repr(Config(metrics_key="m-secret"))
    assert "m-secret" not in text
    assert Config.from_env({"IGRATECH_WS_METRICS_KEY": "m"}).metrics_key == "m"
