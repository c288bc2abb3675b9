"""The two SDKs behind one interface, so that one scenario table runs against both.

`PythonDriver` runs ``igratech_ws.client`` in this event loop; `JsDriver` runs the JavaScript
client under Node with the `ws` package (``js_driver.mjs``), commanded over stdin. Both record the
client's events as the same plain records, in arrival order:

- ``{"kind": "connected", "userId": ...}``, ``{"kind": "settings", "channels": [...]}``
- ``{"kind": "push", "event", "channel", "offset", "epoch", "snapshot"}``
- ``{"kind": "gap", "channel", "reason"}`` (the JS client's ``gap``; the Python SDK's
  ``recovery-failed``, one record per channel)
- ``{"kind": "logout", "reason", "code"}``, ``{"kind": "error", "code"}``
- ``{"kind": "disconnected", "code", "reconnect"}`` (every connection or attempt that ended)
- ``{"kind": "ended"}``: the client stopped for good (no more reconnects).

Caller's duties: `start` once, `stop` always (the fixture does), and bound every wait
(`wait_for` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from igratech_ws.client import Backoff, Client, HandshakeRejected, ReconnectFailed
from igratech_ws.client.events import Disconnected, RecoveryFailed
from igratech_ws.core.messages import Settings
from tests.support.nodejs import CLIENT_MODULE, node, node_env

Record = dict[str, Any]
#: Bound of every wait of a scenario (they assert what arrives, never how fast).
WAIT_S = 15.0


class Driver:
    """What a scenario may do with a client; `events` is what the client reported so far."""

    name = "?"

    def __init__(self) -> None:
        self.events: list[Record] = []

    async def start(
        self, url: str, token: str | None, games: tuple[str, ...] = (), stats: bool = False
    ) -> None:
        raise NotImplementedError

    async def follow(self, *games: str) -> None:
        raise NotImplementedError

    async def set_token(self, token: str | None) -> None:
        raise NotImplementedError

    async def reconnect(self) -> None:
        raise NotImplementedError

    async def inject(self, channel: str, offset: int, epoch: str) -> None:
        """Make the client hold a position it never received (a stale or foreign one)."""
        raise NotImplementedError

    async def state(self, channel: str) -> dict[str, Any]:
        """The client's current state of `channel` (event -> payload as JSON)."""
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    # --- reading what the client saw -------------------------------------------------------

    def of(self, kind: str, **match: Any) -> list[Record]:
        return [
            e
            for e in self.events
            if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())
        ]

    def offsets(self, channel: str) -> list[int]:
        """Offsets of the pushes received on `channel` (snapshots left out), in order."""
        return [e["offset"] for e in self.of("push", channel=channel) if not e["snapshot"]]

    async def wait_for(self, predicate: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: timed out waiting for {what}; events: {self.events}")
            await asyncio.sleep(0.01)

    async def wait_count(self, kind: str, count: int, **match: Any) -> None:
        await self.wait_for(lambda: len(self.of(kind, **match)) >= count, f"{count} x {kind}")


class PythonDriver(Driver):
    name = "python"

    def __init__(self) -> None:
        super().__init__()
        self.client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(
        self, url: str, token: str | None, games: tuple[str, ...] = (), stats: bool = False
    ) -> None:
        backoff = Backoff(initial=0.1, maximum=0.5, max_elapsed=60, rng=random.Random(7))
        self.client = Client(
            url, token, games=games, stats=stats, backoff=backoff, connect_timeout=3
        )
        await self.client.start()
        self._task = asyncio.create_task(self._consume(self.client))

    async def _consume(self, client: Client) -> None:
        try:
            async for event in client:
                self._note(event.event, event.data, event)
        except (HandshakeRejected, ReconnectFailed) as exc:
            self.events.append({"kind": "failed", "error": str(exc)})
        self.events.append({"kind": "ended"})

    def _note(self, name: str, data: Any, event: Any) -> None:
        if name == "connected":
            self.events.append({"kind": "connected", "userId": getattr(data, "userId", None)})
        elif name == "settings" and isinstance(data, Settings):
            self.events.append({"kind": "settings", "channels": [c.channel for c in data.channels]})
        elif event.channel is not None and event.offset is not None:
            self.events.append(
                {
                    "kind": "push",
                    "event": name,
                    "channel": event.channel,
                    "offset": event.offset,
                    "epoch": event.epoch,
                    "snapshot": event.snapshot,
                }
            )
        elif isinstance(data, RecoveryFailed):
            for channel in data.channels:
                self.events.append({"kind": "gap", "channel": channel, "reason": data.reason})
        elif name == "logout":
            self.events.append({"kind": "logout", "reason": data.reason, "code": data.code})
        elif name == "error":
            self.events.append({"kind": "error", "code": getattr(data, "code", None)})
        elif isinstance(data, Disconnected):
            self.events.append(
                {"kind": "disconnected", "code": data.code, "reconnect": data.reconnect}
            )

    async def follow(self, *games: str) -> None:
        assert self.client is not None
        await self.client.follow(*games)

    async def set_token(self, token: str | None) -> None:
        assert self.client is not None
        self.client.set_token(token)

    async def reconnect(self) -> None:
        assert self.client is not None
        self.client.reconnect()

    async def inject(self, channel: str, offset: int, epoch: str) -> None:
        assert self.client is not None
        self.client.positions[channel] = (offset, epoch)

    async def state(self, channel: str) -> dict[str, Any]:
        import msgspec

        assert self.client is not None
        state: dict[str, Any] = msgspec.to_builtins(self.client.state(channel))
        return state

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                async with asyncio.timeout(5):
                    await self._task


class JsDriver(Driver):
    name = "js"

    def __init__(self) -> None:
        super().__init__()
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stderr = b""
        self._replies: asyncio.Queue[Record] = asyncio.Queue()

    async def _spawn(self) -> None:
        env = node_env(IGRATECH_WS_CLIENT_MODULE=str(CLIENT_MODULE))
        script = str(Path(__file__).with_name("js_driver.mjs"))
        self.proc = await asyncio.create_subprocess_exec(
            node(),
            script,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            record: Record = json.loads(line)
            if record["kind"] in ("ack", "failure"):
                await self._replies.put(record)
            else:
                self.events.append(record)

    async def _command(self, cmd: str, **args: Any) -> Record:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        try:
            async with asyncio.timeout(WAIT_S):
                reply = await self._replies.get()  # one reply per command, in order
        except TimeoutError:
            pytest.fail(f"js driver: no answer to {cmd}; events: {self.events}")
        if reply["kind"] == "failure":
            pytest.fail(f"js driver: {cmd} failed: {reply['error']}")
        return reply

    async def start(
        self, url: str, token: str | None, games: tuple[str, ...] = (), stats: bool = False
    ) -> None:
        await self._spawn()
        await self._command("start", url=url, token=token, games=list(games), stats=stats)

    async def follow(self, *games: str) -> None:
        """Follow and wait for the answer (as the Python SDK's helper does)."""
        before = len(self.of("settings"))
        await self._command("follow", games=list(games))
        wanted = {"game:" + g for g in games}
        await self.wait_for(
            lambda: any(wanted <= set(e["channels"]) for e in self.of("settings")[before:]),
            f"the answer to follow {games}",
        )

    async def set_token(self, token: str | None) -> None:
        await self._command("set_token", token=token)

    async def reconnect(self) -> None:
        await self._command("reconnect")

    async def inject(self, channel: str, offset: int, epoch: str) -> None:
        await self._command("inject", channel=channel, offset=offset, epoch=epoch)

    async def state(self, channel: str) -> dict[str, Any]:
        state: dict[str, Any] = (await self._command("state", channel=channel))["state"]
        return state

    async def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None and proc.stdin is not None:
            with contextlib.suppress(ConnectionError, OSError):
                proc.stdin.write(b'{"cmd": "close"}\n')
                await proc.stdin.drain()
                proc.stdin.close()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._reader
        if proc.stderr is not None:
            self._stderr = await proc.stderr.read()
        if self._stderr.strip():
            # the client logs a failing handler with console.error: a scenario must see none
            pytest.fail(f"js driver wrote to stderr:\n{self._stderr.decode(errors='replace')}")
