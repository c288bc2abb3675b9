"""One timer per loop serves every connection's handshake deadline (`HandshakeDeadlines`)."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from typing import Any, cast

from igratech_ws.transport.wsconnection import HandshakeDeadlines, WebSocketConnection


class _Upgrading:
    def __init__(self, fired: list[tuple[str, float]], name: str) -> None:
        self.fired = fired
        self.name = name

    def _handshake_timeout(self) -> None:
        self.fired.append((self.name, time.monotonic()))


#: The fakes alive (the deadlines hold connections weakly; a real one lives in its transport).
_HELD: list[_Upgrading] = []


def _connection(fired: list[tuple[str, float]], name: str) -> WebSocketConnection:
    fake = _Upgrading(fired, name)
    _HELD.append(fake)
    return cast(WebSocketConnection, cast(Any, fake))


async def test_deadlines_fire_in_order_each_on_time_and_are_then_forgotten() -> None:
    deadlines = HandshakeDeadlines(asyncio.get_running_loop())
    fired: list[tuple[str, float]] = []
    start = time.monotonic()
    deadlines.add(_connection(fired, "a"), start + 0.05)
    deadlines.add(_connection(fired, "b"), start + 0.10)
    deadlines.add(_connection(fired, "b2"), start + 0.10)
    # Out of order (the timeout was lowered meanwhile): still fired at its own deadline.
    deadlines.add(_connection(fired, "early"), start + 0.02)
    await asyncio.sleep(0.3)
    assert [name for name, _ in fired] == ["early", "a", "b", "b2"]
    due = {"early": 0.02, "a": 0.05, "b": 0.10, "b2": 0.10}
    for name, at in fired:
        assert at >= start + due[name] - 0.002, name  # never early (beyond the clock's step)
        assert at < start + due[name] + 0.15, name
    assert len(deadlines) == 0


async def test_a_deadline_added_after_the_others_fired_arms_the_timer_again() -> None:
    deadlines = HandshakeDeadlines(asyncio.get_running_loop())
    fired: list[tuple[str, float]] = []
    deadlines.add(_connection(fired, "first"), time.monotonic() + 0.01)
    await asyncio.sleep(0.05)
    deadlines.add(_connection(fired, "second"), time.monotonic() + 0.01)
    await asyncio.sleep(0.05)
    assert [name for name, _ in fired] == ["first", "second"]


async def test_a_closed_connection_is_not_kept_alive_by_its_deadline() -> None:
    """A flood of connections that open and close at once: each leaves a small entry until its
    deadline, never the connection itself."""
    deadlines = HandshakeDeadlines(asyncio.get_running_loop())
    fired: list[tuple[str, float]] = []
    gone = _Upgrading(fired, "gone")
    alive = _connection(fired, "alive")
    watch = weakref.ref(gone)
    deadlines.add(cast(WebSocketConnection, cast(Any, gone)), time.monotonic() + 0.02)
    deadlines.add(alive, time.monotonic() + 0.02)
    del gone
    gc.collect()
    assert watch() is None
    await asyncio.sleep(0.1)
    assert [name for name, _ in fired] == ["alive"] and len(deadlines) == 0


async def test_a_real_connection_can_be_held_weakly() -> None:
    from igratech_ws.config import Config

    assert weakref.ref(WebSocketConnection(Config()))() is not None
