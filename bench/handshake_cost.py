"""The connect storm's server cost in instructions: repeatable on a loaded machine.

``python -m bench.handshake_cost`` starts each server under valgrind's callgrind (instructions are
counted, not timed, so other processes on the machine do not move the figure), opens ``--warmup``
connections the way the storm's clients do (bench.loadclient: a distinct HS256 JWT each for
igratech-ws, then a ``settings`` request following one game, answered), zeroes the counters, opens
``--n`` more, and dumps the counters: the figure is the server's user-space instructions per
handshake + subscription, and its system calls per handshake (the kernel's work is not counted in
instructions; each system call costs a few thousand more).

Servers: igratech-ws as the storm runs it (``jwt``), the same without a token (``anon``: no JWT
verified, no user channel joined), and the bare picows broadcaster the storm compares against
(``picows``); and ``verify``: `TokenVerifier.verify` alone, per HS256 token (a process that
verifies 2,000 distinct tokens minus one that verifies none). ``--profile`` keeps each dump and writes
``callgrind_annotate``'s inclusive listing next to it (`--out`).

Slow on purpose: a Python server under callgrind runs about 50 times slower, so igratech-ws takes
a few minutes to start and 500 handshakes another; the servers are measured side by side, each in
one run (two runs of one server differ by little: the order in which a loaded machine schedules
the clients' packets moves the count slightly, not the CPU time of other processes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadclient import Worker
from bench.servers import JWT_SECRET, OURS, PICOWS, Kind, Ports, Server

#: What each measured variant runs: the server, and whether its clients carry a JWT.
VARIANTS: dict[str, tuple[Kind, bool]] = {
    "jwt": (OURS, True),
    "anon": (OURS, False),
    "picows": (PICOWS, False),
}
START_LIMIT = 600.0


@dataclass
class Cost:
    """One server's counters over the measured handshakes."""

    variant: str
    server: str
    handshakes: int
    instructions: int
    syscalls: int | None

    @property
    def per_handshake(self) -> float:
        return self.instructions / self.handshakes

    def row(self) -> dict[str, Any]:
        return {
            "scenario": "handshake_cost",
            "variant": self.variant,
            "server": self.server,
            "handshakes": self.handshakes,
            "instructions": self.instructions,
            "instructions_per_handshake": self.per_handshake,
            "syscalls_per_handshake": (
                self.syscalls / self.handshakes if self.syscalls is not None else None
            ),
        }


def available() -> str | None:
    """Why the harness cannot run here (a sentence for the report), or None."""
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _command(kind: Kind, port: int, api_port: int, log_dir: Path) -> list[str]:
    cmd = Server(kind, port, api_port, None, log_dir).command()
    if kind is OURS:
        # The console script is a launcher; valgrind must start the interpreter itself.
        cmd = [sys.executable, "-m", "igratech_ws.cli", *cmd[1:]]
    return cmd


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _totals(path: Path) -> dict[str, int]:
    """The `summary:` line of a callgrind dump (what callgrind_annotate calls the program's
    totals; its `totals:` line also counts what was on the stack when the counters were zeroed),
    by event name."""
    events: list[str] = []
    totals: list[int] = []
    with path.open() as dump:
        for line in dump:
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("summary:"):
                totals = [int(v) for v in line.split()[1:]]
                break
    return dict(zip(events, totals, strict=False))


def _control(option: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", option, str(pid)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )


async def _connect(
    worker: Worker, url: str, proto: str, n: int, first: int, jwt: bool, concurrency: int
) -> int:
    answer = await worker.connect(
        {
            "n": n,
            "proto": proto,
            "url": url,
            "games": ["g-1"],
            "per_conn_games": 1,
            "first_index": first,
            "timeout": 600,
            "concurrency": concurrency,
            "jwt_secret": JWT_SECRET if jwt else None,
        }
    )
    if answer["connected"] < n or answer["ready"] < n:
        raise RuntimeError(f"only {answer['connected']}/{n} connected: {answer}")
    return int(answer["connected"])


async def _warm(url: str, proto: str, n: int, jwt: bool, concurrency: int) -> Worker:
    """Open `n` connections to warm the server; the first ones may fail (the server's 5 s
    handshake deadline can pass while valgrind translates the code they run for the first
    time), and are tried again."""
    worker = Worker()
    first = 0
    for _ in range(10):
        with contextlib.suppress(AssertionError, RuntimeError):
            await _connect(Worker(), url, proto, 1, first, jwt, 1)
            break
        first += 1
    await _connect(worker, url, proto, n, first + 1, jwt, concurrency)
    return worker


def _start(
    variant: str, kind: Kind, port: int, api_port: int, out: Path
) -> subprocess.Popen[bytes]:
    """The server under callgrind, in its own process group, its output in `out`."""
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--collect-systime=yes",
        # No instrumentation while the server starts (several times faster); on before warming.
        "--instr-atstart=no",
        f"--callgrind-out-file={out / f'callgrind.{variant}'}.%p",
        *_command(kind, port, api_port, out),
    ]
    env = Server(kind, port, api_port, None, out).env()
    with open(out / f"{variant}.log", "wb") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def _collect(variant: str, pid: int, out: Path, profile: bool) -> dict[str, int]:
    """Dump the counters (since they were zeroed) and read them; keep the dump if `profile`."""
    _control("--dump", pid)
    parts = sorted(out.glob(f"callgrind.{variant}.{pid}.*"))
    if not parts:
        raise RuntimeError(f"{variant}: callgrind wrote no dump")
    totals = _totals(parts[-1])
    if profile:
        listing = subprocess.run(
            ["callgrind_annotate", "--inclusive=yes", "--threshold=99.5", str(parts[-1])],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        (out / f"{variant}.annotate.txt").write_text(listing)
    else:
        for part in parts:
            part.unlink()
    return totals


def _stop(variant: str, proc: subprocess.Popen[bytes], out: Path) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    for leftover in out.glob(f"callgrind.{variant}.{proc.pid}"):
        leftover.unlink()


async def measure(
    variant: str,
    n: int,
    warmup: int,
    concurrency: int,
    out: Path,
    profile: bool,
    ports: Ports,
) -> Cost:
    """Instructions and system calls of `variant`'s server over `n` handshakes, once warm."""
    kind, jwt = VARIANTS[variant]
    port, api_port = ports.take(), ports.take()
    proc = _start(variant, kind, port, api_port, out)
    try:
        deadline = time.monotonic() + START_LIMIT
        # igratech-ws binds the WebSocket port before it builds the HTTP API: wait for both.
        while not (_listening(port) and (kind is not OURS or _listening(api_port))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{variant}: the server did not start (see {variant}.log)")
            await asyncio.sleep(0.5)
        _control("--instr=on", proc.pid)
        url = f"ws://127.0.0.1:{port}" + ("/wspublic" if kind is OURS else "/")
        # Warm: imports done lazily, caches, the game's broker subscription, the allocator.
        warm = await _warm(url, kind.proto, warmup, jwt, concurrency)
        await asyncio.sleep(1.0)
        _control("--zero", proc.pid)
        worker = Worker()
        done = await _connect(worker, url, kind.proto, n, 1000, jwt, concurrency)
        await asyncio.sleep(1.0)  # what the last answers set in motion (timers, flushes)
        totals = _collect(variant, proc.pid, out, profile)
        for opened in (warm, worker):
            with contextlib.suppress(Exception):
                await opened.close()
        return Cost(variant, kind.name, done, totals["Ir"], totals.get("sysCount"))
    finally:
        _stop(variant, proc, out)


_VERIFY_SCRIPT = """
import sys, time
import jwt
from igratech_ws.auth import TokenVerifier
n, secret = int(sys.argv[1]), sys.argv[2]
now = int(time.time())
claims = [{"sub": f"u-{i}", "iat": now, "exp": now + 3600} for i in range(VERIFY_TOKENS + 1)]
tokens = [jwt.encode(c, secret, "HS256") for c in claims]
verifier = TokenVerifier(secret=secret)
verifier.verify(tokens[-1])
for token in tokens[:n]:
    verifier.verify(token)
"""
#: Tokens `verify_cost` verifies (the difference between a run with them and one without).
VERIFY_TOKENS = 2000


def _instructions(argv: list[str], out: Path, name: str) -> int:
    dump = out / f"callgrind.{name}"
    subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}", *argv],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=600,
    )
    try:
        return _totals(dump)["Ir"]
    finally:
        dump.unlink()


def verify_cost(out: Path) -> Cost:
    """Instructions of `TokenVerifier.verify` alone for one HS256 token (the storm's kind): a
    process verifying `VERIFY_TOKENS` distinct tokens minus the same process verifying none."""
    script = _VERIFY_SCRIPT.replace("VERIFY_TOKENS", str(VERIFY_TOKENS))
    runs = [
        _instructions([sys.executable, "-c", script, str(n), JWT_SECRET], out, f"verify{n}")
        for n in (0, VERIFY_TOKENS)
    ]
    return Cost("verify", "igratech-ws", VERIFY_TOKENS, runs[1] - runs[0], None)


async def run(
    variants: list[str],
    out: Path,
    *,
    n: int = 500,
    warmup: int = 100,
    concurrency: int = 100,
    profile: bool = False,
    ports: Ports | None = None,
) -> list[Cost]:
    """Measure `variants` side by side (instruction counts do not mind sharing the CPU); `out`
    must exist."""
    ports = ports or Ports(start=29100)
    servers = [v for v in variants if v in VARIANTS]
    jobs = [measure(v, n, warmup, concurrency, out, profile, ports) for v in servers]
    if "verify" in variants:
        jobs.append(asyncio.to_thread(verify_cost, out))
    return list(await asyncio.gather(*jobs))


def summary(costs: list[Cost]) -> dict[str, Any]:
    """The rows, and igratech-ws's ratio to the bare picows server when both were measured."""
    by = {c.variant: c for c in costs}
    result: dict[str, Any] = {"rows": [c.row() for c in costs]}
    if "jwt" in by and "picows" in by:
        result["ratio"] = by["jwt"].per_handshake / by["picows"].per_handshake
    if "jwt" in by and "anon" in by:
        result["jwt_share"] = by["jwt"].per_handshake - by["anon"].per_handshake
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="measured handshakes per server")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--variants",
        default="jwt,anon,picows,verify",
        help=f"comma-separated, of {','.join(VARIANTS)},verify (TokenVerifier.verify alone)",
    )
    parser.add_argument("--out", type=Path, default=None, help="keep dumps and logs here")
    parser.add_argument("--profile", action="store_true", help="keep annotated dumps in --out")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--port-base", type=int, default=29100, help="first port to try")
    args = parser.parse_args(argv)
    why = available()
    if why is not None:
        print(f"handshake_cost: {why}", file=sys.stderr)
        return 2
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS and v != "verify"]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    out = args.out or Path(tempfile.mkdtemp(prefix="handshake-cost-"))
    out.mkdir(parents=True, exist_ok=True)
    costs = asyncio.run(
        run(
            variants,
            out,
            n=args.n,
            warmup=args.warmup,
            concurrency=args.concurrency,
            profile=args.profile,
            ports=Ports(start=args.port_base),
        )
    )
    for cost in costs:
        syscalls = cost.row()["syscalls_per_handshake"]
        print(
            f"{cost.variant:9} {cost.server:16} {cost.per_handshake:12,.0f} instructions/"
            + ("verify" if cost.variant == "verify" else "handshake")
            + (f"  {syscalls:5.1f} syscalls/handshake" if syscalls is not None else ""),
            flush=True,
        )
    result = summary(costs)
    if "ratio" in result:
        print(f"igratech-ws / picows: {result['ratio']:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
