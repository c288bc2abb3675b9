"""What a join holds while it waits for the broker is bounded in bytes (issue 9).

A connection joining a channel holds the channel's live publications until its start is known.
On main the hold was bounded only in count (10,000 publications): a busy channel of large
publications and a slow broker answer kept tens of megabytes alive per joining connection. Here
the hold is bounded by the connection's outbound budget; past it nothing is held and the join
catches up from history after its answer, exactly once and in order (or, when history no longer
has it, the connection is closed so that its next resume is told).
"""

from __future__ import annotations

import json

from igratech_ws.brokers.base import HistoryLimits
from igratech_ws.hub import Hub
from tests.support.cluster import eventually
from tests.support.fakes import FakeSubscriber, RecordingBroker, make_hub, settle

CH = "game:g-busy"
PAYLOAD = 20_000
BUDGET = 1_048_576


def _held_bytes(hub: Hub, subscriber: FakeSubscriber) -> int:
    join = hub._joining[CH][subscriber]
    return sum(len(p.data) for p in join.buffer or [])


async def test_a_slow_join_on_a_busy_channel_holds_at_most_the_budget() -> None:
    broker = RecordingBroker(limits=HistoryLimits(size=2000))
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        live = FakeSubscriber("live")
        result = await hub.join(live, CH, None)
        hub.finish_join(live, result)
        joiner = FakeSubscriber("joiner")
        # The join of this channel is done, but the answer waits for the other channels of the
        # same request (a slow broker answering one of them): live publications are held.
        result = await hub.join(joiner, CH, None)
        assert result.state.offset == 0
        body = json.dumps({"pad": "x" * PAYLOAD}).encode()
        peak = 0
        for _ in range(1000):  # 20 MB published while the answer waits
            broker.publish_now(CH, "bet", body)
            peak = max(peak, _held_bytes(hub, joiner))
        assert peak <= BUDGET, f"a joining connection held {peak / 2**20:.1f} MB"
        hub.finish_join(joiner, result)
        await eventually(
            lambda: (hub.position_of(joiner, CH) or (0,))[0] == 1000 or bool(joiner.closes),
            "the joiner caught up",
        )
        await settle()
        assert joiner.closes == []
        assert joiner.offsets(CH) == list(range(1, 1001))
        assert live.offsets(CH) == list(range(1, 1001))
    finally:
        await hub.close()
        await broker.close()
