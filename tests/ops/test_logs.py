"""The memory broker's background expiry, and the log formatter's redaction and rate limit."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from igratech_ws.brokers.base import HistoryLimits
from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.logs import JsonFormatter, RateLimitFilter, configure, redact


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


def test_tokens_are_redacted_from_log_lines() -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1LTEifQ.c2lnbmF0dXJl"
    assert token not in redact(f"GET /wspublic?token={token}&x=1")
    assert "token=[redacted]" in redact("/wspublic?token=abc&x=1")
    record = logging.makeLogRecord({"msg": "handshake %s", "args": (token,), "path": f"?token={token}"})
    line = json.loads(JsonFormatter().format(record))
    assert token not in json.dumps(line)


def test_the_rate_limit_passes_a_burst_then_summarises() -> None:
    limit = RateLimitFilter(burst=3, period=10.0)
    records = [logging.makeLogRecord({"msg": "bad frame", "created": 100.0 + i * 0.01}) for i in range(10)]
    assert [limit.filter(r) for r in records] == [True] * 3 + [False] * 7
    later = logging.makeLogRecord({"msg": "bad frame", "created": 111.0})
    assert limit.filter(later)
    assert "7 similar suppressed" in later.getMessage()


def test_picows_records_are_rate_limited_and_ours_are_not() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("picows").level)
    configure("info", stream=stream)
    try:
        for _ in range(100):
            logging.getLogger("picows.ws.1").error("WS parser error")
            logging.getLogger("igratech_ws.node").warning("ours")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert sum(line["logger"] == "picows.ws.1" for line in lines) == 20
        assert sum(line["logger"] == "igratech_ws.node" for line in lines) == 100
    finally:
        root.handlers[:], level, picows_level = saved
        root.setLevel(level)
        logging.getLogger("picows").setLevel(picows_level)
