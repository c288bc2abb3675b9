"""Attacks on the hub's walk of writes (FLUSH_CHUNK connections per loop iteration): what a
large fan-out split over loop iterations must still promise, with frames, replays, closes and
failures landing between its chunks.

Fake subscribers on the memory broker, the loop driven by hand (`settle`), `FLUSH_CHUNK` made
small so that a walk of a few connections has many chunks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from igratech_ws import hub as hub_module
from igratech_ws.core.codec import event_frame
from igratech_ws.hub import Hub
from tests.support.fakes import FakeSubscriber, RecordingBroker, make_hub, settle, split_frames

CHANNEL = "game:walk-attack"


def publish(broker: RecordingBroker, count: int = 1, size: int = 10) -> None:
    body = json.dumps({"pad": "x" * size}).encode()
    for _ in range(count):
        broker.publish_now(CHANNEL, "incident", body)


async def joined(hub: Hub, subscribers: list[FakeSubscriber], recover: bool = False) -> None:
    for subscriber in subscribers:
        start = None
        if recover:
            start = (0, (await hub.broker.position(CHANNEL)).epoch)
        hub.finish_join(subscriber, await hub.join(subscriber, CHANNEL, start))


def idle(hub: Hub) -> bool:
    return hub._walk is None and not hub._flush_scheduled and not hub._dirty


@pytest.fixture
def chunk(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(hub_module, "FLUSH_CHUNK", 3)
    return 3


async def test_publications_between_every_chunk_reach_every_follower_once_and_in_order(
    broker: RecordingBroker, chunk: int
) -> None:
    """A publication, a reply and a pong land between every two chunks of every walk, for a
    dozen walks: each follower gets every publication exactly once and in offset order, with
    its own frames where they were queued, and the hub ends idle (a publication after that is
    written by the next walk)."""
    hub = await make_hub(broker)
    followers = [FakeSubscriber(f"s-{n}") for n in range(4 * chunk + 1)]
    await joined(hub, followers)
    loop = asyncio.get_running_loop()
    rounds = 40

    def in_between(left: int) -> None:
        publish(broker)
        target = followers[left % len(followers)]
        hub.send(target, event_frame("reply", {"n": left}))
        if left > 1:
            loop.call_soon(in_between, left - 1)

    publish(broker)
    loop.call_soon(in_between, rounds)
    await settle(400)
    assert idle(hub)
    for follower in followers:
        frames = follower.frames()
        assert [f["offset"] for f in frames if "offset" in f] == list(range(1, rounds + 2))
        # a reply comes after every publication delivered before it was queued
        seen = 0
        for frame in frames:
            if "offset" in frame:
                seen = frame["offset"]
            else:
                assert seen >= rounds - frame["data"]["n"] + 1, follower
    publish(broker)
    await settle(len(followers) // chunk + 1)
    assert all(f.offsets(CHANNEL)[-1] == rounds + 2 for f in followers)
    await hub.close()


async def test_a_budget_flush_out_of_band_mid_walk_keeps_the_order(
    broker: RecordingBroker, chunk: int
) -> None:
    """A follower the walk has not reached yet is written out of band (a frame that would pass
    its budget makes `send_wire` hand what is queued to the socket first), then gets more
    frames before and after the walk reaches it: one ordered stream, nothing twice."""
    hub = await make_hub(broker, max_buffer_bytes=4000)
    followers = [FakeSubscriber(f"s-{n}") for n in range(3 * chunk)]
    await joined(hub, followers)
    late = followers[-1]
    loop = asyncio.get_running_loop()

    def in_between() -> None:
        publish(broker, 1, size=1500)  # 2: joins the unwritten write
        publish(broker, 1, size=1500)  # 3: over the budget with 1 and 2: 1, 2 written now
        publish(broker)  # 4

    publish(broker, 1, size=1500)  # 1
    loop.call_soon(in_between)
    await settle(100)
    assert idle(hub)
    for follower in followers:
        assert follower.offsets(CHANNEL) == [1, 2, 3, 4], follower
        assert follower.closes == []
    # 1 and 2 out of band in one write, then 3 and 4 when the walk came (one write each: with
    # this budget each frame passes a quarter of it, see `Hub._release`).
    assert [[json.loads(p)["offset"] for p in split_frames(w)] for w in late.writes] == [
        [1, 2],
        [3],
        [4],
    ]
    await hub.close()


async def test_followers_closing_between_chunks_lose_only_their_own_frames(
    broker: RecordingBroker, chunk: int
) -> None:
    """Followers close (and leave) between the walk's chunks, before it reaches them: nothing
    is written to them after their close, the others get everything, the hub ends idle."""
    hub = await make_hub(broker)
    followers = [FakeSubscriber(f"s-{n}") for n in range(4 * chunk)]
    await joined(hub, followers)
    loop = asyncio.get_running_loop()
    gone = followers[-chunk:]

    def close_them() -> None:
        for follower in gone:
            follower.close_with(hub_module.CloseCode.GOING_AWAY)
            hub.leave(follower, CHANNEL)
        publish(broker)

    publish(broker)
    loop.call_soon(close_them)
    await settle(100)
    assert idle(hub)
    for follower in gone:
        assert follower.writes == []
    for follower in followers[:-chunk]:
        assert follower.offsets(CHANNEL) == [1, 2], follower
    await hub.close()


async def count_flush_wakeups(hub: Hub) -> Callable[[], tuple[int, int]]:
    """Wrap `hub.flush` and `hub._end_walk`: how many replay waiters were woken, and how many
    walks ended."""
    counts = [0, 0]
    flush, end_walk = hub.flush, hub._end_walk

    def counting_flush() -> None:
        before = [w for w in hub._flush_waiters if not w.done()]
        flush()
        counts[0] += sum(1 for w in before if w.done())

    def counting_end_walk() -> None:
        counts[1] += 1
        end_walk()

    hub.flush = counting_flush  # type: ignore[method-assign]
    hub._end_walk = counting_end_walk  # type: ignore[method-assign]
    return lambda: (counts[0], counts[1])


async def test_waiting_replays_wake_once_per_walk_not_once_per_chunk(
    broker: RecordingBroker, chunk: int
) -> None:
    """A reconnect storm: many connections recover at once, each replay waiting for its page
    to reach the socket. Woken after every chunk, each waiting replay ran once per chunk of
    every walk: (connections / FLUSH_CHUNK) times each, so the walk's loop iterations (which
    the chunks are there to keep short) filled with replay steps, quadratic in the storm. A
    replay is woken once per walk at most, and every connection still gets history exactly
    once and in order."""
    hub = await make_hub(broker, max_buffer_bytes=8000)  # a page of about one publication
    publish(broker, 12, size=1200)
    storm = [FakeSubscriber(f"r-{n}") for n in range(10 * chunk)]
    wakeups = await count_flush_wakeups(hub)
    await joined(hub, storm, recover=True)
    await settle(2000)
    for subscriber in storm:
        assert subscriber.offsets(CHANNEL) == list(range(1, 13)), subscriber
    woken, walks = wakeups()
    assert hub._replays == {} and idle(hub)
    assert woken <= walks * len(storm), (woken, walks)
    await hub.close()


class BrokenSocket(FakeSubscriber):
    """A connection whose first write raises (what uvloop's `write` does on a handle closed
    under it, say: a transport bug, not a client's doing)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.failures = 1

    def write_wire(self, data: bytes) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("unable to perform operation: the handler is closed")
        super().write_wire(data)


async def test_a_write_that_raises_does_not_stop_every_later_write(
    broker: RecordingBroker, chunk: int, caplog: pytest.LogCaptureFixture
) -> None:
    """One connection's write raises in the middle of a chunk. The walk was left under way with
    nothing scheduled to carry it on (`_flush_scheduled` True, `_walk` set): every frame queued
    after that, to any connection of the node, joined an outbox nothing would ever write. The
    error is the loop's to log; the walk carries on after that connection, and later
    publications reach everyone."""
    hub = await make_hub(broker)
    followers = [FakeSubscriber(f"s-{n}") for n in range(3 * chunk)]
    broken = BrokenSocket("broken")
    followers.insert(chunk + 1, broken)
    await joined(hub, followers)
    publish(broker)
    await settle(50)
    publish(broker)
    await settle(50)
    assert idle(hub)
    for follower in followers:
        expected = [2] if follower is broken else [1, 2]
        assert follower.offsets(CHANNEL) == expected, follower
    assert "the handler is closed" in caplog.text
    await hub.close()


class SlowPhone(FakeSubscriber):
    """A client that does not read: what is written stays in its socket; every write checks
    the peak of its socket's buffer."""

    def __init__(self, name: str, budget: int) -> None:
        super().__init__(name, reading=False)
        self.budget = budget
        self.peak = 0

    def write_wire(self, data: bytes) -> None:
        super().write_wire(data)
        self.peak = max(self.peak, self.backlog)


async def test_a_client_that_stops_reading_mid_walk_is_held_and_conflated_within_budget(
    broker: RecordingBroker, chunk: int
) -> None:
    """A client deep in the walk stops reading while state and stream publications land between
    every chunk: once its socket is past low water its frames are held (state conflated), its
    socket never holds more than the budget, it is not closed for a state flood, and when it
    reads again it has every stream publication in order and the newest state; the others get
    everything."""
    budget = 16 * 1024
    hub = await make_hub(broker, max_buffer_bytes=budget)
    followers = [FakeSubscriber(f"s-{n}") for n in range(3 * chunk)]
    phone = SlowPhone("phone", budget)
    followers.insert(2 * chunk + 1, phone)
    await joined(hub, followers)
    loop = asyncio.get_running_loop()
    body = json.dumps({"scope": "game", "gameId": "walk-attack", "values": {"pad": "x" * 300}})

    def flood(left: int) -> None:
        broker.publish_now(CHANNEL, "stats", body.encode())
        if left % 50 == 0:
            publish(broker)
        if left > 1:
            loop.call_soon(flood, left - 1)

    loop.call_soon(flood, 300)
    await settle(1000)
    assert phone.closes == [] and hub.conflated_frames > 0
    assert phone.peak <= budget
    for _ in range(20):
        phone.drain(hub)
        await settle(20)
    assert idle(hub) and not phone.queued()
    frames = [f for f in phone.frames() if f.get("channel") == CHANNEL]
    offsets = [f["offset"] for f in frames]
    assert offsets == sorted(set(offsets))
    incidents = [f["offset"] for f in frames if f["event"] == "incident"]
    assert len(incidents) == 6
    for follower in followers:
        if follower is not phone:
            assert follower.offsets(CHANNEL) == list(range(1, 307)), follower
    assert offsets[-1] == 306  # the newest state
    await hub.close()
