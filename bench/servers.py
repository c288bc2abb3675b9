"""The servers under test: how to start each one on 127.0.0.1, publish to it, and measure it.

Every server runs in its own process group pinned to the server CPU (``taskset``), except the
multi-worker igratech-ws of the ``workers`` scenario, which is not pinned; `Server.stop` kills the
group (the workers too). Publishers are the bench's side of each server's publish path: igratech-ws and
soketi take HTTP requests, the others a publisher WebSocket connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import picows
from picows import WSListener, WSMsgType, WSTransport

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PEER_SCRIPTS = BENCH / "peer_servers"
PEERS = BENCH / "peers"
NODE_MODULES = PEERS / "node_modules"
RESULTS = BENCH / "results"

API_KEY = "bench-api-key"
JWT_SECRET = "bench-jwt-secret-0123456789abcdef0123456789"
SOKETI_APP = ("app-id", "app-key", "app-secret")


@dataclass(frozen=True)
class Kind:
    """A server under test."""

    name: str
    label: str
    proto: str  # the load client's protocol: ours, plain, sio, pusher
    needs_node: bool = False


OURS = Kind("igratech-ws", "igratech-ws", "ours")
PICOWS = Kind("picows-coalesce", "picows broadcaster (coalescing; the limit)", "plain")
NODE_WS = Kind("node-ws", "Node ws", "plain", needs_node=True)
NODE_SIO = Kind("node-socketio", "Node socket.io", "sio", needs_node=True)
SOKETI = Kind("soketi", "soketi", "pusher", needs_node=True)
PY_SIO = Kind("python-socketio", "python-socketio", "sio")
ALL_KINDS = (OURS, PICOWS, NODE_WS, NODE_SIO, SOKETI, PY_SIO)
KINDS = {k.name: k for k in ALL_KINDS}


def missing_reason(kind: Kind) -> str | None:
    """Why `kind` cannot run here (a sentence for the report), or None when it can."""
    if kind.needs_node:
        if shutil.which("node") is None:
            return "node is not installed"
        wanted = {
            NODE_WS.name: "ws",
            NODE_SIO.name: "socket.io",
            SOKETI.name: "@soketi/soketi",
        }[kind.name]
        if not (NODE_MODULES / wanted).is_dir():
            return f"npm package {wanted} is not installed in bench/peers (run `make bench-peers`)"
        if kind is SOKETI and not (NODE_MODULES / "uWebSockets.js").is_dir():
            return "uWebSockets.js is missing in bench/peers (run `make bench-peers`)"
    if kind is PY_SIO:
        try:
            import socketio  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: F401
        except ImportError:
            return "python-socketio is not installed (run `make bench-peers`)"
    return None


class Ports:
    """Fresh ports for each server run, so that no run meets another's TIME_WAIT sockets."""

    def __init__(self, start: int = 19100) -> None:
        self.start = start
        self.next = start

    def take(self) -> int:
        while True:
            port = self.next
            self.next += 1
            if self.next > self.start + 9900:  # wrap within this run's own range
                self.next = self.start
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


def cpu_ns(pid: int) -> int:
    """CPU time used by every live thread of `pid`, in ns (scheduler accounting)."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError), open(path) as handle:
            total += int(handle.read().split()[0])
    return total


def stat_ticks(pid: int) -> int:
    """utime + stime of `pid` from /proc/<pid>/stat, in clock ticks."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


# Process groups this process started and has not killed yet: `kill_leftovers` ends them on exit.
LIVE_GROUPS: set[int] = set()


def kill_leftovers() -> None:
    """SIGKILL every process group still registered (servers, load workers)."""
    for pgid in list(LIVE_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        LIVE_GROUPS.discard(pgid)


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    """The direct children of `pid` (every thread's ``children`` list), [] once it is gone."""
    found: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError, ValueError), open(path) as handle:
            found.extend(int(p) for p in handle.read().split())
    return sorted(set(found))


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (bounded: a tree of more than 256 processes is cut)."""
    tree = [pid]
    index = 0
    while index < len(tree) and len(tree) < 256:
        tree.extend(c for c in children(tree[index]) if c not in tree)
        index += 1
    return tree


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets `pid` holds open (its fds that link to ``socket:[N]``)."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{name}")
                if link.startswith("socket:["):
                    found.add(int(link[8:-1]))
    return found


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets listening on `port` (IPv4 and IPv6) in this network namespace."""
    found: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            next(handle, None)
            for line in handle:
                fields = line.split()
                # local address "ADDR:PORT" in hex; state 0A = LISTEN; inode is field 9.
                listening = len(fields) > 9 and fields[3] == "0A"
                if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    found.add(int(fields[9]))
    return found


def find_redis_pid(port: int = 6379) -> int | None:
    """The pid of the local redis-server listening on `port`, or None (not ours to control: it
    is only read, for its CPU time)."""
    wanted = listening_inodes(port)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as handle:
                if not handle.read().startswith("redis-server"):
                    continue
        except OSError:
            continue
        if not wanted or socket_inodes(int(entry)) & wanted:
            return int(entry)
    return None


def redis_clean(url: str, prefix: str) -> int:
    """Delete every key of `url`'s database that starts with `prefix`; how many were deleted.
    The caller's duty: pass a prefix no one else uses (the bench draws a random one)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=prefix + "*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(client.unlink(*batch))
    finally:
        client.close()
    return deleted


class TreeCpu:
    """CPU time of a fixed set of processes over a window (scheduler ns), each one separately."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.ns0 = [cpu_ns(p) for p in self.pids]

    def read(self) -> list[float]:
        """Seconds each process ran since construction (0 for one that is gone)."""
        return [max(0, cpu_ns(p) - n0) / 1e9 for p, n0 in zip(self.pids, self.ns0, strict=True)]


class CpuMeter:
    """Server CPU over a window: scheduler ns (fine-grained) and /proc stat ticks (coarse)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.ns0 = cpu_ns(pid)
        self.ticks0 = stat_ticks(pid)

    def read(self) -> tuple[float, float]:
        """(seconds by schedstat, seconds by stat utime+stime) since construction."""
        ns = cpu_ns(self.pid) - self.ns0
        ticks = stat_ticks(self.pid) - self.ticks0
        return ns / 1e9, ticks / CLK_TCK


class Server:
    """One running server process (its own process group, pinned to `cpu` unless None).

    `workers` and `broker` apply to igratech-ws only: ``serve --workers N --broker URL``; with
    ``workers > 1`` the parent spawns the worker processes and `start` returns once every one of
    them listens on both ports.
    """

    def __init__(
        self,
        kind: Kind,
        port: int,
        api_port: int,
        cpu: int | None,
        log_dir: Path,
        *,
        workers: int = 0,
        broker: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self.port = port
        self.api_port = api_port
        self.cpu = cpu
        self.workers = workers
        self.broker = broker
        self.extra_env = dict(extra_env or {})
        self.log_path = log_dir / f"{kind.name}-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        port = str(self.port)
        kind = self.kind
        if kind is OURS:
            exe = str(Path(sys.executable).parent / "igratech-ws")
            cmd = [
                exe,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                port,
                "--api-port",
                str(self.api_port),
                "--log-level",
                "warning",
            ]
            if self.workers:
                cmd += ["--workers", str(self.workers)]
            if self.broker:
                cmd += ["--broker", self.broker]
            return cmd
        if kind is PICOWS:
            return [sys.executable, str(PEER_SCRIPTS / "picows_broadcaster.py"), port]
        if kind is PY_SIO:
            return [sys.executable, str(PEER_SCRIPTS / "pysio_server.py"), port]
        if kind is NODE_WS:
            return ["node", str(PEER_SCRIPTS / "ws_server.js"), port]
        if kind is NODE_SIO:
            return ["node", str(PEER_SCRIPTS / "sio_server.js"), port]
        if kind is SOKETI:
            return [
                "node",
                str(NODE_MODULES / "@soketi/soketi/bin/server.js"),
                "start",
                f"--config={PEER_SCRIPTS / 'soketi.json'}",
            ]
        raise ValueError(kind.name)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "IGRATECH_WS_API_KEY": API_KEY,
                "IGRATECH_WS_JWT_SECRET": JWT_SECRET,
                # Every bench client comes from 127.0.0.1: lift the per-address cap.
                "IGRATECH_WS_MAX_CONNECTIONS_PER_IP": "1000000",
                "IGRATECH_WS_MAX_CONNECTIONS": "1000000",
                "NODE_PATH": str(NODE_MODULES),
                "NODE_ENV": "production",
                "SOKETI_PORT": str(self.port),
                "SOKETI_METRICS_SERVER_PORT": str(self.api_port),
                "SOKETI_CLUSTER_PORT": str(self.api_port + 1),
            }
        )
        env.update(self.extra_env)
        return env

    async def start(self, limit: float = 30.0) -> None:
        """Start the process and return once its ports accept connections (or raise)."""
        self._spawn()
        deadline = time.monotonic() + limit
        ports = [self.port] + ([self.api_port] if self.kind is OURS else [])
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind.name} exited: {self.tail()}")
            if all(_port_open(p) for p in ports) and self._workers_listening(ports):
                await asyncio.sleep(0.3 if self.kind.needs_node else 0.1)
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.kind.name} did not listen within {limit}s: {self.tail()}")

    def _workers_listening(self, ports: list[int]) -> bool:
        # With SO_REUSEPORT the port answers as soon as the first worker binds; connections made
        # before the others bind would all land on it, so wait for every worker's listeners.
        if self.workers <= 1:
            return True
        pids = self.worker_pids()
        if len(pids) < self.workers:
            return False
        for port in ports:
            listeners = listening_inodes(port)
            if not all(socket_inodes(pid) & listeners for pid in pids):
                return False
        return True

    def worker_pids(self) -> list[int]:
        """The processes that serve: the children of a multi-worker parent (not multiprocessing's
        resource tracker), else the server process itself."""
        if self.workers <= 1:
            return [self.pid]
        return [c for c in children(self.pid) if "resource_tracker" not in cmdline(c)]

    def _spawn(self) -> None:
        cmd = self.command()
        if self.cpu is not None and shutil.which("taskset"):
            cmd = ["taskset", "-c", str(self.cpu), *cmd]
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed with the process
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                cwd=str(ROOT),
                start_new_session=True,
            )
        finally:
            log.close()
        LIVE_GROUPS.add(self.proc.pid)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, size: int = 800) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        LIVE_GROUPS.discard(proc.pid)
        self.proc = None


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# --- payloads ------------------------------------------------------------------------------------


def incident(game: str, seq: int, ts_ns: int | None = None) -> dict[str, Any]:
    """An incident payload of ~200 bytes on the wire; `ts_ns` rides in `description`."""
    ts = ts_ns if ts_ns is not None else time.time_ns()
    return {
        "gameId": game,
        "incidentId": f"inc-{seq}",
        "type": "goal",
        "occurredAt": "2026-11-23T19:45:00Z",
        "minute": seq % 90,
        "side": "home",
        "score": {"home": seq % 7, "away": 0},
        "description": f"~ts~{ts} Penalty converted",
    }


def peer_frame(game: str, seq: int, ts_ns: int | None = None) -> dict[str, Any]:
    """What igratech-ws would push for this incident, for the peers to relay byte for byte."""
    return {
        "event": "incident",
        "channel": f"game:{game}",
        "offset": seq,
        "epoch": "b8eedbd0",
        "data": incident(game, seq, ts_ns),
    }


# --- publishers ----------------------------------------------------------------------------------


class Publisher:
    """Publishes incidents to one server. `publish_many` is the burst path."""

    async def open(self) -> None:
        return None

    async def publish_many(self, items: Sequence[tuple[str, int]]) -> None:
        raise NotImplementedError

    async def publish_one(self, game: str, seq: int) -> None:
        await self.publish_many([(game, seq)])

    async def close(self) -> None:
        return None


class HttpOursPublisher(Publisher):
    """POST /api/v1/publish and /api/v1/publish/batch (at most 1000 items a request)."""

    def __init__(self, api_port: int) -> None:
        self.base = f"http://127.0.0.1:{api_port}/api/v1"
        self.session: Any = None

    async def open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {API_KEY}"},
            connector=aiohttp.TCPConnector(limit=256),
        )

    async def publish_many(self, items: Sequence[tuple[str, int]]) -> None:
        for start in range(0, len(items), 1000):
            chunk = items[start : start + 1000]
            body = {
                "items": [
                    {"event": "incident", "gameId": g, "data": incident(g, s)} for g, s in chunk
                ]
            }
            async with self.session.post(self.base + "/publish/batch", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"batch publish: {resp.status} {await resp.text()}")
                await resp.read()

    async def publish_one(self, game: str, seq: int) -> None:
        body = {"event": "incident", "gameId": game, "data": incident(game, seq)}
        async with self.session.post(self.base + "/publish", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"publish: {resp.status} {await resp.text()}")
            await resp.read()

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class SoketiPublisher(Publisher):
    """The Pusher HTTP API: /events (one) and /batch_events (10 a request, soketi's default)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session: Any = None

    async def open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))

    def _signed(self, path: str, body: bytes) -> str:
        _app_id, key, secret = SOKETI_APP
        params = {
            "auth_key": key,
            "auth_timestamp": str(int(time.time())),
            "auth_version": "1.0",
            "body_md5": hashlib.md5(body).hexdigest(),
        }
        query = "&".join(f"{k}={params[k]}" for k in sorted(params))
        to_sign = f"POST\n{path}\n{query}"
        sig = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
        return f"{self.base}{path}?{query}&auth_signature={sig}"

    async def _post(self, path: str, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        url = self._signed(path, body)
        async with self.session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"soketi {path}: {resp.status} {await resp.text()}")
            await resp.read()

    async def publish_many(self, items: Sequence[tuple[str, int]]) -> None:
        # All batches in flight at once: soketi answers a batch only after broadcasting it, so
        # sending them one after another would measure the round trips, not the server.
        path = f"/apps/{SOKETI_APP[0]}/batch_events"
        posts = []
        for start in range(0, len(items), 10):
            batch = [
                {
                    "name": "incident",
                    "channel": f"game-{g}",
                    "data": json.dumps(peer_frame(g, s), separators=(",", ":")),
                }
                for g, s in items[start : start + 10]
            ]
            posts.append(self._post(path, {"batch": batch}))
        await asyncio.gather(*posts)

    async def publish_one(self, game: str, seq: int) -> None:
        data = json.dumps(peer_frame(game, seq), separators=(",", ":"))
        await self._post(
            f"/apps/{SOKETI_APP[0]}/events",
            {"name": "incident", "channels": [f"game-{game}"], "data": data},
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class _PubListener(WSListener):
    def __init__(self) -> None:
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sio = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        if not self.sio and not self.ready.done():
            self.ready.set_result(None)

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        data = frame.get_payload_as_bytes()
        if self.sio:
            if data.startswith(b"0{"):
                transport.send(WSMsgType.TEXT, b"40")
            elif data.startswith(b"40") and not self.ready.done():
                self.ready.set_result(None)
            elif data == b"2":
                transport.send(WSMsgType.TEXT, b"3")


class WsPublisher(Publisher):
    """A publisher WebSocket: "<game>\\n<frame>" to /pub (plain) or 42["publish",..] (socket.io)."""

    def __init__(self, port: int, sio: bool) -> None:
        self.sio = sio
        if sio:
            self.url = f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
        else:
            self.url = f"ws://127.0.0.1:{port}/pub"
        self.transport: WSTransport | None = None

    async def open(self) -> None:
        sio = self.sio

        def factory() -> _PubListener:
            listener = _PubListener()
            listener.sio = sio
            return listener

        transport, listener = await picows.ws_connect(factory, self.url)
        assert isinstance(listener, _PubListener)
        await asyncio.wait_for(listener.ready, 10)
        self.transport = transport

    def _message(self, game: str, seq: int) -> bytes:
        frame = peer_frame(game, seq)
        if self.sio:
            return b"42" + json.dumps(["publish", game, frame], separators=(",", ":")).encode()
        return game.encode() + b"\n" + json.dumps(frame, separators=(",", ":")).encode()

    async def publish_many(self, items: Sequence[tuple[str, int]]) -> None:
        assert self.transport is not None
        for game, seq in items:
            self.transport.send(WSMsgType.TEXT, self._message(game, seq))

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.disconnect()


def publisher_for(server: Server) -> Publisher:
    kind = server.kind
    if kind is OURS:
        return HttpOursPublisher(server.api_port)
    if kind is SOKETI:
        return SoketiPublisher(server.port)
    return WsPublisher(server.port, sio=kind.proto == "sio")


def ws_url(server: Server) -> str:
    port = server.port
    proto = server.kind.proto
    if proto == "sio":
        return f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
    if proto == "pusher":
        query = urllib.parse.urlencode(
            {"protocol": 7, "client": "js", "version": "8.4.0", "flash": "false"}
        )
        return f"ws://127.0.0.1:{port}/app/{SOKETI_APP[1]}?{query}"
    return f"ws://127.0.0.1:{port}/wspublic"
