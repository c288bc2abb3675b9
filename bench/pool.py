"""The parent's side of the load client: a pool of `bench.loadclient` worker processes.

Each worker is a process group of its own pinned to the client CPU; `LoadPool.stop` kills every
group. Connections are spread over the workers so that none holds more than `PER_WORKER_MAX`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from bench.servers import LIVE_GROUPS, ROOT

PER_WORKER_MAX = 12_000


class WorkerProc:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lock = asyncio.Lock()

    @classmethod
    async def spawn(cls, cpu: int | None) -> WorkerProc:
        args = [sys.executable, "-m", "bench.loadclient"]
        if cpu is not None:
            args += ["--cpu", str(cpu)]
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
            start_new_session=True,
            limit=1 << 22,
        )
        LIVE_GROUPS.add(proc.pid)
        worker = cls(proc)
        hello = await worker._read(30)
        if "hello" not in hello:
            raise RuntimeError(f"load worker did not start: {hello}")
        return worker

    async def _read(self, limit: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), limit)
        if not line:
            raise RuntimeError("load worker exited")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def call(self, cmd: dict[str, Any], limit: float) -> dict[str, Any]:
        """Send one command; its answer within `limit` seconds (else TimeoutError)."""
        assert self.proc.stdin is not None
        async with self.lock:
            self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
            await self.proc.stdin.drain()
            answer = await self._read(limit)
        if "error" in answer:
            raise RuntimeError(f"load worker: {answer['error']}")
        return answer

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        LIVE_GROUPS.discard(self.proc.pid)


class LoadPool:
    """`count` workers; `connect` splits n connections over them evenly."""

    def __init__(self, workers: list[WorkerProc]) -> None:
        self.workers = workers

    @classmethod
    async def start(cls, count: int, cpu: int | None) -> LoadPool:
        workers: list[WorkerProc] = []
        try:
            for _ in range(count):
                workers.append(await WorkerProc.spawn(cpu))
        except BaseException:
            for worker in workers:
                worker.kill()
            raise
        return cls(workers)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    async def connect(
        self,
        url: str,
        proto: str,
        n: int,
        games: list[str],
        *,
        limit: float = 60,
        concurrency: int = 200,
        jwt_secret: str | None = None,
        first_index: int = 0,
        per_conn_games: int = 1,
    ) -> dict[str, Any]:
        """Open `n` connections over the workers; the merged answer (times are min/max)."""
        count = len(self.workers)
        shares = [n // count + (1 if i < n % count else 0) for i in range(count)]
        cmds = []
        index = first_index
        for share in shares:
            cmds.append(
                {
                    "cmd": "connect",
                    "url": url,
                    "proto": proto,
                    "n": share,
                    "games": games,
                    "first_index": index,
                    "timeout": limit,
                    "concurrency": max(1, concurrency // count),
                    "jwt_secret": jwt_secret,
                    "per_conn_games": per_conn_games,
                }
            )
            index += share
        answers = await asyncio.gather(
            *(w.call(c, limit + 30) for w, c in zip(self.workers, cmds, strict=True) if c["n"])
        )
        reasons: dict[str, int] = {}
        for a in answers:
            for k, v in a["fail_reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
        return {
            "connected": sum(a["connected"] for a in answers),
            "failed": sum(a["failed"] for a in answers),
            "fail_reasons": reasons,
            "ready": sum(a["ready"] for a in answers),
            "t_start": min(a["t_start"] for a in answers),
            "t_handshakes_done": max(a["t_handshakes_done"] for a in answers),
            "t_ready": max(a["t_ready"] for a in answers),
        }

    async def arm(
        self, target: int, *, sample_every: int = 0, check: bool = False
    ) -> tuple[int, float]:
        """Zero the counters; (connections armed, the workers' CPU seconds so far)."""
        cmd = {"cmd": "arm", "target": target, "sample_every": sample_every, "check": check}
        answers = await asyncio.gather(*(w.call(cmd, 30) for w in self.workers))
        return sum(a["armed"] for a in answers), sum(a["cpu"] for a in answers)

    async def wait(self, limit: float, lat_dir: Path | None = None) -> dict[str, Any]:
        """Every worker's counts once all connections got their target or `limit` passed."""
        calls = []
        paths: list[Path | None] = []
        for i, worker in enumerate(self.workers):
            cmd: dict[str, Any] = {"cmd": "wait", "timeout": limit}
            path = None if lat_dir is None else lat_dir / f"lat-{os.getpid()}-{i}.bin"
            if path is not None:
                cmd["lat_path"] = str(path)
            paths.append(path)
            calls.append(worker.call(cmd, limit + 60))
        answers = await asyncio.gather(*calls)
        done = [a["t_done"] for a in answers]
        return {
            "received": sum(a["received"] for a in answers),
            "complete": sum(a["complete"] for a in answers),
            "armed": sum(a["armed"] for a in answers),
            "t_done": None if any(t is None for t in done) else max(done),
            "t_last_rx": max(a["t_last_rx"] for a in answers),
            "min_n": min(a["min_n"] for a in answers),
            "max_n": max(a["max_n"] for a in answers),
            "errors": sum(a["errors"] for a in answers),
            "cpu": sum(a["cpu"] for a in answers),
            "closed_by_server": sum(a["closed_by_server"] for a in answers),
            "lat_files": [
                p for p, a in zip(paths, answers, strict=True) if p and a.get("lat_count")
            ],
        }

    async def close_all(self) -> None:
        await asyncio.gather(*(w.call({"cmd": "close"}, 60) for w in self.workers))

    def stop(self) -> None:
        for worker in self.workers:
            worker.kill()
