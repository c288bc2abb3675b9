"""The internal HTTP API over real sockets, before a fake node wrapping a real MemoryBroker.

Every test runs twice: on aiohttp's own site, and on `PublishFastSite` (the publish fast path,
which hands every other request to aiohttp), so both paths answer the same.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from igratech_ws.brokers.base import PublishResult
from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.transport import http_fastpath
from igratech_ws.transport.http_api import build_api_app
from igratech_ws.transport.http_fastpath import PublishFastSite
from tests.support.http_api import (
    API_KEY,
    ASYNCAPI,
    AUTH,
    TS,
    FakeNode,
    as_gateway_node,
    incident,
    raw_publish,
    read_answers,
    top,
)


@pytest.fixture
def node(broker: MemoryBroker) -> FakeNode:
    return FakeNode(broker)


Serve = Callable[..., Awaitable[tuple[str, aiohttp.ClientSession]]]


@pytest.fixture(params=["aiohttp", "fastpath"])
async def serve(node: FakeNode, request: pytest.FixtureRequest) -> AsyncIterator[Serve]:
    """Start the API on 127.0.0.1 (port 0) and return its base URL and a client session."""
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(**options: Any) -> tuple[str, aiohttp.ClientSession]:
        options.setdefault("api_key", API_KEY)
        options.setdefault("asyncapi_yaml", ASYNCAPI)
        app = build_api_app(as_gateway_node(node), **options)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = (
            PublishFastSite(runner, "127.0.0.1", 0)
            if request.param == "fastpath"
            else web.TCPSite(runner, "127.0.0.1", 0)
        )
        await site.start()
        host, port = runner.addresses[0][:2]
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        sessions.append(session)
        return f"http://{host}:{port}", session

    yield start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def api(serve: Serve) -> tuple[str, aiohttp.ClientSession]:
    return await serve()


def bet(game: str = "g-1", stake: Any = "10.00") -> dict[str, Any]:
    item = {
        "betId": "b-1",
        "market": "match_winner",
        "selection": "home",
        "odds": "2.10",
        "stake": stake,
        "currency": "EUR",
        "placedAt": TS,
    }
    return {"event": "bet", "gameId": game, "data": {"gameId": game, "bets": [item]}}


def balance(user: str = "u-1") -> dict[str, Any]:
    return {
        "event": "balance",
        "userId": user,
        "data": {"balance": "125.50", "currency": "EUR", "updatedAt": TS},
    }


def global_stats() -> dict[str, Any]:
    return {"event": "stats", "data": {"scope": "global", "updatedAt": TS, "values": {"online": 5}}}


async def post(
    api: tuple[str, aiohttp.ClientSession],
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, aiohttp.ClientResponse]:
    base, session = api
    send_headers = {**AUTH, "Content-Type": "application/json"}
    send_headers.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    async with session.post(base + path, data=data, headers=send_headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json(), response


async def get(
    api: tuple[str, aiohttp.ClientSession], path: str, headers: dict[str, str] | None = None
) -> tuple[int, Any, aiohttp.ClientResponse]:
    base, session = api
    async with session.get(base + path, headers=AUTH if headers is None else headers) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json(), response


def assert_error(body: Any, code: str, field: str | None = None) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code
    assert body["error"]["field"] == field
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert "Traceback" not in body["error"]["message"]


async def settled_top(broker: MemoryBroker, channel: str, quiet: float = 0.5) -> int:
    """The channel's top once it has not moved for `quiet` seconds (within 15 s): a server that
    is only slow (a loaded machine) catches up first, one that never stops never settles."""
    async with asyncio.timeout(15):
        last = await top(broker, channel)
        while True:
            await asyncio.sleep(quiet)
            now = await top(broker, channel)
            if now == last:
                return now
            last = now


# --- auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {API_KEY}x"},
    ],
    ids=["none", "wrong", "other-scheme", "empty", "longer"],
)
async def test_protected_routes_need_the_key(
    api: tuple[str, aiohttp.ClientSession], broker: MemoryBroker, headers: dict[str, str]
) -> None:
    status, body, response = await get(api, "/api/v1/info", headers=headers)
    assert status == 401
    assert_error(body, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")

    base, session = api
    async with session.post(base + "/api/v1/publish", json=incident(), headers=headers) as response:
        assert response.status == 401
        assert_error(await response.json(), "unauthorized")
    assert await top(broker, "game:g-1") == 0


async def test_right_key_and_case_insensitive_scheme(
    api: tuple[str, aiohttp.ClientSession],
) -> None:
    status, _, _ = await get(api, "/api/v1/info", headers={"Authorization": f"bearer {API_KEY}"})
    assert status == 200
    status, _, _ = await get(api, "/api/v1/info")
    assert status == 200


async def test_unknown_route_needs_the_key_then_is_404(
    api: tuple[str, aiohttp.ClientSession],
) -> None:
    status, body, _ = await get(api, "/api/v1/nope", headers={})
    assert status == 401
    assert_error(body, "unauthorized")
    status, body, _ = await get(api, "/api/v1/nope")
    assert status == 404
    assert_error(body, "not_found")


@pytest.mark.parametrize("api_key", [None, ""])
async def test_without_a_configured_key_protected_routes_answer_503(
    serve: Serve, broker: MemoryBroker, api_key: str | None
) -> None:
    api = await serve(api_key=api_key)
    for headers in ({}, AUTH, {"Authorization": "Bearer "}):
        status, body, _ = await get(api, "/api/v1/info", headers=headers)
        assert status == 503
        assert_error(body, "api_key_not_configured")
        assert "API key not configured" in body["error"]["message"]
    status, body, _ = await post(api, "/api/v1/publish", incident())
    assert status == 503
    assert await top(broker, "game:g-1") == 0
    # Probes stay public so that orchestration still works.
    status, body, _ = await get(api, "/healthz", headers={})
    assert status == 200


# --- public routes ---------------------------------------------------------------------------


async def test_healthz(api: tuple[str, aiohttp.ClientSession]) -> None:
    status, body, _ = await get(api, "/healthz", headers={})
    assert (status, body) == (200, {"status": "ok", "node": "node-test"})


async def test_readyz_follows_node_ready(
    api: tuple[str, aiohttp.ClientSession], node: FakeNode
) -> None:
    status, body, _ = await get(api, "/readyz", headers={})
    assert (status, body) == (200, {"status": "ready"})
    node.is_ready = False
    status, body, _ = await get(api, "/readyz", headers={})
    assert (status, body) == (503, {"status": "not_ready", "broker": "disconnected"})
    # Liveness is unaffected: the process still serves.
    status, _, _ = await get(api, "/healthz", headers={})
    assert status == 200
    node.is_ready = True
    status, body, _ = await get(api, "/readyz", headers={})
    assert (status, body) == (200, {"status": "ready"})


async def test_asyncapi_yaml(api: tuple[str, aiohttp.ClientSession]) -> None:
    base, session = api
    async with session.get(base + "/asyncapi.yaml") as response:
        assert response.status == 200
        assert response.content_type == "application/yaml"
        assert await response.text() == ASYNCAPI


async def test_extra_routes_docs_public_others_protected(serve: Serve) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="page")

    def extra(app: web.Application) -> None:
        app.router.add_get("/docs", page)
        app.router.add_get("/docs/index.html", page)
        app.router.add_get("/console/", page)
        app.router.add_get("/docsecret", page)
        app.router.add_get("/metrics", page)

    base, session = await serve(extra_routes=extra)
    # /metrics is public without a metrics key (tests/ops/test_metrics_access.py has the rest).
    for path in ("/docs", "/docs/index.html", "/console/", "/metrics"):
        async with session.get(base + path) as response:
            assert response.status == 200, path
    for path in ("/docsecret",):
        async with session.get(base + path) as response:
            assert response.status == 401, path
        async with session.get(base + path, headers=AUTH) as response:
            assert response.status == 200, path


# --- info, errors of routing -----------------------------------------------------------------


async def test_info(api: tuple[str, aiohttp.ClientSession]) -> None:
    status, body, _ = await get(api, "/api/v1/info")
    assert status == 200
    assert body == {
        "node": "node-test",
        "connections": 3,
        "users": 1,
        "channels": 0,
        "broker": "connected",
    }


async def test_wrong_method_is_json_405(api: tuple[str, aiohttp.ClientSession]) -> None:
    status, body, response = await get(api, "/api/v1/publish")
    assert status == 405
    assert_error(body, "method_not_allowed")
    assert response.headers["Allow"] == "POST"
    status, body, _ = await post(api, "/healthz", {})
    assert status == 405
    assert_error(body, "method_not_allowed")


async def test_unexpected_exception_is_json_500_without_details(
    api: tuple[str, aiohttp.ClientSession], node: FakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    node.explode = True
    status, body, _ = await get(api, "/api/v1/info")
    assert status == 500
    assert_error(body, "internal_error")
    assert "boom" not in body["error"]["message"]
    assert any("boom" in str(record.exc_info) for record in caplog.records)


# --- publish ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_body", "channel"),
    [
        (incident(), "game:g-1"),
        (bet(), "game:g-1"),
        (balance(), "user:u-1"),
        (global_stats(), "global"),
    ],
    ids=["incident", "bet", "balance", "global-stats"],
)
async def test_publish(
    api: tuple[str, aiohttp.ClientSession],
    broker: MemoryBroker,
    request_body: dict[str, Any],
    channel: str,
) -> None:
    status, body, _ = await post(api, "/api/v1/publish", request_body)
    assert status == 200, body
    epoch = (await broker.position(channel)).epoch
    assert body == {
        "channel": channel,
        "offset": 1,
        "epoch": epoch,
        "event": request_body["event"],
        "duplicate": False,
    }
    status, body, _ = await post(api, "/api/v1/publish", request_body)
    assert body["offset"] == 2
    page = await broker.history(channel, 0, 10)
    # What subscribers receive is the payload re-encoded compactly.
    assert json.loads(page.publications[0].data) == request_body["data"]


async def test_publish_accepts_json_with_charset(api: tuple[str, aiohttp.ClientSession]) -> None:
    status, _, _ = await post(
        api,
        "/api/v1/publish",
        incident(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert status == 200


INVALID_PUBLISHES: list[tuple[str, Any, str, str | None]] = [
    ("wrong-type", incident(minute="12"), "bad_message", "data.minute"),
    ("out-of-range", incident(minute=301), "bad_message", "data.minute"),
    (
        "missing-required-in-data",
        {**incident(), "data": {k: v for k, v in incident()["data"].items() if k != "incidentId"}},
        "bad_message",
        "data.incidentId",
    ),
    ("missing-event", {"gameId": "g-1", "data": {}}, "bad_message", "event"),
    ("missing-data", {"event": "incident", "gameId": "g-1"}, "bad_message", "data"),
    ("bad-money", bet(stake="10,00"), "bad_message", "data.bets[0].stake"),
    ("money-as-number", bet(stake=10.0), "bad_message", "data.bets[0].stake"),
    ("unknown-field-top", {**incident(), "channel": "x"}, "bad_message", "channel"),
    ("unknown-field-data", incident(extra=1), "bad_message", "data.extra"),
    ("unknown-event", {**incident(), "event": "goal"}, "unknown_event", "event"),
    ("client-event", {"event": "ping", "data": {}}, "unknown_event", "event"),
    (
        "missing-target",
        {k: v for k, v in incident().items() if k != "gameId"},
        "bad_message",
        "gameId",
    ),
    ("missing-user-target", {**balance(), "userId": None}, "bad_message", "userId"),
    ("wrong-target-user", {**incident(), "gameId": None, "userId": "u-1"}, "bad_message", "userId"),
    ("wrong-target-game", {**balance(), "userId": None, "gameId": "g-1"}, "bad_message", "gameId"),
    ("both-targets", {**incident(), "userId": "u-1"}, "bad_message", "userId"),
    ("bad-target-id", {**incident(), "gameId": "g 1"}, "bad_message", "gameId"),
    ("game-mismatch", {**incident("g-1"), "gameId": "g-2"}, "bad_message", "data.gameId"),
    ("data-not-object", {**incident(), "data": [1]}, "bad_message", "data"),
    ("body-not-object", [incident()], "bad_message", None),
]


@pytest.mark.parametrize(
    ("request_body", "code", "field"),
    [case[1:] for case in INVALID_PUBLISHES],
    ids=[case[0] for case in INVALID_PUBLISHES],
)
async def test_invalid_publish_names_the_field_and_publishes_nothing(
    api: tuple[str, aiohttp.ClientSession],
    broker: MemoryBroker,
    request_body: Any,
    code: str,
    field: str | None,
) -> None:
    status, body, _ = await post(api, "/api/v1/publish", request_body)
    assert status == 400
    assert_error(body, code, field)
    for channel in ("game:g-1", "game:g-2", "user:u-1", "global"):
        assert await top(broker, channel) == 0


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b"   ", b'{"event": "incident"'],
    ids=["garbage", "empty", "blank", "cut"],
)
async def test_bad_json_body(
    api: tuple[str, aiohttp.ClientSession], broker: MemoryBroker, raw: bytes
) -> None:
    status, body, _ = await post(api, "/api/v1/publish", raw=raw)
    assert status == 400
    assert_error(body, "bad_json")
    assert await top(broker, "game:g-1") == 0


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
async def test_wrong_content_type_is_415(
    api: tuple[str, aiohttp.ClientSession], broker: MemoryBroker, content_type: str
) -> None:
    status, body, _ = await post(
        api, "/api/v1/publish", incident(), headers={"Content-Type": content_type}
    )
    assert status == 415
    assert_error(body, "unsupported_media_type")
    assert await top(broker, "game:g-1") == 0


async def test_missing_content_type_is_415(
    api: tuple[str, aiohttp.ClientSession], broker: MemoryBroker
) -> None:
    base, session = api
    # aiohttp's client adds no Content-Type for raw bytes; a bytes payload defaults to octet-stream.
    async with session.post(
        base + "/api/v1/publish",
        data=json.dumps(incident()).encode(),
        headers={**AUTH, "Content-Type": ""},
    ) as response:
        assert response.status == 415
        assert_error(await response.json(), "unsupported_media_type")


async def test_huge_body_with_length_is_413(serve: Serve, broker: MemoryBroker) -> None:
    api = await serve(max_body_bytes=1024)
    request_body = incident(description="x" * 2000)
    status, body, _ = await post(api, "/api/v1/publish", request_body)
    assert status == 413
    assert_error(body, "payload_too_large")
    assert "1024" in body["error"]["message"]
    assert await top(broker, "game:g-1") == 0
    # The same server still accepts a request within the limit.
    status, _, _ = await post(api, "/api/v1/publish", incident())
    assert status == 200


async def test_huge_chunked_body_is_413(serve: Serve, broker: MemoryBroker) -> None:
    base, session = await serve(max_body_bytes=1024)
    raw = json.dumps(incident(description="x" * 2000)).encode()

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: only reading the body can find it too big (client_max_size).
        for start in range(0, len(raw), 256):
            yield raw[start : start + 256]

    async with session.post(
        base + "/api/v1/publish",
        data=chunks(),
        headers={**AUTH, "Content-Type": "application/json"},
    ) as response:
        assert response.status == 413
        assert_error(await response.json(), "payload_too_large")
    assert await top(broker, "game:g-1") == 0


async def test_broker_error_is_503(
    api: tuple[str, aiohttp.ClientSession], node: FakeNode, broker: MemoryBroker
) -> None:
    node.broker_down = True
    status, body, _ = await post(api, "/api/v1/publish", incident())
    assert status == 503
    assert_error(body, "broker_unavailable")
    status, body, _ = await post(api, "/api/v1/publish/batch", {"items": [incident()]})
    assert status == 503
    assert_error(body, "broker_unavailable")
    assert await top(broker, "game:g-1") == 0


# --- batch -----------------------------------------------------------------------------------


async def test_batch_publishes_in_order(
    api: tuple[str, aiohttp.ClientSession], broker: MemoryBroker
) -> None:
    items = [incident(), bet(), balance(), global_stats(), incident(incidentId="i-2")]
    status, body, _ = await post(api, "/api/v1/publish/batch", {"items": items})
    assert status == 200, body
    results = body["results"]
    assert [(r["channel"], r["offset"], r["event"]) for r in results] == [
        ("game:g-1", 1, "incident"),
        ("game:g-1", 2, "bet"),
        ("user:u-1", 1, "balance"),
        ("global", 1, "stats"),
        ("game:g-1", 3, "incident"),
    ]
    assert results[0]["epoch"] == (await broker.position("game:g-1")).epoch
    page = await broker.history("game:g-1", 0, 10)
    assert [json.loads(p.data).get("incidentId") for p in page.publications] == ["i-1", None, "i-2"]


async def test_a_batch_item_with_a_repeated_member_is_read_as_the_two_pass_reading_has_it(
    api: tuple[str, aiohttp.ClientSession], broker: MemoryBroker
) -> None:
    """JSON leaves a repeated member's meaning open: the one-pass reading refuses an item whose
    first `data` is invalid, the two-pass reading takes the last one. Was a 500 (an assertion
    that the two readings never disagree)."""
    data = json.dumps(incident()["data"])
    item = f'{{"event": "incident", "gameId": "g-1", "data": 1, "data": {data}}}'
    raw = f'{{"items": [{item}, {json.dumps(bet())}]}}'.encode()
    status, body, _ = await post(api, "/api/v1/publish/batch", raw=raw)
    assert status == 200, body
    assert [(r["channel"], r["offset"]) for r in body["results"]] == [
        ("game:g-1", 1),
        ("game:g-1", 2),
    ]
    assert await top(broker, "game:g-1") == 2
    # And an invalid last value is refused, naming the item and field.
    item = f'{{"event": "incident", "gameId": "g-1", "data": {data}, "data": 1}}'
    status, body, _ = await post(
        api, "/api/v1/publish/batch", raw=f'{{"items": [{item}]}}'.encode()
    )
    assert status == 400
    assert "items[0]" in body["error"]["field"], body
    assert await top(broker, "game:g-1") == 2


async def test_batch_is_all_or_nothing(
    api: tuple[str, aiohttp.ClientSession], broker: MemoryBroker
) -> None:
    items = [incident(), balance(), bet(stake="ten"), global_stats()]
    status, body, _ = await post(api, "/api/v1/publish/batch", {"items": items})
    assert status == 400
    assert_error(body, "bad_message", "items[2].data.bets[0].stake")
    assert body["error"]["message"].startswith("items[2]")
    for channel in ("game:g-1", "user:u-1", "global"):
        assert await top(broker, channel) == 0


@pytest.mark.parametrize(
    ("request_body", "code", "field"),
    [
        (
            {"items": [incident(), {**incident(), "event": "nope"}]},
            "unknown_event",
            "items[1].event",
        ),
        (
            {"items": [incident(), incident(), {k: v for k, v in bet().items() if k != "gameId"}]},
            "bad_message",
            "items[2].gameId",
        ),
        ({"items": [incident(), {**incident(), "bogus": 1}]}, "bad_message", "items[1].bogus"),
        ({"items": [incident(), {**incident(), "gameId": 7}]}, "bad_message", "items[1].gameId"),
        ({"items": []}, "bad_message", "items"),
        ({"items": "all"}, "bad_message", "items"),
        ({}, "bad_message", "items"),
        ({"items": [incident()], "x": 1}, "bad_message", "x"),
    ],
    ids=[
        "unknown-event",
        "missing-target",
        "unknown-field",
        "wrong-type",
        "empty",
        "not-list",
        "missing",
        "unknown-top-field",
    ],
)
async def test_invalid_batch_names_the_item(
    api: tuple[str, aiohttp.ClientSession],
    broker: MemoryBroker,
    request_body: Any,
    code: str,
    field: str,
) -> None:
    status, body, _ = await post(api, "/api/v1/publish/batch", request_body)
    assert status == 400
    assert_error(body, code, field)
    assert await top(broker, "game:g-1") == 0


async def test_batch_item_limit(serve: Serve, broker: MemoryBroker) -> None:
    api = await serve(max_batch_items=3)
    status, body, _ = await post(api, "/api/v1/publish/batch", {"items": [incident()] * 4})
    assert status == 400
    assert_error(body, "bad_message", "items")
    assert await top(broker, "game:g-1") == 0
    status, body, _ = await post(api, "/api/v1/publish/batch", {"items": [incident()] * 3})
    assert status == 200
    assert [r["offset"] for r in body["results"]] == [1, 2, 3]


async def test_batch_bad_json_and_content_type(api: tuple[str, aiohttp.ClientSession]) -> None:
    status, body, _ = await post(api, "/api/v1/publish/batch", raw=b'{"items": [')
    assert status == 400
    assert_error(body, "bad_json")
    status, body, _ = await post(
        api, "/api/v1/publish/batch", {"items": []}, headers={"Content-Type": "text/plain"}
    )
    assert status == 415


# --- logout ----------------------------------------------------------------------------------


async def test_logout_default_reason(
    api: tuple[str, aiohttp.ClientSession], node: FakeNode
) -> None:
    base, session = api
    async with session.post(base + "/api/v1/users/u-1/logout", headers=AUTH) as response:
        assert response.status == 200
        assert await response.json() == {"userId": "u-1", "closedLocal": 2}
    assert node.logouts == [("u-1", "forced")]


@pytest.mark.parametrize("reason", ["forced", "token_expired"])
async def test_logout_with_reason(
    api: tuple[str, aiohttp.ClientSession], node: FakeNode, reason: str
) -> None:
    status, body, _ = await post(api, "/api/v1/users/u.2_x/logout", {"reason": reason})
    assert (status, body) == (200, {"userId": "u.2_x", "closedLocal": 2})
    status, body, _ = await post(api, "/api/v1/users/u-3/logout", {})
    assert status == 200
    assert node.logouts == [("u.2_x", reason), ("u-3", "forced")]


@pytest.mark.parametrize(
    ("user_id", "body_json", "status_code", "code", "field"),
    [
        ("-bad", None, 400, "bad_message", "userId"),
        ("a%20b", None, 400, "bad_message", "userId"),
        ("x" * 65, None, 400, "bad_message", "userId"),
        ("u-1", {"reason": "logged_in_elsewhere"}, 400, "bad_message", "reason"),
        ("u-1", {"reason": 1}, 400, "bad_message", "reason"),
        ("u-1", {"why": "forced"}, 400, "bad_message", "why"),
    ],
    ids=["leading-dash", "space", "too-long", "bad-reason", "reason-type", "unknown-field"],
)
async def test_invalid_logout(
    api: tuple[str, aiohttp.ClientSession],
    node: FakeNode,
    user_id: str,
    body_json: Any,
    status_code: int,
    code: str,
    field: str,
) -> None:
    status, body, _ = await post(api, f"/api/v1/users/{user_id}/logout", body_json)
    assert status == status_code
    assert_error(body, code, field)
    assert node.logouts == []


async def test_logout_bad_json_and_content_type(
    api: tuple[str, aiohttp.ClientSession], node: FakeNode
) -> None:
    status, body, _ = await post(api, "/api/v1/users/u-1/logout", raw=b"{")
    assert status == 400
    assert_error(body, "bad_json")
    status, body, _ = await post(
        api,
        "/api/v1/users/u-1/logout",
        raw=b"reason=forced",
        headers={"Content-Type": "text/plain"},
    )
    assert status == 415
    assert_error(body, "unsupported_media_type")
    assert node.logouts == []


# --- the fast path's HTTP/1.1 handling -----------------------------------------------------


@pytest.fixture
async def fast(node: FakeNode) -> AsyncIterator[tuple[str, int]]:
    """The API on `PublishFastSite` with a short keep-alive timeout, for raw-socket tests."""
    app = build_api_app(as_gateway_node(node), api_key=API_KEY, asyncapi_yaml=ASYNCAPI)
    runner = web.AppRunner(app)
    await runner.setup()
    site = PublishFastSite(runner, "127.0.0.1", 0, keepalive_timeout=0.5)
    await site.start()
    yield "127.0.0.1", site.port
    await runner.cleanup()


async def test_pipelined_publishes_are_answered_in_order(
    fast: tuple[str, int], broker: MemoryBroker
) -> None:
    reader, writer = await asyncio.open_connection(*fast)
    writer.write(b"".join(raw_publish(incident(incidentId=f"i-{n}")) for n in range(5)))
    answers = await read_answers(reader, 5)
    assert [(status, body["offset"]) for status, _, body in answers] == [
        (200, n) for n in range(1, 6)
    ]
    writer.close()
    page = await broker.history("game:g-1", 0, 10)
    assert [json.loads(p.data)["incidentId"] for p in page.publications] == [
        f"i-{n}" for n in range(5)
    ]


async def test_a_request_sent_byte_by_byte_is_answered(fast: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*fast)
    for byte in raw_publish(incident()):
        writer.write(bytes([byte]))
        await writer.drain()
    [(status, _, body)] = await read_answers(reader, 1)
    assert (status, body["offset"]) == (200, 1)
    writer.close()


async def test_other_routes_on_the_same_connection_go_to_aiohttp_and_stay_there(
    fast: tuple[str, int],
) -> None:
    reader, writer = await asyncio.open_connection(*fast)
    writer.write(raw_publish(incident()))
    writer.write(
        f"GET /api/v1/info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n".encode()
    )
    writer.write(raw_publish(incident(incidentId="i-2")))
    answers = await read_answers(reader, 3)
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert answers[1][2]["node"] == "node-test"
    assert answers[2][2]["offset"] == 2
    # aiohttp's own answers carry its Server header; the fast path's do not.
    assert "server" not in answers[0][1] and "server" in answers[2][1]
    writer.close()


@pytest.mark.parametrize(
    ("head", "status"),
    [
        # chunked framing: aiohttp parses it (and publishes)
        (
            "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            "{size:x}\r\n{body}\r\n0\r\n\r\n",
            200,
        ),
        # HTTP/1.0
        (
            "POST /api/v1/publish HTTP/1.0\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n{body}",
            200,
        ),
        # two Content-Length fields: refused by aiohttp, never guessed at here
        (
            "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: {size}\r\nContent-Length: 5\r\n"
            "\r\n{body}",
            400,
        ),
        # a space before the colon (RFC 9112 5.1 says reject)
        (
            "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n{body}",
            400,
        ),
        # Content-Length with a sign
        (
            "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: +{size}\r\n\r\n{body}",
            400,
        ),
        # Expect: 100-continue is aiohttp's to answer
        (
            "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {size}"
            "\r\n\r\n{body}",
            100,
        ),
        # a control character in a value
        (
            "POST /api/v1/publish HTTP/1.1\r\nHost: x\x01\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n{body}",
            400,
        ),
        # a bare LF hiding a Transfer-Encoding from a CRLF-only reader
        (
            "POST /api/v1/publish HTTP/1.1\r\nHost: x\nTransfer-Encoding: chunked\r\n"
            "Authorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n{body}",
            400,
        ),
    ],
    ids=[
        "chunked",
        "http-1.0",
        "two-lengths",
        "space-before-colon",
        "signed-length",
        "expect",
        "control-character",
        "bare-lf",
    ],
)
async def test_anything_unusual_is_aiohttp_s_to_answer(
    fast: tuple[str, int], broker: MemoryBroker, head: str, status: int
) -> None:
    body = json.dumps(incident())
    request = head.format(key=API_KEY, size=len(body), body=body).encode()
    reader, writer = await asyncio.open_connection(*fast)
    writer.write(request)
    async with asyncio.timeout(5):
        line = await reader.readline()
    assert line.split(b" ")[1] == str(status).encode(), line
    writer.close()
    assert await top(broker, "game:g-1") == (1 if status in (200, 100) else 0)


async def test_connection_close_is_honoured(fast: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*fast)
    writer.write(raw_publish(incident(), extra="Connection: close\r\n"))
    [(status, headers, _)] = await read_answers(reader, 1)
    assert status == 200 and headers["connection"] == "close"
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()


async def test_an_idle_connection_is_closed_after_the_keepalive_timeout(
    fast: tuple[str, int],
) -> None:
    reader, writer = await asyncio.open_connection(*fast)
    writer.write(raw_publish(incident()))
    await read_answers(reader, 1)
    writer.write(b"POST /api/v1/publish HTTP/1.1\r\n")  # a head that never completes
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()


async def test_errors_on_the_fast_path_have_the_api_s_shape(
    fast: tuple[str, int], node: FakeNode
) -> None:
    reader, writer = await asyncio.open_connection(*fast)
    wrong_key = raw_publish(incident()).replace(API_KEY.encode(), b"nope")
    text_plain = raw_publish(incident()).replace(b"application/json", b"text/plain")
    writer.write(wrong_key + text_plain + raw_publish({"event": "x"}))
    node.broker_down = True
    writer.write(raw_publish(incident()))
    answers = await read_answers(reader, 4)
    assert [(s, b["error"]["code"]) for s, _, b in answers] == [
        (401, "unauthorized"),
        (415, "unsupported_media_type"),
        (400, "bad_message"),
        (503, "broker_unavailable"),
    ]
    assert answers[0][1]["www-authenticate"].startswith("Bearer")
    writer.close()


async def test_a_publish_in_flight_finishes_when_the_site_stops(
    node: FakeNode, broker: MemoryBroker
) -> None:
    app = build_api_app(as_gateway_node(node), api_key=API_KEY, asyncapi_yaml=ASYNCAPI)
    runner = web.AppRunner(app, shutdown_timeout=5)
    await runner.setup()
    site = PublishFastSite(runner, "127.0.0.1", 0)
    await site.start()
    started = asyncio.Event()
    release = asyncio.Event()
    publish = node.publish

    async def slow(*args: Any, **kwargs: Any) -> PublishResult:
        started.set()
        await release.wait()
        return await publish(*args, **kwargs)

    node.publish = slow  # type: ignore[method-assign]
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
    writer.write(raw_publish(incident()))
    await asyncio.wait_for(started.wait(), 5)
    cleanup = asyncio.ensure_future(runner.cleanup())
    await asyncio.sleep(0.1)
    assert not cleanup.done()  # waiting for the publish in flight
    release.set()
    [(status, _, body)] = await read_answers(reader, 1)
    assert (status, body["offset"]) == (200, 1)
    await asyncio.wait_for(cleanup, 5)
    writer.close()


# --- the one-pass batch reading agrees with the two-pass one ------------------------------------

_MUTATIONS: list[tuple[str, Any]] = [
    ("event", "jackpot"),
    ("event", "stats"),
    ("event", 5),
    ("gameId", None),
    ("gameId", "g-2"),
    ("gameId", "bad id"),
    ("gameId", "g-1\n"),  # the payload's, but a newline more
    ("gameId", "g" * 65),
    ("userId", "u-1"),
    ("idempotencyKey", "k-1"),
    ("idempotencyKey", ""),
    ("idempotencyKey", "x" * 129),
    ("data", []),
    ("data", {}),
    ("extra", 1),
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["incident", "bet", "balance", "global", "game stats"]),
            st.lists(st.sampled_from(_MUTATIONS), max_size=2),
        ),
        min_size=0,
        max_size=6,
    ),
    st.integers(min_value=1, max_value=5),
)
def test_the_one_pass_batch_reading_accepts_exactly_what_the_two_pass_reading_does(
    specs: list[tuple[str, list[tuple[str, Any]]]], max_items: int
) -> None:
    from igratech_ws.core.codec import ProtocolError
    from igratech_ws.core.publishing import decode_valid_batch, parse_batch_body, validate_publish

    def game_stats() -> dict[str, Any]:  # a game's stats may leave data.gameId out
        data = {"scope": "game", "updatedAt": TS, "values": {"n": 1}}
        return {"event": "stats", "gameId": "g-1", "data": data}

    makers = {
        "incident": incident,
        "bet": bet,
        "balance": balance,
        "global": global_stats,
        "game stats": game_stats,
    }
    items = []
    for kind, mutations in specs:
        item = makers[kind]()
        for key, value in mutations:
            if value is None:
                item.pop(key, None)
            else:
                item[key] = value
        items.append(item)
    body = json.dumps({"items": items}).encode()
    try:
        expected = [
            (validate_publish(item), item.idempotencyKey)
            for item in parse_batch_body(body, max_items)
        ]
    except ProtocolError:
        expected = None
    assert decode_valid_batch(body, max_items) == expected


async def test_a_client_that_never_reads_its_answers_stops_being_served(
    node: FakeNode, broker: MemoryBroker
) -> None:
    """Pipelined requests whose answers are never read: once the answers fill the socket, the
    server stops serving (and reading) that connection instead of buffering without bound; every
    request it took is answered once the client reads."""
    import socket

    app = build_api_app(as_gateway_node(node), api_key=API_KEY, asyncapi_yaml=ASYNCAPI)
    runner = web.AppRunner(app)
    await runner.setup()
    site = PublishFastSite(runner, "127.0.0.1", 0)  # the default keep-alive: not idle here
    await site.start()
    fast = ("127.0.0.1", site.port)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # answers back up quickly
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, fast)
    request = raw_publish(incident())
    chunk = request * 200
    sent = 0
    try:
        async with asyncio.timeout(20):
            while True:  # until the server stops reading and the send buffer is full
                try:
                    async with asyncio.timeout(1.0):
                        await loop.sock_sendall(sock, chunk)
                    sent += 200
                except TimeoutError:
                    break
        # A server that buffered answers without bound would read and serve all that was sent.
        served = await settled_top(broker, "game:g-1")
        assert served < sent  # requests are waiting, unread, in the socket buffers
        await asyncio.sleep(0.5)
        assert await top(broker, "game:g-1") == served  # not serving while answers back up
        # Reading the answers lets it go on; every request sent is answered, in order.
        reader, writer = await asyncio.open_connection(sock=sock)
        answers = await read_answers(reader, served + 50)
        assert [body["offset"] for _, _, body in answers] == list(range(1, served + 51))
        writer.close()
    finally:
        sock.close()
        await runner.cleanup()


async def test_a_half_closed_client_gets_every_answer(
    fast: tuple[str, int], broker: MemoryBroker
) -> None:
    reader, writer = await asyncio.open_connection(*fast)
    writer.write(b"".join(raw_publish(incident(incidentId=f"i-{n}")) for n in range(3)))
    writer.write_eof()
    answers = await read_answers(reader, 3)
    assert [(status, body["offset"]) for status, _, body in answers] == [
        (200, 1),
        (200, 2),
        (200, 3),
    ]
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()


async def test_a_hand_off_after_a_half_close_tells_aiohttp(
    node: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request for aiohttp behind a publish still in flight when the client half-closes: the
    publishes are answered, then aiohttp gets the connection, the request and the EOF, and
    answers. (When the hand-off comes before the EOF, the EOF is aiohttp's to handle: it closes.)
    """
    app = build_api_app(as_gateway_node(node), api_key=API_KEY, asyncapi_yaml=ASYNCAPI)
    runner = web.AppRunner(app)
    await runner.setup()
    site = PublishFastSite(runner, "127.0.0.1", 0)
    await site.start()
    release = asyncio.Event()
    publish = node.publish

    async def held(*args: Any, **kwargs: Any) -> PublishResult:
        await release.wait()
        return await publish(*args, **kwargs)

    node.publish = held  # type: ignore[method-assign]
    seen_eof = asyncio.Event()
    eof_received = http_fastpath._Connection.eof_received

    def noting_eof(connection: Any) -> bool | None:
        seen_eof.set()
        return eof_received(connection)

    monkeypatch.setattr(http_fastpath._Connection, "eof_received", noting_eof)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        writer.write(
            raw_publish(incident())
            + raw_publish(incident(incidentId="i-2"))
            + f"GET /api/v1/info HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\r\n".encode()
        )
        writer.write_eof()
        await asyncio.wait_for(seen_eof.wait(), 5)  # the first publish still waits
        release.set()
        answers = await read_answers(reader, 3)
        assert [status for status, _, _ in answers] == [200, 200, 200]
        assert [body.get("offset") for _, _, body in answers[:2]] == [1, 2]
        assert answers[2][2]["node"] == node.node_id
        writer.close()
    finally:
        release.set()
        await runner.cleanup()


DIFFERENTIAL_REQUESTS: list[tuple[str, bytes]] = [
    ("valid", raw_publish(incident())),
    (
        "no content type",
        raw_publish(incident()).replace(b"Content-Type: application/json\r\n", b""),
    ),
    (
        "json with charset",
        raw_publish(incident()).replace(b"application/json", b"application/json; charset=utf-8"),
    ),
    (
        "vendor json",
        raw_publish(incident()).replace(b"application/json", b"application/vnd.x+json"),
    ),
    ("text", raw_publish(incident()).replace(b"application/json", b"text/plain")),
    (
        "no key",
        raw_publish(incident()).replace(f"Authorization: Bearer {API_KEY}\r\n".encode(), b""),
    ),
    ("wrong key", raw_publish(incident()).replace(b"Bearer ", b"Bearer x")),
    ("lowercase scheme", raw_publish(incident()).replace(b"Bearer ", b"bearer ")),
    (
        "empty body",
        raw_publish(incident()).split(b"Content-Length")[0] + b"Content-Length: 0\r\n\r\n",
    ),
    ("invalid", raw_publish({**incident(), "gameId": "g 1"})),
    ("unknown event", raw_publish({**incident(), "event": "nope"})),
    ("batch", raw_publish({"items": [incident(), balance()]}, path="/api/v1/publish/batch")),
    (
        "bad batch",
        raw_publish({"items": [incident(), bet(stake="x")]}, path="/api/v1/publish/batch"),
    ),
]


@pytest.mark.parametrize(
    "request_bytes",
    [r for _, r in DIFFERENTIAL_REQUESTS],
    ids=[n for n, _ in DIFFERENTIAL_REQUESTS],
)
async def test_the_fast_path_answers_like_aiohttp(node: FakeNode, request_bytes: bytes) -> None:
    """The same raw request to aiohttp's site and to the fast path's: the same status, extra
    headers and body (offsets aside: the first publishes, the second publishes again)."""
    app = build_api_app(as_gateway_node(node), api_key=API_KEY, asyncapi_yaml=ASYNCAPI)
    runner = web.AppRunner(app)
    await runner.setup()
    plain = web.TCPSite(runner, "127.0.0.1", 0)
    fast = PublishFastSite(runner, "127.0.0.1", 0)
    await plain.start()
    await fast.start()
    try:
        answers = []
        for port in (plain.port, fast.port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request_bytes)
            [(status, headers, body)] = await read_answers(reader, 1)
            writer.close()
            for result in body.get("results", [body]):
                result.pop("offset", None)
            kept = {k: v for k, v in headers.items() if k in ("content-type", "www-authenticate")}
            answers.append((status, kept, body))
        assert answers[0] == answers[1]
    finally:
        await runner.cleanup()
