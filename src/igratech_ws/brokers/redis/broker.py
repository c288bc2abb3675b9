"""`RedisBroker`: the stream store, the pub/sub listener and (with Sentinel) the master watch.

Publications are delivered to every subscribed node INCLUDING the node that published them, on
purpose: the hub hands publications to its clients in the order they come off the bus, so the
origin must not short-cut its own. Only control messages skip their own echo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec

from igratech_ws.brokers.base import (
    BrokerError,
    ControlHandler,
    ControlKinds,
    HistoryPage,
    Publication,
    PublicationHandler,
    PublishResult,
    StateHandler,
    StreamPosition,
)
from igratech_ws.brokers.core import Backoff, BrokerCore, encode_control
from igratech_ws.brokers.options import BrokerOptions
from igratech_ws.brokers.redis.connections import client_name, connect, watch_sentinels
from igratech_ws.brokers.redis.names import control_channel, pubsub_channel
from igratech_ws.brokers.redis.pipe import CommandPipe
from igratech_ws.brokers.redis.pubsub import PubSubListener
from igratech_ws.brokers.redis.store import StreamStore
from igratech_ws.brokers.redis.urls import describe_address, split_prefix
from igratech_ws.brokers.redis.wire import decode_publication

log = logging.getLogger("igratech_ws.brokers.redis")


class RedisBroker(BrokerCore):
    """`Broker` on Redis (or Redis Sentinel). See the package docstring for keys and behaviour.

    `url` names the server (and ``prefix``); everything else comes from `options`.
    """

    def __init__(self, url: str, options: BrokerOptions | None = None) -> None:
        super().__init__(options or BrokerOptions())
        redis_url, self.prefix = split_prefix(url)
        self.address = describe_address(redis_url)
        self.client_name = client_name(self.node_id)
        self.pubsub_client_name = self.client_name + "-sub"
        self._connections = connect(redis_url, self.options, self.client_name)
        # Publications and control messages: pipelined, in call order (see `pipe`).
        self._pipe = CommandPipe(
            self._connections.listener_factory,
            op_timeout=self.options.op_timeout,
            address=self.address,
            client_name=self.client_name + "-pub",
        )
        self.store = StreamStore(self._connections.client, self.prefix, self.options, self._pipe)
        self._control_name = control_channel(self.prefix).encode()
        self._listener = PubSubListener(
            self._connections.listener_factory,
            self._control_name,
            op_timeout=self.options.op_timeout,
            ping_interval=self.options.ping_interval,
            backoff=Backoff(self.options.backoff_min, self.options.backoff_max),
            on_message=self._on_message,
            on_state=self.set_state,
        )
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(
        self,
        on_publication: PublicationHandler,
        on_control: ControlHandler,
        on_state: StateHandler | None = None,
    ) -> None:
        """Connect and subscribe the control channel, within twice the operation timeout.

        Raises `BrokerError` naming the address if Redis cannot be reached then (the broker is
        closed). After that, outages are reported through `on_state` and the listener reconnects.
        """
        self.bind(on_publication, on_control, on_state)
        self._listener.start()
        pool = self._connections.sentinel_pool
        if pool is not None:
            self._watcher = asyncio.create_task(
                watch_sentinels(
                    pool,
                    interval=self.options.sentinel_check_interval,
                    op_timeout=self.options.op_timeout,
                    holders=[self._listener, self._pipe],
                ),
                name="redis-broker-sentinel-watch",
            )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.op_timeout * 2):
                await self._listener.first_attempt.wait()
        if not self._listener.connected_once:
            error = self._listener.last_error
            await self.close()
            reason = f": {error!r}" if error is not None else " (no answer)"
            raise BrokerError(f"cannot reach Redis at {self.address}{reason}")

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.mark_closed()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            await asyncio.wait([watcher])
        await self._listener.close()
        await self._pipe.close()
        await self._connections.close()

    def _check_open(self) -> None:
        if self._closing:
            raise BrokerError("broker is closed")

    # -- streams -------------------------------------------------------------------------------

    async def publish(
        self, channel: str, event: str, data: bytes, *, idempotency_key: str | None = None
    ) -> PublishResult:
        """See `Broker.publish`. On `BrokerError` the publication may or may not have been made."""
        self._check_open()
        return await self.store.publish(
            channel, event, data, origin=self.node_id, idempotency_key=idempotency_key
        )

    async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        self._check_open()
        return await self.store.history(channel, since_offset, limit)

    async def position(self, channel: str) -> StreamPosition:
        self._check_open()
        return await self.store.position(channel)

    async def latest_state(self, channel: str) -> list[Publication]:
        self._check_open()
        return await self.store.latest_state(channel)

    # -- delivery ------------------------------------------------------------------------------

    @property
    def subscription_count(self) -> int:
        """Channels this node wants delivered (bounded by the hub's followed channels)."""
        return len(self._listener.wanted)

    def _pub_name(self, channel: str) -> bytes:
        return pubsub_channel(self.prefix, channel).encode()

    async def subscribe(self, channel: str) -> None:
        """See `Broker.subscribe`. Returns at once while disconnected (subscribed on reconnect)."""
        self._check_open()
        await self._listener.subscribe(self._pub_name(channel))

    async def unsubscribe(self, channel: str) -> None:
        """See `Broker.unsubscribe`. Takes effect at once: later messages are dropped here."""
        await self._listener.unsubscribe(self._pub_name(channel))

    def _on_message(self, name: bytes, payload: bytes) -> None:
        if name == self._control_name:
            self.deliver_control_bytes(payload)
            return
        # Messages still in flight after unsubscribe() are dropped here.
        if name not in self._listener.wanted:
            return
        try:
            publication = decode_publication(payload)
        except msgspec.DecodeError:  # not ours (or data that is not UTF-8)
            self.malformed(f"publication on {name!r}", payload)
            return
        self.deliver(publication)

    # -- control -------------------------------------------------------------------------------

    async def publish_control(self, message: ControlKinds) -> None:
        self._check_open()
        await self._pipe.call("PUBLISH", self._control_name, encode_control(message))
