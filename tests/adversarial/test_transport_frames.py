"""RFC 6455 at the public endpoint (issue 9, the Autobahn findings), seen from a raw socket.

On the old listener frames with RSV bits were accepted, broken fragmentation was closed with
1008 (or tolerated), and invalid UTF-8 in a text frame got an `error` event instead of 1007. Now
each is failed with its RFC code, while valid UTF-8 that is not JSON still gets an `error` and
the connection goes on. Frames a client pipelines right behind its upgrade request, even cut in
the middle of a header, are parsed like any other.
"""

from __future__ import annotations

import base64
import json
import os

import pytest

from igratech_ws.app import running_app
from tests.support.gateway import base_config
from tests.support.raw_ws import (
    LOOPS,
    WAIT_S,
    close,
    connect,
    frame,
    in_thread,
    read_frames,
    run_on,
    texts,
)

PING_EVENT = frame(0x1, b'{"event":"ping","data":{"ts":5}}')

FAILING: list[tuple[str, bytes, int]] = [
    ("RSV1", frame(0x1, b'{"event":"ping"}', rsv=4), 1002),
    ("RSV2 on a ping", frame(0x9, b"p", rsv=2), 1002),
    ("RSV3 on a continuation", frame(0x1, b"{", fin=False) + frame(0x0, b"}", rsv=1), 1002),
    ("a continuation without a message", frame(0x0, b"{}"), 1002),
    ("a new text inside a fragmented one", frame(0x1, b"{", fin=False) + frame(0x1, b"{}"), 1002),
    ("a binary inside a fragmented text", frame(0x1, b"{", fin=False) + frame(0x2, b"x"), 1002),
    ("invalid UTF-8 in a text frame", frame(0x1, b'{"event":"\xc3\x28"}'), 1007),
    ("a lone surrogate in a text frame", frame(0x1, b'{"event":"\xed\xa0\x80"}'), 1007),
    (
        "invalid UTF-8 cut across fragments",
        frame(0x1, b"{\xe2\x82", fin=False) + frame(0x0, b"}"),
        1007,
    ),
]


def exchange(port: int, data: bytes, until: bytes | None = None) -> tuple[list[bytes], int | None]:
    sock = connect(port)
    try:
        sock.sendall(data)
        frames, code = read_frames(sock, until)
        if code is None and until is not None:
            sock.sendall(close(1000))
            more, code = read_frames(sock)
            frames += more
    finally:
        sock.close()
    return texts(frames), code


async def _failing(aiofastnet: bool) -> None:
    async with running_app(base_config(use_aiofastnet=aiofastnet)) as app:
        for case, data, expected in FAILING:
            answers, code = await in_thread(exchange, app.port, data + PING_EVENT)
            assert code == expected, (case, code, answers)
            assert not any(b'"pong"' in a for a in answers), case  # nothing after it was parsed


@pytest.mark.parametrize("loop", LOOPS)
def test_protocol_violations_fail_with_their_rfc_code(loop: str) -> None:
    run_on(loop, _failing)


async def test_valid_utf8_that_is_not_json_gets_an_error_and_the_connection_goes_on() -> None:
    async with running_app(base_config()) as app:
        data = frame(0x1, "ceci n'est pas du JSON: é€".encode()) + PING_EVENT
        answers, code = await in_thread(exchange, app.port, data, b'"pong"')
        assert code == 1000, code  # our own close, echoed
        events = [json.loads(a) for a in answers]
        assert [e["event"] for e in events] == ["connected", "error", "pong"], events
        assert events[1]["data"]["code"] == "bad_json"


def pipelined(port: int, cut: int) -> tuple[list[bytes], int | None]:
    """The upgrade request, a whole frame and `cut` bytes of the next one in one segment; the
    rest of that frame in a second one."""
    import socket

    key = base64.b64encode(os.urandom(16))
    request = (
        b"GET /wspublic HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    first = frame(0x1, b'{"event":"ping","data":{"ts":1}}')
    second = frame(0x1, b'{"event":"ping","data":{"ts":2}}')
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request + first + second[:cut])
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        sock.sendall(second[cut:])
        frames, code = read_frames(sock, b'"ts":2')
    return texts(frames), code


async def _pipelined(aiofastnet: bool) -> None:
    async with running_app(base_config(use_aiofastnet=aiofastnet)) as app:
        for cut in (0, 1, 2, 5, 8, 20):
            answers, code = await in_thread(pipelined, app.port, cut)
            events = [json.loads(a) for a in answers]
            assert code is None, (cut, events)
            assert [e["event"] for e in events] == ["connected", "pong", "pong"], (cut, events)
            assert [e["data"]["ts"] for e in events[1:]] == [1, 2]


@pytest.mark.parametrize("loop", LOOPS)
def test_frames_pipelined_behind_the_upgrade_are_parsed_like_the_rest(loop: str) -> None:
    run_on(loop, _pipelined)


async def test_frames_behind_a_refused_upgrade_are_never_parsed() -> None:
    import socket

    def refused(port: int) -> bytes:
        key = base64.b64encode(os.urandom(16))
        request = (
            b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
            sock.sendall(request + PING_EVENT * 10)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer

    async with running_app(base_config()) as app:
        answer = await in_thread(refused, app.port)
        assert answer.startswith(b"HTTP/1.1 404"), answer[:60]
        assert b"pong" not in answer
