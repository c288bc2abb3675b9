"""A client that stops reading is cut off (1013) without costing the others a message or the server
its memory.

The stuck client is a raw socket with a small receive buffer: it does the handshake by hand, follows
two games through the handshake `settings` parameter, and never reads again. A thousand picows
clients in this process follow one of those games and read everything. The publisher floods the
game only the stuck client follows (in batches), while the shared game gets a steady stream.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import quote

import aiohttp
import picows

from igratech_ws.app import App
from tests.support.gateway import API_KEY, incident, raw_upgrade, rss_kib

MakeGateway = Callable[..., AbstractAsyncContextManager[App]]

READERS = 1000
SHARED_MESSAGES = 200
WAIT_S = 30.0  # bound of every wait; the test never asserts on speed


def stuck_client(app: App, games: list[str]) -> socket.socket:
    """A raw socket following `games`, with a small receive window; the caller never reads it."""
    return raw_upgrade(
        app.port, query="?settings=" + quote(json.dumps({"games": games})), rcvbuf=4096
    )


class Reader(picows.WSListener):
    """Records the offsets of `game:g-shared` publications and tells when it has them all."""

    def __init__(self, done: Callable[[], None]) -> None:
        self.offsets: list[int] = []
        self.ready = False
        self.closed_code: int | None = None
        self._done = done
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type is not picows.WSMsgType.TEXT:
            return
        message: dict[str, Any] = json.loads(frame.get_payload_as_bytes())
        if message["event"] == "settings" and not self._ready.done():
            self._ready.set_result(None)
        elif message.get("channel") == "game:g-shared":
            self.offsets.append(message["offset"])
            if len(self.offsets) == SHARED_MESSAGES:
                self._done()

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        if not self._ready.done():
            self._ready.set_exception(ConnectionError("closed before its settings answer"))

    async def wait_ready(self) -> None:
        await self._ready


async def _post(http: aiohttp.ClientSession, app: App, items: list[dict[str, Any]]) -> None:
    async with http.post(
        app.api_url + "/api/v1/publish/batch",
        json={"items": items},
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as answer:
        assert answer.status == 200, await answer.text()


async def test_a_stuck_reader_is_closed_1013_and_nobody_else_loses_a_message(
    make_gateway: MakeGateway,
) -> None:
    async with make_gateway(
        max_write_buffer_bytes=65_536,
        max_connections_per_ip=READERS + 10,
        max_batch_items=1000,
        idle_timeout=120,
    ) as app:
        loop = asyncio.get_running_loop()
        stuck = await loop.run_in_executor(None, stuck_client, app, ["g-shared", "g-flood"])
        finished = 0
        all_done: asyncio.Future[None] = loop.create_future()

        def one_done() -> None:
            nonlocal finished
            finished += 1
            if finished == READERS and not all_done.done():
                all_done.set_result(None)

        url = app.ws_url + "?settings=" + quote(json.dumps({"games": ["g-shared"]}))
        transports: list[picows.WSTransport] = []
        readers: list[Reader] = []
        try:
            for start in range(0, READERS, 100):
                pairs = await asyncio.gather(
                    *(
                        picows.ws_connect(lambda: Reader(one_done), url)
                        for _ in range(start, min(start + 100, READERS))
                    )
                )
                for transport, reader in pairs:
                    assert isinstance(reader, Reader)
                    transports.append(transport)
                    readers.append(reader)
            async with asyncio.timeout(WAIT_S):
                await asyncio.gather(*(reader.wait_ready() for reader in readers))
                for _ in range(int(WAIT_S * 100)):
                    if app.node.hub.subscriber_count("game:g-flood"):
                        break
                    await asyncio.sleep(0.01)
            assert app.node.hub.subscriber_count("game:g-shared") == READERS + 1
            rss_before = rss_kib()

            flood_sent = 0
            async with aiohttp.ClientSession() as http, asyncio.timeout(WAIT_S):
                shared = 0
                # Bounded: 200 rounds of 500 flood publications is ~25 MB for the stuck client,
                # far beyond what the kernel's socket buffers and the 64 KB bound can hold.
                for _round in range(200):
                    if shared < SHARED_MESSAGES:
                        await _post(http, app, [incident("g-shared", k) for k in range(10)])
                        shared += 10
                    if app.node.closes.get(1013):
                        if shared >= SHARED_MESSAGES:
                            break
                        continue
                    await _post(http, app, [incident("g-flood", k) for k in range(500)])
                    flood_sent += 500
                await all_done
            rss_after = rss_kib()
        finally:
            for transport in transports:
                transport.disconnect()
            stuck.close()

        assert app.node.closes.get(1013) == 1, app.node.closes
        assert app.node.hub.subscriber_count("game:g-flood") == 0
        # The flood the stuck client could not take was several megabytes; the server held at
        # most its write bound of it (the bound on growth is generous: a thousand readers live in
        # this process too).
        assert flood_sent * 250 > 10 * 65_536
        assert rss_after - rss_before < 100 * 1024, (rss_before, rss_after)
        expected = list(range(1, SHARED_MESSAGES + 1))
        wrong = [i for i, reader in enumerate(readers) if reader.offsets != expected]
        assert wrong == []
