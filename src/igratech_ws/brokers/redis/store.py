"""The Redis stream store: publish, history, position and state, by Lua script and plain reads.

Publishing is one script (``lua/publish.lua``) so that everything about one publication happens
in one atomic step per channel: the idempotency check, creating the stream with a new epoch if it
has none (dropping any history and state of an earlier life), HINCRBY ``top``, XADD, trimming by
length and age, the state slot of a state event, PUBLISH, and the idempotency record. Any backend
can publish straight into Redis by running that script (`publish_direct` does it without a node).

Reads create and refresh nothing: `position` is one HMGET; `history` and `latest_state` are
read-only scripts; a channel without a meta key is ``(0, EMPTY_EPOCH)`` with no history or state.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from igratech_ws.brokers.base import (
    EMPTY_EPOCH,
    BrokerError,
    HistoryPage,
    Publication,
    PublishResult,
    StreamPosition,
    check_data,
    check_idempotency_key,
)
from igratech_ws.brokers.core import new_epoch
from igratech_ws.brokers.options import BrokerOptions
from igratech_ws.brokers.redis.names import (
    idempotency_key as record_key,
)
from igratech_ws.brokers.redis.names import (
    meta_key,
    pubsub_channel,
    state_key,
    stream_key,
)
from igratech_ws.brokers.redis.pipe import CONNECTION_ERRORS, CommandPipe, RedisReplyError
from igratech_ws.brokers.redis.shards import shard_index
from igratech_ws.brokers.redis.wire import (
    HISTORY_SCRIPT,
    PUBLISH_MANY_SCRIPT,
    PUBLISH_SCRIPT,
    STATE_SCRIPT,
    decode_publication,
)
from igratech_ws.logs import RateLimitedLog

_malformed_log = RateLimitedLog(logging.getLogger("igratech_ws.brokers.redis"))
#: What a reply that is not ours looks like while decoding it.
_BAD_REPLY = (msgspec.DecodeError, TypeError, ValueError, IndexError, AttributeError)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


#: A publish waiting for its batch: the script's keys and arguments, and the caller's future.
_Queued = tuple[list[str], list[Any], "asyncio.Future[Any]"]

PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()
PUBLISH_MANY_SHA = hashlib.sha1(PUBLISH_MANY_SCRIPT.encode()).hexdigest()


class StreamStore:
    """Channel streams in one Redis (through `client`), under `prefix`, per `options`.

    Publishes go through `pipe` when there is one (a node's broker: pipelined, see `pipe`), else
    through `client` (`publish_direct`). Every method raises `BrokerError` (never a raw redis-py
    error) when Redis is unreachable or answers something that is not ours; each call is bounded
    by twice `options.op_timeout`.
    """

    def __init__(
        self,
        client: Redis,
        prefix: str,
        options: BrokerOptions,
        pipe: CommandPipe | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.options = options
        self.pipe = pipe
        if pipe is not None:
            pipe.register_script(PUBLISH_SHA, PUBLISH_SCRIPT)
            pipe.register_script(PUBLISH_MANY_SHA, PUBLISH_MANY_SCRIPT)
        # Publishes queued this loop turn (sent together by `_send_batch`), and batches in flight.
        self._batch: list[_Queued] = []
        self._batches: set[asyncio.Task[None]] = set()
        self._publish: AsyncScript = client.register_script(PUBLISH_SCRIPT)
        self._history: AsyncScript = client.register_script(HISTORY_SCRIPT)
        self._state: AsyncScript = client.register_script(STATE_SCRIPT)
        self._deadline = options.op_timeout * 2
        # The publish script's arguments that depend only on the options, in ARGV order.
        self._limits_args = (
            options.limits.size,
            _ms(options.limits.ttl),
            _ms(options.retention),
        )
        self._slot_args = (_ms(options.state_ttl), _ms(options.idempotency_window))

    async def _run(
        self, what: str, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        try:
            # Socket timeouts bound each step; this bounds the sum (pool wait, connect, reply).
            async with asyncio.timeout(self._deadline):
                return await script(keys=list(keys), args=list(args))
        except CONNECTION_ERRORS as exc:
            raise BrokerError(f"Redis {what} failed: {exc!r}") from exc

    def publish_call(
        self,
        channel: str,
        event: str,
        data: bytes,
        *,
        origin: str,
        idempotency_key: str | None = None,
    ) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of the publish script for one publication (see ``lua/publish.lua``).

        Separate from running it so that several calls can share one pipeline (in order: each
        channel's offsets follow the order of the calls). Raises ValueError for a malformed key.
        """
        check_idempotency_key(idempotency_key)
        check_data(data)
        prefix, options = self.prefix, self.options
        keys = [meta_key(prefix, channel), stream_key(prefix, channel), state_key(prefix, channel)]
        if idempotency_key is not None:
            keys.append(record_key(prefix, channel, idempotency_key))
        args: list[Any] = [
            pubsub_channel(prefix, channel),
            channel,
            event,
            data,
            origin,
            *self._limits_args,
            new_epoch(),
            "1" if event in options.state_events else "0",
            *self._slot_args,
        ]
        return keys, args

    @staticmethod
    def publish_result(reply: Any, data: bytes) -> PublishResult:
        """The `PublishResult` of a publish script's `reply` (`data`: what was published)."""
        try:
            duplicate = bool(int(reply[0]))
            publication = decode_publication(reply[1])
        except _BAD_REPLY as exc:
            raise BrokerError(f"bad publish reply from Redis: {exc}") from exc
        if duplicate:
            publication = msgspec.structs.replace(publication, data=data)
        return PublishResult(publication, duplicate)

    async def publish(
        self,
        channel: str,
        event: str,
        data: bytes,
        *,
        origin: str,
        idempotency_key: str | None = None,
    ) -> PublishResult:
        """See `Broker.publish`. On `BrokerError` the publication may or may not have been made."""
        keys, args = self.publish_call(
            channel, event, data, origin=origin, idempotency_key=idempotency_key
        )
        if self.pipe is None:
            reply = await self._run("publish", self._publish, keys, args)
            return self.publish_result(reply, data)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        batch = self._batch
        batch.append((keys, args, future))
        if len(batch) == 1:
            asyncio.get_running_loop().call_soon(self._send_batch)
        return self.publish_result(await future, data)

    def _send_batch(self) -> None:
        """Send the publishes queued this loop turn as one script call (publish_many), in order.

        One call instead of one per publication: Redis runs them back to back and sends their
        pub/sub messages together, and both sides pay the per-call cost once. Tasks run in the
        order they are created, so batches reach the pipe in order too.
        """
        batch, self._batch = self._batch, []
        task = asyncio.ensure_future(self._run_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_batch(self, batch: list[_Queued]) -> None:
        pipe = self.pipe
        assert pipe is not None
        if len(batch) == 1:
            keys, args, _ = batch[0]
            sha, body = PUBLISH_SHA, PUBLISH_SCRIPT
            call_keys, call_args = keys, args
        else:
            sha, body = PUBLISH_MANY_SHA, PUBLISH_MANY_SCRIPT
            call_keys, call_args = [], [len(batch)]
            for keys, args, _ in batch:
                call_keys.extend(keys)
                call_args.append(len(keys))
                call_args.extend(args)
        try:
            try:
                reply = await pipe.call("EVALSHA", sha, len(call_keys), *call_keys, *call_args)
            except RedisReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                # The pipe loads the scripts on each new connection, so only a SCRIPT FLUSH on a
                # live one gets here: the call did nothing, run it with the script's body.
                reply = await pipe.call("EVAL", body, len(call_keys), *call_keys, *call_args)
        except BaseException as exc:
            error = exc if isinstance(exc, BrokerError) else BrokerError(f"publish failed: {exc!r}")
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        replies = [reply] if len(batch) == 1 else reply
        if not isinstance(replies, list) or len(replies) != len(batch):
            replies = [None] * len(batch)  # publish_result reports a bad reply
        for (_, _, future), one in zip(batch, replies, strict=True):
            if not future.done():
                future.set_result(one)

    async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        reply = await self._run(
            "history",
            self._history,
            [meta_key(self.prefix, channel), stream_key(self.prefix, channel)],
            [max(0, since_offset), max(0, limit), _ms(self.options.limits.ttl), EMPTY_EPOCH],
        )
        try:
            top = StreamPosition(int(reply[0]), reply[1].decode())
        except _BAD_REPLY as exc:
            raise BrokerError(f"bad history reply from Redis: {exc}") from exc
        return HistoryPage(self._decode_all(reply[2:], "history entry"), top)

    def _decode_all(self, payloads: Sequence[Any], what: str) -> list[Publication]:
        """Decode stored publications, skipping (and logging) any that is not ours: one bad
        entry must not make a channel unreadable; a reader then sees a gap, as it should."""
        publications = []
        for payload in payloads:
            try:
                publications.append(decode_publication(payload))
            except _BAD_REPLY:
                _malformed_log.warning("skipping a malformed %s in Redis: %r", what, payload[:80])
        return publications

    async def position(self, channel: str) -> StreamPosition:
        try:
            async with asyncio.timeout(self._deadline):
                reply: list[Any] = await self.client.hmget(
                    meta_key(self.prefix, channel), "epoch", "top"
                )
        except CONNECTION_ERRORS as exc:
            raise BrokerError(f"Redis position failed: {exc!r}") from exc
        epoch, top = reply
        if epoch is None:
            return StreamPosition(0, EMPTY_EPOCH)
        try:
            return StreamPosition(int(top or 0), epoch.decode())
        except _BAD_REPLY as exc:
            raise BrokerError(f"bad position reply from Redis: {exc}") from exc

    async def newest(self, channels: Sequence[str]) -> list[Publication]:
        """The newest publication in history of each of `channels` that has one (one round trip
        through the pipe for all of them). Creates nothing."""
        pipe = self.pipe
        if pipe is None or not channels:
            return []
        replies = await asyncio.gather(
            *(
                pipe.call("XREVRANGE", stream_key(self.prefix, channel), "+", "-", "COUNT", 1)
                for channel in channels
            ),
            return_exceptions=True,
        )
        payloads: list[bytes] = []
        for reply in replies:
            if isinstance(reply, BaseException):
                if isinstance(reply, BrokerError):
                    raise reply
                raise BrokerError(f"bad newest reply from Redis: {reply!r}")
            try:
                fields = reply[0][1] if reply else []
                payloads.extend(
                    fields[i + 1] for i in range(0, len(fields), 2) if fields[i] == b"p"
                )
            except _BAD_REPLY:
                continue
        return self._decode_all(payloads, "history entry")

    async def latest_state(self, channel: str) -> list[Publication]:
        reply = await self._run(
            "state",
            self._state,
            [meta_key(self.prefix, channel), state_key(self.prefix, channel)],
            [],
        )
        if not reply or reply[0] is None:
            return []
        cutoff = time.time() - self.options.state_ttl
        try:
            epoch = reply[0].decode()
        except _BAD_REPLY as exc:
            raise BrokerError(f"bad state reply from Redis: {exc}") from exc
        slots = self._decode_all(reply[1:], "state slot")
        # A slot of another epoch cannot survive the publish script; the check costs nothing.
        kept = [p for p in slots if p.epoch == epoch and p.published_at >= cutoff]
        return sorted(kept, key=lambda p: p.offset)


async def publish_direct(
    client: Redis | Sequence[Redis],
    prefix: str,
    channel: str,
    event: str,
    data_json: bytes,
    *,
    options: BrokerOptions | None = None,
    origin: str = "direct",
    idempotency_key: str | None = None,
) -> PublishResult:
    """Publish into Redis without a node, exactly as a node would (same script, same format).

    `client` is a redis-py client of the server, or of each shard in the order of the nodes'
    URL (the channel's shard is chosen as the nodes choose it: `shards.shard_index`).
    `data_json` must already be the validated compact JSON of the payload (see
    `core.publishing`); `options` must match the nodes' history, state and idempotency settings
    (`options_from_config` of their configuration, or `BrokerOptions(limits=..., ...)`).
    Raises `BrokerError`, or ValueError for a malformed key.
    """
    if not isinstance(client, Redis):
        clients = list(client)
        if not clients:
            raise ValueError("publish_direct needs at least one Redis client")
        client = clients[shard_index(channel, len(clients))]
    store = StreamStore(client, prefix, options or BrokerOptions(node_id=origin))
    return await store.publish(
        channel, event, data_json, origin=origin, idempotency_key=idempotency_key
    )
