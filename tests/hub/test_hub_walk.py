"""The hub's walk of writes: a large fan-out in chunks with the loop running in between, frames
queued meanwhile joining the writes not made yet, and waiting only when publications come
faster than a walk (never after an idle gap, however long the last walk took).

Fake subscribers on the memory broker, as in test_hub.py; the loop is driven by hand (`settle`).
The one real-clock check is a lower bound (a wait that did not happen cannot be made up by a
loaded machine).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from igratech_ws import hub as hub_module
from igratech_ws.hub import FLUSH_CHUNK, FLUSH_COST_FREE, Hub
from tests.support.fakes import FakeSubscriber, RecordingBroker, make_hub, settle

CHANNEL = "game:walk"


class SlowSocket(FakeSubscriber):
    """A subscriber whose every write costs `cost` seconds of CPU (a busy wait), and which notes
    when each write happened."""

    def __init__(self, name: str, cost: float) -> None:
        super().__init__(name)
        self.cost = cost
        self.written_at: list[float] = []

    def write_wire(self, data: bytes) -> None:
        until = time.perf_counter() + self.cost
        while time.perf_counter() < until:
            pass
        self.written_at.append(time.perf_counter())
        super().write_wire(data)


async def joined(hub: Hub, subscribers: list[FakeSubscriber]) -> None:
    for subscriber in subscribers:
        hub.finish_join(subscriber, await hub.join(subscriber, CHANNEL, None))


def publish(broker: RecordingBroker, count: int = 1) -> None:
    for _ in range(count):
        broker.publish_now(CHANNEL, "incident", b'{"gameId":"walk"}')


async def test_a_large_fan_out_lets_the_loop_run_between_chunks(broker: RecordingBroker) -> None:
    """A publication to more than FLUSH_CHUNK followers: a callback queued behind the walk runs
    after one chunk, not after every write; a publication then joins the write of each follower
    the walk has not reached, and the others get it in the next walk. Every follower ends with
    both, in order, each write carrying what was queued when it was made."""
    hub = await make_hub(broker)
    followers = [FakeSubscriber(f"s-{n}") for n in range(2 * FLUSH_CHUNK + 7)]
    await joined(hub, followers)
    seen: list[int] = []

    def in_between() -> None:
        seen.append(sum(1 for f in followers if f.writes))
        publish(broker)

    publish(broker)
    asyncio.get_running_loop().call_soon(in_between)
    await settle()
    assert seen == [FLUSH_CHUNK]
    for index, follower in enumerate(followers):
        assert follower.offsets(CHANNEL) == [1, 2], index
        assert len(follower.writes) == (2 if index < FLUSH_CHUNK else 1), index
    assert hub.writes == len(followers) + FLUSH_CHUNK
    await hub.close()


async def test_an_expensive_walk_does_not_delay_a_publication_after_an_idle_gap(
    broker: RecordingBroker,
) -> None:
    """The last walk cost far more than FLUSH_COST_FREE, but nothing was queued while it wrote:
    the next publication is written on the next loop iteration, not after `max_flush_delay`
    (a second here: only loop iterations pass in `settle`)."""
    hub = await make_hub(broker, max_flush_delay=1.0)
    followers: list[FakeSubscriber] = [SlowSocket(f"s-{n}", 0.002) for n in range(4)]
    await joined(hub, followers)
    publish(broker)
    await settle()
    assert [f.offsets(CHANNEL) for f in followers] == [[1]] * 4
    publish(broker)
    await settle()
    assert [f.offsets(CHANNEL) for f in followers] == [[1, 2]] * 4
    await hub.close()


async def test_publications_during_a_walk_make_the_next_walk_wait(
    broker: RecordingBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames queued while a costly walk wrote (publications faster than a walk): the next walk
    starts no sooner than that walk's writing time after it ended, and what came in the wait
    shares its writes."""
    monkeypatch.setattr(hub_module, "FLUSH_CHUNK", 2)
    hub = await make_hub(broker, max_flush_delay=1.0)
    cost = FLUSH_COST_FREE  # per write: the walk of 4 costs twice FLUSH_COST_FREE
    followers = [SlowSocket(f"s-{n}", cost) for n in range(4)]
    await joined(hub, list(followers))
    loop = asyncio.get_running_loop()
    publish(broker)
    loop.call_soon(publish, broker)  # after the first chunk: reaches s-0 and s-1 in a later walk
    await settle()
    first_walk_end = followers[-1].written_at[0]
    assert [len(f.writes) for f in followers] == [1, 1, 1, 1]
    assert followers[3].offsets(CHANNEL) == [1, 2]
    publish(broker)  # during the wait: shares the write
    await asyncio.sleep(0.2)
    await settle()
    for follower in followers[:2]:
        assert follower.offsets(CHANNEL) == [1, 2, 3]
        assert len(follower.writes) == 2
        assert follower.written_at[1] - first_walk_end >= 4 * cost
    await hub.close()
