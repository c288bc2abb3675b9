"""The internal HTTP API's test doubles and request helpers, shared by
tests/transport/test_http_api.py and test_http_fastpath.py: a `FakeNode` over a real
MemoryBroker, publish bodies, raw HTTP/1.1 requests and answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, Literal

from igratech_ws.brokers.base import BrokerError, ControlKinds, Publication, PublishResult
from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.core.publishing import ValidatedPublication
from igratech_ws.transport.http_api import GatewayNode

API_KEY = "test-key-\u00e9-123"  # non-ASCII on purpose: compare_digest must not choke on it
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ASYNCAPI = "asyncapi: 3.0.0\ninfo:\n  title: Igratech WS\n  version: '1.0'\n"
TS = "2026-11-23T19:45:00Z"


class FakeNode:
    """Implements `GatewayNode` over a started MemoryBroker; can be made to fail or unready.

    The broker keeps the idempotency window (D2); `published_keys` records the keys passed.
    Its publish never waits (as the memory broker's), so the fast path runs it at once, outside
    a task (test_http_fastpath.py tests both ways).
    """

    publishes_at_once = True

    def __init__(self, broker: MemoryBroker) -> None:
        self.node_id = "node-test"
        self.broker = broker
        self.is_ready = True
        self.broker_down = False
        self.explode = False
        self.logouts: list[tuple[str, str]] = []
        self.published_keys: list[str | None] = []

    async def publish(
        self, publication: ValidatedPublication, *, idempotency_key: str | None = None
    ) -> PublishResult:
        if self.broker_down:
            raise BrokerError("connection refused")
        self.published_keys.append(idempotency_key)
        return await self.broker.publish(
            publication.channel,
            publication.event,
            publication.data_json,
            idempotency_key=idempotency_key,
        )

    async def publish_many(
        self, items: Sequence[tuple[ValidatedPublication, str | None]]
    ) -> list[PublishResult]:
        if self.broker_down:
            raise BrokerError("connection refused")
        self.published_keys.extend(key for _, key in items)
        return await self.broker.publish_many(
            [(p.channel, p.event, p.data_json, key) for p, key in items]
        )

    async def logout_user(
        self, user_id: str, reason: Literal["forced", "token_expired"] = "forced"
    ) -> int:
        self.logouts.append((user_id, reason))
        return 2

    def info(self) -> dict[str, Any]:
        if self.explode:
            raise RuntimeError("boom: internal detail that must not leak")
        return {
            "node": self.node_id,
            "connections": 3,
            "users": 1,
            "channels": self.broker.channel_count,
            "broker": "connected" if self.is_ready else "disconnected",
        }

    @property
    def ready(self) -> bool:
        return self.is_ready


def as_gateway_node(node: FakeNode) -> GatewayNode:
    return node  # mypy checks here that FakeNode satisfies the Protocol


def no_publication(_: Publication) -> None:
    return None


def no_control(_: ControlKinds) -> None:
    return None


def incident(game: str = "g-1", **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "gameId": game,
        "incidentId": "i-1",
        "type": "goal",
        "occurredAt": TS,
        "minute": 12,
        "side": "home",
        "score": {"home": 1, "away": 0},
    }
    data.update(changes)
    return {"event": "incident", "gameId": game, "data": data}


async def top(broker: MemoryBroker, channel: str) -> int:
    return (await broker.position(channel)).offset


def raw_publish(body: dict[str, Any], *, path: str = "/api/v1/publish", extra: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n{extra}\r\n"
    )
    return head.encode() + data


async def read_answers(
    reader: asyncio.StreamReader, count: int
) -> list[tuple[int, dict[str, str], Any]]:
    """`count` HTTP/1.1 answers (status, lowercase headers, JSON body), each framed by its
    Content-Length."""
    answers = []
    for _ in range(count):
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        async with asyncio.timeout(5):
            body = await reader.readexactly(int(headers["content-length"]))
        answers.append((status, headers, json.loads(body)))
    return answers
