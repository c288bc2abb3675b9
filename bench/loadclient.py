"""A load-client worker: many picows WebSocket connections in one process, driven over stdin/stdout.

Run as ``python -m bench.loadclient --cpu 1``. The parent (bench.scenarios) writes one JSON command
per line on stdin and reads one JSON answer per line on stdout; the worker never talks to anything
but the server under test on 127.0.0.1 and its parent. Commands, in the order a scenario uses them:

- ``connect``: open ``n`` connections (``concurrency`` handshakes in flight), subscribe each to its
  game(s) in the protocol of the server under test, answer when all are subscribed or ``timeout``.
- ``arm``: zero the counters and set ``target`` (pushes each connection must receive); optional
  ``sample_every`` (parse the publish timestamp on every k-th connection, for latency) and ``check``
  (parse every push's offset and count gaps, for the smoke test).
- ``wait``: answer when every connection has ``target`` pushes, or after ``timeout`` seconds, with
  the counts and times (``time.monotonic()``, the same clock in every process of the machine).
- ``close``, ``quit``.

The caller's duties: keep ``n`` under ~15,000 per worker (a process may open 20,000 files), send
``arm`` before publishing, and kill the worker's process group if it stops answering.

Counting is kept cheap so that the client is not the bottleneck: a push is any text frame of at
least ``MIN_PUSH`` bytes received after the subscription was confirmed (control frames such as
engine.io's "2" or Pusher's ping are shorter), and only sampled connections parse anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from array import array
from typing import Any

import picows
from picows import WSFrame, WSListener, WSMsgType, WSTransport

MIN_PUSH = 120
TS_MARK = b"~ts~"
_mono = time.monotonic
_now_ns = time.time_ns

PROTOCOLS = ("ours", "plain", "sio", "pusher")


def settings_frame(games: list[str]) -> bytes:
    return json.dumps({"event": "settings", "data": {"games": games}}).encode()


class Conn(WSListener):
    """One client connection; counts pushes once subscribed."""

    __slots__ = ("acks", "games", "last_offset", "n", "proto", "ready", "sample", "t", "w")

    def __init__(self, worker: Worker, games: list[str], proto: str) -> None:
        self.w = worker
        self.games = games
        self.proto = proto
        self.t: WSTransport | None = None
        self.ready = False
        self.acks = 0
        self.n = 0
        self.sample = False
        self.last_offset = -1

    # --- subscription handshake, per protocol ------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.t = transport
        if self.proto in ("ours", "plain"):
            transport.send(WSMsgType.TEXT, settings_frame(self.games))

    def _setup(self, transport: WSTransport, data: bytes) -> None:
        proto = self.proto
        if proto in ("ours", "plain"):
            if b'"event":"settings"' in data or b'"event": "settings"' in data:
                self._set_ready()
        elif proto == "sio":
            if data.startswith(b"0{"):
                transport.send(WSMsgType.TEXT, b"40")
            elif data.startswith(b"40"):
                body = json.dumps(["settings", {"games": self.games}])
                transport.send(WSMsgType.TEXT, b"42" + body.encode())
            elif data.startswith(b'42["settings"'):
                self._set_ready()
            elif data == b"2":
                transport.send(WSMsgType.TEXT, b"3")
        elif proto == "pusher":
            if b"pusher:connection_established" in data:
                for game in self.games:
                    sub = {"event": "pusher:subscribe", "data": {"channel": "game-" + game}}
                    transport.send(WSMsgType.TEXT, json.dumps(sub).encode())
            elif b"pusher_internal:subscription_succeeded" in data:
                self.acks += 1
                if self.acks == len(self.games):
                    self._set_ready()

    def _set_ready(self) -> None:
        if not self.ready:
            self.ready = True
            w = self.w
            w.ready += 1
            w.t_ready = _mono()
            if w.ready >= w.expect_ready and w.ready_event is not None:
                w.ready_event.set()

    def _control(self, transport: WSTransport, data: bytes) -> None:
        # Short frames after subscription: keep-alives of the peers' protocols.
        if data == b"2":
            transport.send(WSMsgType.TEXT, b"3")
        elif b"pusher:ping" in data:
            transport.send(WSMsgType.TEXT, b'{"event":"pusher:pong","data":{}}')

    # --- frames -------------------------------------------------------------------------------------

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            if frame.msg_type == WSMsgType.CLOSE:
                self.w.closed_by_server += 1
                transport.disconnect()
            return
        if not self.ready:
            self._setup(transport, frame.get_payload_as_bytes())
            return
        if frame.payload_size < MIN_PUSH:
            self._control(transport, frame.get_payload_as_bytes())
            return
        w = self.w
        w.received += 1
        w.last_rx = _mono()
        self.n += 1
        if self.sample:
            data = frame.get_payload_as_bytes()
            at = data.find(TS_MARK)
            if at >= 0:
                w.lat.append(_now_ns() - int(data[at + 4 : at + 23]))
            if w.check:
                at = data.find(b'"offset":')
                if at >= 0:
                    end = data.find(b",", at)
                    offset = int(data[at + 9 : end])
                    if self.last_offset >= 0 and offset != self.last_offset + 1:
                        w.errors += 1
                    self.last_offset = offset
        if self.n == w.target:
            w.complete += 1
            if w.complete == w.armed_conns:
                w.t_done = _mono()
                if w.done_event is not None:
                    w.done_event.set()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.w.disconnected += 1
        if self.ready:
            self.w.ready -= 1


class Worker:
    """The connections of this process and their counters."""

    def __init__(self) -> None:
        self.conns: list[Conn] = []
        self.ready = 0
        self.expect_ready = 0
        self.ready_event: asyncio.Event | None = None
        self.done_event: asyncio.Event | None = None
        self.t_ready = 0.0
        self.received = 0
        self.complete = 0
        self.armed_conns = 0
        self.target = 0
        self.t_done: float | None = None
        self.last_rx = 0.0
        self.lat: array[int] = array("q")
        self.check = False
        self.errors = 0
        self.failed = 0
        self.fail_reasons: dict[str, int] = {}
        self.closed_by_server = 0
        self.disconnected = 0

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        n = int(cmd["n"])
        proto = str(cmd["proto"])
        assert proto in PROTOCOLS
        url = str(cmd["url"])
        games: list[str] = list(cmd["games"])
        per_conn = int(cmd.get("per_conn_games", 1))
        first = int(cmd.get("first_index", 0))
        timeout = float(cmd.get("timeout", 60))
        secret = cmd.get("jwt_secret")
        tokens: list[str] | None = None
        if secret:
            import jwt

            now = int(time.time())
            tokens = [
                jwt.encode(
                    {"sub": f"u-{first + i}", "iat": now, "exp": now + 3600}, secret, "HS256"
                )
                for i in range(n)
            ]
        sem = asyncio.Semaphore(int(cmd.get("concurrency", 200)))
        self.expect_ready = self.ready + n
        self.ready_event = asyncio.Event()
        handshakes = 0
        t_hs_last = 0.0
        loop_deadline = _mono() + timeout

        async def one(i: int) -> None:
            nonlocal handshakes, t_hs_last
            index = first + i
            mine = [games[(index + k) % len(games)] for k in range(per_conn)]
            target = url
            if tokens is not None:
                target += ("&" if "?" in url else "?") + "token=" + tokens[i]
            async with sem:
                left = loop_deadline - _mono()
                if left <= 0:
                    self._fail("timeout")
                    return
                try:
                    _, listener = await asyncio.wait_for(
                        picows.ws_connect(
                            lambda: Conn(self, mine, proto),
                            target,
                            websocket_handshake_timeout=min(left, 30),
                            read_buffer_init_size=4096,
                        ),
                        left,
                    )
                except Exception as exc:
                    self._fail(type(exc).__name__)
                    return
                handshakes += 1
                t_hs_last = _mono()
                assert isinstance(listener, Conn)
                self.conns.append(listener)

        t_start = _mono()
        await asyncio.gather(*(one(i) for i in range(n)))
        # Every connection opened by this worker so far must confirm its subscription.
        self.expect_ready = len(self.conns)
        if self.ready < self.expect_ready:
            self.ready_event.clear()
            with _suppress_timeout():
                await asyncio.wait_for(self.ready_event.wait(), max(0.1, loop_deadline - _mono()))
        return {
            "connected": handshakes,
            "failed": self.failed,
            "fail_reasons": self.fail_reasons,
            "ready": self.ready,
            "conns": len(self.conns),
            "t_start": t_start,
            "t_handshakes_done": t_hs_last,
            "t_ready": self.t_ready,
        }

    def _fail(self, reason: str) -> None:
        self.failed += 1
        if len(self.fail_reasons) < 20 or reason in self.fail_reasons:
            self.fail_reasons[reason] = self.fail_reasons.get(reason, 0) + 1

    def arm(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.target = int(cmd["target"])
        self.received = 0
        self.complete = 0
        self.errors = 0
        self.t_done = None
        self.last_rx = 0.0
        self.lat = array("q")
        self.check = bool(cmd.get("check", False))
        every = int(cmd.get("sample_every", 0))
        live = [c for c in self.conns if c.ready]
        self.armed_conns = len(live)
        self.done_event = asyncio.Event()
        for i, conn in enumerate(self.conns):
            conn.n = 0
            conn.last_offset = -1
            conn.sample = self.check or (every > 0 and i % every == 0)
        if self.armed_conns == 0 or self.target == 0:
            self.done_event.set()
        return {"armed": self.armed_conns, "cpu": time.process_time()}

    async def wait(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.done_event is not None
        with _suppress_timeout():
            await asyncio.wait_for(self.done_event.wait(), float(cmd.get("timeout", 30)))
        counts = [c.n for c in self.conns if c.ready] or [0]
        lat_path = cmd.get("lat_path")
        if lat_path and self.lat:
            _save(lat_path, self.lat)
        return {
            "received": self.received,
            "complete": self.complete,
            "armed": self.armed_conns,
            "t_done": self.t_done,
            "t_last_rx": self.last_rx,
            "min_n": min(counts),
            "max_n": max(counts),
            "errors": self.errors,
            "lat_count": len(self.lat),
            "cpu": time.process_time(),
            "closed_by_server": self.closed_by_server,
        }

    async def close(self) -> dict[str, Any]:
        for conn in self.conns:
            if conn.t is not None:
                conn.t.disconnect()
        await asyncio.sleep(0.05)
        count = len(self.conns)
        self.conns = []
        self.ready = 0
        return {"closed": count}


def _save(path: str, values: array[int]) -> None:
    with open(path, "wb") as out:
        values.tofile(out)


class _suppress_timeout:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, tb: object) -> bool:
        return kind is TimeoutError


async def serve(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    print(json.dumps({"hello": os.getpid()}), file=out, flush=True)
    while True:
        line = await reader.readline()
        if not line:
            return
        cmd = json.loads(line)
        name = cmd.get("cmd")
        try:
            if name == "connect":
                answer = await worker.connect(cmd)
            elif name == "arm":
                answer = worker.arm(cmd)
            elif name == "wait":
                answer = await worker.wait(cmd)
            elif name == "close":
                answer = await worker.close()
            elif name == "quit":
                print(json.dumps({"bye": True}), file=out, flush=True)
                return
            else:
                answer = {"error": f"unknown command {name!r}"}
        except Exception as exc:  # report, don't die: the parent decides
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), file=out, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = parser.parse_args(argv)
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {args.cpu})
    import uvloop

    uvloop.run(serve(Worker()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
