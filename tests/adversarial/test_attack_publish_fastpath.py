"""Attacks on the publish fast path (transport/http_fastpath.py) and the one-pass publish decoders
(core/publishing.py), over real sockets on a real gateway (memory broker: publishes run in the
read callback).

What must hold: a cached head never lets a wrong or missing API key through; framing tricks
(Content-Length negative, huge, doubled, chunked, CL+TE) get an answer and never publish what a
second parser would read as another request; a client that never reads cannot grow the server's
memory; a half-closed client gets an answer to every complete request it sent; no invalid channel
name is ever published, and a batch with one invalid item publishes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from igratech_ws.app import App, running_app
from igratech_ws.core import channels
from igratech_ws.core.codec import ProtocolError
from igratech_ws.core.publishing import (
    decode_valid_batch,
    decode_valid_publish,
    parse_publish_body,
    validate_publish,
)
from igratech_ws.transport.http_fastpath import PublishFastSite
from tests.support.gateway import API_KEY, base_config, incident, publish
from tests.support.http_api import read_answers
from tests.support.raw_ws import WAIT_S, in_thread
from tests.support.servers import Proxy, private_server


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with running_app(base_config()) as running:
        yield running


async def top(app: App, channel: str) -> int:
    return (await app.node.broker.position(channel)).offset


def body_of(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def request(
    body: bytes,
    *,
    path: str = "/api/v1/publish",
    auth: str | None = f"Bearer {API_KEY}",
    length: str | None = None,
    extra: str = "",
    version: str = "HTTP/1.1",
) -> bytes:
    head = f"POST {path} {version}\r\nHost: x\r\n"
    if auth is not None:
        head += f"Authorization: {auth}\r\n"
    head += "Content-Type: application/json\r\n"
    head += f"Content-Length: {len(body) if length is None else length}\r\n"
    return (head + extra + "\r\n").encode() + body


async def exchange(app: App, data: bytes, answers: int) -> list[tuple[int, dict[str, str], Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", app.api_port)
    try:
        writer.write(data)
        return await read_answers(reader, answers)
    finally:
        writer.close()


def read_all(sock: socket.socket) -> bytes:
    """Every byte until the server closes (bounded by the socket's timeout)."""
    got = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            got += chunk
    return got


def statuses(raw: bytes) -> list[int]:
    """The status of every answer in `raw` (HTTP/1.1, or aiohttp's HTTP/1.0 to a bad request)."""
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", raw)]


# --- 1. the head cache and the API key -----------------------------------------------------------


async def test_a_cached_head_never_lets_a_wrong_or_missing_key_through(app: App) -> None:
    body = body_of(incident("g-auth", 1))
    good = request(body)
    wrongs = [
        request(body, auth=None),
        request(body, auth=f"Bearer {API_KEY}x"),
        request(body, auth=f"Bearer {API_KEY[:-1]}"),
        request(body, auth=f"Basic {API_KEY}"),
        request(body, auth=f"Bearer  {API_KEY[:-1]}X"),
        request(body, auth="Bearer"),
        request(body, auth=""),
    ]
    # The good head first (cached), then each wrong one, twice each (cached too), interleaved.
    data = good + b"".join(w + good + w for w in wrongs)
    answers = await exchange(app, data, 1 + 3 * len(wrongs))
    got = [status for status, _, _ in answers]
    assert got == [200] + [401, 200, 401] * len(wrongs), got
    assert await top(app, "game:g-auth") == 1 + len(wrongs)  # only the good ones (dedup: none)


async def test_cache_churn_with_distinct_heads_keeps_checking_the_key(app: App) -> None:
    body = body_of(incident("g-churn", 1))
    data = b"".join(
        request(body, extra=f"X-N: {i}\r\n", auth=f"Bearer {API_KEY}" if i % 2 else "Bearer no")
        for i in range(300)
    )
    answers = await exchange(app, data, 300)
    assert [s for s, _, _ in answers] == [200 if i % 2 else 401 for i in range(300)]


@pytest.mark.parametrize("delta", [-3, -2, -1, 0, 1, 2, 3])
async def test_heads_near_the_cache_bound_are_served_and_checked(app: App, delta: int) -> None:
    body = body_of(incident("g-near", 1))
    bare = len(request(b"", extra="X-Pad: \r\n", length=str(len(body))))
    pad = "p" * (2048 + delta - bare)
    good = request(body, extra=f"X-Pad: {pad}\r\n")
    assert len(good) - len(body) == 2048 + delta
    bad = request(body, extra=f"X-Pad: {pad}\r\n", auth=f"Bearer {API_KEY[:-1]}Z")
    answers = await exchange(app, good + bad + good + bad, 4)
    assert [s for s, _, _ in answers] == [200, 401, 200, 401]


# --- 2. framing tricks --------------------------------------------------------------------------

SMUGGLED = request(body_of(incident("g-smuggled", 1)))
HOSTILE_FRAMING: list[tuple[str, bytes]] = [
    ("negative", request(b"{}", length="-1")),
    ("plus sign", request(b"{}", length="+2")),
    ("huge", request(b"{}", length="99999999999999999999")),
    ("over the limit", request(b"{}", length=str(2**31))),
    ("hex", request(b"{}", length="0x2")),
    ("spaces inside", request(b"{}", length="1 1")),
    ("doubled, different", request(b"{}", extra="Content-Length: 0\r\n")),
    ("doubled, in one field", request(b"{}", length="2, 0")),
    ("CL+TE", request(b"0\r\n\r\n" + SMUGGLED, length="5", extra="Transfer-Encoding: chunked\r\n")),
    ("TE+CL", request(b"0\r\n\r\n" + SMUGGLED, extra="Transfer-Encoding: chunked\r\n")),
    ("TE obfuscated", request(b"0\r\n\r\n" + SMUGGLED, extra="Transfer-Encoding : chunked\r\n")),
    (
        "TE in a folded line",
        request(b"0\r\n\r\n" + SMUGGLED, extra=" Transfer-Encoding: chunked\r\n"),
    ),
    ("bare LF in the head", request(b"{}", extra="X-A: 1\nContent-Length: 0\r\n")),
    ("NUL in a value", request(b"{}", extra="X-A: \x00\r\n")),
    ("invalid UTF-8 in a value", request(b"{}").replace(b"Host: x", b"Host: \xff\xfe")),
    ("invalid UTF-8 body", request(b'{"event":"\xff\xfe"}')),
]


@pytest.mark.parametrize("case", HOSTILE_FRAMING, ids=[c[0] for c in HOSTILE_FRAMING])
async def test_framing_tricks_never_publish_a_smuggled_request(
    app: App, case: tuple[str, bytes]
) -> None:
    _name, data = case

    def talk() -> bytes:
        with socket.create_connection(("127.0.0.1", app.api_port), timeout=1) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(data)
            return read_all(sock)  # until the server closes, or 1 s of silence

    raw = await in_thread(talk)
    codes = statuses(raw)
    assert codes, raw[:200]
    assert all(400 <= c < 500 for c in codes), raw[:500]
    assert await top(app, "game:g-smuggled") == 0


async def test_a_chunked_publish_is_served_by_aiohttp_once(app: App) -> None:
    body = body_of(incident("g-chunk", 1))
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    data = request(chunked, length=None, extra="Transfer-Encoding: chunked\r\n").replace(
        b"Content-Length: %d\r\n" % len(chunked), b""
    )
    answers = await exchange(app, data + request(body), 2)
    assert [s for s, _, _ in answers] == [200, 200]
    assert await top(app, "game:g-chunk") == 2


# --- 3. pipelining, half-close, byte splits ------------------------------------------------------


async def test_a_half_closed_client_gets_every_answer(app: App) -> None:
    """A client pipelines 300 publishes and half-closes: every complete request it sent is
    answered before the server closes (the module's promise), not only the first slice."""
    count = 300
    data = b"".join(request(body_of(incident("g-half", i))) for i in range(count))

    def talk() -> bytes:
        with socket.create_connection(("127.0.0.1", app.api_port), timeout=WAIT_S) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return read_all(sock)

    raw = await in_thread(talk)
    published = await top(app, "game:g-half")
    assert statuses(raw) == [200] * count, (len(statuses(raw)), published)
    assert published == count


async def test_a_client_that_never_reads_cannot_grow_the_server(app: App) -> None:
    """Thousands of pipelined publishes, answers never read: the server stops reading, so the
    client's sends block, and what was published stays bounded."""
    one = request(body_of(incident("g-flood", 1)))
    chunk = one * 256
    total = 0

    def flood() -> int:
        sent = 0
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", app.api_port))
        sock.setblocking(False)
        deadline = time.monotonic() + 3
        stalled_since = None
        try:
            while time.monotonic() < deadline and sent < 64 * 2**20:
                try:
                    at = sent % len(chunk)  # whole requests, resumed where a send stopped
                    sent += sock.send(chunk[at:])
                    stalled_since = None
                except BlockingIOError:
                    stalled_since = stalled_since or time.monotonic()
                    if time.monotonic() - stalled_since > 0.5:
                        break
                    time.sleep(0.01)
        finally:
            sock.close()
        return sent

    total = await in_thread(flood)
    assert total < 32 * 2**20, total  # the kernel's buffers and one body's worth, not 64 MiB
    await asyncio.sleep(0.1)


async def test_a_request_split_at_every_byte(app: App) -> None:
    data = request(body_of(incident("g-split", 1))) + request(body_of(incident("g-split", 2)))

    def talk() -> bytes:
        with socket.create_connection(("127.0.0.1", app.api_port), timeout=WAIT_S) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(data)):
                sock.sendall(data[i : i + 1])
                if i % 8 == 0:
                    time.sleep(0.0005)
            sock.shutdown(socket.SHUT_WR)
            return read_all(sock)

    raw = await in_thread(talk)
    assert statuses(raw) == [200, 200], raw[:300]
    assert await top(app, "game:g-split") == 2


async def test_http_1_0_is_served_by_aiohttp(app: App) -> None:
    data = request(body_of(incident("g-10", 1)), version="HTTP/1.0")

    def talk() -> bytes:
        with socket.create_connection(("127.0.0.1", app.api_port), timeout=WAIT_S) as sock:
            sock.sendall(data)
            return read_all(sock)  # HTTP/1.0 without keep-alive: the server closes

    raw = await in_thread(talk)
    assert raw.startswith(b"HTTP/1.") and b" 200 " in raw[:20], raw[:200]
    assert await top(app, "game:g-10") == 1


async def test_connection_close_in_the_middle_of_a_pipeline(app: App) -> None:
    data = (
        request(body_of(incident("g-close", 1)))
        + request(body_of(incident("g-close", 2)), extra="Connection: close\r\n")
        + request(body_of(incident("g-close", 3)))
    )

    def talk() -> bytes:
        with socket.create_connection(("127.0.0.1", app.api_port), timeout=WAIT_S) as sock:
            sock.sendall(data)
            return read_all(sock)

    raw = await in_thread(talk)
    assert statuses(raw) == [200, 200], raw
    assert b"Connection: close" in raw
    assert await top(app, "game:g-close") == 2  # the request after the close is not published


# --- 4. the one-pass decoders: no invalid channel, all or nothing --------------------------------


def bad_incident(**top_changes: Any) -> dict[str, Any]:
    item = incident("g-ok", 1)
    item.update(top_changes)
    return item


def with_data(**changes: Any) -> dict[str, Any]:
    item = incident("g-ok", 1)
    item["data"] = {**item["data"], **changes}
    return item


BALANCE = {
    "event": "balance",
    "userId": "u-1",
    "data": {
        "balance": "1.00",
        "currency": "EUR",
        "updatedAt": "2026-11-23T19:45:00Z",
        "reason": "bet_settled",
    },
}
STATS_DATA = {"scope": "game", "updatedAt": "2026-11-23T19:45:00Z", "values": {"corners": 3}}

INVALID_ITEMS: list[tuple[str, bytes]] = [
    ("gameId with a space", body_of({**incident("g 1", 1)})),
    ("gameId with a colon", body_of({**incident("g:1", 1)})),
    ("gameId 65 chars", body_of(incident("g" * 65, 1))),
    ("gameId unicode", body_of(incident("gé", 1))),
    ("gameId empty", body_of(incident("", 1))),
    ("gameId with a trailing newline", body_of(incident("g-1\n", 1))),
    ("target with a trailing newline only", body_of(bad_incident(gameId="g-ok\n"))),
    ("target differs from data", body_of(bad_incident(gameId="g-other"))),
    ("target invalid, data valid", body_of(bad_incident(gameId="g ok"))),
    ("data invalid, target valid", body_of(with_data(gameId="g ok"))),
    ("target and userId", body_of(bad_incident(userId="u-1"))),
    ("userId with a space", body_of({**BALANCE, "userId": "u 1"})),
    ("userId with a newline", body_of({**BALANCE, "userId": "u-1\n"})),
    ("userId on a game event", body_of({**incident("g-ok", 1), "gameId": None, "userId": "u-1"})),
    ("gameId on a user event", body_of({**BALANCE, "userId": None, "gameId": "g-ok"})),
    # A repeated member: the last value counts in the two-pass reading; both must refuse.
    ("repeated target, last bad", body_of(incident("g-ok", 1))[:-1] + b',"gameId":"g bad"}'),
    ("repeated event, last unknown", body_of(incident("g-ok", 1))[:-1] + b',"event":"nope"}'),
    (
        "repeated data.gameId, last bad",
        body_of(incident("g-ok", 1)).replace(
            b'"gameId":"g-ok","incidentId"', b'"gameId":"g-ok","gameId":"g bad","incidentId"'
        ),
    ),
]


def two_pass_refuses(body: bytes) -> bool:
    try:
        validate_publish(parse_publish_body(body))
    except ProtocolError:
        return True
    return False


@pytest.mark.parametrize("case", INVALID_ITEMS, ids=[c[0] for c in INVALID_ITEMS])
def test_one_pass_refuses_what_two_pass_refuses(case: tuple[str, bytes]) -> None:
    _name, body = case
    assert two_pass_refuses(body), body
    assert decode_valid_publish(body) is None
    assert decode_valid_batch(b'{"items":[' + body + b"]}", 1000) is None


@pytest.mark.parametrize(
    "stats",
    [
        {"event": "stats", "gameId": "g bad", "data": STATS_DATA},
        {"event": "stats", "gameId": "g" * 65, "data": STATS_DATA},
        {"event": "stats", "gameId": "g\u00e9", "data": STATS_DATA},
        {"event": "stats", "gameId": "g-1\n", "data": STATS_DATA},
        {"event": "stats", "gameId": "g-1", "data": {**STATS_DATA, "gameId": "g-2"}},
        {"event": "stats", "data": {**STATS_DATA, "gameId": "g-1"}},
        {"event": "stats", "data": {**STATS_DATA, "scope": "global", "gameId": "g-1"}},
        {"event": "stats", "gameId": "g-1", "data": {**STATS_DATA, "scope": "global"}},
    ],
)
def test_stats_targets_are_checked_without_data_game_id(stats: dict[str, Any]) -> None:
    body = body_of(stats)
    assert two_pass_refuses(body)
    assert decode_valid_publish(body) is None
    assert decode_valid_batch(b'{"items":[' + body + b"]}", 1000) is None


def test_valid_stats_without_data_game_id_go_to_the_target() -> None:
    one = decode_valid_publish(body_of({"event": "stats", "gameId": "g-1", "data": STATS_DATA}))
    assert one is not None and one[0].channel == "game:g-1"
    assert channels.channel_kind(one[0].channel) == "game"


@pytest.mark.parametrize("case", INVALID_ITEMS, ids=[c[0] for c in INVALID_ITEMS])
async def test_a_batch_with_one_invalid_item_publishes_nothing(
    app: App, case: tuple[str, bytes]
) -> None:
    _name, bad = case
    goods = [body_of(incident("g-all", i)) for i in range(5)]
    batch = b'{"items":[' + b",".join([*goods[:3], bad, *goods[3:]]) + b"]}"
    answers = await exchange(app, request(batch, path="/api/v1/publish/batch"), 1)
    assert answers[0][0] == 400, answers
    single = await exchange(app, request(bad), 1)
    assert 400 <= single[0][0] < 500, single
    assert await top(app, "game:g-all") == 0
    assert await top(app, "game:g-ok") == 0


async def test_batch_size_limit(app: App) -> None:
    item = body_of(incident("g-lim", 1))
    full = b'{"items":[' + b",".join([item] * 1000) + b"]}"
    over = b'{"items":[' + b",".join([item] * 1001) + b"]}"
    answers = await exchange(
        app,
        request(over, path="/api/v1/publish/batch") + request(full, path="/api/v1/publish/batch"),
        2,
    )
    assert [s for s, _, _ in answers] == [400, 200] or answers[0][0] == 413, answers
    assert await top(app, "game:g-lim") == (1000 if answers[1][0] == 200 else 0)


async def test_a_key_repeated_within_a_batch_publishes_once(app: App) -> None:
    items = [
        {**incident("g-dup", i), "idempotencyKey": "k-1" if i in (0, 2) else f"k-{i + 10}"}
        for i in range(4)
    ]
    batch = body_of({"items": items})
    first = await exchange(app, request(batch, path="/api/v1/publish/batch"), 1)
    again = await exchange(app, request(batch, path="/api/v1/publish/batch"), 1)
    assert first[0][0] == 200 and again[0][0] == 200, (first, again)
    assert await top(app, "game:g-dup") == 3


# --- 5. batch publish on a Redis that fails mid-batch ---------------------------------------------


ProxyT = TypeVar("ProxyT", bound=Proxy)


@contextlib.asynccontextmanager
async def gateway_behind(
    proxy_class: type[ProxyT], tmp_path: Path
) -> AsyncIterator[tuple[App, ProxyT]]:
    """A gateway on a private redis-server behind a `proxy_class` that a test can cut, freeze,
    mute..."""
    with private_server("redis", tmp_path) as server:
        await server.start()
        proxy = proxy_class(server.port)
        await proxy.start()
        try:
            config = base_config(
                broker=proxy.url(server.url), broker_timeout=0.5, broker_backoff_max=0.2
            )
            async with running_app(config) as running:
                yield running, proxy
        finally:
            await proxy.stop()


@pytest.fixture
async def redis_app(tmp_path: Path) -> AsyncIterator[tuple[App, Proxy]]:
    """A gateway on a private redis-server behind a proxy that a test can cut or freeze."""
    async with gateway_behind(Proxy, tmp_path) as running:
        yield running


def keyed_batch(round_: int, count: int, games: int = 4) -> bytes:
    items = [
        {**incident(f"g-b{i % games}", i), "idempotencyKey": f"k-{round_}-{i}"}
        for i in range(count)
    ]
    return body_of({"items": items})


async def publish_until_answered(app: App, batch: bytes) -> list[int]:
    """Send `batch` until it is answered 200 (a 503 is resent as is, like a careful backend)."""
    got: list[int] = []
    async with asyncio.timeout(WAIT_S):
        while not got or got[-1] != 200:
            answers = await exchange(app, request(batch, path="/api/v1/publish/batch"), 1)
            got.append(answers[0][0])
            if got[-1] != 200:
                await asyncio.sleep(0.1)
    return got


async def check_exactly_once(app: App, count: int, games: int = 4) -> None:
    for game in range(games):
        page = await app.node.broker.history(f"game:g-b{game}", 0, 10_000)
        ids = [json.loads(p.data)["incidentId"] for p in page.publications]
        want = [f"inc-{i}" for i in range(count) if i % games == game]
        assert ids == want, (game, ids[:10], want[:10])  # each once, in the batch's order


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.003, 0.01])
async def test_a_redis_cut_mid_batch_answers_503_and_a_resend_publishes_once(
    redis_app: tuple[App, Proxy], delay: float
) -> None:
    app, proxy = redis_app
    count = 400
    batch = keyed_batch(1, count)
    reader, writer = await asyncio.open_connection("127.0.0.1", app.api_port)
    try:
        writer.write(request(batch, path="/api/v1/publish/batch"))
        await asyncio.sleep(delay)
        await proxy.cut()
        first = (await read_answers(reader, 1))[0]
    finally:
        writer.close()
    assert first[0] in (200, 503), first  # never a 500, never a hang
    await proxy.restore()
    statuses_seen = await publish_until_answered(app, batch)
    assert all(s in (200, 503) for s in statuses_seen), statuses_seen
    await check_exactly_once(app, count)


async def test_a_frozen_redis_answers_503_within_the_deadline(
    redis_app: tuple[App, Proxy],
) -> None:
    app, proxy = redis_app
    count = 300
    batch = keyed_batch(2, count)
    proxy.freeze()
    started = time.monotonic()
    answers = await exchange(app, request(batch, path="/api/v1/publish/batch"), 1)
    assert answers[0][0] == 503, answers
    assert time.monotonic() - started < 5
    await proxy.restore()
    await publish_until_answered(app, batch)
    await check_exactly_once(app, count)


class ReplyDropper(Proxy):
    """A `Proxy` that, while `mute`, forwards requests to Redis but drops its replies: the
    batch is published, and the gateway never hears so."""

    mute = False

    async def _replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                if not self.mute:
                    writer.write(chunk)
                    await writer.drain()
        writer.close()


async def test_a_batch_published_but_unanswered_is_published_once_on_resend(
    tmp_path: Path,
) -> None:
    async with gateway_behind(ReplyDropper, tmp_path) as (app, proxy):
        count = 200
        batch = keyed_batch(3, count)
        proxy.mute = True
        answers = await exchange(app, request(batch, path="/api/v1/publish/batch"), 1)
        assert answers[0][0] == 503, answers
        proxy.mute = False
        await proxy.cut()  # the muted connections are out of step: start over
        await proxy.restore()
        await publish_until_answered(app, batch)
        await check_exactly_once(app, count)


class ReplyDelayer(ReplyDropper):
    """While `mute`, Redis's replies are held back, then delivered late (a slow network)."""

    async def _replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                while self.mute:  # noqa: ASYNC110 (a test proxy, polled by design)
                    await asyncio.sleep(0.01)
                writer.write(chunk)
                await writer.drain()
        writer.close()


async def test_replies_that_arrive_after_the_deadline_are_not_taken_for_the_next_ones(
    tmp_path: Path,
) -> None:
    async with gateway_behind(ReplyDelayer, tmp_path) as (app, proxy):
        count = 200
        batch = keyed_batch(4, count)
        proxy.mute = True
        answers = await exchange(app, request(batch, path="/api/v1/publish/batch"), 1)
        assert answers[0][0] == 503, answers
        proxy.mute = False  # the late replies arrive now
        got = await publish_until_answered(app, batch)
        assert all(s in (200, 503) for s in got), got
        await check_exactly_once(app, count)
        # A single publish after that gets its own offset, not a stale reply's.
        status, answer = await asyncio.wait_for(publish(app, incident("g-b0", 9999)), WAIT_S)
        assert status == 200, answer
        top_now = await top(app, "game:g-b0")
        assert answer["offset"] == top_now == count // 4 + 1, (answer, top_now)


def _repeated_member_cases() -> list[bytes]:
    inc = incident("g-1", 1)
    data = json.dumps(inc["data"])
    bal = json.dumps(BALANCE["data"])
    whole = json.dumps(inc)[:-1]
    return [
        (whole + ',"event":"incident"}').encode(),
        (whole + ',"event":"bet"}').encode(),
        ('{"gameId":"g-1","data":' + data + ',"event":"incident"}').encode(),
        ('{"event":"incident","gameId":"g-1","data":' + bal + ',"data":' + data + "}").encode(),
        ('{"event":"incident","gameId":null,"data":' + data + ',"gameId":"g-1"}').encode(),
        (
            '{"event":"balance","userId":"u-1","data":' + bal + ',"userId":null,"gameId":"g-1"}'
        ).encode(),
        ('{"event":"balance","userId":"u 1","data":' + bal + ',"userId":"u-1"}').encode(),
        (whole + ',"gameId":"g-1 "}').encode(),
        (whole + ',"gameId":"g-2"}').encode(),
    ]


@pytest.mark.parametrize("body", _repeated_member_cases())
def test_repeated_members_never_make_the_two_readings_disagree(body: bytes) -> None:
    """What the one pass accepts, the two passes accept with the same channel and event; the
    batch reading too. (A None from the one pass falls back to the two passes.)"""
    one = decode_valid_publish(body)
    batch = decode_valid_batch(b'{"items":[' + body + b"]}", 1000)
    if one is None:
        assert batch is None
        return
    assert batch is not None and batch[0][0] == one[0]
    reference = validate_publish(parse_publish_body(body))
    assert (one[0].event, one[0].channel, one[0].data_json) == (
        reference.event,
        reference.channel,
        reference.data_json,
    )
    assert channels.channel_kind(one[0].channel) is not None


async def test_a_half_closed_burst_ending_in_a_handed_off_request(app: App) -> None:
    """300 publishes (many slices), then a request aiohttp serves, then a half-close: every
    one is answered (the publishes here, the last by aiohttp)."""
    count = 300
    data = b"".join(request(body_of(incident("g-tail", i))) for i in range(count))
    data += b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"

    def talk() -> bytes:
        with socket.create_connection(("127.0.0.1", app.api_port), timeout=3) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            got = b""
            # Until the server closes, or the last answer (aiohttp's) is in: aiohttp then keeps
            # the connection to its keep-alive timeout, as it does any.
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                while len(statuses(got)) <= count and (chunk := sock.recv(65536)):
                    got += chunk
            return got

    raw = await in_thread(talk)
    assert statuses(raw)[:count] == [200] * count, statuses(raw)
    assert len(statuses(raw)) == count + 1, statuses(raw)[count:]
    assert await top(app, "game:g-tail") == count


async def test_a_half_closed_burst_on_redis_gets_every_answer(
    redis_app: tuple[App, Proxy],
) -> None:
    app, _proxy = redis_app
    count = 50
    data = b"".join(request(body_of(incident("g-rhalf", i))) for i in range(count))

    def talk() -> bytes:
        with socket.create_connection(("127.0.0.1", app.api_port), timeout=WAIT_S) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            return read_all(sock)

    raw = await in_thread(talk)
    assert statuses(raw) == [200] * count
    assert await top(app, "game:g-rhalf") == count


async def test_api_connections_cut_mid_request_leave_nothing(app: App) -> None:
    """Connections closed (or reset) mid-head, mid-body, or after a pipelined burst unread:
    the fast path keeps none of them."""
    one = request(body_of(incident("g-cut", 1)))

    def hit(count: int) -> None:
        for i in range(count):
            with socket.create_connection(("127.0.0.1", app.api_port), timeout=WAIT_S) as sock:
                sock.sendall([one[:40], one[:-5], one * 40][i % 3])
                if i % 2:  # a reset, not a FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")

    await in_thread(hit, 150)
    sites = [s for s in app.api_runner.sites if isinstance(s, PublishFastSite)]
    assert sites
    for _ in range(int(WAIT_S / 0.02)):
        if not any(s._shared.connections for s in sites):
            break
        await asyncio.sleep(0.02)
    assert not any(s._shared.connections for s in sites)
