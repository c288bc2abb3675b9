"""A terminal printer: one readable line per event (used by ``igratech-ws listen``)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from datetime import datetime
from typing import Any, TextIO

import msgspec

from igratech_ws.client.client import connect
from igratech_ws.client.events import Event

_RESET = "\x1b[0m"
_COLORS = {
    "goal": "\x1b[1;32m",
    "incident": "\x1b[33m",
    "bet": "\x1b[36m",
    "bets-result": "\x1b[35m",
    "balance": "\x1b[1;32m",
    "stats": "\x1b[34m",
    "error": "\x1b[31m",
    "logout": "\x1b[1;31m",
    "disconnected": "\x1b[31m",
    "recovery-failed": "\x1b[1;31m",
    "connected": "\x1b[2m",
    "settings": "\x1b[2m",
}


def _values(values: dict[str, Any], limit: int = 8) -> str:
    text = " ".join(f"{k}={v}" for k, v in list(values.items())[:limit])
    return text + (" ..." if len(values) > limit else "")


def summarize(event: Event) -> str:
    """The human part of an event's line (without time, name and channel)."""
    d = event.data
    name = event.event
    if isinstance(d, dict) or d is None:
        return msgspec.json.encode(d).decode()[:300]
    if name == "connected":
        return f"session={d.sessionId} user={d.userId} node={d.node} ping={d.pingInterval}s"
    if name == "settings":
        recovered = {c.channel: c.recovered for c in d.channels if c.recovered is not None}
        extra = f" recovered={recovered}" if recovered else ""
        return f"games={d.games} stats={'on' if d.stats else 'off'}{extra}"
    if name == "incident":
        score = f" {d.score.home}:{d.score.away}" if d.score else ""
        minute = f" {d.minute}'" if d.minute is not None else ""
        side = f" ({d.side})" if d.side and d.side != "none" else ""
        text = f" - {d.description}" if d.description else ""
        return f"{d.type.upper()}{minute}{score}{side}{text}"
    if name == "bet":
        bets = "; ".join(
            f"{b.player or '?'} {b.market} {b.selection} @{b.odds} {b.stake} {b.currency}"
            for b in d.bets
        )
        return f"{d.gameId}: {bets}"
    if name == "bets-result":
        return "; ".join(
            f"{r.betId} {r.status.upper()} payout {r.payout}/{r.stake} {r.currency}"
            for r in d.results
        )
    if name == "balance":
        reason = f" ({d.reason})" if d.reason else ""
        return f"{d.balance} {d.currency}{reason}"
    if name == "stats":
        where = d.gameId if d.scope == "game" else "global"
        return f"{where}: {_values(d.values)}"
    if name == "error":
        return f"{d.code}: {d.message}"
    if name == "logout":
        return f"{d.reason} (close {d.code})"
    if name == "disconnected":
        then = f"reconnecting in {d.delay:.2f}s" if d.reconnect else "not reconnecting"
        return f"code={d.code} {d.reason}; {then}"
    if name == "recovery-failed":
        return f"missed publications cannot be replayed on {', '.join(d.channels)}"
    return repr(d)[:300]


def format_line(event: Event, *, color: bool) -> str:
    """One line: local time, event name, channel and offset, summary; ANSI-colored if asked."""
    stamp = datetime.now().strftime("%H:%M:%S")
    where = f"{event.channel}#{event.offset}" if event.channel else ""
    line = f"{stamp}  {event.event:<15} {where:<22} {summarize(event)}"
    if not color:
        return line
    key = event.event
    if key == "incident" and getattr(event.data, "type", "") == "goal":
        key = "goal"
    code = _COLORS.get(key)
    return f"{code}{line}{_RESET}" if code else line


async def listen(
    url: str,
    token: str | None,
    games: Iterable[str],
    stats: bool,
    *,
    out: TextIO = sys.stdout,
    color: bool | None = None,
    max_events: int | None = None,
) -> int:
    """Connect to `url` and print one line per event until the stream ends or `max_events`.

    Colors are used when `color` is True, or when it is None and `out` is a terminal. Returns the
    number of events printed. Connection errors of the first connect propagate (see `connect`).
    """
    use_color = out.isatty() if color is None else color
    printed = 0
    if max_events is not None and max_events <= 0:
        return 0
    async with connect(url, token, games=list(games), stats=stats) as client:
        async for event in client:
            out.write(format_line(event, color=use_color) + "\n")
            out.flush()
            printed += 1
            if max_events is not None and printed >= max_events:
                break
    return printed
