"""Structured logs: one JSON object per line on stderr, with the fields passed as `extra`.

Nothing here logs tokens or payloads: callers pass ids, codes and counts. As a second line of
defence, any value that looks like a JWT or carries a `token=` query parameter is redacted.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import msgspec

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_TOKEN_QUERY_RE = re.compile(r"(token=)[^&\s\"']+", re.IGNORECASE)
_encoder = msgspec.json.Encoder()


def redact(text: str) -> str:
    """`text` with JWTs and `token=` query values replaced by `[redacted]`."""
    return _TOKEN_QUERY_RE.sub(r"\1[redacted]", _JWT_RE.sub("[redacted]", text))


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, logger, message and the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return _encoder.encode(entry).decode()


class _Window:
    """At most `burst` events per `period` seconds; counts those refused until the next window.

    The one rate limit behind `RateLimitFilter` and `RateLimitedLog`.
    """

    __slots__ = ("_passed", "_start", "_suppressed", "burst", "period")

    def __init__(self, burst: int, period: float) -> None:
        self.burst = burst
        self.period = period
        self._start = -period
        self._passed = 0
        self._suppressed = 0

    def allow(self, now: float) -> tuple[bool, int]:
        """Whether an event at `now` passes, and how many were suppressed in the window that
        `now` closed (the caller reports that number once; 0 when none or still inside)."""
        closed = 0
        if now - self._start >= self.period:
            closed = self._suppressed
            self._start = now
            self._passed = 0
            self._suppressed = 0
        if self._passed < self.burst:
            self._passed += 1
            return True, closed
        self._suppressed += 1
        return False, closed


class RateLimitFilter(logging.Filter):
    """Lets at most `burst` records through per `period` seconds, then one summary of the rest.

    Put on loggers that outside input can trigger (picows logs every client protocol error), so a
    misbehaving client cannot flood the logs.
    """

    def __init__(self, burst: int = 20, period: float = 10.0) -> None:
        super().__init__()
        self._window = _Window(burst, period)

    def filter(self, record: logging.LogRecord) -> bool:
        allowed, suppressed = self._window.allow(record.created)
        if allowed and suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} similar suppressed)"
            record.args = None
        return allowed


class RateLimitedLog:
    """Logs at most `burst` records per `period` seconds, then one summary of those suppressed.

    For messages that an outside party can cause at will (malformed bus messages) or that a bug
    can cause per publication (a raising handler): logs stay readable and bounded.
    """

    def __init__(self, logger: logging.Logger, *, burst: int = 5, period: float = 10.0) -> None:
        self.logger = logger
        self._window = _Window(burst, period)

    def _allow(self) -> bool:
        allowed, suppressed = self._window.allow(time.monotonic())
        if suppressed:
            self.logger.warning("%d similar messages suppressed", suppressed)
        return allowed

    def warning(self, message: str, *args: object) -> None:
        if self._allow():
            self.logger.warning(message, *args)

    def exception(self, message: str, *args: object) -> None:
        """Log `message` with the current exception's traceback (call from an except block)."""
        if self._allow():
            self.logger.exception(message, *args)


def configure(level: str = "info", *, stream: Any = None) -> None:
    """Send every `igratech_ws` log record, as JSON, to `stream` (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # picows logs every refused handshake at info; keep those at warning and above.
    picows_log = logging.getLogger("picows")
    picows_log.setLevel(max(logging.WARNING, root.level))
    # markdown-it (the /docs page, rendered at start) logs every parsing step at debug: thousands
    # of lines that would bury the node's own at ``--log-level debug``.
    logging.getLogger("markdown_it").setLevel(max(logging.INFO, root.level))
    # Filters on a logger do not apply to its children's records; picows logs as children.
    handler.addFilter(_ClientCausedRateLimit())


class _ClientCausedRateLimit(logging.Filter):
    """Rate-limits, each on its own, the loggers a client can make write at will: picows (a
    client's bad frames) and aiohttp's server (an ERROR with a traceback for each malformed
    request on the API port); everything else passes."""

    PREFIXES = ("picows", "aiohttp.server")

    def __init__(self) -> None:
        super().__init__()
        self._limits = {prefix: RateLimitFilter() for prefix in self.PREFIXES}

    def filter(self, record: logging.LogRecord) -> bool:
        for prefix, limit in self._limits.items():
            if record.name.startswith(prefix):
                return limit.filter(record)
        return True
