"""Bad input at the socket: whatever bytes arrive, the server refuses or closes with a fixed code,
holds bounded memory, and keeps serving everybody else.

Each case uses a raw socket (blocking, in a worker thread, so the in-process server keeps running on
the event loop). After each case a well-behaved client on the same server still gets its `pong` and
its pushes. The close code each case gets is listed in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igratech_ws.app import App
from igratech_ws.core.wsframes import is_valid_close_code
from tests.support.gateway import connect, incident, publish, recv_event, rss_kib, send
from tests.support.gateway import settings as ws_settings
from tests.support.raw_ws import WAIT_S, frame, in_thread, read_frames
from tests.support.raw_ws import connect as connect_raw

MakeGateway = Callable[..., AbstractAsyncContextManager[App]]

MAX_FRAME = 65_536


CLIENT_CLOSE = frame(0x8, struct.pack("!H", 1000))


def ws_case(
    port: int, data: bytes, then_close: bool = False, expect: bytes | None = None
) -> tuple[list[bytes], int | None]:
    """Send `data` after a valid handshake (then, if `then_close`, a close frame: at once, or once
    a text frame holding `expect` arrived); the text frames and close code the server answers."""
    sock = connect_raw(port)
    try:
        frames: list[tuple[int, bytes]] = []
        if expect is not None:
            sock.sendall(data)
            frames, code = read_frames(sock, expect)
            if code is None:
                sock.sendall(CLIENT_CLOSE)
                more, code = read_frames(sock)
                frames += more
        else:
            sock.sendall(data + (CLIENT_CLOSE if then_close else b""))
            frames, code = read_frames(sock)
    finally:
        sock.close()
    return [payload for opcode, payload in frames if opcode == 0x1], code


def raw_case(port: int, data: bytes) -> bytes:
    """Send `data` on a fresh TCP connection; what the server answered before it closed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    answer = b""
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return b"<closed while sending>"
        sock.settimeout(WAIT_S)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return answer
            answer += chunk
    except ConnectionResetError:
        return answer + b"<reset>"
    except TimeoutError:
        return answer + b"<still open>"
    finally:
        sock.close()


async def settled(app: App) -> None:
    """Wait (bounded) until the node has forgotten every raw connection."""
    for _ in range(int(WAIT_S * 100)):
        if not app.node.connection_count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{app.node.connection_count} connections still open")


async def assert_still_serving(app: App, n: int) -> None:
    """A well-behaved client gets its pong and a fresh push on the same server."""
    async with connect(app) as ws:
        await recv_event(ws, "connected")
        await send(ws, "ping", {"ts": n})
        assert (await recv_event(ws, "pong"))["data"]["ts"] == n
        await ws_settings(ws, games=["g-health"])
        status, answer = await publish(app, incident("g-health", n))
        assert status == 200, answer
        assert (await recv_event(ws, "incident"))["offset"] == answer["offset"]


# --- the handshake ------------------------------------------------------------------------------

HANDSHAKE_CASES = [
    ("header line without colon", b"GET /wspublic HTTP/1.1\r\nHost\r\n\r\n", b"400"),
    (
        "no Sec-WebSocket-Key",
        b"GET /wspublic HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
        b"400",
    ),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"400"),
    ("not HTTP at all", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 20000, b""),
    ("random bytes beyond the 16 KiB request bound", os.urandom(20_000), b""),
    (
        "200 header lines of 100 bytes",
        b"GET /wspublic HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 90) for i in range(200))
        + b"\r\n",
        b"",
    ),
]


@pytest.mark.parametrize(
    ("case", "data", "status"), HANDSHAKE_CASES, ids=[c[0] for c in HANDSHAKE_CASES]
)
async def test_a_bad_handshake_is_refused_and_the_server_goes_on(
    make_gateway: MakeGateway, case: str, data: bytes, status: bytes
) -> None:
    async with make_gateway() as app:
        answer = await in_thread(raw_case, app.port, data)
        assert not answer.endswith(b"<still open>"), case
        if status:
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
        else:
            assert b"101" not in answer[:20], answer[:100]
        await settled(app)
        await assert_still_serving(app, 1)


async def test_a_megabyte_of_headers_is_cut_off_with_bounded_memory(
    make_gateway: MakeGateway,
) -> None:
    """picows disconnects once an unfinished request passes 16 KiB: nothing buffers without bound."""
    headers = b"GET /wspublic HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(1000)
    )
    endless = b"GET /wspublic HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * (1 << 20)
    async with make_gateway() as app:
        before = rss_kib()
        for data in (headers + b"\r\n", endless) * 3:
            answer = await in_thread(raw_case, app.port, data)
            assert not answer.endswith(b"<still open>")
            assert b"101" not in answer[:20]
        # Six 1 MB requests: a server buffering them would grow by 6 MB at least.
        assert rss_kib() - before < 4 * 1024
        await assert_still_serving(app, 1)


async def test_a_silent_client_is_dropped_by_the_handshake_timeout(
    make_gateway: MakeGateway,
) -> None:
    async with make_gateway() as app:
        answer = await in_thread(raw_case, app.port, b"GET /wspublic HTTP/1.1\r\nHost: x\r\n")
        assert not answer.endswith(b"<still open>")  # picows's 5 s handshake timeout
        await assert_still_serving(app, 1)


# --- frames after the upgrade -------------------------------------------------------------------

FRAME_CASES: list[tuple[str, bytes, int | None]] = [
    *[
        (f"reserved opcode {op:#x}", frame(op, b"x"), 1002)
        for op in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15)
    ],
    *[
        (f"RSV bits {rsv:03b}", frame(0x1, b'{"event":"ping"}', rsv=rsv), 1002)
        for rsv in (1, 2, 4, 7)
    ],
    ("ping of 126 bytes", frame(0x9, b"p" * 126), 1002),
    ("close of 126 bytes", frame(0x8, b"\x03\xe8" + b"r" * 124), 1002),
    ("fragmented ping", frame(0x9, b"p", fin=False), 1002),
    ("unmasked text frame", frame(0x1, b'{"event":"ping"}', mask=False), 1002),
    ("close with a 1-byte body", frame(0x8, b"\x03"), 1002),
    *[
        (f"close with code {code}", frame(0x8, struct.pack("!H", code)), 1002)
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)
    ],
    ("close with a reason that is not UTF-8", frame(0x8, b"\x03\xe8\xff\xfe"), 1007),
    ("one frame over max_frame_bytes", frame(0x1, b"a" * (MAX_FRAME + 10)), 1009),
    (
        "fragments over max_frame_bytes in total",
        frame(0x1, b"a" * 40_000, fin=False) + frame(0x0, b"a" * 40_000),
        1009,
    ),
    ("continuation without a start", frame(0x0, b"abc"), 1002),
    (
        "a new text frame inside a fragmented one",
        frame(0x1, b'{"ev', fin=False) + frame(0x1, b"x"),
        1002,
    ),
    ("invalid UTF-8 outside any JSON string", frame(0x1, b"\xff\xfe"), 1007),
    (
        "invalid UTF-8 inside a JSON string",
        frame(0x1, b'{"event":"ping","data":{"ts":"\xff\xfe"}}'),
        1007,
    ),
    (
        "invalid UTF-8 split across fragments",
        frame(0x1, "ok €".encode()[:-1], fin=False) + frame(0x0, b"\xff"),
        1007,
    ),
]


@pytest.mark.parametrize(("case", "data", "code"), FRAME_CASES, ids=[c[0] for c in FRAME_CASES])
async def test_a_protocol_violation_closes_with_its_code(
    make_gateway: MakeGateway, case: str, data: bytes, code: int
) -> None:
    async with make_gateway(max_frame_bytes=MAX_FRAME) as app:
        texts, received = await in_thread(ws_case, app.port, data)
        assert received == code, (case, texts)
        await settled(app)
        assert app.node.closes.get(code) == 1
        await assert_still_serving(app, 1)


# Frames the server tolerates: it answers with an `error` (or as if valid) and stays open.
TOLERATED_CASES: list[tuple[str, bytes, str]] = [
    ("binary frame", frame(0x2, b"\x00\x01"), "bad_message"),
    (
        "valid UTF-8 that is not JSON",
        frame(0x1, "not JSON, but fine UTF-8: é€".encode()),
        "bad_json",
    ),
    (
        "a ping between the fragments of a message",
        frame(0x1, b'{"event":"pi', fin=False) + frame(0x9, b"x") + frame(0x0, b'ng"}'),
        "pong",
    ),
]


@pytest.mark.parametrize(
    ("case", "data", "answer"), TOLERATED_CASES, ids=[c[0] for c in TOLERATED_CASES]
)
async def test_tolerated_frames_get_an_answer_and_the_connection_stays(
    make_gateway: MakeGateway, case: str, data: bytes, answer: str
) -> None:
    async with make_gateway() as app:
        texts, code = await in_thread(ws_case, app.port, data, True, answer.encode())
        assert code == 1000, case  # our own close, echoed: the server had not closed
        assert any(answer.encode() in text for text in texts[1:]), texts
        await assert_still_serving(app, 1)


async def test_a_clients_valid_close_code_is_echoed_and_counted_as_other(
    make_gateway: MakeGateway,
) -> None:
    """Section 5.5.1: the server echoes a valid code; the metric counts it under `other`."""
    async with make_gateway() as app:
        for code in (3000, 4321, 4999):
            _texts, received = await in_thread(
                ws_case, app.port, frame(0x8, struct.pack("!H", code) + b"bye")
            )
            assert received == code
        await settled(app)
        assert app.node.closes == {0: 3}


# --- random frame sequences ----------------------------------------------------------------------

_payloads = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
    st.sampled_from(
        [
            b'{"event":"ping","data":{"ts":1}}',
            b'{"event":"settings","data":{"games":["g-1"]}}',
            b"{",
        ]
    ),
)
_frames = st.builds(
    lambda opcode, payload, fin, mask, big: frame(
        opcode, payload * (400 if big else 1), fin=fin, mask=mask
    ),
    opcode=st.integers(min_value=0, max_value=15),
    payload=_payloads,
    fin=st.booleans(),
    mask=st.booleans().map(lambda unmasked: not unmasked) | st.just(True),
    big=st.booleans(),
)
#: Codes a random sequence may get: protocol error, invalid UTF-8 (RFC 6455 section 8.1), policy,
#: too big, or the echo of a valid close code it sent. 1011 would be a bug.
ALLOWED = {None, 1000, 1002, 1007, 1008, 1009}


async def test_random_frame_sequences_never_break_the_server(make_gateway: MakeGateway) -> None:
    async with make_gateway(
        max_frame_bytes=MAX_FRAME, max_message_rate=1000, message_burst=1000
    ) as app:
        loop = asyncio.get_running_loop()
        codes: list[int | None] = []

        @settings(
            max_examples=60,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(st.lists(_frames, min_size=1, max_size=8))
        def check(sequence: list[bytes]) -> None:
            data = b"".join(sequence)
            _texts, code = ws_case(app.port, data, True)
            codes.append(code)
            assert code in ALLOWED or (code is not None and is_valid_close_code(code)), code
            asyncio.run_coroutine_threadsafe(assert_still_serving(app, len(codes)), loop).result(
                WAIT_S
            )

        await loop.run_in_executor(None, check)
        assert len(codes) >= 10
        await settled(app)
