"""`RedisBroker`: channels routed to their shard (`RedisServer`), control on the first one.

Publications are delivered to every subscribed node INCLUDING the node that published them, on
purpose: the hub hands publications to its clients in the order they come off the bus, so the
origin must not short-cut its own. Only control messages skip their own echo.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import msgspec

from igratech_ws.brokers.base import (
    BrokerError,
    BrokerState,
    ControlHandler,
    ControlKinds,
    HistoryPage,
    Publication,
    PublicationHandler,
    PublishResult,
    StateHandler,
    StreamPosition,
)
from igratech_ws.brokers.core import BrokerCore, encode_control
from igratech_ws.brokers.options import BrokerOptions
from igratech_ws.brokers.redis.connections import client_name
from igratech_ws.brokers.redis.names import control_channel, pubsub_channel
from igratech_ws.brokers.redis.server import RedisServer
from igratech_ws.brokers.redis.shards import CONTROL_SHARD, shard_index, split_shards
from igratech_ws.brokers.redis.store import StreamStore
from igratech_ws.brokers.redis.urls import split_prefix
from igratech_ws.brokers.redis.wire import decode_publication

log = logging.getLogger("igratech_ws.brokers.redis")


class RedisBroker(BrokerCore):
    """`Broker` on Redis (or Redis Sentinel), on one server or sharded over several. See the
    package docstring for keys and behaviour, and `shards` for the URL and the routing.

    `url` names the server(s) (and ``prefix``); everything else comes from `options`.

    State: the broker's state is the control shard's (the first server: it carries control
    messages, so a node cut from it is cut from the cluster); the others' outages are logged and
    shown by `shard_states`, and affect only their channels: their publishes and reads fail with
    `BrokerError` meanwhile, and when such a shard comes back the newest publication of each of
    its followed channels is delivered again, so that the hub sees any gap and fills it from
    history (a duplicate is dropped by it).
    """

    def __init__(self, url: str, options: BrokerOptions | None = None) -> None:
        super().__init__(options or BrokerOptions())
        redis_url, self.prefix = split_prefix(url)
        urls = split_shards(redis_url)
        self.client_name = client_name(self.node_id)
        self.pubsub_client_name = self.client_name + "-sub"
        self._control_name = control_channel(self.prefix).encode()
        self._pub_prefix = pubsub_channel(self.prefix, "").encode()
        self.servers = [
            RedisServer(
                server_url,
                self.prefix,
                self.options,
                client_name=self.client_name,
                control_name=self._control_name if index == CONTROL_SHARD else None,
                on_message=self._on_message,
                on_state=functools.partial(self._on_shard_state, index),
            )
            for index, server_url in enumerate(urls)
        ]
        self.address = ",".join(server.address for server in self.servers)
        #: The state of each shard's pub/sub connection, in URL order.
        self.shard_states = [BrokerState.CONNECTING] * len(self.servers)
        self._refills: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def store(self) -> StreamStore:
        """The stream store of an unsharded broker (tests, tools)."""
        if len(self.servers) != 1:
            raise AttributeError("a sharded broker has one store per shard: use store_for()")
        return self.servers[0].store

    def server_for(self, channel: str) -> RedisServer:
        """The shard that holds `channel`."""
        return self.servers[shard_index(channel, len(self.servers))]

    def store_for(self, channel: str) -> StreamStore:
        return self.server_for(channel).store

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(
        self,
        on_publication: PublicationHandler,
        on_control: ControlHandler,
        on_state: StateHandler | None = None,
    ) -> None:
        """Connect and subscribe the control channel, within twice the operation timeout.

        Raises `BrokerError` naming the address if the control shard (the only server, unless
        sharded) cannot be reached then (the broker is closed); another shard that cannot be
        reached is logged and keeps being retried, its channels failing meanwhile. After start,
        outages are reported through `on_state` and the listeners reconnect.
        """
        self.bind(on_publication, on_control, on_state)
        for server in self.servers:
            server.start()
        within = self.options.op_timeout * 2
        reached = await asyncio.gather(*(server.first_attempt(within) for server in self.servers))
        control = self.servers[CONTROL_SHARD]
        if not reached[CONTROL_SHARD]:
            error = control.listener.last_error
            await self.close()
            reason = f": {error!r}" if error is not None else " (no answer)"
            raise BrokerError(f"cannot reach Redis at {control.address}{reason}")
        for server, ok in zip(self.servers, reached, strict=True):
            if not ok:
                log.error(
                    "Redis shard %s is unreachable: its channels fail until it is back",
                    server.address,
                )

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.mark_closed()
        for task in list(self._refills):
            task.cancel()
        if self._refills:
            await asyncio.wait(list(self._refills))
        for server in self.servers:
            await server.close()

    def _on_shard_state(self, index: int, state: BrokerState) -> None:
        before, self.shard_states[index] = self.shard_states[index], state
        if index == CONTROL_SHARD:
            self.set_state(state)
            return
        if state is BrokerState.DISCONNECTED and before is not BrokerState.DISCONNECTED:
            log.warning("Redis shard %s disconnected", self.servers[index].address)
        elif state is BrokerState.CONNECTED and before is BrokerState.DISCONNECTED:
            log.warning("Redis shard %s connected again", self.servers[index].address)
            task = asyncio.ensure_future(self._refill(self.servers[index]))
            self._refills.add(task)
            task.add_done_callback(self._refills.discard)

    async def _refill(self, server: RedisServer) -> None:
        """Deliver again the newest publication of each channel followed on `server`, after its
        outage: whatever was published meanwhile shows up as a gap (see the class docstring)."""
        skip = len(self._pub_prefix)
        channels = [name[skip:].decode() for name in list(server.listener.wanted)]
        try:
            newest = await server.store.newest(channels)
        except BrokerError as exc:
            log.warning(
                "Redis shard %s: reading newest publications failed: %s", server.address, exc
            )
            return
        for publication in newest:
            if self._pub_name(publication.channel) in server.listener.wanted:
                self.deliver(publication)

    def _check_open(self) -> None:
        if self._closing:
            raise BrokerError("broker is closed")

    # -- streams -------------------------------------------------------------------------------

    async def publish(
        self, channel: str, event: str, data: bytes, *, idempotency_key: str | None = None
    ) -> PublishResult:
        """See `Broker.publish`. On `BrokerError` the publication may or may not have been made."""
        self._check_open()
        return await self.store_for(channel).publish(
            channel, event, data, origin=self.node_id, idempotency_key=idempotency_key
        )

    async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        self._check_open()
        return await self.store_for(channel).history(channel, since_offset, limit)

    async def position(self, channel: str) -> StreamPosition:
        self._check_open()
        return await self.store_for(channel).position(channel)

    async def latest_state(self, channel: str) -> list[Publication]:
        self._check_open()
        return await self.store_for(channel).latest_state(channel)

    # -- delivery ------------------------------------------------------------------------------

    @property
    def subscription_count(self) -> int:
        """Channels this node wants delivered (bounded by the hub's followed channels)."""
        return sum(len(server.listener.wanted) for server in self.servers)

    def _pub_name(self, channel: str) -> bytes:
        return pubsub_channel(self.prefix, channel).encode()

    async def subscribe(self, channel: str) -> None:
        """See `Broker.subscribe`. Returns at once while disconnected (subscribed on reconnect)."""
        self._check_open()
        await self.server_for(channel).listener.subscribe(self._pub_name(channel))

    async def unsubscribe(self, channel: str) -> None:
        """See `Broker.unsubscribe`. Takes effect at once: later messages are dropped here."""
        await self.server_for(channel).listener.unsubscribe(self._pub_name(channel))

    def _on_message(self, name: bytes, payload: bytes) -> None:
        if name == self._control_name:
            self.deliver_control_bytes(payload)
            return
        # Messages still in flight after unsubscribe() are dropped here.
        if not self._wanted(name):
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
        await self.servers[CONTROL_SHARD].pipe.call(
            "PUBLISH", self._control_name, encode_control(message)
        )

    def _wanted(self, name: bytes) -> bool:
        servers = self.servers
        if len(servers) == 1:
            return name in servers[0].listener.wanted
        return any(name in server.listener.wanted for server in servers)
