"""``GET /metrics``: the collector over a real node, and the route on a real gateway."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import websockets
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from igratech_ws import metrics
from igratech_ws.app import App, running_app
from igratech_ws.auth import mint_token
from igratech_ws.brokers.base import BrokerState, Publication
from igratech_ws.config import Config

SECRET = "metrics-secret-that-is-long-enough-for-hs256"
API_KEY = "metrics-api-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
NOW = "2026-11-23T19:45:00Z"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def config() -> Config:
    return Config(
        host="127.0.0.1",
        port=0,
        api_host="127.0.0.1",
        api_port=0,
        jwt_secret=SECRET,
        api_key=API_KEY,
    )


@pytest.fixture
async def gateway() -> AsyncIterator[App]:
    async with running_app(config()) as app:
        yield app


def parse(text: str) -> Samples:
    """Every sample as (name, labels without `node`) -> value."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if k != "node")
            samples[(sample.name, labels)] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(app: App) -> Samples:
    async with (
        aiohttp.ClientSession() as http,
        http.get(app.api_url + "/metrics", headers=AUTH) as answer,
    ):
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        return parse(await answer.text())


async def scrape_until(app: App, name: str, **labels: str) -> Samples:
    """Scrape until `name{labels}` is present and positive (bounded: 5 s)."""
    for _ in range(100):
        samples = await scrape(app)
        found = value(samples, name, **labels)
        if found:
            return samples
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}{labels} never appeared")


async def publish(app: App, body: dict[str, Any]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(app.api_url + "/api/v1/publish", json=body, headers=AUTH) as answer,
    ):
        assert answer.status == 200
        result: dict[str, Any] = await answer.json()
        return result


async def recv(ws: Any, event: str) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert frame["event"] == event, frame
    return frame


# Who may read /metrics (no key by default, or the metrics key): tests/ops/test_metrics_access.py


async def test_metrics_follow_the_node(gateway: App) -> None:
    app = gateway
    samples = await scrape(app)
    assert value(samples, "igratech_ws_connections") == 0
    assert value(samples, "igratech_ws_broker_state", state="connected") == 1
    assert value(samples, "igratech_ws_broker_state", state="disconnected") == 0
    assert value(samples, "igratech_ws_publish_to_send_seconds_count") == 0

    url = app.ws_url + "?token=" + mint_token(SECRET, "u-1")
    async with websockets.connect(url, open_timeout=5, close_timeout=2) as ws:
        await recv(ws, "connected")
        await ws.send(json.dumps({"event": "settings", "data": {"follow": ["g-1"]}}))
        await recv(ws, "settings")
        await ws.send(json.dumps({"event": "ping", "data": {"ts": 1}}))
        await recv(ws, "pong")
        body = {
            "event": "incident",
            "gameId": "g-1",
            "data": {"gameId": "g-1", "incidentId": "i-1", "type": "goal", "occurredAt": NOW},
        }
        await publish(app, body)
        await recv(ws, "incident")

        samples = await scrape(app)
        assert value(samples, "igratech_ws_connections") == 1
        assert value(samples, "igratech_ws_users") == 1
        assert value(samples, "igratech_ws_channels") == 2  # user:u-1 and game:g-1
        assert value(samples, "igratech_ws_connections_accepted_total") == 1
        assert value(samples, "igratech_ws_publications_in_total") == 1
        frames = value(samples, "igratech_ws_frames_out_total")
        assert frames is not None and frames >= 1
        # One publication reached a follower: one latency observation, and it is not negative.
        assert value(samples, "igratech_ws_publish_to_send_seconds_count") == 1
        latency = value(samples, "igratech_ws_publish_to_send_seconds_sum")
        assert latency is not None and latency >= 0
        assert value(samples, "igratech_ws_publish_to_send_seconds_bucket", le="+Inf") == 1

        # A forced logout closes the connection with 4002: counted by code.
        async with (
            aiohttp.ClientSession() as http,
            http.post(app.api_url + "/api/v1/users/u-1/logout", headers=AUTH) as answer,
        ):
            assert answer.status == 200
        await recv(ws, "logout")
    samples = await scrape_until(app, "igratech_ws_closes_total", code="4002")
    assert value(samples, "igratech_ws_closes_total", code="4002") == 1
    assert value(samples, "igratech_ws_connections") == 0
    assert value(samples, "igratech_ws_slow_consumer_closes_total") == 0


async def test_two_nodes_in_one_process_have_their_own_metrics() -> None:
    async with running_app(config()) as first, running_app(config()) as second:
        one, two = await scrape(first), await scrape(second)
        assert one is not two
        assert value(one, "igratech_ws_connections") == 0
        assert value(two, "igratech_ws_connections") == 0


# --- the collector over a stand-in node ------------------------------------------------------


class _Hub:
    def __init__(self) -> None:
        self.frames_out = 12
        self.writes = 4
        self.publications_in = 5
        self.resyncs = 2
        self.channel_count = 3
        self.on_delivered: Any = None


class _Broker:
    state = BrokerState.DISCONNECTED
    append_chains = (5, 2)


class _MemoryLikeBroker:
    state = BrokerState.CONNECTED


class _Node:
    def __init__(self) -> None:
        self.node_id = "n-1"
        self.hub = _Hub()
        self.broker: object = _Broker()
        self.closes = {1013: 4, 1000: 1}
        self.connections_total = 9
        self.draining = True
        self.started_at = 0.0
        self.connection_count = 2
        self.messages_in = {"ping": 7, "settings": 3}
        self.rate_limited = 6
        self.refused = {"origin_not_allowed": 2}

    def info(self) -> dict[str, Any]:
        return {"users": 1}


def _publication(published_at: float) -> Publication:
    return Publication("game:g-1", 1, "e", "incident", b"{}", published_at, "n-1")


def test_collector_reads_every_counter() -> None:
    node = _Node()
    app = web.Application()
    installed = metrics.install(app, node)
    assert node.hub.on_delivered == installed.on_delivered
    samples = parse(installed.exposition().decode())
    assert value(samples, "igratech_ws_slow_consumer_closes_total") == 4
    assert value(samples, "igratech_ws_closes_total", code="1013") == 4
    assert value(samples, "igratech_ws_closes_total", code="1000") == 1
    assert value(samples, "igratech_ws_messages_in_total", event="ping") == 7
    assert value(samples, "igratech_ws_messages_in_total", event="settings") == 3
    assert value(samples, "igratech_ws_resyncs_total") == 2
    assert value(samples, "igratech_ws_rate_limited_messages_total") == 6
    assert value(samples, "igratech_ws_handshakes_refused_total", reason="origin_not_allowed") == 2
    assert value(samples, "igratech_ws_frames_out_total") == 12
    assert value(samples, "igratech_ws_socket_writes_total") == 4
    assert value(samples, "igratech_ws_draining") == 1
    assert value(samples, "igratech_ws_broker_state", state="disconnected") == 1
    assert value(samples, "igratech_ws_broker_state", state="connected") == 0
    assert value(samples, "igratech_ws_broker_append_chains_total") == 5
    assert value(samples, "igratech_ws_broker_append_chain_breaks_total") == 2
    # Counters are read at scrape time: a change shows in the next scrape.
    node.hub.frames_out = 13
    assert value(parse(installed.exposition().decode()), "igratech_ws_frames_out_total") == 13


def test_latency_is_observed_once_per_publication_and_never_negative() -> None:
    import time

    installed = metrics.NodeMetrics(_Node())
    installed.on_delivered(_publication(time.time() + 60), 3)  # a clock ahead: clamped to 0
    installed.on_delivered(_publication(time.time() - 30), 0)  # a long way behind
    samples = parse(installed.exposition().decode())
    assert value(samples, "igratech_ws_publish_to_send_seconds_count") == 2
    assert value(samples, "igratech_ws_publish_to_send_seconds_bucket", le="0.0005") == 1
    assert value(samples, "igratech_ws_publish_to_send_seconds_bucket", le="10.0") == 1
    assert value(samples, "igratech_ws_publish_to_send_seconds_bucket", le="+Inf") == 2


def test_optional_counters_are_left_out_when_the_node_lacks_them() -> None:
    node = _Node()
    del node.messages_in, node.rate_limited, node.refused
    node.broker = _MemoryLikeBroker()
    samples = parse(metrics.NodeMetrics(node).exposition().decode())
    names = {name for name, _ in samples}
    assert "igratech_ws_messages_in_total" not in names
    assert "igratech_ws_rate_limited_messages_total" not in names
    assert "igratech_ws_broker_append_chains_total" not in names
    assert "igratech_ws_connections" in names
