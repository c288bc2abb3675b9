"""Recovery replays by clients that never read cost bounded memory (issue 9, item 2).

On main, 30 anonymous clients recovering a public game from offset 0 (1,000 large `bet`
publications in history) and never reading grew the server by ~900 MB: the whole replay was
queued at once, before the write bound was checked. Here the attackers recover a game's whole
history through the handshake `settings` parameter, with a tiny receive window, and stop reading;
the server's resident memory must stay within a small multiple of the outbound budget per
attacker, none of them is closed for it, and one that starts reading again receives every
publication exactly once, in order.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from urllib.parse import quote

from igratech_ws.app import running_app
from igratech_ws.core.publishing import parse_publish_body, validate_publish
from tests.support.gateway import base_config, raw_upgrade, rss_kib

ATTACKERS = 12
PUBLICATIONS = 300
BETS_PER_PUBLICATION = 200  # ~30 KB per publication, as in the issue
BUDGET = 262_144
WAIT_S = 30.0


def _bet_body(game: str, n: int) -> bytes:
    bets = [
        {
            "betId": f"b-{n}-{k}",
            "market": "match_winner",
            "selection": "home",
            "odds": "2.10",
            "stake": "10.00",
            "currency": "EUR",
            "placedAt": "2026-11-23T19:45:00Z",
            "player": "p" * 20,
        }
        for k in range(BETS_PER_PUBLICATION)
    ]
    return json.dumps({"event": "bet", "gameId": game, "data": {"gameId": game, "bets": bets}})


def _read_frames(sock: socket.socket, want: int) -> list[dict[str, object]]:
    """Read server text frames (unmasked, RFC 6455 5.2) until `want` channel pushes arrived."""
    buffer = b""
    frames: list[dict[str, object]] = []
    pushes = 0
    deadline = time.monotonic() + WAIT_S
    while pushes < want:
        assert time.monotonic() < deadline, f"only {pushes} of {want} pushes"
        while True:
            if len(buffer) < 2:
                break
            length, at = buffer[1] & 0x7F, 2
            if length == 126:
                length, at = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                length, at = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < at + length:
                break
            opcode, payload = buffer[0] & 0x0F, buffer[at : at + length]
            buffer = buffer[at + length :]
            assert opcode == 0x1, f"opcode {opcode}: {payload[:80]!r}"
            frame = json.loads(payload)
            frames.append(frame)
            pushes += "channel" in frame
        if pushes >= want:
            break
        chunk = sock.recv(1 << 20)
        assert chunk, "closed by the server"
        buffer += chunk
    return frames


async def test_clients_that_recover_and_never_read_cost_bounded_memory() -> None:
    config = base_config(
        max_write_buffer_bytes=BUDGET,
        history_size=PUBLICATIONS,
        recovery_limit=PUBLICATIONS,
        max_connections_per_ip=ATTACKERS + 5,
        idle_timeout=120,
    )
    async with running_app(config) as app:
        game = "g-flood"
        for n in range(PUBLICATIONS):
            body = _bet_body(game, n).encode()
            publication = (
                await app.node.publish(validate_publish(parse_publish_body(body)))
            ).publication
        size = len(publication.data)
        assert size > 25_000
        # The epoch is in any settings answer: the attacker asks for the whole history.
        query = "?settings=" + quote(
            json.dumps(
                {
                    "games": [game],
                    "recover": {f"game:{game}": {"offset": 0, "epoch": publication.epoch}},
                }
            )
        )
        loop = asyncio.get_running_loop()
        before = rss_kib()
        peak = before
        sockets: list[socket.socket] = []
        try:
            for _ in range(ATTACKERS):
                sock = await loop.run_in_executor(
                    None, lambda: raw_upgrade(app.port, query=query, rcvbuf=4096)
                )
                sockets.append(sock)
                peak = max(peak, rss_kib())
            for _ in range(40):  # the server does what it will with them: 2 s
                await asyncio.sleep(0.05)
                peak = max(peak, rss_kib())
            grown_mb = (peak - before) / 1024
            history_mb = PUBLICATIONS * size / 2**20
            # Main queued every attacker's whole replay: ATTACKERS x history (~100 MB here).
            assert grown_mb < 40, f"server grew {grown_mb:.0f} MB (history {history_mb:.0f} MB)"
            assert app.node.closes.get(1013) is None, app.node.closes
            assert app.node.connection_count == ATTACKERS
            # One of them reads again: everything, once, in order, then the connection is live.
            frames = await loop.run_in_executor(None, _read_frames, sockets[0], PUBLICATIONS)
            assert [f["event"] for f in frames[:2]] == ["connected", "settings"]
            assert [f["offset"] for f in frames if "channel" in f] == list(
                range(1, PUBLICATIONS + 1)
            )
        finally:
            for sock in sockets:
                sock.close()
