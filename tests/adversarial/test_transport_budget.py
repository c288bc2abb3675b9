"""The inbound budget counts every frame (issue 9, classes 1 and 9).

On the old listener only complete text messages took a token: pings, pongs, binary frames and
continuation frames were free, so a client could make the server work (and answer) without limit.
Now each frame takes one, the refused ones are answered `error rate_limited` (data) or not at
all (pings), and going on past `STRIKES` refused frames in a row closes with 1008.
"""

from __future__ import annotations

import json

import pytest

from igratech_ws.app import running_app
from tests.support.gateway import base_config
from tests.support.raw_ws import LOOPS, connect, frame, in_thread, read_frames, run_on, texts

#: Refused frames in a row before 1008: the documented 10 (core.ratelimit.STRIKES).
STRIKES = 10
PING_EVENT = frame(0x1, b'{"event":"ping","data":{"ts":7}}')
BURST = 5
KINDS = {
    "ping": frame(0x9, b"p"),
    "pong": frame(0xA, b"p"),
    "binary": frame(0x2, b"\x00"),
    "text": frame(0x1, b'{"event":"ping"}'),
    # A message of BURST fragments: each fragment is a frame and takes a token.
    "continuation": frame(0x1, b" ", fin=False)
    + frame(0x0, b" ", fin=False) * (BURST - 2)
    + frame(0x0, b" "),
}


def exchange(
    port: int, data: bytes, until: bytes | None
) -> tuple[list[dict[str, object]], int | None]:
    sock = connect(port)
    try:
        sock.sendall(data)
        frames, code = read_frames(sock, until)
    finally:
        sock.close()
    return [json.loads(t) for t in texts(frames)], code


async def _after_the_burst(aiofastnet: bool, kind: str) -> None:
    config = base_config(max_message_rate=0.001, message_burst=BURST, use_aiofastnet=aiofastnet)
    async with running_app(config) as app:
        data = (KINDS[kind] * BURST if kind != "continuation" else KINDS[kind]) + PING_EVENT
        answers, code = await in_thread(exchange, app.port, data, b"rate_limited")
        assert code is None, code
        events = [a["event"] for a in answers]
        # The ping event after BURST frames of `kind` is over the budget: no pong for it.
        assert events[-1] == "error" and answers[-1]["data"]["code"] == "rate_limited", answers  # type: ignore[index]
        assert events.count("pong") == (BURST if kind == "text" else 0), events
        assert app.node.rate_limited == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loop", LOOPS)
def test_every_kind_of_frame_takes_a_token(loop: str, kind: str) -> None:
    run_on(loop, lambda aiofastnet: _after_the_burst(aiofastnet, kind))


async def _flood(aiofastnet: bool, kind: str) -> None:
    config = base_config(max_message_rate=0.001, message_burst=BURST, use_aiofastnet=aiofastnet)
    async with running_app(config) as app:
        one = KINDS[kind] if kind != "continuation" else frame(0x0, b" ", fin=False)
        start = frame(0x1, b" ", fin=False) if kind == "continuation" else b""
        data = start + one * (BURST + STRIKES + 1 + 50)
        answers, code = await in_thread(exchange, app.port, data, None)
        assert code == 1008, (code, answers)
        errors = [a["data"]["code"] for a in answers if a["event"] == "error"]  # type: ignore[index]
        if kind in ("ping", "pong"):
            assert "rate_limited" not in errors  # refused pings are not answered at all
        else:
            assert errors.count("rate_limited") == STRIKES, errors
        assert app.node.closes.get(1008) == 1


@pytest.mark.parametrize("kind", ["ping", "pong", "binary", "continuation"])
def test_a_flood_of_any_frame_ends_with_1008(kind: str) -> None:
    run_on("uvloop", lambda aiofastnet: _flood(aiofastnet, kind))
