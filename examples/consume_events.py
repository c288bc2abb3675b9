"""Consume live events from an igratech-ws gateway with the Python client SDK.

    python3 examples/consume_events.py ws://127.0.0.1:8080/wspublic --game g-1001 --stats
    python3 examples/consume_events.py --token "$IGRATECH_WS_TOKEN" --game g-1001

Any Python 3.11+ runs it from a checkout where `make run` made `.venv` (it re-runs itself with
`.venv/bin/python`).

Prints goals, bets, the user's balance and settlements as they happen; reconnects and resumes by
itself. Stop with Ctrl-C (or --max-events N).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

try:
    import igratech_ws  # noqa: F401
except ModuleNotFoundError:  # run by a Python without the project: use the checkout's .venv
    VENV = Path(__file__).resolve().parents[1] / ".venv"
    if (VENV / "bin" / "python").exists() and Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(VENV / "bin" / "python", [str(VENV / "bin" / "python"), *sys.argv])
    sys.exit("igratech_ws is not installed: run `make run` once (it creates .venv)")

from igratech_ws.client import Event, connect
from igratech_ws.core.messages import BalanceData, BetData, BetsResultData, IncidentData


def describe(event: Event) -> str | None:
    """A line for the events this example cares about (None: skip it)."""
    data = event.data
    if isinstance(data, IncidentData) and data.type == "goal" and data.score:
        return f"GOAL {data.gameId} {data.minute}': {data.score.home}:{data.score.away}"
    if isinstance(data, BetData):
        return f"{len(data.bets)} bet(s) on {data.gameId}, first at odds {data.bets[0].odds}"
    if isinstance(data, BalanceData):
        return f"balance now {data.balance} {data.currency}"
    if isinstance(data, BetsResultData):
        return ", ".join(f"bet {r.betId} {r.status} ({r.payout})" for r in data.results)
    if event.event in ("disconnected", "recovery-failed", "logout", "error"):
        return f"{event.event}: {data}"
    return None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="ws://127.0.0.1:8080/wspublic")
    parser.add_argument("--token", help="a JWT; without it the connection is anonymous")
    parser.add_argument("--game", action="append", default=[], help="a game id to follow")
    parser.add_argument("--stats", action="store_true", help="also receive global stats")
    parser.add_argument("--max-events", type=int, default=None)
    args = parser.parse_args()

    seen = 0
    async with connect(args.url, args.token, games=args.game, stats=args.stats) as client:
        async for event in client:
            line = describe(event)
            if line:
                print(line, flush=True)
            seen += 1
            if args.max_events is not None and seen >= args.max_events:
                break
        print(f"stopped; last positions: {client.positions}")


if __name__ == "__main__":
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main())
    except OSError as exc:  # the first connection failed: say so in one line
        sys.exit(f"cannot connect: {exc}; is the gateway running?")
