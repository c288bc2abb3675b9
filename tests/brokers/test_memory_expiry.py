"""The memory broker's background expiry of channels nobody uses any more."""

from __future__ import annotations

import asyncio

from igratech_ws.brokers.base import HistoryLimits
from igratech_ws.brokers.memory import MemoryBroker


async def test_history_of_channels_nobody_uses_any_more_expires_by_age() -> None:
    broker = MemoryBroker(node_id="n", limits=HistoryLimits(size=100, ttl=0.2))
    await broker.start(lambda p: None, lambda m: None)
    try:
        for n in range(50):
            await broker.publish(f"game:g-{n}", "incident", b"{}")
        assert sum(len(s.history) for s in broker._streams.values()) == 50
        await asyncio.sleep(0.5)  # the sweep runs every ttl/4
        assert sum(len(s.history) for s in broker._streams.values()) == 0
        # Positions survive expiry: a client at the top still recovers (nothing to replay).
        assert (await broker.position("game:g-3")).offset == 1
    finally:
        await broker.close()
        await broker.close()  # idempotent
