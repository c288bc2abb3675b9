"""Real gateway processes (and private brokers) for multi-node end-to-end tests.

Each node is `igratech-ws serve` started with subprocess in its own process group, on port 0 (so
the kernel picks free ports and there is no race between picking and binding); the ports are read
from the node's JSON ``serving`` log line. Every wait is bounded, and `stop` kills the whole group
and reaps it, so a failing test leaves no process behind.

Caller's duties: start processes through `node_group` / `private_broker` (context managers that
always clean up), and give each test its own broker namespace (`BrokerSpace`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.support.gateway import API_KEY, SECRET, token

#: Bound of every wait in these tests: generous, since they assert order and counts, never speed.
WAIT_S = 20.0
SERVE = [str(Path(sys.executable).with_name("igratech-ws")), "serve"]


# --- broker namespaces ---------------------------------------------------------------------------


@dataclass
class BrokerSpace:
    """One test's private namespace on a broker: a key prefix in Redis, a stream in NATS."""

    kind: str  # "redis" or "nats"
    base_url: str
    namespace: str = field(default_factory=lambda: "igwscl" + uuid.uuid4().hex[:10])

    @property
    def prefix(self) -> str:
        return self.namespace + (":" if self.kind == "redis" else "")

    @property
    def url(self) -> str:
        separator = "&" if urlsplit(self.base_url).query else "?"
        return f"{self.base_url}{separator}prefix={self.prefix}"

    async def cleanup(self) -> None:
        """Delete every key (Redis) or the stream (NATS) of this namespace; absent is fine."""
        with contextlib.suppress(Exception):  # a broker that is gone has nothing left to clean
            async with asyncio.timeout(10):
                if self.kind == "redis":
                    await _delete_redis_keys(self.base_url, self.prefix)
                else:
                    await _delete_nats_stream(self.base_url, self.prefix)


async def _delete_redis_keys(url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _delete_nats_stream(url: str, prefix: str) -> None:
    import nats

    from igratech_ws.brokers.nats import stream_name

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
    try:
        with contextlib.suppress(Exception):  # absent stream: nothing to clean
            await nc.jetstream(timeout=3).delete_stream(stream_name(prefix))
    finally:
        await nc.close()


# --- processes -----------------------------------------------------------------------------------


def free_port() -> int:
    """A port free right now on 127.0.0.1 (only for servers that cannot be told to use port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _spawn(
    argv: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new process group (so `stop` reaches its children), stderr to a file."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )


async def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> int | None:
    """Send `sig` to `proc`'s whole group and reap it (SIGKILL after 5 s); its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    try:
        await asyncio.to_thread(proc.wait, 5.0)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 5.0)
    return proc.returncode


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class NodeProcess:
    """One `igratech-ws serve` process; `ws_url` / `api_url` are known once it logged `serving`."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ws_url: str = ""
    api_url: str = ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_lines(self) -> list[dict[str, Any]]:
        """The node's JSON log records so far (non-JSON lines, e.g. a traceback, are skipped)."""
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def describe(self) -> str:
        return f"node {self.name} (exit {self.proc.poll()}), log tail:\n{_tail(self.log_path)}"

    async def wait_serving(self) -> None:
        """Wait for the `serving` log line and take the listeners' URLs from it."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for record in self.log_lines():
                if record.get("msg") == "serving":
                    self.ws_url, self.api_url = record["ws"], record["api"]
                    return
            if not self.alive:
                pytest.fail(f"{self.describe()}\nexited before serving")
            await asyncio.sleep(0.05)
        pytest.fail(f"{self.describe()}\nnot serving after {WAIT_S} s")

    async def get(self, path: str, *, auth: bool = False) -> tuple[int | None, Any]:
        """GET `path` on the internal API: (status, JSON body), or (None, error) if unreachable."""
        headers = {"Authorization": f"Bearer {API_KEY}"} if auth else {}
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
                http.get(self.api_url + path, headers=headers) as answer,
            ):
                return answer.status, await answer.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, repr(exc)

    async def wait_readyz(self, status: int) -> None:
        """Wait until GET /readyz answers `status` (the process must stay alive meanwhile)."""
        deadline = time.monotonic() + WAIT_S
        last: Any = None
        while time.monotonic() < deadline:
            if not self.alive:
                pytest.fail(f"{self.describe()}\ndied while waiting for /readyz {status}")
            got, last = await self.get("/readyz")
            if got == status:
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"{self.describe()}\n/readyz never answered {status}; last: {last}")

    async def post(self, path: str, body: Any, http: aiohttp.ClientSession) -> tuple[int, Any]:
        async with http.post(
            self.api_url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as answer:
            return answer.status, await answer.json(content_type=None)

    async def publish(self, body: dict[str, Any], http: aiohttp.ClientSession) -> tuple[int, Any]:
        return await self.post("/api/v1/publish", body, http)

    def connect(self, user: str | None = None, **query: str) -> Any:
        """A `websockets` client on this node, as `user` (a JWT in `token`) or anonymous."""
        params = dict(query)
        if user is not None:
            params["token"] = token(user)
        url = self.ws_url + ("?" + urlencode(params) if params else "")
        return websockets.connect(url, open_timeout=5, close_timeout=2)


def node_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IGRATECH_WS_")}
    env["IGRATECH_WS_JWT_SECRET"] = SECRET
    env["IGRATECH_WS_API_KEY"] = API_KEY
    return env


@contextlib.asynccontextmanager
async def node_group(
    broker_url: str, names: list[str], log_dir: Path, **settings: str
) -> AsyncIterator[dict[str, NodeProcess]]:
    """Start one node per name on `broker_url`, wait until each serves and is ready; kill all at exit.

    `settings` become ``IGRATECH_WS_<NAME>`` environment variables (e.g. history_size="500").
    """
    env = node_env()
    for key, value in settings.items():
        env["IGRATECH_WS_" + key.upper()] = value
    nodes: dict[str, NodeProcess] = {}
    try:
        for name in names:
            argv = [
                *SERVE,
                "--host", "127.0.0.1", "--port", "0",
                "--api-host", "127.0.0.1", "--api-port", "0",
                "--broker", broker_url,
                "--node-id", name,
            ]  # fmt: skip
            log_path = log_dir / f"node-{name}.log"
            nodes[name] = NodeProcess(name, _spawn(argv, log_path, env), log_path)
        await asyncio.gather(*(node.wait_serving() for node in nodes.values()))
        await asyncio.gather(*(node.wait_readyz(200) for node in nodes.values()))
        yield nodes
    finally:
        await asyncio.gather(*(stop(node.proc) for node in nodes.values()))


# --- private brokers -----------------------------------------------------------------------------


class PrivateBroker:
    """A redis-server or nats-server of this test alone, which the test may stop and restart.

    Redis runs without persistence (a restart loses everything); NATS keeps JetStream in `store`,
    so a restart with the same directory keeps the streams.
    """

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.store = workdir / f"{kind}-store"
        self.store.mkdir(exist_ok=True)
        self.log_path = workdir / f"{kind}-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        if self.kind == "redis":
            return f"redis://127.0.0.1:{self.port}/0"
        return f"nats://127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        if self.kind == "redis":
            return [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(self.store),
            ]  # fmt: skip
        return [
            "nats-server", "-js", "-a", "127.0.0.1", "-p", str(self.port),
            "-sd", str(self.store),
        ]  # fmt: skip

    async def start(self) -> None:
        """Start the server and wait until it accepts TCP connections (and NATS JetStream works)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = _spawn(self._argv(), self.log_path)
        self.starts += 1
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.kind}-server exited: {_tail(self.log_path)}")
            if await self._answers():
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"{self.kind}-server not up after {WAIT_S} s: {_tail(self.log_path)}")

    async def _answers(self) -> bool:
        try:
            if self.kind == "redis":
                from redis.asyncio import Redis

                client = Redis(host="127.0.0.1", port=self.port, socket_timeout=1,
                               socket_connect_timeout=1)  # fmt: skip
                try:
                    return bool(await client.ping())
                finally:
                    await client.aclose()
            import nats

            nc = await nats.connect(
                self.url, connect_timeout=1, max_reconnect_attempts=0, allow_reconnect=False
            )
            try:
                await nc.jetstream(timeout=2).account_info()
                return True
            finally:
                await nc.close()
        except Exception:
            return False

    async def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None:
            await stop(self.proc, sig)


@contextlib.asynccontextmanager
async def private_broker(
    kind: str, workdir: Path, broker_class: type[PrivateBroker] = PrivateBroker
) -> AsyncIterator[PrivateBroker]:
    """A started private broker, stopped at exit; skips (or fails in CI) without the binary."""
    binary = "redis-server" if kind == "redis" else "nats-server"
    if shutil.which(binary) is None:
        reason = f"{binary} is not installed (needed to restart a private broker)"
        if os.environ.get("IGRATECH_WS_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason}, and IGRATECH_WS_REQUIRE_SERVICES=1 requires it")
        pytest.skip(reason)
    broker = broker_class(kind, workdir)
    try:
        await broker.start()
        yield broker
    finally:
        await broker.stop()


# --- a private broker that is quick to come back ------------------------------------------------


class QuickBroker(PrivateBroker):
    """`PrivateBroker` whose readiness probe first waits for the TCP port: nats-py's connect to a
    port that is not listening yet waits its 2 s reconnect delay before trying again, which would
    add 2 s to every restart (nothing is asserted about that time; it only makes the file slow)."""

    async def _answers(self) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return await super()._answers()


def quick_broker(kind: str, workdir: Path) -> contextlib.AbstractAsyncContextManager[PrivateBroker]:
    """`private_broker` with a `QuickBroker` (skips without the binary, fails in CI); the broker is
    killed at exit."""
    return private_broker(kind, workdir, QuickBroker)


# --- clients -------------------------------------------------------------------------------------


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def offsets_by_epoch(frames: list[dict[str, Any]]) -> list[tuple[str, list[int]]]:
    """Group consecutive frames by epoch: [(epoch, [offsets...]), ...] in arrival order."""
    groups: list[tuple[str, list[int]]] = []
    for frame in frames:
        if not groups or groups[-1][0] != frame["epoch"]:
            groups.append((frame["epoch"], []))
        groups[-1][1].append(frame["offset"])
    return groups


# --- a client that follows channels across reconnects --------------------------------------------


@dataclass
class ChannelLog:
    """What one client saw on one channel: ("push", offset, epoch, marker) and
    ("start", offset, epoch, recovered) entries, in arrival order."""

    entries: list[tuple[Any, ...]] = field(default_factory=list)

    @property
    def position(self) -> tuple[int, str] | None:
        """The last (offset, epoch) the client holds: what it resumes from."""
        for entry in reversed(self.entries):
            if entry[0] == "push" or entry[3] is not True:
                return entry[1], entry[2]
        return None

    def pushes(self) -> list[tuple[int, str, str]]:
        return [(e[1], e[2], e[3]) for e in self.entries if e[0] == "push"]


@dataclass
class Verdict:
    """The result of walking a `ChannelLog` with the protocol's rules."""

    problems: list[str]
    resets: int  # `recovered: false` answers, or re-joins without recovery
    epoch_switches: int  # pushes whose epoch differs from the one held
    recovered: int  # `recovered: true` answers


def check_log(log: ChannelLog) -> Verdict:
    """Apply the client rules of docs/protocol.md to what a client saw on one channel.

    Within one epoch each push must be the next offset after the position held (no gap, no
    duplicate, no reordering); `recovered: true` must keep the epoch held; no (offset, epoch) may
    arrive twice, even across reconnects.
    """
    problems: list[str] = []
    resets = switches = recovered = 0
    position: tuple[int, str] | None = None
    seen: set[tuple[int, str]] = set()
    for entry in log.entries:
        kind, offset, epoch = entry[0], entry[1], entry[2]
        if kind == "start":
            if entry[3] is True:
                recovered += 1
                if position is None or position[1] != epoch:
                    problems.append(f"recovered: true from {position} into epoch {epoch}")
                continue
            if position is not None and position != (offset, epoch):
                resets += 1
            position = (offset, epoch)
            continue
        if (offset, epoch) in seen:
            problems.append(f"duplicate push {offset}@{epoch}")
        seen.add((offset, epoch))
        if position is not None:
            if epoch != position[1] and position[0] == 0:
                # Offset 0 has seen nothing: a stream's first epoch is new to it (D1).
                if offset != 1:
                    problems.append(f"push {offset}@{epoch} after offset 0: not the first")
            elif epoch != position[1]:
                switches += 1
            elif offset != position[0] + 1:
                problems.append(f"push {offset}@{epoch} after {position[0]}: not the next offset")
        position = (offset, epoch)
    return Verdict(problems, resets, switches, recovered)


def _marker(frame: dict[str, Any]) -> str:
    data = frame["data"]
    return str(data.get("incidentId") or data.get("balance") or "")


class Follower:
    """A client following its user channel and `games`, resuming after every disconnect.

    `run(nodes)` connects to the first node of `nodes` that accepts, and after each disconnect to
    the next one (what a load balancer does when a node is gone), resuming every channel it holds
    a position on: games through a settings message, its user channel through the handshake
    `settings` query parameter. It stops once `targets` (channel -> (offset, epoch)) are reached.
    """

    def __init__(self, name: str, user: str | None = None, games: tuple[str, ...] = ()) -> None:
        self.name = name
        self.user = user
        self.games = games
        self.logs: dict[str, ChannelLog] = {}
        self.closes: list[int | None] = []
        self.sessions: list[str] = []  # node names, one per session
        self.targets: dict[str, tuple[int, str]] | None = None
        self.live = asyncio.Event()  # set once the first session follows everything
        self._asked: list[set[str]] = []  # channels each settings request (in order) recovers/adds

    def channel_log(self, channel: str) -> ChannelLog:
        return self.logs.setdefault(channel, ChannelLog())

    def count(self, channel: str) -> int:
        return len(self.channel_log(channel).pushes())

    @property
    def done(self) -> bool:
        if self.targets is None:
            return False
        for channel, (offset, epoch) in self.targets.items():
            position = self.channel_log(channel).position
            if position is None or position[1] != epoch or position[0] < offset:
                return False
        return True

    async def run(self, nodes: list[NodeProcess], timeout: float = WAIT_S * 2) -> None:
        """Follow until `done`; fail after `timeout` seconds. Never raises for a lost connection."""
        index = 0
        try:
            async with asyncio.timeout(timeout):
                while not self.done:
                    node = nodes[index % len(nodes)]
                    index += 1
                    try:
                        await self._session(node)
                    except (OSError, websockets.InvalidHandshake, TimeoutError):
                        await asyncio.sleep(0.1)  # node down or not accepting: try the next one
        except TimeoutError:
            positions = {channel: log.position for channel, log in self.logs.items()}
            pytest.fail(
                f"follower {self.name} did not reach {self.targets} in {timeout} s; "
                f"positions {positions}, "
                f"closes {self.closes}, sessions {self.sessions}"
            )

    async def _session(self, node: NodeProcess) -> None:
        query: dict[str, str] = {}
        user_channel = f"user:{self.user}"
        self._asked = []
        if self.user is not None:
            held = self.channel_log(user_channel).position
            if held is not None:
                recover = {user_channel: {"offset": held[0], "epoch": held[1]}}
                query["settings"] = json.dumps({"recover": recover})
                self._asked.append({user_channel})
        async with node.connect(self.user, **query) as ws:
            self.sessions.append(node.name)
            try:
                await self._follow(ws)
            except websockets.ConnectionClosed as exc:
                self.closes.append(exc.rcvd.code if exc.rcvd is not None else None)

    async def _follow(self, ws: ClientConnection) -> None:
        from tests.support.gateway import recv, send

        first = await recv(ws, 10)
        assert first["event"] == "connected", first
        if self.games:
            data: dict[str, Any] = {"games": list(self.games)}
            recover = {}
            for game in self.games:
                held = self.channel_log(f"game:{game}").position
                if held is not None:
                    recover[f"game:{game}"] = {"offset": held[0], "epoch": held[1]}
            if recover:
                data["recover"] = recover
            await send(ws, "settings", data)
            self._asked.append({f"game:{game}" for game in self.games})
        elif not self._asked:
            self.live.set()
        while not self.done:
            try:
                frame = await recv(ws, 0.5)
            except TimeoutError:
                continue
            self._note(frame)
        await ws.close()

    def _note(self, frame: dict[str, Any]) -> None:
        event = frame["event"]
        if "channel" in frame:
            self.channel_log(frame["channel"]).entries.append(
                ("push", frame["offset"], frame["epoch"], _marker(frame))
            )
        elif event == "settings":
            asked = self._asked.pop(0) if self._asked else set()
            for state in frame["data"]["channels"]:
                if state["channel"] in asked:
                    self.channel_log(state["channel"]).entries.append(
                        ("start", state["offset"], state["epoch"], state.get("recovered"))
                    )
            if not self._asked:
                self.live.set()
        elif event == "error":
            pytest.fail(f"follower {self.name} got an error: {frame}")


# --- a publisher that keeps publishing -----------------------------------------------------------


@dataclass
class Accepted:
    channel: str
    offset: int
    epoch: str
    marker: str


class Publisher:
    """Publishes `bodies()` through one node's API, one at a time, until `stop` is set.

    Records every accepted publication (200) and counts 503 `broker_unavailable` refusals; any
    other answer is a failure the test reports.
    """

    def __init__(self, node: NodeProcess, make_body: Callable[[int], dict[str, Any]]) -> None:
        self.node = node
        self.make_body = make_body
        self.accepted: list[Accepted] = []
        self.refused = 0
        self.unexpected: list[Any] = []
        self.stop = asyncio.Event()
        self.sent = 0

    def last(self, channel: str) -> tuple[int, str] | None:
        for item in reversed(self.accepted):
            if item.channel == channel:
                return item.offset, item.epoch
        return None

    def accepted_on(self, channel: str) -> list[Accepted]:
        return [a for a in self.accepted if a.channel == channel]

    async def run(self, *, limit: int = 2000, pause: float = 0.01) -> None:
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not self.stop.is_set() and self.sent < limit:
                self.sent += 1
                body = self.make_body(self.sent)
                try:
                    status, answer = await self.node.publish(body, http)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.unexpected.append(repr(exc))
                    return
                if status == 200:
                    data = body["data"]
                    marker = str(data.get("incidentId") or data.get("balance"))
                    self.accepted.append(
                        Accepted(answer["channel"], answer["offset"], answer["epoch"], marker)
                    )
                elif status == 503 and answer.get("error", {}).get("code") == "broker_unavailable":
                    self.refused += 1
                    await asyncio.sleep(0.05)
                else:
                    self.unexpected.append((status, answer))
                    return
                await asyncio.sleep(pause)
