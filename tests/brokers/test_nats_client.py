"""`brokers.nats.client`: the faster header encoder and parser do exactly what nats-py's do
(and the headers of a publication, written and read, are its own)."""

from __future__ import annotations

import asyncio
import string
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NatsPyClient
from nats.aio.msg import Msg

from igratech_ws.brokers.base import Publication
from igratech_ws.brokers.nats.append import headers_of
from igratech_ws.brokers.nats.client import Client, header_block, parse_header_lines
from igratech_ws.brokers.nats.history import publication_from

# Bytes that matter to a header parser: separators, whitespace of every kind, non-ASCII.
_PIECES = [
    b"\r\n",
    b":",
    b": ",
    b" ",
    b"\t",
    b"\x0b",
    b"\x1c",
    b"\x1f",
    b"\xc3\xa9",
    b"\xff",
    b"Igws-Offset",
    b"Nats-Sequence",
    b"12",
    b"a",
    b"-",
    b"",
]
blocks = st.lists(st.sampled_from(_PIECES) | st.binary(max_size=6), max_size=30).map(b"".join)
# Blocks shaped like the server's (lines, then an empty line): some of clean lines only (the
# parser's fast path, with its near misses: a ":" or a space in the wrong place), some of any.
_LINE_PIECES = [
    b": ",
    b":",
    b"  ",
    b" ",
    b"\t",
    b"\r",
    b"\n",
    b"\x1c",
    b"\x00",
    b"\xc3\xa9",
    b"Igws-Offset",
    b"Nats-Msg-Id",
    b"ab12",
    b"g:1/k",
    b"a",
    b"-",
    b"",
]
_CLEAN_PIECES = [b":", b"a b", b"ab12", b"g:1/k", b"1.5", b"-", b"x: y", b"Igws-Offset"]


def _server_blocks(pieces: list[bytes]) -> st.SearchStrategy[bytes]:
    line = st.lists(st.sampled_from(pieces), max_size=6).map(b"".join)
    value = st.lists(st.sampled_from(pieces), min_size=1, max_size=4).map(b"".join)
    named = st.tuples(st.sampled_from([b"Igws-Event", b"A", b""]), value).map(b": ".join)
    return st.lists(st.one_of(named, named, named, line), max_size=8).map(
        lambda ls: b"".join(one + b"\r\n" for one in ls) + b"\r\n"
    )


server_blocks = _server_blocks(_CLEAN_PIECES) | _server_blocks(_LINE_PIECES)


@given(blocks)
def test_parses_any_block_as_nats_py_does(raw: bytes) -> None:
    assert parse_header_lines(raw) == NatsPyClient._parse_header_lines(raw)


@given(server_blocks)
def test_parses_any_server_shaped_block_as_nats_py_does(raw: bytes) -> None:
    ours = parse_header_lines(raw)
    theirs = NatsPyClient._parse_header_lines(raw)
    assert ours == theirs and list(ours) == list(theirs)


def test_a_republished_publication() -> None:
    raw = (
        b"Igws-Offset: 7\r\nIgws-Epoch: ab12\r\nIgws-Event: incident\r\nIgws-Time: 1.5\r\n"
        b"Igws-Origin: n1\r\nNats-Stream: IGWS_x\r\nNats-Subject: x.ch.game:g-1\r\n"
        b"Nats-Sequence: 42\r\nNats-Last-Sequence: 41\r\n\r\n"
    )
    parsed = parse_header_lines(raw)
    assert parsed == NatsPyClient._parse_header_lines(raw)
    assert parsed["Igws-Offset"] == "7" and parsed["Nats-Subject"] == "x.ch.game:g-1"


def test_the_broker_client_uses_it() -> None:
    assert Client._parse_header_lines is parse_header_lines


def _sent(client: NatsPyClient, subject: str, headers: dict[str, str]) -> object:
    """What `client.publish` sends (not connected: commands are captured), or the error."""
    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(cmd)

    client._status = NatsPyClient.CONNECTED
    client._send_command = capture  # type: ignore[method-assign]
    try:
        asyncio.run(client.publish(subject, b'{"a":1}', reply="_INBOX.x.1", headers=headers))
    except Exception as exc:
        return type(exc)
    return sent, client.stats["out_msgs"], client.stats["out_bytes"]


_NAMES = st.sampled_from(["Igws-Offset", "Nats-Msg-Id", "A", "", " A", "A B", "a:b", "é"])
_VALUES = st.text(alphabet=string.printable + "é\x85\xa0\u2028\x00", max_size=8)


@given(st.dictionaries(_NAMES | st.text(max_size=4), _VALUES, max_size=7))
def test_publishes_any_headers_as_nats_py_does(headers: dict[str, str]) -> None:
    assert _sent(Client(), "igws.ch.g", headers) == _sent(NatsPyClient(), "igws.ch.g", headers)


_SAFE_VALUES = st.text(alphabet=string.ascii_letters + string.digits + ".:/-_ %", max_size=20)


@given(
    st.dictionaries(
        st.sampled_from(["Igws-Offset", "Igws-Epoch", "Nats-Msg-Id"]),
        _SAFE_VALUES.map(str.strip),
        min_size=1,
    )
)
def test_our_kind_of_headers_take_the_fast_path(headers: dict[str, str]) -> None:
    block = header_block(headers)
    assert block is not None
    assert _sent(Client(), "igws.ch.g", headers) == _sent(NatsPyClient(), "igws.ch.g", headers)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"A": " x"},
        {"A": "x "},
        {"A": "x\r\ny"},
        {"A": "\t"},
        {" A": "x"},
        {"": "x"},
        {"A:B": "x"},
        {"A": 1},
    ],
)
def test_headers_nats_py_would_change_are_left_to_it(headers: dict[str, str]) -> None:
    assert header_block(headers) is None
    assert _sent(Client(), "igws.ch.g", headers) == _sent(NatsPyClient(), "igws.ch.g", headers)


def test_times_written_and_read_back_are_each_publications_own() -> None:
    # headers_of and publication_from remember the last time (a chain shares one).
    times = [1.5, 1.5, -0.0, 0.0, 0.0, 1796232760.2254188, 2.0]
    for published_at in times:
        publication = Publication("game:a", 1, "e", "bet", b"{}", published_at, "n")
        headers = headers_of(publication)
        assert headers["Igws-Time"] == repr(published_at)
        read = publication_from("game:a", headers, b"{}")
        assert repr(read.published_at) == repr(published_at)


async def test_an_inline_subscription_gets_each_message_in_order(nats_url: str) -> None:
    errors: list[Exception] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(exc)

    client = Client()
    await client.connect(nats_url, error_cb=error_cb)
    try:
        got: list[tuple[bytes, dict[str, str] | None]] = []

        def handler(msg: Msg) -> None:
            if msg.data == b"boom":
                raise RuntimeError("boom")
            got.append((msg.data, msg.headers))

        subject = f"inline.{uuid.uuid4().hex}"
        sub = await client.subscribe_inline(subject, handler)
        await client.flush()
        for i in range(5):
            await client.publish(subject, b"%d" % i, headers={"Igws-Offset": str(i)})
        await client.publish(subject, b"boom")
        await client.publish(subject, b"after")
        await client.flush()
        for _ in range(100):
            if len(got) == 6:
                break
            await asyncio.sleep(0.01)
        assert got == [(b"%d" % i, {"Igws-Offset": str(i)}) for i in range(5)] + [(b"after", None)]
        assert [str(e) for e in errors] == ["boom"]  # to the error callback, as a callback's
        assert sub.delivered == 7 and client.stats["in_msgs"] >= 7

        await sub.unsubscribe()
        await client.publish(subject, b"gone")
        await client.flush()
        await asyncio.sleep(0.05)
        assert len(got) == 6
    finally:
        await client.close()


_REPUBLISHED = (
    b"NATS/1.0\r\nIgws-Offset: 2\r\nIgws-Epoch: 9ca18e3c8965\r\nIgws-Event: incident\r\n"
    b"Igws-Time: 1796295389.0360844\r\nIgws-Origin: 4bbd9292712a\r\n"
    b"Nats-Expected-Last-Msg-Id: fb3d60f794b6431c.1\r\nNats-Msg-Id: fb3d60f794b6431c.2\r\n"
    b"Nats-Stream: IGWS_x\r\nNats-Subject: x.ch.game:1\r\nNats-Sequence: 2\r\n"
    b"Nats-Last-Sequence: 1\r\n\r\n"
)


def _via_dict(block: bytes) -> object:
    from igratech_ws.brokers.nats.history import publication_from

    try:
        return publication_from("c", parse_header_lines(block[10:]), b"x")
    except (KeyError, ValueError):
        return "malformed"


def test_publication_from_block_matches_the_dict_path_on_mutated_blocks() -> None:
    """The live delivery's fast path yields what nats-py's header dict would, or defers."""
    import random

    from igratech_ws.brokers.nats.history import publication_from_block

    assert publication_from_block("c", _REPUBLISHED, b"x") == _via_dict(_REPUBLISHED)
    pieces = [b" ", b":", b"\r\n", b"Igws-Offset", b"Igws-", b"\t", b"x", b"1", b"\xc3", b"\r"]
    rng = random.Random(7)
    taken = 0
    for _ in range(20_000):
        block = bytearray(_REPUBLISHED)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(10, len(block))
            op = rng.random()
            if op < 0.4:
                block[at : at + rng.randint(0, 3)] = rng.choice(pieces)
            elif op < 0.7:
                del block[at : at + rng.randint(1, 4)]
            else:
                block.insert(at, rng.randrange(256))
        fast = publication_from_block("c", bytes(block), b"x")
        if fast is not None:
            taken += 1
            assert fast == _via_dict(bytes(block)), bytes(block)
    assert taken > 1000
    assert publication_from_block("c", None, b"x") is None


async def test_flush_returns_once_the_server_has_read_every_subscription_before_it() -> None:
    """`flush` after a subscribe is the broker's barrier (a node's control subscription at start,
    a channel's in `subscribe`): the PONG must come after the server has read the SUB. nats-py
    writes the PING straight to the socket, ahead of the SUBs still pending for its flusher task:
    the server answered the PING first, took another node's publish, then the SUB, and the node
    missed the message (the flaky two-node control test on NATS). A fake server that records
    each command it reads, in order, shows what it had read when it answered."""
    read: list[bytes] = []
    read_when_answered: list[list[bytes]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'INFO {"server_id":"fake","version":"2.15.1","proto":1,"headers":true}\r\n')
        while line := await reader.readline():
            read.append(b" ".join(line.split()[:2]))
            if line.startswith(b"PING"):
                read_when_answered.append(list(read))
                writer.write(b"PONG\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = Client()
    try:
        await client.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)

        async def callback(msg: Msg) -> None:
            pass

        await client.subscribe("p.control", cb=callback)
        await client.subscribe_inline("p.live.c", lambda msg: None)
        await client.flush()
        # The handshake's PING, then the flush's: answered after both SUBs.
        assert read_when_answered[-1][-3:] == [b"SUB p.control", b"SUB p.live.c", b"PING"]
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
