"""Hostile upgrade requests: every one is refused with a 4xx and a JSON reason naming the field,
never a 500, and never an ERROR (let alone a traceback) in the log.

Issue 9, class 6: on the old listener `/wspublic?` with 17 query fields or `//[x/wspublic` got a
500 and an ERROR traceback per request, and a request over picows's 16 KiB bound was dropped
without an answer.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket

import pytest

from igratech_ws.app import running_app
from tests.support.gateway import base_config
from tests.support.raw_ws import WAIT_S, in_thread


def upgrade(port: int, target: bytes, extra: bytes = b"") -> tuple[int, dict[str, str] | None]:
    """Send an upgrade request for `target`; the HTTP status and the JSON error, if any."""
    key = base64.b64encode(os.urandom(16))
    request = (
        b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        # The server may answer and close before reading it all: read its answer anyway.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        answer = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
                if answer.startswith(b"HTTP/1.1 101") and b"\r\n\r\n" in answer:
                    break
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]
    status = int(answer[9:12])
    _head, _, body = answer.partition(b"\r\n\r\n")
    error = json.loads(body)["error"] if body and status != 101 else None
    return status, error


DEEP = b"[" * 30_000 + b"]" * 30_000
CASES: list[tuple[str, bytes, bytes, int, str, str]] = [
    # (case, target, extra headers, status, error code, field)
    (
        "17 query fields",
        b"/wspublic?" + b"&".join(b"f%d=1" % i for i in range(17)),
        b"",
        400,
        "bad_request",
        "query",
    ),
    ("1,000 query fields", b"/wspublic?" + b"&" * 999, b"", 400, "bad_request", "query"),
    ("an IPv6 bracket", b"//[x/wspublic", b"", 400, "bad_request", "target"),
    (
        "an unclosed IPv6 bracket in an absolute URI",
        b"http://[::1/wspublic",
        b"",
        400,
        "bad_request",
        "target",
    ),
    ("a % without hex digits", b"/wspublic?settings=%zz", b"", 400, "bad_request", "query"),
    ("a lone % at the end", b"/wspublic?token=%", b"", 400, "bad_request", "query"),
    (
        "percent-encoded bytes that are not UTF-8",
        b"/wspublic?settings=%ff%fe",
        b"",
        400,
        "bad_request",
        "query",
    ),
    (
        "raw bytes that are not ASCII",
        b"/wspublic?settings=\xff\xfe",
        b"",
        400,
        "bad_request",
        "target",
    ),
    (
        "deep settings inside the request bound",
        b"/wspublic?settings=" + b"[" * 7000 + b"]" * 7000,
        b"",
        400,
        "invalid_settings",
        "settings",
    ),
    (
        "30,000-deep settings",
        b"/wspublic?settings=" + DEEP,
        b"",
        431,
        "request_too_large",
        "request",
    ),
    (
        "a header of 20 KB",
        b"/wspublic",
        b"X-Pad: " + b"a" * 20_000 + b"\r\n",
        431,
        "request_too_large",
        "request",
    ),
]


@pytest.mark.parametrize(
    ("case", "target", "extra", "status", "code", "field"), CASES, ids=[c[0] for c in CASES]
)
async def test_a_hostile_upgrade_gets_a_4xx_naming_the_field(
    caplog: pytest.LogCaptureFixture,
    case: str,
    target: bytes,
    extra: bytes,
    status: int,
    code: str,
    field: str,
) -> None:
    caplog.set_level(logging.INFO)
    async with running_app(base_config()) as app:
        for _ in range(3):  # and again: nothing accumulates, nothing is logged per request
            answer = await in_thread(upgrade, app.port, target, extra)
            assert answer[0] == status, (case, answer)
            assert answer[1] is not None and answer[1]["code"] == code, answer
            assert answer[1].get("field", "").startswith(field), answer
        assert app.node.refused.get(code) == 3
        # The server still upgrades a good request.
        assert (await in_thread(upgrade, app.port, b"/wspublic"))[0] == 101
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [], [r.getMessage() for r in errors]


async def test_a_handshake_bug_is_a_500_and_its_log_is_rate_limited(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not client input, a bug: 500, and its traceback logged at most 20 times per 10 s."""
    from igratech_ws.transport import websocket

    def broken(self: object, request: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(websocket.Handshake, "__call__", broken)
    async with running_app(base_config()) as app:
        for _ in range(60):
            status, error = await in_thread(upgrade, app.port, b"/wspublic")
            assert status == 500 and error is not None and error["code"] == "internal_error"
    logged = [r for r in caplog.records if r.name == "igratech_ws.websocket"]
    assert 0 < len(logged) <= 20
