"""Deeply nested JSON is an error the sender can read, never a crash (issue 9, item 5).

On main a 30,000-deep JSON array in a frame escaped msgspec as RecursionError: the connection was
closed with 1011 and a traceback logged; in the handshake `settings` parameter it was a 500 with
an ERROR traceback per request; in a publish body, a 500. The one mapping of decode failures
(`core.codec.decode_failure`) makes each a documented error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import msgspec
import pytest

from igratech_ws.app import running_app
from igratech_ws.core.codec import ProtocolError, decode_json, decode_payload
from igratech_ws.core.messages import PUBLISHED_EVENTS
from tests.support.gateway import base_config, connect, recv_event, send


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "frame",
    [
        '{"event":"ping","data":{"ts":' + _nested(30_000) + "}}",
        '{"event":"settings","data":{"games":' + _nested(30_000) + "}}",
        '{"event":"ping","data":' + '{"a":' * 10_000 + "1" + "}" * 10_000 + "}",
        _nested(30_000),
    ],
)
async def test_a_deeply_nested_frame_gets_an_error_and_the_connection_goes_on(
    frame: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_app(base_config()) as app, connect(app) as ws:
        await recv_event(ws, "connected")
        await ws.send(frame)
        error = await recv_event(ws, "error")
        assert error["data"]["code"] in ("bad_message", "invalid_settings", "bad_json")
        await send(ws, "ping", {"ts": 1})
        assert (await recv_event(ws, "pong"))["data"]["ts"] == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def _handshake(port: int, query: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            (
                f"GET /wspublic?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        answer = b""
        while chunk := sock.recv(65536):  # the server closes after its answer
            answer += chunk
        return answer


@pytest.mark.parametrize(
    "settings",
    [_nested(3000), '{"games":' + _nested(3000) + "}", '{"recover":' + '{"a":' * 2000 + "}"],
)
async def test_a_deeply_nested_settings_parameter_is_a_400(
    settings: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_app(base_config()) as app:
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(None, _handshake, app.port, "settings=" + settings)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["error"]["code"] in ("invalid_settings", "bad_json")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("event", sorted(PUBLISHED_EVENTS))
@pytest.mark.parametrize("depth", [999, 30_000])
def test_a_deeply_nested_payload_is_refused_by_the_codec(event: str, depth: int) -> None:
    """What the HTTP API validates a publish payload with (`decode_payload`) and decodes bodies
    with (`decode_json`): a ProtocolError, never RecursionError."""
    with pytest.raises(ProtocolError) as caught:
        decode_payload(event, ('{"x":' + _nested(depth) + "}").encode())
    assert caught.value.code in ("bad_message", "bad_json")
    with pytest.raises(ProtocolError):
        decode_json(
            msgspec.json.Decoder(dict[str, msgspec.Raw]),
            ('{"data":' + _nested(depth) + "}").encode(),
            what="Body",
        )
