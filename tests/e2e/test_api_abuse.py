"""The internal API under bad input: every bad request is a 4xx that publishes nothing.

After each bad request the channel positions are still 0 (the broker appended nothing) and the
server keeps serving: a good publish afterwards gets offset 1 and reaches a follower.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
import pytest

from igratech_ws.app import App
from igratech_ws.transport import http_api
from tests.support.gateway import API_KEY, connect, incident, publish, recv_event, settings

MakeGateway = Callable[..., AbstractAsyncContextManager[App]]

GOOD = json.dumps(incident("g-1", 1)).encode()
CHANNELS = ("game:g-1", "user:u-1", "global")


def _with(**changes: Any) -> bytes:
    body = incident("g-1", 1)
    body.update(changes)
    return json.dumps(body).encode()


def _data_with(**changes: Any) -> bytes:
    body = incident("g-1", 1)
    body["data"].update(changes)
    return json.dumps(body).encode()


# (case, body, content type, path); every one must be refused with a 4xx.
BAD_REQUESTS: list[tuple[str, bytes, str, str]] = [
    ("empty body", b"", "application/json", "/api/v1/publish"),
    ("not JSON", b"{not json", "application/json", "/api/v1/publish"),
    ("truncated JSON", GOOD[:-5], "application/json", "/api/v1/publish"),
    ("JSON array", b"[]", "application/json", "/api/v1/publish"),
    ("JSON string", b'"incident"', "application/json", "/api/v1/publish"),
    ("JSON null", b"null", "application/json", "/api/v1/publish"),
    (
        "non-UTF-8 outside strings",
        b'{"event": "incident"}\xff',
        "application/json",
        "/api/v1/publish",
    ),
    ("lone surrogate", b'{"event": "\\ud800", "data": {}}', "application/json", "/api/v1/publish"),
    ("wrong content type", GOOD, "text/plain", "/api/v1/publish"),
    ("event is a number", _with(event=5), "application/json", "/api/v1/publish"),
    ("data is a list", _with(data=[1, 2]), "application/json", "/api/v1/publish"),
    ("gameId is a number", _with(gameId=1001), "application/json", "/api/v1/publish"),
    ("minute is a string", _data_with(minute="ten"), "application/json", "/api/v1/publish"),
    ("unknown event", _with(event="jackpot"), "application/json", "/api/v1/publish"),
    ("internal event name", _with(event="connected"), "application/json", "/api/v1/publish"),
    ("unknown target field", _with(channel="game:g-1"), "application/json", "/api/v1/publish"),
    ("both targets", _with(userId="u-1"), "application/json", "/api/v1/publish"),
    (
        "no target for a game event",
        json.dumps({k: v for k, v in incident("g-1", 1).items() if k != "gameId"}).encode(),
        "application/json",
        "/api/v1/publish",
    ),
    ("bad gameId characters", _with(gameId="g-1/../x"), "application/json", "/api/v1/publish"),
    ("gameId too long", _with(gameId="g" * 65), "application/json", "/api/v1/publish"),
    ("payload gameId differs", _data_with(gameId="g-2"), "application/json", "/api/v1/publish"),
    ("unknown payload field", _data_with(extra=1), "application/json", "/api/v1/publish"),
    (
        "deeply nested data",
        b'{"event":"incident","gameId":"g-1","data":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        "application/json",
        "/api/v1/publish",
    ),
    (
        "deeply nested object",
        b'{"event":"incident","gameId":"g-1","data":'
        + b'{"a":' * 20_000
        + b"1"
        + b"}" * 20_000
        + b"}",
        "application/json",
        "/api/v1/publish",
    ),
    (
        "huge body",
        b'{"event":"incident","gameId":"g-1","data":{"x":"' + b"a" * 70_000 + b'"}}',
        "application/json",
        "/api/v1/publish",
    ),
    (
        "batch with one bad item",
        json.dumps({"items": [incident("g-1", 1), {"event": "jackpot", "data": {}}]}).encode(),
        "application/json",
        "/api/v1/publish/batch",
    ),
    ("empty batch", b'{"items": []}', "application/json", "/api/v1/publish/batch"),
    (
        "batch too long",
        json.dumps({"items": [incident("g-1", n) for n in range(11)]}).encode(),
        "application/json",
        "/api/v1/publish/batch",
    ),
    ("batch of garbage", b'{"items": "x"}', "application/json", "/api/v1/publish/batch"),
    ("empty idempotency key", _with(idempotencyKey=""), "application/json", "/api/v1/publish"),
    (
        "long idempotency key",
        _with(idempotencyKey="k" * 129),
        "application/json",
        "/api/v1/publish",
    ),
    (
        "idempotency key with a space",
        _with(idempotencyKey="a b"),
        "application/json",
        "/api/v1/publish",
    ),
    (
        "idempotency key with a newline",
        _with(idempotencyKey="ab\n"),
        "application/json",
        "/api/v1/publish",
    ),
    ("idempotency key a number", _with(idempotencyKey=5), "application/json", "/api/v1/publish"),
    (
        "batch item with a bad idempotency key",
        json.dumps({"items": [{**incident("g-1", 1), "idempotencyKey": "-x"}]}).encode(),
        "application/json",
        "/api/v1/publish/batch",
    ),
]


async def _positions(app: App) -> list[int]:
    return [(await app.node.broker.position(channel)).offset for channel in CHANNELS]


async def test_bad_publish_bodies_get_4xx_and_publish_nothing(make_gateway: MakeGateway) -> None:
    async with (
        make_gateway(max_publish_body_bytes=65_536, max_batch_items=10) as app,
        connect(app) as ws,
        aiohttp.ClientSession() as http,
    ):
        await recv_event(ws, "connected")
        await settings(ws, games=["g-1"], stats=True)
        statuses: dict[str, int] = {}
        for case, body, content_type, path in BAD_REQUESTS:
            async with http.post(
                app.api_url + path,
                data=body,
                headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": content_type},
            ) as answer:
                statuses[case] = answer.status
                error = (await answer.json())["error"]
                assert isinstance(error["code"], str) and isinstance(error["message"], str)
            assert await _positions(app) == [0, 0, 0], case
        bad = {case: status for case, status in statuses.items() if not 400 <= status < 500}
        assert bad == {}
        assert statuses["huge body"] == 413
        assert statuses["wrong content type"] == 415
        # Still serving: the first good publication is offset 1 and reaches the follower first.
        status, published = await publish(app, incident("g-1", 7))
        assert (status, published["offset"]) == (200, 1)
        pushed = await recv_event(ws, "incident")
        assert (pushed["offset"], pushed["data"]["incidentId"]) == (1, "inc-7")


@pytest.mark.parametrize("path", ["/api/v1/publish", "/api/v1/publish/batch"])
async def test_invalid_utf8_inside_a_string_is_a_400(gateway: App, path: str) -> None:
    body = b'{"event": "incident\xff\xfe", "data": {}}'
    if path.endswith("batch"):
        body = b'{"items": [' + body + b"]}"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.api_url + path,
            data=body,
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        ) as answer:
            status = answer.status
        assert await _positions(gateway) == [0, 0, 0]
        assert status == 400


async def test_a_huge_body_without_a_content_length_is_refused(make_gateway: MakeGateway) -> None:
    async def chunks() -> Any:
        yield b'{"event":"incident","gameId":"g-1","data":{"x":"'
        for _ in range(64):
            yield b"a" * 4096
        yield b'"}}'

    async with make_gateway(max_publish_body_bytes=65_536) as app, aiohttp.ClientSession() as http:
        async with http.post(
            app.api_url + "/api/v1/publish",
            data=chunks(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        ) as answer:
            assert answer.status == 413
        assert await _positions(app) == [0, 0, 0]
        status, _ = await publish(app, incident("g-1", 1))
        assert status == 200


WRONG_AUTHORIZATIONS: list[str | None] = [
    None,
    "",
    "Bearer",
    "Bearer ",
    "Bearer wrong",
    f"Bearer {API_KEY[:-1]}",
    f"Bearer {API_KEY}x",
    f"Bearer {API_KEY.upper()}",
    f"Basic {API_KEY}",
    f"Token {API_KEY}",
    API_KEY,
    f"Bearer {API_KEY} {API_KEY}",
    "Bearer \u00e9" + API_KEY,
]


async def test_a_wrong_api_key_never_succeeds(gateway: App) -> None:
    async with aiohttp.ClientSession() as http:
        for authorization in WRONG_AUTHORIZATIONS:
            headers = {} if authorization is None else {"Authorization": authorization}
            for path, body in (
                ("/api/v1/publish", incident("g-1", 1)),
                ("/api/v1/publish/batch", {"items": [incident("g-1", 1)]}),
                ("/api/v1/users/u-1/logout", {}),
            ):
                async with http.post(gateway.api_url + path, json=body, headers=headers) as answer:
                    assert answer.status == 401, (path, authorization)
                    assert (await answer.json())["error"]["code"] == "unauthorized"
            async with http.get(gateway.api_url + "/api/v1/info", headers=headers) as answer:
                assert answer.status == 401, authorization
        assert await _positions(gateway) == [0, 0, 0]
        # The right key, for contrast, works on the same server.
        status, _ = await publish(gateway, incident("g-1", 1))
        assert status == 200


async def test_the_api_refuses_everything_protected_when_no_key_is_configured(
    make_gateway: MakeGateway,
) -> None:
    async with make_gateway(api_key="") as app, aiohttp.ClientSession() as http:
        async with http.post(
            app.api_url + "/api/v1/publish",
            json=incident("g-1", 1),
            headers={"Authorization": "Bearer "},
        ) as answer:
            assert answer.status == 503
        assert await _positions(app) == [0, 0, 0]


def _deep(depth: int, where: str) -> bytes:
    nested = b"[" * depth + b"]" * depth
    if where == "data":
        return b'{"event":"incident","gameId":"g-1","data":' + nested + b"}"
    if where == "field":
        return (
            json.dumps(incident("g-1", 1))
            .encode()
            .replace(b'"minute": ', b'"minute": ' + nested + b', "x": ', 1)
        )
    return b'{"items":[' + _deep(depth, "data") + b"]}"


@pytest.mark.parametrize("depth", [999, 5_000])
@pytest.mark.parametrize("where", ["data", "field", "batch"])
async def test_a_deeply_nested_body_is_a_400_not_a_500(
    gateway: App, depth: int, where: str
) -> None:
    """Nesting deeper than the decoder's recursion limit is the documented 400 (the codec's one
    mapping of decode failures), never an internal error."""
    path = "/api/v1/publish/batch" if where == "batch" else "/api/v1/publish"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.api_url + path,
            data=_deep(depth, where),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        ) as answer:
            status, body = answer.status, await answer.json()
        assert (status, body["error"]["code"]) == (400, "bad_message"), body
        assert await _positions(gateway) == [0, 0, 0]


def test_the_api_key_is_compared_in_constant_time() -> None:
    source = inspect.getsource(http_api._bearer_is)
    assert "hmac.compare_digest(" in source
    # No other comparison of the key: neither == nor != against the expected bytes.
    assert "== expected" not in source and "expected ==" not in source
    assert "!= expected" not in source and "expected !=" not in source
    assert "startswith(expected" not in source
