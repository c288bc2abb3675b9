"""The terminal printer: one line per event, colors only when asked or on a terminal."""

from __future__ import annotations

import asyncio
import io
import itertools
import random

from igratech_ws.client.console import format_line, listen
from igratech_ws.client.events import Disconnected, Event, RecoveryFailed
from igratech_ws.core.codec import decode_payload
from igratech_ws.demo_feed import demo_requests
from tests.support.fake_server import FakeGateway, incident, wait_until


async def test_listen_prints_one_line_per_event() -> None:
    gateway = FakeGateway()
    url = await gateway.start()
    try:
        gateway.publish("game:g-1", "incident", incident("g-1", 1))  # history only
        out = io.StringIO()
        task = asyncio.create_task(listen(url, None, ["g-1"], False, out=out, max_events=3))
        async with asyncio.timeout(10):
            await wait_until(lambda: gateway.connections)
            gateway.publish("game:g-1", "incident", incident("g-1", 2))
            assert await task == 3
        lines = out.getvalue().splitlines()
        assert [line.split()[1] for line in lines] == ["connected", "settings", "incident"]
        assert "game:g-1#2" in lines[2] and "CORNER" in lines[2]
        assert "\x1b[" not in out.getvalue()  # StringIO is not a terminal
    finally:
        await gateway.stop()


def test_every_demo_event_formats_on_one_line() -> None:
    feed = demo_requests(games=["g-1"], demo_user_id="u-1", rng=random.Random(2))
    for request in itertools.islice(feed, 400):
        data = decode_payload(request.event, request.data)
        event = Event(request.event, data, "game:g-1", 1, "e1")
        for color in (False, True):
            line = format_line(event, color=color)
            assert "\n" not in line and request.event in line
            assert ("\x1b[" in line) is color
    for data in (Disconnected(1012, "restart", True, 1, 0.5), RecoveryFailed(["game:g-1"])):
        name = "disconnected" if isinstance(data, Disconnected) else "recovery-failed"
        assert name in format_line(Event(name, data), color=False)
    assert "future" in format_line(Event("future", {"a": 1}), color=False)
