"""Soak: a server subprocess under mixed traffic for a bounded time, watched for leaks and loss.

Run with ``make soak`` (5 minutes) or ``python -m bench.soak --seconds 120``. Everything stays on
127.0.0.1: one ``igratech-ws serve`` subprocess on free ports, and in this process a pool of clients
that keep joining and leaving (each lives a random few seconds, follows 1-3 games, pings now and
then; half log in as a user of their own), while a publisher posts batches of incidents to the
games and balances to the connected users through the internal API.

Every client checks what it receives: offsets on each channel must follow one another from the
position its `settings` answer reported (no loss, no duplicate, in order). At the end the script
prints, and writes as JSON (``--out``), the server's RSS and open file descriptors at start, middle
and end, the messages published and delivered, and every error counted by kind. It exits 1 when a
client saw a gap, a duplicate, or an unexpected close, so a CI job may run a short soak as a check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from igratech_ws.auth import mint_token

SECRET = "soak-secret-that-is-long-enough-for-hs256!"
API_KEY = "soak-api-key"
NOW = "2026-11-23T19:45:00Z"
#: Bound of every single wait (a handshake, an answer): generous, a soak does not measure speed.
WAIT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_figures(pid: int) -> dict[str, int]:
    """RSS (KiB) and open file descriptors of process `pid`, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return {"rss_kib": rss, "open_fds": len(os.listdir(f"/proc/{pid}/fd"))}


@dataclass
class Stats:
    published: int = 0
    delivered: int = 0
    sessions: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)


class Soak:
    def __init__(self, args: argparse.Namespace, ws_url: str, api_url: str) -> None:
        self.args = args
        self.ws_url = ws_url
        self.api_url = api_url
        self.stats = Stats()
        self.users: set[str] = set()
        self.games = [f"g-{n}" for n in range(args.games)]
        self.stop_at = time.monotonic() + args.seconds
        self._ids = itertools.count(1)
        self.rng = random.Random(args.seed)

    @property
    def running(self) -> bool:
        return bool(time.monotonic() < self.stop_at)

    async def client(self, http: aiohttp.ClientSession) -> None:
        """One client's life: connect, follow games, read and check, leave."""
        n = next(self._ids)
        user = f"soak-u-{n}" if self.rng.random() < 0.5 else None
        url = self.ws_url + (f"?token={mint_token(SECRET, user)}" if user else "")
        games = self.rng.sample(self.games, self.rng.randint(1, 3))
        lifetime = self.rng.uniform(self.args.min_life, self.args.max_life)
        last: dict[str, int] = {}
        try:
            async with http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=WAIT_S)) as ws:
                self.stats.sessions += 1
                hello = await ws.receive_json(timeout=WAIT_S)
                if hello.get("event") != "connected":
                    self.stats.errors["no_connected_frame"] += 1
                    return
                await ws.send_json({"event": "settings", "data": {"games": games}})
                if user is not None:
                    self.users.add(user)
                deadline = time.monotonic() + lifetime
                next_ping = time.monotonic() + 1.0
                while time.monotonic() < deadline and self.running:
                    try:
                        message = await ws.receive(timeout=0.5)
                    except TimeoutError:
                        message = None
                    if message is not None:
                        if message.type is not aiohttp.WSMsgType.TEXT:
                            self.stats.closes[str(ws.close_code)] += 1
                            self.stats.errors["closed_by_server"] += 1
                            return
                        self._check(json.loads(message.data), last)
                    if time.monotonic() >= next_ping:
                        await ws.send_json({"event": "ping", "data": {"ts": int(time.time())}})
                        next_ping = time.monotonic() + self.rng.uniform(1.0, 5.0)
                self.stats.closes["1000"] += 1
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.stats.errors[f"client_{type(exc).__name__}"] += 1
        finally:
            if user is not None:
                self.users.discard(user)

    def _check(self, frame: dict[str, Any], last: dict[str, int]) -> None:
        event = frame.get("event")
        if event == "settings":
            for state in frame["data"]["channels"]:
                last[state["channel"]] = state["offset"]
            return
        if event == "error":
            self.stats.errors[f"error_{frame['data'].get('code')}"] += 1
            return
        channel = frame.get("channel")
        if channel is None:
            return  # pong and other unpositioned frames
        self.stats.delivered += 1
        offset = frame["offset"]
        previous = last.get(channel)
        if previous is None:
            last[channel] = offset  # the user channel: its position came with no answer
        elif offset == previous + 1:
            last[channel] = offset
        elif offset <= previous:
            self.stats.errors["duplicate_or_reordered"] += 1
        else:
            self.stats.errors["gap"] += 1
            last[channel] = offset

    async def clients(self, http: aiohttp.ClientSession) -> None:
        """Keep about `--clients` clients alive, replacing each one that leaves."""
        tasks: set[asyncio.Task[None]] = set()
        while self.running:
            while len(tasks) < self.args.clients and self.running:
                task = asyncio.ensure_future(self.client(http))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                # Spread the arrivals instead of a thundering herd.
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)
        if tasks:
            await asyncio.wait(tasks, timeout=WAIT_S + self.args.max_life)

    async def publisher(self, http: aiohttp.ClientSession) -> None:
        """Post a batch every tick: incidents to random games, balances to connected users."""
        headers = {"Authorization": f"Bearer {API_KEY}"}
        tick = 1.0 / self.args.batches_per_second
        serial = itertools.count(1)
        while self.running:
            items: list[dict[str, Any]] = []
            for _ in range(self.args.batch_size):
                n = next(serial)
                users = list(self.users)
                if users and n % 4 == 0:
                    items.append(
                        {
                            "event": "balance",
                            "userId": self.rng.choice(users),
                            "data": {
                                "balance": f"{n}.00",
                                "currency": "EUR",
                                "updatedAt": NOW,
                                "reason": "bet_settled",
                            },
                        }
                    )
                else:
                    game = self.rng.choice(self.games)
                    items.append(
                        {
                            "event": "incident",
                            "gameId": game,
                            "data": {
                                "gameId": game,
                                "incidentId": f"inc-{n}",
                                "type": "corner",
                                "occurredAt": NOW,
                                "minute": n % 90,
                                "side": "home",
                            },
                        }
                    )
            try:
                async with http.post(
                    self.api_url + "/api/v1/publish/batch",
                    json={"items": items},
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=WAIT_S),
                ) as answer:
                    if answer.status == 200:
                        self.stats.published += len(items)
                    else:
                        self.stats.errors[f"publish_http_{answer.status}"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.stats.errors[f"publish_{type(exc).__name__}"] += 1
            await asyncio.sleep(tick)


def start_server(port: int, api_port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start `igratech-ws serve` on 127.0.0.1; its log goes to a file in the temp directory."""
    log_path = Path(tempfile.gettempdir()) / "igratech-ws-soak-server.log"
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "igratech_ws.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--api-port",
                str(api_port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=log,
            stderr=log,
        )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port, api_port = free_port(), free_port()
    env = dict(
        os.environ,
        IGRATECH_WS_JWT_SECRET=SECRET,
        IGRATECH_WS_API_KEY=API_KEY,
        # The soak's clients all come from 127.0.0.1.
        IGRATECH_WS_MAX_CONNECTIONS_PER_IP=str(args.clients * 4),
    )
    server = start_server(port, api_port, env)
    api_url = f"http://127.0.0.1:{api_port}"
    figures: dict[str, Any] = {"seconds": args.seconds, "clients": args.clients}
    samples: list[dict[str, Any]] = []
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False)
        ) as http:
            await _wait_ready(http, api_url, server)
            figures["start"] = process_figures(server.pid)
            soak = Soak(args, f"ws://127.0.0.1:{port}/wspublic", api_url)
            began = time.monotonic()

            async def sample() -> None:
                while soak.running:
                    await asyncio.sleep(min(10.0, args.seconds / 4))
                    entry = {"t": round(time.monotonic() - began, 1), **process_figures(server.pid)}
                    samples.append(entry)
                    if "middle" not in figures and time.monotonic() - began >= args.seconds / 2:
                        figures["middle"] = entry
                    print(f"soak: {entry} delivered={soak.stats.delivered}", flush=True)

            await asyncio.gather(soak.clients(http), soak.publisher(http), sample())
            # Every client has left: what the server still holds now is what leaks.
            await asyncio.sleep(2.0)
            figures["end"] = process_figures(server.pid)
            async with http.get(
                api_url + "/api/v1/info", headers={"Authorization": f"Bearer {API_KEY}"}
            ) as answer:
                figures["server_info_at_end"] = await answer.json()
        stats = soak.stats
        figures.update(
            published=stats.published,
            delivered=stats.delivered,
            client_sessions=stats.sessions,
            closes=dict(stats.closes),
            errors=dict(stats.errors),
            samples=samples,
        )
    finally:
        server.terminate()
        try:
            figures["server_exit_code"] = server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            figures["server_exit_code"] = "killed"
    return figures


async def _wait_ready(
    http: aiohttp.ClientSession, api_url: str, server: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"soak: the server exited with {server.returncode}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(api_url + "/readyz") as answer:
                if answer.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise SystemExit("soak: the server did not become ready within 15 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=300.0, help="duration (default 300)")
    parser.add_argument("--clients", type=int, default=300, help="clients alive at once")
    parser.add_argument("--games", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=20, help="publications per batch")
    parser.add_argument("--batches-per-second", type=float, default=10.0)
    parser.add_argument("--min-life", type=float, default=3.0, help="shortest client life, s")
    parser.add_argument("--max-life", type=float, default=30.0, help="longest client life, s")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--out",
        default=str(Path(tempfile.gettempdir()) / "igratech-ws-soak.json"),
        help="where to write the figures as JSON",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.clients <= 0 or args.min_life > args.max_life:
        parser.error("--seconds and --clients must be positive, --min-life <= --max-life")
    try:
        import uvloop

        figures = uvloop.run(run(args))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        figures = asyncio.run(run(args))
    text = json.dumps(figures, indent=2, sort_keys=True)
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(
        json.dumps({k: v for k, v in figures.items() if k != "samples"}, indent=2, sort_keys=True)
    )
    print(f"soak: figures written to {args.out}")
    bad = {"gap", "duplicate_or_reordered", "closed_by_server"} & set(figures.get("errors", {}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
