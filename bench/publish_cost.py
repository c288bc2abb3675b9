"""The single publish route's server cost in instructions: repeatable on a loaded machine.

``python -m bench.publish_cost`` starts igratech-ws (memory broker) under valgrind's callgrind,
publishes ``--warmup`` single events the way the publish scenario does (32 aiohttp clients on
keep-alive connections, ``POST /api/v1/publish``, one incident to one of 100 games, nobody
subscribed), zeroes the counters, publishes ``--n`` more and dumps the counters: the figure is
the server's user-space instructions per request (the kernel's work is not counted; its system
calls per request are). ``--profile`` keeps the dump and writes callgrind_annotate's inclusive
listing next to it (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.handshake_cost import START_LIMIT, _collect, _control, _listening, _start, _stop
from bench.servers import API_KEY, OURS, Ports, incident


async def _publish(api_port: int, n: int, first: int, concurrency: int) -> int:
    import aiohttp

    url = f"http://127.0.0.1:{api_port}/api/v1/publish"
    games = [f"g-{i}" for i in range(100)]
    sent = 0
    seq = first

    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {API_KEY}"},
        connector=aiohttp.TCPConnector(limit=256),
        timeout=aiohttp.ClientTimeout(total=600),
    ) as session:

        async def client() -> None:
            nonlocal sent, seq
            while sent < n:
                sent += 1
                seq += 1
                game = games[seq % 100]
                body = {"event": "incident", "gameId": game, "data": incident(game, seq)}
                async with session.post(url, json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"publish: {resp.status} {await resp.text()}")
                    await resp.read()

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return sent


async def measure(
    n: int, warmup: int, concurrency: int, out: Path, profile: bool, ports: Ports | None = None
) -> dict[str, Any]:
    """One callgrind run (~15 s); the row `bench.run` saves and `bench.report` quotes."""
    ports = ports or Ports(23700)
    port, api_port = ports.take(), ports.take()
    proc = _start("publish", OURS, port, api_port, out)
    try:
        deadline = time.monotonic() + START_LIMIT
        while not (_listening(port) and _listening(api_port)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see publish.log)")
            await asyncio.sleep(0.5)
        _control("--instr=on", proc.pid)
        await _publish(api_port, warmup, 0, concurrency)
        await asyncio.sleep(1.0)
        _control("--zero", proc.pid)
        done = await _publish(api_port, n, 10_000_000, concurrency)
        await asyncio.sleep(1.0)
        totals = _collect("publish", proc.pid, out, profile)
    finally:
        _stop("publish", proc, out)
    return {
        "scenario": "publish_cost",
        "requests": done,
        "instructions": totals["Ir"],
        "instructions_per_request": totals["Ir"] / done,
        "syscalls_per_request": totals["sysCount"] / done if "sysCount" in totals else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="publish-cost-"))
    out.mkdir(parents=True, exist_ok=True)
    row = asyncio.run(measure(args.n, args.warmup, args.concurrency, out, args.profile))
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
