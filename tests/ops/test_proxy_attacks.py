"""The client address behind proxies, attacked over real sockets on 127.0.0.1.

Linux routes all of 127.0.0.0/8 to loopback, so one test plays two parts: a client bound to
127.0.0.1 is the proxy (trusted by default, or named in `trusted_proxies`), one bound to
127.0.0.2 is someone else. Requests are written byte for byte (raw sockets, not a WebSocket
library), so they can lie, stop half-way and crawl.

Promises checked (docs/deployment.md, "The client's address behind a proxy"; docs/security.md):
- only a trusted peer's `X-Forwarded-For` or PROXY header is believed, and of X-Forwarded-For only
  the right-most entry that is not a trusted proxy (what the client writes itself is to its left);
- the per-address limit, the logs and the refusal metrics see the client, not the proxy;
- with the default settings, one proxy address is never refused by the per-address limit;
- a PROXY header is read only when `proxy_protocol` is on and only from a trusted peer; a missing,
  malformed, oversized or unwanted one is answered 400 with its reason, and a slow one meets the
  handshake deadline.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from igratech_ws.app import App, running_app
from igratech_ws.config import Config
from igratech_ws.core.client_address import MAX_PROXY_HEADER_BYTES, PROXY_V2_SIGNATURE
from igratech_ws.transport import wsconnection

PROXY = "127.0.0.1"  # the proxy, trusted by default (loopback)
STRANGER = "127.0.0.2"  # another host (untrusted where `trusted_proxies` names only PROXY)
WAIT_S = 10.0  # bound of every wait; nothing here asserts on speed


def config(**overrides: Any) -> Config:
    return Config(host="127.0.0.1", port=0, api_port=0).with_overrides(overrides)


@asynccontextmanager
async def gateway(**overrides: Any) -> AsyncIterator[tuple[App, int]]:
    async with running_app(config(**overrides)) as app:
        port = urlsplit(app.ws_url).port
        assert port is not None
        yield app, port


def upgrade_request(forwarded_for: list[str] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /wspublic HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"X-Forwarded-For: {value}" for value in forwarded_for or ()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def proxy_v1(source: str, destination: str = "10.0.0.2") -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} 51000 8080\r\n".encode()


def proxy_v2(source: str, tlvs: bytes = b"", *, local: bool = False) -> bytes:
    if local:
        return PROXY_V2_SIGNATURE + b"\x20\x00\x00\x00"
    body = (
        ipaddress.IPv4Address(source).packed
        + ipaddress.IPv4Address("10.0.0.2").packed
        + struct.pack("!HH", 51000, 8080)
        + tlvs
    )
    return PROXY_V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


@dataclass
class Answer:
    """What the server did with one connection attempt.

    `status` is the HTTP status (0: the server closed without answering); after a 101, `event`
    is the first frame's event (``connected``) or `close_code` its close code (1013: over the
    per-address limit). `error` is a refusal's JSON error object.
    """

    status: int
    event: str | None = None
    close_code: int | None = None
    error: dict[str, Any] | None = None
    writer: asyncio.StreamWriter | None = None

    @property
    def greeted(self) -> bool:
        return self.status == 101 and self.event == "connected"


async def attempt(
    port: int,
    data: bytes,
    *,
    source: str = PROXY,
    pace: float | None = None,
    keep: bool = False,
) -> Answer:
    """Connect from `source`, send `data` (one byte per `pace` seconds when set), read the
    answer. With `keep`, a greeted connection stays open (close `Answer.writer`)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), WAIT_S
    )
    try:
        answer = await asyncio.wait_for(_exchange(reader, writer, data, pace), WAIT_S)
    except BaseException:
        writer.close()
        raise
    if keep and answer.greeted:
        answer.writer = writer
    else:
        writer.close()
    return answer


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, pace: float | None
) -> Answer:
    # Read while sending: a server that answers early (or hangs up) stops the sending, so the
    # client never writes into a closed socket (whose reset could discard the answer).
    head_read = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
    try:
        if pace is None:
            writer.write(data)
        else:
            for index in range(len(data)):
                if head_read.done():
                    break
                writer.write(data[index : index + 1])
                await writer.drain()
                await asyncio.sleep(pace)
        head = await head_read
    except (asyncio.IncompleteReadError, ConnectionError):
        return Answer(0)
    finally:
        head_read.cancel()
    status = int(head.split(b" ", 2)[1])
    if status != 101:
        body = head.partition(b"\r\n\r\n")[2] + await reader.read()
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            error = None  # picows's own plain-text refusals
        return Answer(status, error=error)
    first, length = await reader.readexactly(2)
    if length & 0x7F == 126:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
    else:
        size = length & 0x7F
    payload = await reader.readexactly(size)
    if first & 0x0F == 0x8:
        return Answer(101, close_code=struct.unpack("!H", payload[:2])[0])
    return Answer(101, event=json.loads(payload)["event"])


async def close_all(answers: list[Answer]) -> None:
    for answer in answers:
        if answer.writer is not None:
            answer.writer.close()


# --- X-Forwarded-For ----------------------------------------------------------------------------


async def test_a_stranger_cannot_forge_its_way_past_the_limit() -> None:
    """An untrusted peer's X-Forwarded-For is ignored: the limit counts its own address."""
    async with gateway(trusted_proxies=PROXY, max_connections_per_ip=2) as (app, port):
        held = [
            await attempt(port, upgrade_request([forged]), source=STRANGER, keep=True)
            for forged in ("203.0.113.1", "203.0.113.2")
        ]
        try:
            assert all(answer.greeted for answer in held)
            third = await attempt(port, upgrade_request(["203.0.113.3"]), source=STRANGER)
            assert third.close_code == 1013
            assert app.node.refused.get("per_address_limit") == 1
            # The address it claimed is still free for the real proxy's client of that name.
            through_proxy = await attempt(port, upgrade_request(["203.0.113.3"]), keep=True)
            assert through_proxy.greeted
            held.append(through_proxy)
        finally:
            await close_all(held)


async def test_what_a_client_prepends_behind_the_proxy_does_not_count() -> None:
    """nginx appends the address it saw; entries left of it are the client's own writing."""
    async with gateway(max_connections_per_ip=1) as (_app, port):
        first = await attempt(port, upgrade_request(["1.1.1.1, 203.0.113.9, 10.0.0.7"]), keep=True)
        try:
            assert first.greeted
            for forged in ("2.2.2.2, 203.0.113.9, 10.0.0.7", "10.9.9.9, 203.0.113.9"):
                again = await attempt(port, upgrade_request([forged]))
                assert again.close_code == 1013, forged
            # Two header lines are one list, read from the right across both.
            split = await attempt(port, upgrade_request(["3.3.3.3", "203.0.113.9, 10.0.0.7"]))
            assert split.close_code == 1013
        finally:
            await close_all([first])


async def test_a_long_chain_of_trusted_entries_neither_hides_nor_invents_a_client() -> None:
    trusted_hops = ", ".join(f"10.0.{n // 250}.{n % 250 + 1}" for n in range(40))
    async with gateway(max_connections_per_ip=1) as (_app, port):
        held: list[Answer] = []
        try:
            # The client's address right of forty trusted entries it wrote itself: counted.
            first = await attempt(
                port, upgrade_request([f"{trusted_hops}, 203.0.113.9"]), keep=True
            )
            held.append(first)
            assert first.greeted
            again = await attempt(port, upgrade_request([f"{trusted_hops}, 203.0.113.9"]))
            assert again.close_code == 1013
            # Sixteen trusted hops or fewer: the left-most is a client inside the network.
            inside = ", ".join(["10.0.0.3", *["10.0.0.4"] * 15])
            held.append(await attempt(port, upgrade_request([inside]), keep=True))
            assert held[-1].greeted
            assert (await attempt(port, upgrade_request(["10.0.0.3"]))).close_code == 1013
            # Past sixteen trusted hops the client is unknown, not guessed: exempt, never the
            # left-most entry (which anyone in the chain could have written).
            for _ in range(3):
                held.append(await attempt(port, upgrade_request([trusted_hops]), keep=True))
                assert held[-1].greeted
            held.append(await attempt(port, upgrade_request(["10.0.0.1"]), keep=True))
            assert held[-1].greeted
        finally:
            await close_all(held)


@pytest.mark.parametrize(
    "values",
    [
        ["garbage"],
        [""],
        [" , ,"],
        ["unknown"],
        ["203.0.113.9, garbage"],  # an unusable entry right of an address: the chain is broken
        ["1.2.3.4.5"],
        ["::ffff:zz"],
        ["[2001:db8::1"],
        ["9" * 2000],
        ['!@#$%^&*();<>"\\'],
        [", ".join(["x"] * 3000)],
    ],
)
async def test_garbage_forwarded_for_names_nobody(values: list[str]) -> None:
    """A trusted proxy's unusable header is a proxy naming nobody: served, and exempt."""
    async with gateway(max_connections_per_ip=1) as (app, port):
        held = [await attempt(port, upgrade_request(values), keep=True) for _ in range(3)]
        try:
            assert [answer.greeted for answer in held] == [True] * 3
            assert app.node.refused == {}
        finally:
            await close_all(held)


async def test_non_ascii_bytes_in_forwarded_for_are_garbage_too() -> None:
    request = upgrade_request().replace(
        b"\r\n\r\n", b"\r\nX-Forwarded-For: 203.0.113.\xff9\r\n\r\n"
    )
    async with gateway(max_connections_per_ip=1) as (_app, port):
        held = [await attempt(port, request, keep=True) for _ in range(2)]
        try:
            assert all(answer.greeted for answer in held)
        finally:
            await close_all(held)


async def count_greeted(port: int, requests: list[bytes]) -> tuple[int, list[Answer]]:
    """Open every request at once (a few dozen in flight), keep the greeted ones open."""
    gate = asyncio.Semaphore(32)

    async def one(request: bytes) -> Answer:
        async with gate:
            return await attempt(port, request, keep=True)

    answers = list(await asyncio.gather(*(one(request) for request in requests)))
    return sum(answer.greeted for answer in answers), answers


@pytest.mark.parametrize(
    ("headers", "greeted"),
    [
        pytest.param(lambda n: [f"198.51.{n // 250}.{n % 250 + 1}"], 1001, id="distinct-clients"),
        pytest.param(lambda n: None, 1001, id="no-header"),
        pytest.param(lambda n: ["203.0.113.9"], 1000, id="one-client"),
    ],
)
async def test_one_proxy_carries_1001_users_with_the_default_settings(
    headers: Any, greeted: int
) -> None:
    """The issue's case: the 1,001st user behind nginx was refused. With the defaults (limit
    1,000 per address, loopback and private networks trusted) it is served, while one client
    behind the proxy is still held to 1,000."""
    assert Config().max_connections_per_ip == 1000
    async with gateway() as (app, port):
        count, answers = await count_greeted(
            port, [upgrade_request(headers(n)) for n in range(1001)]
        )
        try:
            assert count == greeted
            limited = [answer for answer in answers if not answer.greeted]
            assert [answer.close_code for answer in limited] == [1013] * (1001 - greeted)
            assert app.node.connection_count == greeted
        finally:
            await close_all(answers)


async def test_the_logs_name_the_client_not_the_proxy(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger="igratech_ws.websocket")
    monkeypatch.setattr(wsconnection.log, "filters", [])  # no rate limit left by earlier tests
    async with gateway() as (_app, port):
        answer = await attempt(port, upgrade_request(["1.1.1.1, 203.0.113.9"]), keep=True)
        assert answer.greeted and answer.writer is not None
        answer.writer.write(b"\x81\x02hi")  # an unmasked client frame: the connection fails
        await asyncio.sleep(0.2)
        answer.writer.close()
        failing = [r for r in caplog.records if r.getMessage() == "failing a connection"]
        assert failing and getattr(failing[0], "client", None) == "203.0.113.9"


# --- PROXY protocol -----------------------------------------------------------------------------


@pytest.mark.parametrize("header", [proxy_v1, proxy_v2], ids=["v1", "v2"])
async def test_a_proxy_header_names_the_client_for_the_limit(header: Any) -> None:
    async with gateway(proxy_protocol=True, max_connections_per_ip=1) as (_app, port):
        first = await attempt(port, header("203.0.113.9") + upgrade_request(), keep=True)
        try:
            assert first.greeted
            # The same client through the balancer again: over its limit.
            again = await attempt(port, header("203.0.113.9") + upgrade_request())
            assert again.close_code == 1013
            # Its X-Forwarded-For cannot overrule the balancer's header.
            forged = await attempt(port, header("203.0.113.9") + upgrade_request(["198.51.100.1"]))
            assert forged.close_code == 1013
            other = await attempt(port, header("198.51.100.7") + upgrade_request(), keep=True)
            assert other.greeted
            await close_all([other])
        finally:
            await close_all([first])


async def test_a_client_behind_the_balancer_cannot_add_its_own_proxy_header() -> None:
    """An L4 balancer passes the client's bytes on after its own header: a PROXY header there is
    the client's, and refused."""
    async with gateway(proxy_protocol=True, max_connections_per_ip=1) as (app, port):
        for forged in (proxy_v1("198.51.100.1"), proxy_v2("198.51.100.1")):
            answer = await attempt(port, proxy_v1("203.0.113.9") + forged + upgrade_request())
            assert answer.status == 400
            assert answer.error is not None and answer.error["code"] == "proxy_header_refused"
            assert "only the first" in answer.error["message"]
        assert app.node.refused == {"proxy_header_refused": 2}
        async with aiohttp.ClientSession() as http, http.get(app.api_url + "/metrics") as got:
            metrics = await got.text()
        assert 'handshakes_refused_total{node="' in metrics
        assert 'reason="proxy_header_refused"} 2.0' in metrics


async def test_a_balancer_health_check_names_nobody_and_is_exempt() -> None:
    local = proxy_v2("0.0.0.0", local=True)
    async with gateway(proxy_protocol=True, max_connections_per_ip=1) as (_app, port):
        held = [await attempt(port, local + upgrade_request(), keep=True) for _ in range(2)]
        held += [
            await attempt(port, b"PROXY UNKNOWN\r\n" + upgrade_request(), keep=True)
            for _ in range(2)
        ]
        try:
            assert all(answer.greeted for answer in held)
        finally:
            await close_all(held)


async def test_a_proxy_header_and_request_sent_byte_by_byte_are_read() -> None:
    async with gateway(proxy_protocol=True, max_connections_per_ip=1) as (_app, port):
        for header in (proxy_v1("203.0.113.9"), proxy_v2("198.51.100.7")):
            answer = await attempt(port, header + upgrade_request(), pace=0.0005, keep=True)
            assert answer.greeted
            await close_all([answer])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"PROXY TCP4 203.0.113.9\r\n", id="v1-fields-missing"),
        pytest.param(b"PROXY TCP4 203.0.113.9 10.0.0.2 1\r\n", id="v1-port-missing"),
        pytest.param(b"PROXY TCP4 203.0.113.999 10.0.0.2 1 2\r\n", id="v1-bad-address"),
        pytest.param(b"PROXY TCP4 " + b"1" * 200 + b"\r\n", id="v1-oversized"),
        pytest.param(PROXY_V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12, id="v2-version-3"),
        pytest.param(
            PROXY_V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4, id="v2-addresses-truncated"
        ),
        pytest.param(
            PROXY_V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 65535), id="v2-oversized"
        ),
        pytest.param(
            proxy_v2("203.0.113.9", b"\x04" + b"x" * MAX_PROXY_HEADER_BYTES), id="v2-long-tlvs"
        ),
    ],
)
async def test_a_malformed_proxy_header_is_refused_with_its_reason(data: bytes) -> None:
    async with gateway(proxy_protocol=True) as (app, port):
        answer = await attempt(port, data + upgrade_request())
        assert answer.status == 400
        assert answer.error is not None and answer.error["code"] == "proxy_header_invalid"
        assert app.node.refused == {"proxy_header_invalid": 1}


async def test_a_trusted_peer_without_a_proxy_header_is_refused() -> None:
    async with gateway(proxy_protocol=True) as (_app, port):
        answer = await attempt(port, upgrade_request(["203.0.113.9"]))
        assert answer.status == 400
        assert answer.error is not None and answer.error["code"] == "proxy_header_missing"


@pytest.mark.parametrize("header", [proxy_v1, proxy_v2], ids=["v1", "v2"])
async def test_a_stranger_cannot_send_a_proxy_header(header: Any) -> None:
    """A PROXY header from an untrusted peer is refused, and its plain connections count its
    own address."""
    async with gateway(proxy_protocol=True, trusted_proxies=PROXY, max_connections_per_ip=1) as (
        _app,
        port,
    ):
        forged = await attempt(port, header("203.0.113.9") + upgrade_request(), source=STRANGER)
        assert forged.status == 400
        assert forged.error is not None and forged.error["code"] == "proxy_header_refused"
        plain = await attempt(port, upgrade_request(), source=STRANGER, keep=True)
        try:
            assert plain.greeted
            again = await attempt(port, upgrade_request(["203.0.113.9"]), source=STRANGER)
            assert again.close_code == 1013
        finally:
            await close_all([plain])


@pytest.mark.parametrize("header", [proxy_v1, proxy_v2], ids=["v1", "v2"])
async def test_a_proxy_header_is_refused_when_the_listener_does_not_read_them(
    header: Any,
) -> None:
    async with gateway(max_connections_per_ip=1) as (_app, port):
        answer = await attempt(port, header("203.0.113.9") + upgrade_request())
        assert answer.status == 400
        assert answer.error is not None and answer.error["code"] == "proxy_header_refused"
        assert "proxy_protocol is off" in answer.error["message"]
        # Sent in pieces, it is not recognised as such, but never believed: a refusal anyway.
        slow = await attempt(port, header("203.0.113.9") + upgrade_request(), pace=0.0005)
        assert slow.status == 400


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"PROXY TCP4 203.0.113.9 10.0.0.2 51", id="v1-stops"),
        pytest.param(proxy_v2("203.0.113.9")[:20], id="v2-stops"),
        pytest.param(b"PROXY ", id="v1-signature-only"),
        pytest.param(PROXY_V2_SIGNATURE[:5], id="v2-signature-part"),
    ],
)
async def test_a_proxy_header_that_never_ends_meets_the_handshake_deadline(
    data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wsconnection, "HANDSHAKE_TIMEOUT", 0.5)
    async with gateway(proxy_protocol=True) as (_app, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            # The server drops the connection: end of stream, well within the test's bound.
            assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
        finally:
            writer.close()


async def test_a_proxy_header_sent_slower_than_the_deadline_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wsconnection, "HANDSHAKE_TIMEOUT", 0.5)
    async with gateway(proxy_protocol=True) as (app, port):
        answer = await attempt(port, proxy_v1("203.0.113.9") + upgrade_request(), pace=0.05)
        assert answer.status == 0  # closed without an answer once the deadline passed
        assert app.node.connection_count == 0


@pytest.mark.parametrize("use_aiofastnet", [False, True], ids=["uvloop", "aiofastnet"])
def test_production_transports_read_the_same_addresses(use_aiofastnet: bool) -> None:
    """The tests above run on asyncio's transports; production runs uvloop's or aiofastnet's,
    whose reads are cut differently. The same headers give the same addresses there."""
    import uvloop

    async def main() -> None:
        async with gateway(
            use_aiofastnet=use_aiofastnet, proxy_protocol=True, max_connections_per_ip=1
        ) as (_, port):
            first = await attempt(port, proxy_v2("203.0.113.9") + upgrade_request(), keep=True)
            try:
                assert first.greeted
                for pace in (None, 0.0005):
                    again = await attempt(
                        port, proxy_v1("203.0.113.9") + upgrade_request(), pace=pace
                    )
                    assert again.close_code == 1013
                missing = await attempt(port, upgrade_request())
                assert missing.error is not None
                assert missing.error["code"] == "proxy_header_missing"
            finally:
                await close_all([first])
        async with gateway(
            use_aiofastnet=use_aiofastnet, trusted_proxies=PROXY, max_connections_per_ip=1
        ) as (_app, port):
            held = await attempt(port, upgrade_request(["1.1.1.1"]), source=STRANGER, keep=True)
            try:
                assert held.greeted
                forged = await attempt(port, upgrade_request(["2.2.2.2"]), source=STRANGER)
                assert forged.close_code == 1013
                named = await attempt(port, upgrade_request(["2.2.2.2"]), keep=True)
                assert named.greeted
                await close_all([named])
            finally:
                await close_all([held])

    uvloop.run(main())
