"""Property: whatever the interleaving of publishes, disconnects and reconnects, a resuming client
gets every publication exactly once and in order while the gap fits the history window, and is told
`recovered: false` (and gets nothing replayed) beyond it.

Runs against a real in-process gateway on the memory broker, and on Redis and NATS (each example
with its own `prefix`, cleaned up). Hypothesis drives the interleavings from a worker thread while
the gateway runs on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igratech_ws.app import running_app
from tests.support.brokers import delete_nats_streams as _delete_nats_stream
from tests.support.brokers import delete_redis_keys as _delete_redis_keys
from tests.support.gateway import base_config, connect, incident, publish, recv, recv_event
from tests.support.gateway import settings as ws_settings

WINDOW = 5  # history_size of the gateway under test
EXAMPLES = {"memory": 25, "redis": 15, "nats": 15}
EXAMPLE_BOUND_S = 30.0

Op = tuple[str, int]
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.integers(min_value=1, max_value=4)),
        st.tuples(st.just("drop"), st.just(0)),
        st.tuples(st.just("resume"), st.just(0)),
    ),
    min_size=1,
    max_size=10,
)


@dataclass
class Client:
    """What the test knows: the client's last position and what it must receive."""

    epoch: str = ""
    offset: int = 0
    top: int = 0  # offsets published so far on the channel


def _broker_url(kind: str, base: str | None, namespace: str) -> str:
    if kind == "memory" or base is None:
        return "memory://"
    separator = "&" if urlsplit(base).query else "?"
    return f"{base}{separator}prefix={namespace}{':' if kind == 'redis' else ''}"


async def _run_example(kind: str, base: str | None, ops: list[Op]) -> None:
    namespace = "p" + uuid.uuid4().hex[:12]
    config = base_config(
        broker=_broker_url(kind, base, namespace), history_size=WINDOW, history_ttl=600.0
    )
    game = "g-" + namespace
    channel = "game:" + game
    try:
        async with running_app(config) as app, contextlib.AsyncExitStack() as stack:
            model = Client()
            ws: Any = await stack.enter_async_context(connect(app))
            await recv_event(ws, "connected")
            answer = await ws_settings(ws, games=[game])
            model.epoch = answer["channels"][0]["epoch"]
            for op, count in ops:
                if op == "publish":
                    for _ in range(count):
                        status, body = await publish(app, incident(game, model.top + 1))
                        assert status == 200, body
                        model.top += 1
                        assert body["offset"] == model.top
                    if ws is not None:
                        for _ in range(count):
                            frame = await recv_event(ws, "incident")
                            assert frame["offset"] == model.offset + 1, (frame, model)
                            # A client holds the position of each push (from offset 0 that
                            # includes the stream's first epoch, D1).
                            model.offset, model.epoch = frame["offset"], frame["epoch"]
                elif op == "drop" and ws is not None:
                    await ws.close()
                    ws = None
                elif op == "resume":
                    if ws is not None:
                        await ws.close()
                    ws = await stack.enter_async_context(connect(app))
                    await recv_event(ws, "connected")
                    recover = {channel: {"offset": model.offset, "epoch": model.epoch}}
                    answer = await ws_settings(ws, games=[game], recover=recover)
                    state = answer["channels"][0]
                    assert state["offset"] == model.top
                    missed = model.top - model.offset
                    if missed <= WINDOW:
                        assert state["recovered"] is True, (state, model)
                        for _ in range(missed):
                            frame = await recv_event(ws, "incident")
                            assert frame["offset"] == model.offset + 1, (frame, model)
                            # A client holds the position of each push (from offset 0 that
                            # includes the stream's first epoch, D1).
                            model.offset, model.epoch = frame["offset"], frame["epoch"]
                    else:
                        assert state["recovered"] is False, (state, model)
                        # Reload, then go on from the position reported.
                        model.offset, model.epoch = model.top, state["epoch"]
            # Exactly once: after a sentinel publication, the next frame is that one, nothing else.
            if ws is not None:
                status, body = await publish(app, incident(game, 0))
                assert status == 200
                frame = await recv(ws)
                assert (frame["event"], frame["offset"]) == ("incident", body["offset"]), frame
    finally:
        if kind == "redis" and base is not None:
            await _delete_redis_keys(base, namespace + ":")
        elif kind == "nats" and base is not None:
            await _delete_nats_stream(base, namespace)


@pytest.mark.parametrize("kind", ["memory", "redis", "nats"])
async def test_resume_is_exactly_once_in_the_window_and_says_so_beyond(
    kind: str, request: pytest.FixtureRequest
) -> None:
    base = None if kind == "memory" else str(request.getfixturevalue(f"{kind}_url"))
    loop = asyncio.get_running_loop()
    ran: list[int] = []

    @settings(
        max_examples=EXAMPLES[kind],
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(_ops)
    def check(ops: list[Op]) -> None:
        future = asyncio.run_coroutine_threadsafe(_run_example(kind, base, ops), loop)
        future.result(EXAMPLE_BOUND_S)
        ran.append(len(ops))

    await loop.run_in_executor(None, check)
    assert len(ran) >= 5, json.dumps(ran)
