"""SIGTERM drains: clients get every publication acknowledged before it, then close 1012; no new
client gets in; the process exits 0 within a bound.

The server is a real `igratech-ws serve` subprocess on free ports (ports 0 are not printed).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.gateway import API_KEY, incident

CLIENTS = 20
BURST = 300
EXIT_BOUND_S = 10.0
WAIT_S = 10.0  # bound of every wait; nothing here asserts on speed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(port: int, api_port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`igratech-ws serve` on 127.0.0.1 (stderr piped: the caller reads and closes it)."""
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
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def _wait_ready(api_url: str, server: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as http, asyncio.timeout(15):
        while True:
            assert server.poll() is None, "the server exited during start-up"
            try:
                async with http.get(api_url + "/readyz") as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


async def _read_until_close(ws: websockets.ClientConnection) -> tuple[list[int], int | None]:
    """Offsets of the pushes received, then the close code (None: no close frame came)."""
    offsets: list[int] = []
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                frame = json.loads(await ws.recv())
                if frame["event"] == "incident":
                    offsets.append(frame["offset"])
    except ConnectionClosed as closed:
        return offsets, closed.rcvd.code if closed.rcvd is not None else None
    raise AssertionError("unreachable")


async def _try_handshake(url: str) -> str:
    try:
        async with websockets.connect(url, open_timeout=2) as ws:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 2))
            return "accepted" if frame["event"] == "connected" else "closed"
    except InvalidStatus as refused:
        return f"http {refused.response.status_code}"
    except (OSError, ConnectionClosed, TimeoutError, websockets.InvalidHandshake):
        return "refused"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
async def test_sigterm_delivers_what_was_acknowledged_then_closes_1012_and_exits_0() -> None:
    port, api_port = free_port(), free_port()
    env = dict(os.environ, IGRATECH_WS_API_KEY=API_KEY, IGRATECH_WS_MAX_MESSAGE_RATE="1000")
    server = start_server(port, api_port, env)
    ws_url = f"ws://127.0.0.1:{port}/wspublic"
    api_url = f"http://127.0.0.1:{api_port}"
    try:
        await _wait_ready(api_url, server)
        clients = [await websockets.connect(ws_url, open_timeout=5) for _ in range(CLIENTS)]
        for ws in clients:
            assert json.loads(await ws.recv())["event"] == "connected"
            await ws.send(json.dumps({"event": "settings", "data": {"games": ["g-1"]}}))
            assert json.loads(await ws.recv())["event"] == "settings"
        readers = [asyncio.ensure_future(_read_until_close(ws)) for ws in clients]

        acknowledged: list[int] = []
        async with aiohttp.ClientSession() as http:

            async def post(n: int) -> None:
                async with http.post(
                    api_url + "/api/v1/publish",
                    json=incident("g-1", n),
                    headers={"Authorization": f"Bearer {API_KEY}"},
                ) as answer:
                    if answer.status == 200:
                        acknowledged.append((await answer.json())["offset"])

            # A burst in flight at once, SIGTERM as soon as it is all answered.
            await asyncio.gather(*(post(n) for n in range(BURST)))
        assert sorted(acknowledged) == list(range(1, BURST + 1))
        server.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()

        # A handshake racing the signal itself may still get in (and be drained with the rest);
        # from the first 1012 on, the node is draining and must refuse everybody.
        await asyncio.wait(readers, timeout=WAIT_S, return_when=asyncio.FIRST_COMPLETED)
        attempts: list[str] = []
        while server.poll() is None and time.monotonic() - sent_at < EXIT_BOUND_S:
            attempts.append(await _try_handshake(ws_url))
        results = await asyncio.gather(*readers)
        exit_code = await asyncio.get_running_loop().run_in_executor(
            None, lambda: server.wait(timeout=EXIT_BOUND_S)
        )
        for ws in clients:
            await ws.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        assert server.stderr is not None
        stderr = server.stderr.read().decode(errors="replace")
        server.stderr.close()

    assert exit_code == 0, stderr[-2000:]
    assert "accepted" not in attempts, attempts
    expected = list(range(1, BURST + 1))
    assert [offsets == expected for offsets, _ in results] == [True] * CLIENTS
    assert [code for _, code in results] == [1012] * CLIENTS
    assert "Traceback" not in stderr, stderr[-2000:]
