"""One Redis server (a shard) of a broker: its pools, its command pipe, its pub/sub listener and,
with Sentinel, the watch of its master; started and closed together.

A `RedisServer` knows nothing of the other shards: the broker routes channels to it
(`shards.shard_index`) and turns its state changes into the broker's (see `RedisBroker`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from igratech_ws.brokers.base import BrokerState
from igratech_ws.brokers.core import Backoff
from igratech_ws.brokers.options import BrokerOptions
from igratech_ws.brokers.redis.connections import connect, watch_sentinels
from igratech_ws.brokers.redis.pipe import CommandPipe
from igratech_ws.brokers.redis.pubsub import MessageHandler, PubSubListener
from igratech_ws.brokers.redis.store import StreamStore
from igratech_ws.brokers.redis.urls import describe_address


class RedisServer:
    """The connections to one Redis server (see the module docstring).

    `url` is the server's URL without ``prefix``; `control_name` is the control channel to listen
    to, or None on every shard but the first. Caller's duties: `start` once, `close` once.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        options: BrokerOptions,
        *,
        client_name: str,
        control_name: bytes | None,
        on_message: MessageHandler,
        on_state: Callable[[BrokerState], None],
    ) -> None:
        self.address = describe_address(url)
        self.options = options
        self.connections = connect(url, options, client_name)
        # Publications and control messages: pipelined, in call order (see `pipe`).
        self.pipe = CommandPipe(
            self.connections.listener_factory,
            op_timeout=options.op_timeout,
            address=self.address,
            client_name=client_name + "-pub",
        )
        self.store = StreamStore(self.connections.client, prefix, options, self.pipe)
        self.listener = PubSubListener(
            self.connections.listener_factory,
            control_name,
            op_timeout=options.op_timeout,
            ping_interval=options.ping_interval,
            backoff=Backoff(options.backoff_min, options.backoff_max),
            on_message=on_message,
            on_state=on_state,
        )
        self._watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listening (and watching the sentinels); connections open in the background."""
        self.listener.start()
        pool = self.connections.sentinel_pool
        if pool is not None:
            self._watcher = asyncio.create_task(
                watch_sentinels(
                    pool,
                    interval=self.options.sentinel_check_interval,
                    op_timeout=self.options.op_timeout,
                    holders=[self.listener, self.pipe],
                ),
                name="redis-broker-sentinel-watch",
            )

    async def first_attempt(self, within: float) -> bool:
        """Wait (at most `within` s) for the listener's first connection attempt; whether it
        connected."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self.listener.first_attempt.wait()
        return self.listener.connected_once

    async def close(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.wait([watcher])
        await self.listener.close()
        await self.pipe.close()
        await self.connections.close()
