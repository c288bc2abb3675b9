"""The log formatter's redaction and rate limit."""

from __future__ import annotations

import io
import json
import logging

from igratech_ws.logs import JsonFormatter, RateLimitFilter, configure, redact


def test_tokens_are_redacted_from_log_lines() -> None:
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1LTEifQ.c2lnbmF0dXJl"
    assert token not in redact(f"GET /wspublic?token={token}&x=1")
    assert "token=[redacted]" in redact("/wspublic?token=abc&x=1")
    record = logging.makeLogRecord(
        {"msg": "handshake %s", "args": (token,), "path": f"?token={token}"}
    )
    line = json.loads(JsonFormatter().format(record))
    assert token not in json.dumps(line)


def test_the_rate_limit_passes_a_burst_then_summarises() -> None:
    limit = RateLimitFilter(burst=3, period=10.0)
    records = [
        logging.makeLogRecord({"msg": "bad frame", "created": 100.0 + i * 0.01}) for i in range(10)
    ]
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
            logging.getLogger("aiohttp.server").error("Error handling request")
            logging.getLogger("igratech_ws.node").warning("ours")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        # Each client-caused source has its own allowance: one flood does not hide the other.
        assert sum(line["logger"] == "picows.ws.1" for line in lines) == 20
        assert sum(line["logger"] == "aiohttp.server" for line in lines) == 20
        assert sum(line["logger"] == "igratech_ws.node" for line in lines) == 100
    finally:
        root.handlers[:], level, picows_level = saved
        root.setLevel(level)
        logging.getLogger("picows").setLevel(picows_level)
