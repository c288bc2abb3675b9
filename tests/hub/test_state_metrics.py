"""The counters of state on follow and conflation reach /metrics (issue 12)."""

from __future__ import annotations

import json

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from igratech_ws import metrics
from igratech_ws.config import Config
from igratech_ws.node import Node
from tests.support.fakes import FakeSubscriber, RecordingBroker, settle


def _value(exposition: bytes, name: str) -> float:
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not exposed")


async def test_snapshot_and_conflated_frames_are_counted() -> None:
    broker = RecordingBroker()
    node = Node(Config(), broker)
    await node.start()
    try:
        installed = metrics.install(web.Application(), node)
        data = {"scope": "game", "gameId": "g-1", "updatedAt": "2026-11-23T19:45:00Z"}
        for n in range(3):
            broker.publish_now(
                "game:g-1", "stats", json.dumps({**data, "values": {"n": n}}).encode()
            )
        sub = FakeSubscriber("s")
        hub = node.hub
        hub.finish_join(sub, await hub.join(sub, "game:g-1", None))
        await settle()
        broker.publish_now("game:g-1", "stats", json.dumps({**data, "values": {"n": 3}}).encode())
        await settle()  # live now (a join goes live with the first publication it sees)
        sub.reading = False
        sub.backlog = hub.low_water + 1
        for n in range(10):
            broker.publish_now(
                "game:g-1", "stats", json.dumps({**data, "values": {"n": n}}).encode()
            )
        await settle()
        exposition = installed.exposition()
        assert _value(exposition, "igratech_ws_snapshot_frames_total") == 1
        assert _value(exposition, "igratech_ws_conflated_frames_total") == 9
    finally:
        await node.close()
