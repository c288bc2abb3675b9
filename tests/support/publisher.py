"""A TCP proxy for the publisher's retry tests: it loses the answers of the first connections."""

from __future__ import annotations

import asyncio
import contextlib


class BlackHoleOnce:
    """A TCP proxy to the API that forwards requests but swallows the answers of its first
    `swallow` connections: the client times out although the gateway did publish."""

    def __init__(self, target_port: int, swallow: int = 1) -> None:
        self.target_port = target_port
        self.swallow = swallow
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        swallow = self.connections <= self.swallow
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, drop: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if not drop:
                        dst.write(data)
                        await dst.drain()
            dst.close()

        down = asyncio.ensure_future(pipe(up_reader, writer, swallow))
        self.tasks.add(down)
        await pipe(reader, up_writer, False)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(down, 5)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in self.tasks:
            task.cancel()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if self.server is not None:
            await self.server.wait_closed()
