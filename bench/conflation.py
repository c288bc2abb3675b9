"""Conflation under a slow reader (issue 12): ``python -m bench.run --scenarios conflation``.

One igratech-ws process (memory broker, a 64 KiB outbound budget per connection) and one raw
WebSocket client that reads slowly: a small receive buffer, at most `READ_BYTES_PER_S` bytes a
second. Two phases, each bounded in time:

- **stats**: a game publishes `RATE` stats a second (each frame about 8 KB, several times what
  the reader takes). The server must conflate: the reader stays connected, the server's memory
  stays bounded (its RSS growth is reported), and once the publisher stops the reader's last
  frame is the last stats published.
- **bets**: the same reader on a game that publishes `RATE` bets a second of the same size.
  Stream frames are never dropped, so the reader is closed as a slow consumer (1013); the
  time from the first publication to the close is reported.

`run` returns rows for the report (`section` renders them); ``python -m bench.conflation``
runs it alone and replaces its section of docs/benchmarks.md with the figures it measured.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
SERVE = [str(Path(sys.executable).with_name("igratech-ws")), "serve"]
API_KEY = "bench-conflation-key"
#: Publications per second in each phase.
RATE = 50
#: Bytes per second the slow reader takes from its socket.
READ_BYTES_PER_S = 16 * 1024
#: The per-connection outbound budget the server runs with (max_write_buffer_bytes).
BUDGET = 64 * 1024
STAMP = "2026-11-23T19:45:00Z"
SECTION = "## 9. Conflation under a slow reader"

Row = dict[str, Any]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def stats_body(game: str, n: int) -> dict[str, Any]:
    values: dict[str, Any] = {f"figure_{i:03d}": f"{n}-{i}-" + "x" * 24 for i in range(199)}
    values["seq"] = n
    return {
        "event": "stats",
        "gameId": game,
        "data": {"scope": "game", "gameId": game, "updatedAt": STAMP, "values": values},
    }


def bet_body(game: str, n: int) -> dict[str, Any]:
    bets = [
        {
            "betId": f"b-{n}-{i}",
            "market": "match_winner",
            "selection": "home",
            "odds": "2.10",
            "stake": "5.00",
            "currency": "EUR",
            "placedAt": STAMP,
        }
        for i in range(55)
    ]
    return {"event": "bet", "gameId": game, "data": {"gameId": game, "bets": bets}}


@dataclass
class Reader:
    """A raw WebSocket client that reads at most `rate` bytes a second and parses frames."""

    port: int
    rate: int
    frames: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    closed_at: float | None = None
    buffer: bytearray = field(default_factory=bytearray)

    async def run(self, game: str, stop: asyncio.Event) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", self.port))
        key = base64.b64encode(os.urandom(16)).decode()
        settings = json.dumps({"games": [game]}, separators=(",", ":"))
        request = (
            f"GET /wspublic?settings={_quote(settings)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await loop.sock_recv(sock, 1)
            if not chunk:
                raise RuntimeError("the server closed during the upgrade")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"upgrade refused: {head[:80]!r}")
        try:
            step = 0.05
            quiet_since: float | None = None
            while self.close_code is None:
                chunk = b""
                # Slow while the publisher runs; then it drains what is left at full speed,
                # until a second passes without a byte.
                size = 1 << 16 if stop.is_set() else max(1, int(self.rate * step))
                try:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, size), step)
                except TimeoutError:
                    pass
                else:
                    if not chunk:  # EOF: a slow consumer's socket is aborted, no close frame
                        self.close_code = 1006
                        self.closed_at = time.monotonic()
                        break
                if stop.is_set():
                    now = time.monotonic()
                    if chunk:
                        quiet_since = None
                    elif quiet_since is None:
                        quiet_since = now
                    elif now - quiet_since > 1.0:
                        break
                self._parse(chunk)
                if not stop.is_set():
                    await asyncio.sleep(step)
        except (ConnectionError, OSError):
            if self.close_code is None:
                self.close_code = -1
                self.closed_at = time.monotonic()
        finally:
            sock.close()

    def _parse(self, chunk: bytes) -> None:
        buffer = self.buffer
        buffer += chunk
        while len(buffer) >= 2:
            opcode = buffer[0] & 0x0F
            length = buffer[1] & 0x7F
            at = 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length = int.from_bytes(buffer[2:4], "big")
                at = 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length = int.from_bytes(buffer[2:10], "big")
                at = 10
            if len(buffer) < at + length:
                return
            payload = bytes(buffer[at : at + length])
            del buffer[: at + length]
            if opcode == 0x1:
                self.frames.append(json.loads(payload))
            elif opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
                self.closed_at = time.monotonic()
                return


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


async def _counters(api_port: int) -> dict[str, float]:
    """The server's slow-consumer closes and conflated frames (its /metrics, summed)."""
    wanted = ("igratech_ws_slow_consumer_closes_total", "igratech_ws_conflated_frames_total")
    found = dict.fromkeys(wanted, 0.0)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{api_port}/metrics") as answer,
    ):
        for line in (await answer.text()).splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in found:
                found[name] += float(line.rsplit(" ", 1)[1])
    return found


async def _phase(
    pid: int,
    ws_port: int,
    api_port: int,
    kind: str,
    seconds: float,
    progress: Callable[[str], None],
) -> Row:
    game = f"g-{kind}-{os.getpid()}"
    before = await _counters(api_port)
    reader = Reader(ws_port, READ_BYTES_PER_S)
    stop = asyncio.Event()
    reading = asyncio.ensure_future(reader.run(game, stop))
    await asyncio.sleep(0.5)  # connected and following
    baseline = rss_kb(pid)
    peak = baseline
    samples: list[int] = []
    body = stats_body if kind == "stats" else bet_body
    started = time.monotonic()
    published = 0
    last_seq = -1
    server_closed_at: float | None = None
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        url = f"http://127.0.0.1:{api_port}/api/v1/publish"
        while time.monotonic() - started < seconds and reader.close_code is None:
            tick = started + published / RATE
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
            async with http.post(url, json=body(game, published)) as answer:
                if answer.status != 200:
                    raise RuntimeError(f"publish answered {answer.status}")
            last_seq = published
            published += 1
            if published % 10 == 0:
                rss = rss_kb(pid)
                samples.append(rss)
                peak = max(peak, rss)
                now = await _counters(api_port)
                if (
                    now["igratech_ws_slow_consumer_closes_total"]
                    > before["igratech_ws_slow_consumer_closes_total"]
                ):
                    server_closed_at = time.monotonic()
                    break  # the server let the reader go: nothing more to learn
    elapsed = time.monotonic() - started
    stop.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reading, 30)
    reading.cancel()
    after = await _counters(api_port)
    pushes = [f for f in reader.frames if f.get("channel") == f"game:{game}"]
    conflated = sum(1 for f in pushes if f.get("conflated"))
    last_values = pushes[-1]["data"].get("values", {}) if pushes else {}
    row: Row = {
        "scenario": "conflation",
        "kind": kind,
        "rate": RATE,
        "budget_bytes": BUDGET,
        "read_bytes_per_s": READ_BYTES_PER_S,
        "seconds": round(elapsed, 2),
        "published": published,
        "received": len(pushes),
        "conflated_frames_seen": conflated,
        "conflated_frames_server": int(
            after["igratech_ws_conflated_frames_total"]
            - before["igratech_ws_conflated_frames_total"]
        ),
        "slow_consumer_closes": int(
            after["igratech_ws_slow_consumer_closes_total"]
            - before["igratech_ws_slow_consumer_closes_total"]
        ),
        "close_code": reader.close_code,
        # When the server closed it (seen in its metrics, sampled every 10 publications): the
        # reader itself learns it only after draining what the kernel buffered before.
        "closed_after_s": (
            round(server_closed_at - started, 2) if server_closed_at is not None else None
        ),
        "rss_baseline_kb": baseline,
        "rss_peak_kb": peak,
        "rss_growth_kb": peak - baseline,
        "rss_last_kb": samples[-1] if samples else baseline,
        "last_is_newest": kind == "stats" and last_values.get("seq") == last_seq,
    }
    progress(f"     conflation {kind}: {json.dumps(row)}")
    return row


async def run(progress: Callable[[str], None], seconds: float = 20.0) -> list[Row]:
    """Both phases against one fresh server; about twice `seconds` plus a few seconds."""
    ws_port, api_port = free_port(), free_port()
    env = {
        **os.environ,
        "IGRATECH_WS_API_KEY": API_KEY,
        "IGRATECH_WS_PORT": str(ws_port),
        "IGRATECH_WS_API_PORT": str(api_port),
        "IGRATECH_WS_HOST": "127.0.0.1",
        "IGRATECH_WS_API_HOST": "127.0.0.1",
        "IGRATECH_WS_MAX_WRITE_BUFFER_BYTES": str(BUDGET),
        "IGRATECH_WS_IDLE_TIMEOUT": "300",
        # A short history, so that the server's memory shows the connection, not the history.
        "IGRATECH_WS_HISTORY_SIZE": "10",
        "IGRATECH_WS_LOG_LEVEL": "warning",
    }
    process = await asyncio.create_subprocess_exec(
        *SERVE, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await _wait_ready(api_port)
        rows = [
            await _phase(process.pid, ws_port, api_port, "stats", seconds, progress),
            await _phase(process.pid, ws_port, api_port, "bets", seconds, progress),
        ]
    finally:
        process.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 10)
        if process.returncode is None:
            process.kill()
            await process.wait()
    return rows


async def _wait_ready(api_port: int) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"http://127.0.0.1:{api_port}/readyz") as answer:
                    if answer.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError("the server did not become ready in 20 s")


def section(rows: list[Row]) -> list[str]:
    """Section 9 of docs/benchmarks.md, from the rows `run` returned."""
    mine = {r["kind"]: r for r in rows if r.get("scenario") == "conflation"}
    lines = [SECTION, ""]
    if not mine:
        return [
            *lines,
            "Not run: `python -m bench.run --scenarios conflation` (about 45 seconds).",
            "",
        ]
    stats, bets = mine.get("stats"), mine.get("bets")
    any_row = stats or bets
    assert any_row is not None
    lines += [
        f"One igratech-ws process (memory broker, an outbound budget of "
        f"{any_row['budget_bytes'] // 1024} KiB per connection) and one raw WebSocket client "
        f"with a 4 KiB receive buffer that reads {any_row['read_bytes_per_s'] // 1024} KiB/s. "
        f"A game publishes {any_row['rate']} updates a second of about 8 KB each (several "
        "times what the reader takes): first `stats` (state: conflated), then `bet` (stream: "
        "never dropped), each for at most the time shown. *Received* counts what the reader got "
        "by the end (it drains at full speed once the publisher stops, so it includes what "
        "the kernel's socket buffers held: megabytes on loopback); *dropped by conflation* is "
        "the server's `igratech_ws_conflated_frames_total`; one received frame marked "
        "`conflated` may stand for a long chain of replaced ones. The close is the server's "
        "(`igratech_ws_slow_consumer_closes_total`, sampled every 10 publications; the reader "
        "sees it only after draining what the kernel's buffers held before it). Server "
        "memory is its RSS, sampled every 10 publications, with a history of 10 publications "
        "per channel so that it shows the connection rather than the history.",
        "",
    ]
    body = []
    for name, row in (("stats (state)", stats), ("bet (stream)", bets)):
        if row is None:
            continue
        closed = (
            f"1013 after {row['closed_after_s']:.1f} s"
            if row["slow_consumer_closes"] and row["closed_after_s"] is not None
            else "no (still connected)"
            if row["close_code"] is None
            else f"{row['close_code']}"
        )
        body.append(
            [
                name,
                f"{row['seconds']:.1f}",
                f"{row['published']:,}",
                f"{row['received']:,}",
                f"{row['conflated_frames_server']:,}",
                f"{row['conflated_frames_seen']:,}",
                closed,
                f"{row['rss_growth_kb']:,}",
                "yes" if row["last_is_newest"] else ("n/a" if name.startswith("bet") else "no"),
            ]
        )
    lines += [
        "| events | seconds | published | received | dropped by conflation | received marked "
        "conflated | closed as a slow consumer | server RSS growth KiB | last frame is the "
        "newest |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *("| " + " | ".join(cells) + " |" for cells in body),
        "",
    ]
    return lines


def splice(doc: Path, lines: list[str]) -> None:
    """Replace section 9 of `doc` (or insert it before *Reproduce*) with `lines`."""
    text = doc.read_text()
    block = "\n".join(lines)
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + block + ("\n" + text[end + 1 :] if end != -1 else "")
    else:
        marker = "## Reproduce"
        at = text.index(marker) if marker in text else len(text)
        text = text[:at] + block + "\n" + text[at:]
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    seconds = float(args[0]) if args else 20.0
    rows = asyncio.run(run(lambda m: print(m, file=sys.stderr, flush=True), seconds))
    print(json.dumps(rows, indent=1))
    if seconds >= 20.0:  # a short run is a check, not figures for the docs
        splice(ROOT / "docs" / "benchmarks.md", section(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
