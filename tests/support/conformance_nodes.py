"""Gateway processes for the scenarios that kill a node: two nodes on a private Redis namespace,
node a on a fixed port so that a client's URL still reaches it once restarted."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.support.cluster import SERVE, BrokerSpace, NodeProcess, _spawn, free_port, node_env, stop


def _serve(space: BrokerSpace, name: str, port: int, log: Path) -> NodeProcess:
    argv = [
        *SERVE,
        "--host", "127.0.0.1", "--port", str(port),
        "--api-host", "127.0.0.1", "--api-port", "0",
        "--broker", space.url, "--node-id", name,
    ]  # fmt: skip
    return NodeProcess(name, _spawn(argv, log, node_env()), log)


class two_nodes:
    """Nodes a (on a fixed port, restartable) and b on `space`; both killed at exit."""

    def __init__(self, space: BrokerSpace, log_dir: Path) -> None:
        self.space, self.log_dir = space, log_dir
        self.port = free_port()
        self.nodes: list[NodeProcess] = []

    async def __aenter__(self) -> tuple[Callable[[], Awaitable[None]], list[NodeProcess]]:
        a = _serve(self.space, "a", self.port, self.log_dir / "node-a.log")
        b = _serve(self.space, "b", 0, self.log_dir / "node-b.log")
        self.nodes = [a, b]
        await asyncio.gather(a.wait_serving(), b.wait_serving())
        await asyncio.gather(a.wait_readyz(200), b.wait_readyz(200))
        return self.restart, self.nodes

    async def restart(self) -> None:
        log = self.log_dir / f"node-a-{len(self.nodes)}.log"  # a fresh log: a new `serving` line
        a = _serve(self.space, "a", self.port, log)
        self.nodes.append(a)
        await a.wait_serving()
        await a.wait_readyz(200)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(stop(node.proc) for node in self.nodes))
