"""The publish fast path's own machinery (`http_fastpath`): publishes started in the callback
that read them, the task made only for one that has to wait, a pipelined burst served a slice
per loop turn, and the bounded cache of parsed heads. Hostile requests still get the API's
answers, never a 500 or a hang.

The answers themselves (the same as aiohttp's) are tested in test_http_api.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from igratech_ws.brokers.base import BrokerError, PublishResult
from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.transport import http_fastpath
from igratech_ws.transport.http_api import build_api_app
from igratech_ws.transport.http_fastpath import (
    HEAD_CACHE_SIZE,
    MAX_CACHED_HEAD_BYTES,
    MAX_SERVED_AT_ONCE,
    PublishFastSite,
)
from tests.support.http_api import (
    API_KEY,
    ASYNCAPI,
    FakeNode,
    incident,
    raw_publish,
    read_answers,
    top,
)


@pytest.fixture(params=[True, False], ids=["at-once", "in-a-task"])
def node(broker: MemoryBroker, request: pytest.FixtureRequest) -> FakeNode:
    """A node whose publish runs at once (the memory broker's way), or in a task (a server
    broker's way)."""
    fake = FakeNode(broker)
    fake.publishes_at_once = request.param
    return fake


@pytest.fixture
def at_once(node: FakeNode) -> None:
    if not node.publishes_at_once:
        pytest.skip("only a publish that runs at once")


@pytest.fixture
async def site(node: FakeNode) -> AsyncIterator[PublishFastSite]:
    app = build_api_app(node, api_key=API_KEY, asyncapi_yaml=ASYNCAPI)
    runner = web.AppRunner(app)
    await runner.setup()
    fast = PublishFastSite(runner, "127.0.0.1", 0, keepalive_timeout=0.5)
    await fast.start()
    yield fast
    await runner.cleanup()


async def exchange(site: PublishFastSite, data: bytes, answers: int) -> list[Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
    try:
        writer.write(data)
        return await read_answers(reader, answers)
    finally:
        writer.close()


# --- publishes started at once; a task only for one that waits -----------------------------------


async def test_a_publish_that_does_not_wait_needs_no_task(
    site: PublishFastSite, node: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Any] = []
    loop = asyncio.get_running_loop()
    create_task = loop.create_task

    def counting(coro: Any, **kwargs: Any) -> Any:
        made.append(getattr(coro, "__qualname__", coro))
        return create_task(coro, **kwargs)

    monkeypatch.setattr(loop, "create_task", counting)
    answers = await exchange(site, raw_publish(incident()) * 3, 3)
    assert [body["offset"] for _, _, body in answers] == [1, 2, 3]
    tasks = [name for name in made if "_finish" in str(name)]
    assert len(tasks) == (0 if node.publishes_at_once else 3)


async def test_a_publish_that_waits_is_answered_in_order(
    site: PublishFastSite, node: FakeNode
) -> None:
    """The first publish waits (as on Redis): the requests behind it wait their turn, and every
    answer comes in order."""
    release = asyncio.Event()
    publish = node.publish
    calls = 0

    async def first_waits(*args: Any, **kwargs: Any) -> PublishResult:
        nonlocal calls
        calls += 1
        if calls == 1:
            await release.wait()
        return await publish(*args, **kwargs)

    node.publish = first_waits  # type: ignore[method-assign]
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
    writer.write(b"".join(raw_publish(incident(incidentId=f"i-{n}")) for n in range(3)))
    await asyncio.sleep(0.1)
    assert calls == 1  # the others wait behind the first
    release.set()
    answers = await read_answers(reader, 3)
    assert [body["offset"] for _, _, body in answers] == [1, 2, 3]
    writer.close()


@pytest.mark.parametrize("waits", [False, True], ids=["at-once", "after-waiting"])
@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (BrokerError("connection refused"), 503, "broker_unavailable"),
        (RuntimeError("boom: internal detail"), 500, "internal_error"),
    ],
    ids=["broker", "bug"],
)
async def test_a_failing_publish_gets_the_api_s_error(
    site: PublishFastSite,
    node: FakeNode,
    caplog: pytest.LogCaptureFixture,
    waits: bool,
    failure: Exception,
    status: int,
    code: str,
) -> None:
    async def failing(*args: Any, **kwargs: Any) -> PublishResult:
        if waits:
            await asyncio.sleep(0.01)
        raise failure

    node.publish = failing  # type: ignore[method-assign]
    answers = await exchange(site, raw_publish(incident()) * 2, 2)
    for answer_status, headers, body in answers:
        assert (answer_status, body["error"]["code"]) == (status, code)
        assert headers["content-type"] == "application/json"
        assert "boom" not in body["error"]["message"]
    if status == 500:
        assert any("boom" in str(record.exc_info) for record in caplog.records)


# --- `_resumed`: the rest of a coroutine started by hand -----------------------------------------


async def test_resumed_finishes_what_was_started() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def work() -> int:
        return await future + 1

    coro = work()
    waiting_for = coro.send(None)
    assert waiting_for is future
    task = asyncio.ensure_future(http_fastpath._resumed(coro, waiting_for))
    await asyncio.sleep(0)
    assert not task.done()
    future.set_result(41)
    assert await task == 42


async def test_resumed_passes_cancellation_and_errors_on() -> None:
    seen: list[str] = []
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def work() -> None:
        try:
            await future
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    coro = work()
    task = asyncio.ensure_future(http_fastpath._resumed(coro, coro.send(None)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"] and future.cancelled()

    async def fails() -> None:
        await asyncio.sleep(0)  # yields None: "run me again soon"
        raise ValueError("late")

    coro = fails()
    assert coro.send(None) is None
    with pytest.raises(ValueError, match="late"):
        await http_fastpath._resumed(coro, None)


# --- a pipelined burst is served a slice per loop turn -------------------------------------------


class _Transport:
    """What `_Connection` needs of a transport; keeps what is written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        assert not self.closed, "resume_reading on a closed transport"
        self.paused = False


async def test_a_pipelined_burst_does_not_hold_the_loop(
    site: PublishFastSite, at_once: None
) -> None:
    connection = http_fastpath._Connection(site._shared)
    transport = _Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    burst = 3 * MAX_SERVED_AT_ONCE + 5
    connection.data_received(
        b"".join(raw_publish(incident(incidentId=f"i-{n}")) for n in range(burst))
    )
    assert len(transport.written) == MAX_SERVED_AT_ONCE  # the rest on the next turns
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(transport.written) == burst
    offsets = [
        json.loads(answer.split(b"\r\n\r\n", 1)[1])["offset"] for answer in transport.written
    ]
    assert offsets == list(range(1, burst + 1))
    connection.connection_lost(None)


async def test_a_burst_cut_short_by_a_lost_connection_stops_quietly(
    site: PublishFastSite, at_once: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A burst big enough to pause reading, and the connection lost before its next slice: the
    slice scheduled for the next loop turn serves nothing and touches no closed transport."""
    connection = http_fastpath._Connection(site._shared)
    transport = _Transport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    request = raw_publish(incident())
    burst = site._shared.routes.max_body_bytes // len(request) + 2 * MAX_SERVED_AT_ONCE
    connection.data_received(request * burst)
    assert transport.paused and len(transport.written) == MAX_SERVED_AT_ONCE
    transport.closed = True
    connection.connection_lost(None)
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(transport.written) == MAX_SERVED_AT_ONCE
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


async def test_a_long_burst_over_a_socket_is_answered_in_order(
    site: PublishFastSite, broker: MemoryBroker
) -> None:
    burst = 500
    answers = await exchange(
        site, b"".join(raw_publish(incident(incidentId=f"i-{n}")) for n in range(burst)), burst
    )
    assert [body["offset"] for _, _, body in answers] == list(range(1, burst + 1))
    assert await top(broker, "game:g-1") == burst


# --- parsed heads are remembered, within bounds ---------------------------------------------------


async def test_a_repeated_head_is_parsed_once(site: PublishFastSite) -> None:
    heads = site._shared.heads
    answers = await exchange(site, raw_publish(incident()) * 3, 3)
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert len(heads) == 1


async def test_the_head_cache_is_bounded(site: PublishFastSite, broker: MemoryBroker) -> None:
    heads = site._shared.heads
    requests = [raw_publish(incident(), extra=f"X-N: {n}\r\n") for n in range(HEAD_CACHE_SIZE * 3)]
    answers = await exchange(site, b"".join(requests), len(requests))
    assert [status for status, _, _ in answers] == [200] * len(requests)
    assert 0 < len(heads) <= HEAD_CACHE_SIZE
    # A long head is served, not remembered.
    long_head = raw_publish(incident(), extra=f"X-Long: {'x' * MAX_CACHED_HEAD_BYTES}\r\n")
    before = set(heads)
    [(status, _, _)] = await exchange(site, long_head, 1)
    assert status == 200
    assert set(heads) <= before
    assert all(len(head) <= MAX_CACHED_HEAD_BYTES for head in heads)


async def test_a_remembered_head_is_checked_again_each_time(site: PublishFastSite) -> None:
    """A head remembered with a wrong key is refused every time; with `Connection: close`, each
    connection is closed after its answer."""
    wrong = raw_publish(incident()).replace(API_KEY.encode(), b"wrong")
    answers = await exchange(site, wrong * 3, 3)
    assert [status for status, _, _ in answers] == [401, 401, 401]
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        writer.write(raw_publish(incident(), extra="Connection: close\r\n"))
        [(status, headers, _)] = await read_answers(reader, 1)
        assert (status, headers["connection"]) == (200, "close")
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()


# --- hostile requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"event": "incident", "gameId": ', 400, "bad_json"),
        (b"\xff\xfe", 400, "bad_json"),
        (b"   ", 400, "bad_json"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "bad_message"),
        (b'{"event": "incident", "gameId": "g 1", "data": {}}', 400, "bad_message"),
        (b'{"event": "jackpot", "gameId": "g-1", "data": {}}', 400, "unknown_event"),
    ],
    ids=["truncated", "not-utf8", "blank", "deep", "bad-field", "unknown-event"],
)
async def test_a_hostile_body_gets_a_4xx_and_the_connection_goes_on(
    site: PublishFastSite, broker: MemoryBroker, body: bytes, status: int, code: str
) -> None:
    head = (
        f"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    answers = await exchange(site, head + body + raw_publish(incident()), 2)
    assert (answers[0][0], answers[0][2]["error"]["code"]) == (status, code)
    assert answers[1][0] == 200
    assert await top(broker, "game:g-1") == 1


async def test_a_repeated_member_is_published_as_the_two_pass_reading_has_it(
    site: PublishFastSite, broker: MemoryBroker
) -> None:
    data = json.dumps(incident()["data"])
    body = f'{{"event": "incident", "gameId": "g-1", "data": 1, "data": {data}}}'.encode()
    head = (
        f"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    [(status, _, answer)] = await exchange(site, head + body, 1)
    assert (status, answer["offset"]) == (200, 1)
    assert await top(broker, "game:g-1") == 1


async def test_a_slow_head_is_served_and_a_stalled_one_closed(site: PublishFastSite) -> None:
    """Slowloris: a request trickled in pieces is answered once complete; a head that stops
    coming is closed at the keep-alive timeout (0.5 s here), holding nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
    request = raw_publish(incident())
    for start in range(0, len(request), 7):
        writer.write(request[start : start + 7])
        await asyncio.sleep(0.001)
    [(status, _, _)] = await read_answers(reader, 1)
    assert status == 200
    writer.write(request[:40])
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
