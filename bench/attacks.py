"""Transport attacks on igratech-ws: what a hostile connection can make the server hold.

Each attack runs against a fresh server (default limits unless the attack says otherwise) with
`CONNECTIONS` attacking connections opened from this process (raw sockets, frames built by hand).
The server's RSS is sampled every 20 ms while the attack runs: the peak growth over the same
connections idle, divided by the connections, is what one attacking connection made the server
buffer at worst; the growth once it is over is what it kept. The last row holds every budget at
once (an unfinished message of `max_frame_bytes` in, a follower that reads nothing of a busy
channel out) against the bound the configuration promises.

``python -m bench.attacks`` runs only these and rewrites the figures of docs/security.md;
``make bench`` runs them with the other scenarios (``--scenarios attacks``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.servers import API_KEY, OURS, ROOT, Server, rss_kb

Row = dict[str, Any]
CONNECTIONS = 100
#: Connections of the worst-case attack (each may hold about 1.1 MB: kept smaller).
WORST_CONNECTIONS = 50
DOC = ROOT / "docs" / "security.md"
BEGIN = "<!-- attack-figures: written by bench/attacks.py (make bench); do not edit -->"
END = "<!-- /attack-figures -->"
SAMPLE_S = 0.02


# --- a raw client --------------------------------------------------------------------------------


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 section 5.2)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", size)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", size)
    key = os.urandom(4)
    if not payload:
        return head + key
    repeated = (key * (size // 4 + 1))[:size]
    masked = int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")
    return head + key + masked.to_bytes(size, "little")


class RawClient:
    """One connection past a real upgrade; reads only when told to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, query: str = "", rcvbuf: int | None = None) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /wspublic{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"upgrade refused: {head[:60]!r}")
        return cls(reader, writer)

    async def send(self, data: bytes, within: float = 2.0) -> bool:
        """Write `data`; False once the server stopped taking it (closed, or not reading)."""
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), within)
            return True
        except (OSError, TimeoutError):
            return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


# --- measuring -----------------------------------------------------------------------------------


class RssPeak:
    """Samples a process's RSS in the background; `peak` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_kb(pid)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RssPeak:
        self._task = asyncio.ensure_future(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, rss_kb(self.pid))

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_kb(self.pid))
            await asyncio.sleep(SAMPLE_S)


async def closes(server: Server) -> dict[str, int]:
    """The server's closes by code (its /metrics)."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{server.api_port}/metrics",
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as answer,
    ):
        text = await answer.text()
    found = re.findall(r'^igratech_ws_closes_total\{[^}]*code="([^"]+)"[^}]*\} (\S+)', text, re.M)
    return {code: int(float(value)) for code, value in found if float(value)}


@contextlib.asynccontextmanager
async def attacked(ctx: Any, env: dict[str, str] | None = None) -> AsyncIterator[Server]:
    port, api_port = ctx.ports.take(), ctx.ports.take()
    ctx.ports.take()
    server = Server(OURS, port, api_port, ctx.server_cpu, ctx.log_dir, extra_env=env)
    try:
        await server.start()
        await asyncio.sleep(0.3)
        yield server
    finally:
        server.stop()


async def open_many(port: int, n: int, **kwargs: Any) -> list[RawClient]:
    clients: list[RawClient] = []
    for start in range(0, n, 50):
        clients += await asyncio.gather(
            *(RawClient.open(port, **kwargs) for _ in range(min(50, n - start)))
        )
    return clients


async def _measure(
    ctx: Any,
    name: str,
    n: int,
    attack: Callable[[Server, list[RawClient]], Awaitable[None]],
    *,
    env: dict[str, str] | None = None,
    open_kwargs: dict[str, Any] | None = None,
    settle_s: float = 1.0,
) -> Row:
    async with attacked(ctx, env) as server:
        alone = rss_kb(server.pid)
        clients = await open_many(server.port, n, **(open_kwargs or {}))
        try:
            await asyncio.sleep(0.5)
            idle = rss_kb(server.pid)
            started = time.monotonic()
            async with RssPeak(server.pid) as peak:
                await attack(server, clients)
                held = rss_kb(server.pid)
                await asyncio.sleep(settle_s)
            after = rss_kb(server.pid)
            return {
                "scenario": "attacks",
                "server": OURS.name,
                "attack": name,
                "connections": n,
                "seconds": round(time.monotonic() - started, 2),
                "idle_rss_kb": idle,
                "idle_kb_per_conn": (idle - alone) / n,
                "peak_kb_per_conn": (peak.peak - idle) / n,
                "held_kb_per_conn": (held - idle) / n,
                "after_kb_per_conn": (after - idle) / n,
                "closes": await closes(server),
            }
        finally:
            for client in clients:
                client.close()


# --- the attacks ---------------------------------------------------------------------------------

PING = frame(0x9, b"p" * 125)
PINGS = PING * 512
BIG_PING_EVENT = b'{"event":"ping","data":{"ts":1}}'.ljust(65_000)


async def ping_flood(server: Server, clients: list[RawClient]) -> None:
    """Every client sends up to 4 MB of pings and reads nothing."""

    async def one(client: RawClient) -> None:
        for _ in range(4 * 1024 * 1024 // len(PINGS)):
            if not await client.send(PINGS):
                return

    await asyncio.gather(*(one(c) for c in clients))


async def large_frames(server: Server, clients: list[RawClient]) -> None:
    """Every client sends its whole burst (40) of 65 KB messages at once."""
    data = frame(0x1, BIG_PING_EVENT) * 40
    await asyncio.gather(*(c.send(data, within=10) for c in clients))
    await asyncio.sleep(0.5)


async def unfinished_fragments(server: Server, clients: list[RawClient]) -> None:
    """Every client sends the first 65,000 bytes of a message and never the rest."""
    data = frame(0x1, BIG_PING_EVENT, fin=False)
    await asyncio.gather(*(c.send(data, within=10) for c in clients))
    await asyncio.sleep(1.0)


def bets_body(n: int) -> dict[str, Any]:
    bets = [
        {
            "betId": f"b-{n}-{i}",
            "market": "winner",
            "selection": "home" * 16,
            "odds": "1.95",
            "stake": "10.00",
            "currency": "EUR",
            "placedAt": "2026-11-23T19:45:00Z",
            "player": "p" * 64,
        }
        for i in range(500)
    ]
    return {"event": "bet", "gameId": "g-attack", "data": {"gameId": "g-attack", "bets": bets}}


async def every_budget(server: Server, clients: list[RawClient]) -> None:
    """Every client holds an unfinished 65 KB message and follows a busy game without reading
    (4 KiB receive buffer): publish ~100 KB bets until the server has closed them all as slow
    consumers, or 30 s."""
    import aiohttp

    data = frame(0x1, BIG_PING_EVENT, fin=False)
    await asyncio.gather(*(c.send(data, within=10) for c in clients))
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        n = 0
        while time.monotonic() < deadline:
            async with http.post(
                f"http://127.0.0.1:{server.api_port}/api/v1/publish", json=bets_body(n)
            ) as answer:
                if answer.status != 200:
                    raise RuntimeError(f"publish: {answer.status} {await answer.text()}")
            n += 1
            if n % 20 == 0 and (await closes(server)).get("1013", 0) >= len(clients):
                return


async def run(ctx: Any) -> list[Row]:
    """Every attack, each on a fresh server; rows for the report and docs/security.md."""
    lifted = {
        "IGRATECH_WS_MAX_MESSAGE_RATE": "1000000000",
        "IGRATECH_WS_MESSAGE_BURST": "1000000000",
        # A stalled socket is a slow consumer after idle_timeout / 2: 2 s here, not 30.
        "IGRATECH_WS_PING_INTERVAL": "2",
        "IGRATECH_WS_IDLE_TIMEOUT": "4",
    }
    follow = "?settings=" + quote(json.dumps({"games": ["g-attack"]}))
    plan: list[tuple[str, int, Callable[..., Awaitable[None]], dict[str, Any]]] = [
        ("ping flood, default limits", CONNECTIONS, ping_flood, {"open_kwargs": {"rcvbuf": 4096}}),
        (
            "ping flood, rate limit lifted",
            CONNECTIONS,
            ping_flood,
            {"open_kwargs": {"rcvbuf": 4096}, "env": lifted, "settle_s": 3.0},
        ),
        ("large frames (a burst of 40 x 65 KB)", CONNECTIONS, large_frames, {}),
        ("unfinished fragmented messages", CONNECTIONS, unfinished_fragments, {}),
        (
            "every budget at once",
            WORST_CONNECTIONS,
            every_budget,
            {"open_kwargs": {"rcvbuf": 4096, "query": follow}},
        ),
    ]
    rows: list[Row] = []
    for name, n, attack, kwargs in plan:
        ctx.progress(f"  attack: {name}")
        rows.append(await _measure(ctx, name, n, attack, **kwargs))
    return rows


# --- docs/security.md ------------------------------------------------------------------------------


def render(rows: list[Row]) -> str:
    from igratech_ws.config import Config

    limits = Config()
    bound_kb = (limits.max_frame_bytes + limits.max_write_buffer_bytes) / 1024
    lines = [
        BEGIN,
        "",
        f"Default limits: `max_frame_bytes` {limits.max_frame_bytes:,}, "
        f"`max_write_buffer_bytes` {limits.max_write_buffer_bytes:,} (reading pauses above a "
        f"quarter of it), `max_message_rate` {limits.max_message_rate:g}/s with bursts of "
        f"{limits.message_burst:g}. Server RSS over the same connections idle, per attacking "
        "connection (KB; an idle connection itself is in docs/benchmarks.md):",
        "",
        "| attack | connections | peak | when the attack ends | 1-3 s later | closes by code |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        closed = ", ".join(f"{k}: {v}" for k, v in sorted(r["closes"].items())) or "none"
        lines.append(
            f"| {r['attack']} | {r['connections']} | {r['peak_kb_per_conn']:,.1f} "
            f"| {r['held_kb_per_conn']:,.1f} | {r['after_kb_per_conn']:,.1f} | {closed} |"
        )
    worst = max(rows, key=lambda r: r["peak_kb_per_conn"])
    lines += [
        "",
        f"Worst case per connection under the configured limits: at most **{bound_kb:,.0f} KB** "
        "in the process by construction (one message being assembled, `max_frame_bytes`, plus "
        "a full send budget, `max_write_buffer_bytes`; past either the connection is closed), "
        "plus the idle cost; the kernel's socket buffers come on top and are not in RSS. The "
        f"worst measured here: **{worst['peak_kb_per_conn']:,.0f} KB** ({worst['attack']}). "
        "A publication's frame is one object shared by all its followers, so a busy channel's "
        "backlog costs less than a budget per follower; RSS does not shrink when memory is "
        "freed inside the process (the allocator keeps it for reuse), so the last column is an "
        "upper bound (tests/adversarial/test_transport_memory.py measures what is given back).",
    ]
    lines += ["", END]
    return "\n".join(lines)


def write_doc(rows: list[Row], doc: Path = DOC) -> bool:
    """Put the figures between the markers of `doc`; False when `rows` has no attack rows."""
    rows = [r for r in rows if r.get("scenario") == "attacks"]
    if not rows:
        return False
    text = doc.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise RuntimeError(f"{doc} has no {BEGIN!r} ... {END!r} section")
    doc.write_text(pattern.sub(lambda _: render(rows), text), encoding="utf-8")
    return True


def main() -> int:
    import uvloop

    from bench import scenarios
    from bench.run import _cpus
    from bench.servers import RESULTS, kill_leftovers

    server_cpu, client_cpu = _cpus()
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = scenarios.Context(
        kinds=[OURS],
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        log_dir=log_dir,
        deadline=time.monotonic() + 600,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    try:
        rows = uvloop.run(run(ctx))
    finally:
        kill_leftovers()
    (RESULTS / "attacks.json").write_text(json.dumps(rows, indent=1))
    write_doc(rows)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
