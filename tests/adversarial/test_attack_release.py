"""Attacks on how the hub hands a slow client's frames to its socket (`Hub._release`,
`_release_some`, the 0.25 s poll of held connections): the socket's buffer gets at most a
quarter of the budget (and a frame) while the client does not read, the rest stays queued and
conflatable. Written as a hostile or unlucky client: one that reads in bursts, one whose socket
drains without the transport saying so, one whose write raises, one closed in the middle of a
release, one with a 4 KiB receive buffer on a real socket.

What must hold (docs/reliability.md "Conflation under a slow client"): stream frames never
dropped nor reordered, only superseded state skipped (the replacement marked conflated),
non-live frames (answers, pongs, snapshots, replays) never overtaken, no slow-consumer close for
a stats flood while the stream fits three quarters of the budget, memory within the budget, and
nothing stuck: held frames go out once the client reads.
"""

from __future__ import annotations

import asyncio

import pytest

from igratech_ws import hub as hub_module
from igratech_ws.brokers.base import Publication
from igratech_ws.hub import Hub
from tests.hub.test_conflation import GAME, big_stats, check_view, followed, incident
from tests.support.fakes import FakeSubscriber, RecordingBroker, make_hub, settle

BUDGET = 64 * 1024
PONG = b'{"event":"pong","data":{"serverTime":"2026-11-23T19:45:00Z"}}'


class Phone(FakeSubscriber):
    """A client on a socket like the transport's: a write past a quarter of the budget pauses
    it, and only a read that takes it below an eighth tells the hub (`on_writable`), as
    `resume_writing` does. `read(n)` takes `n` bytes off the socket's buffer; with `tell=False`
    the hub is never told (a transport that reports nothing: only the poll can see it)."""

    def __init__(self, name: str, hub: Hub, *, tell: bool = True) -> None:
        super().__init__(name, reading=False)
        self.hub = hub
        self.tell = tell
        self.paused = False
        self.peak = 0

    def write_wire(self, data: bytes) -> None:
        super().write_wire(data)
        self.peak = max(self.peak, self.backlog + (self.pending.size if self.pending else 0))
        if self.backlog > self.hub.low_water:
            self.paused = True

    def read(self, n: int) -> None:
        self.backlog = max(0, self.backlog - n)
        if self.paused and self.backlog <= self.hub.low_water // 2:
            self.paused = False
            if self.tell:
                self.hub.on_writable(self)


def held_bytes(sub: FakeSubscriber) -> int:
    return sub.backlog + sum(map(len, sub.queued()))


# --- the poll: the safety net for a transport that reports nothing -----------------------------


async def test_a_poll_that_releases_part_of_a_held_queue_keeps_one_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client reads a little before every poll, never enough to take all that is held: each
    poll writes part of it and holds the rest again (`_release_some` -> `_hold`). The poll must
    stay one timer, not start a second chain each time (polls doubling every 0.25 s)."""
    monkeypatch.setattr(hub_module, "WRITABLE_POLL", 0.02)
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    polls = 0
    poll = hub._poll_behind

    def counted() -> None:
        nonlocal polls
        polls += 1
        poll()

    monkeypatch.setattr(hub, "_poll_behind", counted)
    try:
        sub = Phone("sipping", hub, tell=False)
        await followed(hub, sub, GAME)
        published: list[Publication] = []
        for n in range(12):  # stream frames, each with the stats before it: ~40 KB, all kept
            published.append(big_stats(broker, n))
            published.append(incident(broker, n))
        await settle()
        assert hub._behind, "the client never fell behind"
        loop = asyncio.get_running_loop()
        chains = []
        for _ in range(15):
            sub.read(4096)  # one poll's worth: part of what is held
            await asyncio.sleep(0.021)
            timers = [
                t
                for t in loop._scheduled  # type: ignore[attr-defined]
                if not t.cancelled() and t._callback is counted
            ]
            chains.append(len(timers))
        assert max(chains) <= 1, f"poll timers pending at once, per round: {chains}"
    finally:
        await hub.close()
        await broker.close()


class BrokenOnce(FakeSubscriber):
    """A connection whose next write after `arm()` raises (a transport bug, not a client's)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, reading=False)
        self.armed = False

    def write_wire(self, data: bytes) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("unable to perform operation: the handler is closed")
        super().write_wire(data)


async def test_a_write_that_raises_in_a_poll_does_not_stop_the_poll(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two held connections; the first's socket drains and its write raises in the poll, the
    second's drains later, with no `on_writable` for either. The poll must carry on: the second's
    held frames go out (before, the raise left no timer and them held for good)."""
    monkeypatch.setattr(hub_module, "WRITABLE_POLL", 0.02)
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        broken = BrokenOnce("broken")
        quiet = FakeSubscriber("quiet", reading=False)
        await followed(hub, broken, GAME)
        await followed(hub, quiet, GAME)
        published = [incident(broker, 0)]
        published += [big_stats(broker, n) for n in range(30)]
        published.append(incident(broker, 1))
        await settle()
        assert broken in hub._behind and quiet in hub._behind
        broken.armed = True
        broken.backlog = 0  # drained, the transport says nothing: the poll finds it
        await asyncio.sleep(0.1)
        assert not broken.armed, "the poll never tried the drained socket"
        quiet.backlog = 0
        quiet.reading = True
        await asyncio.sleep(0.1)
        assert quiet.queued() == [], "held frames stuck: the poll stopped after a raising write"
        check_view(quiet.frames(), published)
        # The broken one lost what the raising write carried, and nothing after it is stuck.
        assert broken.queued() == [] or broken in hub._behind
    finally:
        await hub.close()
        await broker.close()
