"""deploy/: the Grafana dashboard queries only metrics a running gateway exposes, and the compose
file runs two gateway nodes on one Redis from the repository's Dockerfile."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import websockets
import yaml
from prometheus_client.parser import text_string_to_metric_families

from igratech_ws.app import running_app
from igratech_ws.auth import mint_token
from igratech_ws.config import Config

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
SECRET = "deploy-secret-that-is-long-enough-for-hs256"
API_KEY = "deploy-api-key"
METRIC_RE = re.compile(r"\b(igratech_ws_[a-z0-9_]+)")


def dashboard_queries() -> list[str]:
    def walk(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["expr"]] if isinstance(node.get("expr"), str) else []
            query = node.get("query")
            if isinstance(query, dict) and isinstance(query.get("query"), str):
                found.append(query["query"])
            return found + [e for value in node.values() for e in walk(value)]
        if isinstance(node, list):
            return [e for value in node for e in walk(value)]
        return []

    return walk(json.loads(DASHBOARD.read_text()))


def test_the_dashboard_is_grafana_json_with_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    assert len(panels) >= 10
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"] and panel["gridPos"]["w"] > 0, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"


async def scraped_sample_names() -> set[str]:
    """Every sample name of /metrics on a real gateway after some traffic of each kind."""
    config = Config(
        host="127.0.0.1", port=0, api_port=0, jwt_secret=SECRET, api_key=API_KEY,
        max_message_rate=1, message_burst=1,
    )  # fmt: skip
    async with running_app(config) as app, aiohttp.ClientSession() as http:
        token = mint_token(SECRET, "u-dash", ttl=60)
        async with websockets.connect(f"{app.ws_url}?token={token}") as ws:
            await ws.recv()
            await ws.send('{"event":"settings","data":{"games":["g-1"]}}')
            await ws.send('{"event":"ping"}')  # over the burst: rate-limited
            await ws.send("not json")
            body = {
                "event": "incident", "gameId": "g-1",
                "data": {"gameId": "g-1", "incidentId": "i-1", "type": "goal",
                         "occurredAt": "2026-11-23T19:45:00Z"},
            }  # fmt: skip
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with http.post(app.api_url + "/api/v1/publish", json=body, headers=headers) as r:
                assert r.status == 200
            await asyncio.sleep(0.3)
        try:
            async with websockets.connect(f"{app.ws_url}?token=bad"):
                pass
        except websockets.InvalidStatus:
            pass
        await asyncio.sleep(0.1)
        async with http.get(app.api_url + "/metrics") as answer:
            text = await answer.text()
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


async def test_every_metric_the_dashboard_queries_exists() -> None:
    names = await scraped_sample_names()
    queried = {name for query in dashboard_queries() for name in METRIC_RE.findall(query)}
    assert len(queried) >= 12, queried
    assert sorted(queried - names) == []


def test_the_checker_sees_a_metric_that_does_not_exist() -> None:
    names = {"igratech_ws_connections"}
    queried = set(METRIC_RE.findall("sum(rate(igratech_ws_conections_total[5m]))"))
    assert queried - names == {"igratech_ws_conections_total"}


def test_compose_runs_two_nodes_on_one_redis_from_the_dockerfile() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    gateways = {name: s for name, s in services.items() if name.startswith("gateway")}
    assert len(gateways) == 2 and "redis" in services
    node_ids = set()
    for service in gateways.values():
        assert service["build"]["context"] == ".."
        assert (ROOT / service["build"]["dockerfile"]).exists()
        env = service["environment"]
        assert env["IGRATECH_WS_BROKER"] == "redis://redis:6379/0"
        assert env["IGRATECH_WS_JWT_SECRET"].startswith("${IGRATECH_WS_JWT_SECRET:?")
        node_ids.add(env["IGRATECH_WS_NODE_ID"])
        # The internal API is published on the host's loopback only.
        api_ports = [p for p in service["ports"] if p.endswith(":8081")]
        assert api_ports and all(p.startswith("127.0.0.1:") for p in api_ports)
        Config.from_env({k: v for k, v in env.items() if "${" not in v})  # valid settings
    assert len(node_ids) == 2
