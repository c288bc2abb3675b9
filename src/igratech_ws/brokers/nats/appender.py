"""A node's appends to JetStream: one round trip per append, several publications per append.

The append protocol is `append`'s (consecutive offsets by ``Nats-Expected-Last-Subject-Sequence``,
idempotency keys by ``Nats-Msg-Id``, state slots by ``Nats-Rollup: sub``); what this module adds is
how a node drives it fast:

- **The channel's tail is remembered.** After each acknowledged append the node knows the
  channel's newest stream sequence, offset and epoch, so the next append needs no read first: one
  round trip instead of two. If another node or a backend appended meanwhile, the server refuses
  the expectation (error 10071) and the node reads the tail again and retries; so a remembered
  tail is only ever a guess that the server checks. Tails are kept for the `MAX_TAILS` channels
  published last.
- **Per channel, one append is in flight; what arrives meanwhile goes together next.** The
  publications queued behind it leave as one *atomic batch* (NATS 2.12 and later, stream option
  ``allow_atomic``): every message of the channel, then the newest state slot of each state event,
  all stored or none, with the expectation on the first message. So a burst of publications to one
  channel costs one round trip, the server stores and republishes them back to back (the nodes get
  them in one read), and a state slot is written in the same atomic step as its publication. On a
  server without atomic batches they leave one by one, each in one round trip.
- A publication with an idempotency key always goes alone (a duplicate id would fail a whole
  batch): JetStream answers a duplicate with the first one's sequence, which is read back.
- Acknowledgements come on one inbox subscription of the node and are decoded here (nats-py's
  request path costs more than the append).

Order: publications made through one broker instance are appended in call order, per channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from igratech_ws.brokers.base import BrokerError, Publication, PublishResult
from igratech_ws.brokers.core import new_epoch
from igratech_ws.brokers.nats.append import first_of, headers_of
from igratech_ws.brokers.nats.history import StreamMissing, read_last
from igratech_ws.brokers.nats.subjects import (
    H_EXPECTED_LAST_SUBJECT_SEQ,
    H_MSG_ID,
    H_ROLLUP,
    append_subject,
    message_id,
    state_subject,
    stream_name,
)

log = logging.getLogger("igratech_ws.brokers.nats")

#: Channels whose tail a node remembers (the ones it published last).
MAX_TAILS = 65_536
#: Messages in one atomic batch at most (the server's own limit is 1000).
MAX_BATCH = 256
#: Appends lost to other publishers before a publication fails (each loss means another append
#: succeeded, so only heavy cross-node contention on one channel gets here).
MAX_ATTEMPTS = 64

ERR_WRONG_LAST_SEQUENCE = 10071
#: "wrong last sequence" as an atomic batch reports it.
ERR_WRONG_LAST_SEQUENCE_BATCH = 10164
ERR_ATOMIC_DISABLED = 10174
ERR_BATCH_DUPLICATE_ID = 10201
_CONFLICTS = (ERR_WRONG_LAST_SEQUENCE, ERR_WRONG_LAST_SEQUENCE_BATCH)

H_BATCH_ID = "Nats-Batch-Id"
H_BATCH_SEQUENCE = "Nats-Batch-Sequence"
H_BATCH_COMMIT = "Nats-Batch-Commit"


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _Ack(msgspec.Struct):
    """A JetStream publish acknowledgement (`PubAck`), or its error."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_ack_decoder = msgspec.json.Decoder(_Ack)


class _AckError(Exception):
    def __init__(self, error: _ApiError) -> None:
        super().__init__(f"{error.description} (err_code {error.err_code})")
        self.err_code = error.err_code


@dataclass(slots=True)
class _Tail:
    seq: int
    offset: int
    epoch: str


@dataclass(slots=True)
class _Pending:
    event: str
    data: bytes
    key: str | None
    future: asyncio.Future[PublishResult]


class Acks:
    """The node's acknowledgement inbox: `expect()` a token, publish with `reply_to(token)`."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._waiting: dict[str, asyncio.Future[_Ack]] = {}
        self._next = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + ".*", cb=self._on_ack)

    def expect(self) -> tuple[str, asyncio.Future[_Ack]]:
        """A reply subject and the future of the acknowledgement that will come to it."""
        self._next += 1
        token = str(self._next)
        future: asyncio.Future[_Ack] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        return f"{self._prefix}.{token}", future

    def forget(self, reply: str) -> None:
        """Stop waiting for the acknowledgement sent to `reply` (given up on)."""
        self._waiting.pop(reply.rpartition(".")[2], None)

    async def _on_ack(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject.rpartition(".")[2], None)
        if future is None or future.done():
            return  # given up on (timed out)
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            future.set_exception(StreamMissing())  # no stream listens on the subject
            return
        try:
            future.set_result(_ack_decoder.decode(msg.data))
        except msgspec.DecodeError as exc:
            future.set_exception(BrokerError(f"bad acknowledgement from NATS: {exc}"))

    def fail_all(self, error: BaseException) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)

    async def close(self) -> None:
        self.fail_all(BrokerError("broker is closed"))
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()


class Appender:
    """Appends of one node (see the module docstring). Caller's duties: `start` once after
    connecting, `close` once; `atomic` only when the stream allows atomic batches."""

    def __init__(
        self,
        nc: NatsClient,
        js: JetStreamContext,
        prefix: str,
        *,
        origin: str,
        timeout: float,
        state_events: frozenset[str],
        atomic: bool,
    ) -> None:
        self._nc = nc
        self._js = js
        self.prefix = prefix
        self.stream = stream_name(prefix)
        self.origin = origin
        self.timeout = timeout
        self.state_events = state_events
        self.atomic = atomic
        self._acks = Acks(nc)
        self._tails: OrderedDict[str, _Tail] = OrderedDict()
        # Channels with publications waiting, and the task appending each one's queue.
        self._queues: dict[str, deque[_Pending]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: Appends made, and how many of them were atomic batches (for tests and metrics).
        self.appends = 0
        self.batches = 0

    async def start(self) -> None:
        await self._acks.start()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for queue in self._queues.values():
            for pending in queue:
                if not pending.future.done():
                    pending.future.set_exception(BrokerError("broker is closed"))
        self._queues.clear()
        await self._acks.close()

    def forget_tail(self, channel: str | None = None) -> None:
        """Forget remembered tails (all of them when `channel` is None): after the stream was
        recreated, or when the broker cannot tell what happened to an append."""
        if channel is None:
            self._tails.clear()
        else:
            self._tails.pop(channel, None)

    async def publish(
        self, channel: str, event: str, data: bytes, idempotency_key: str | None
    ) -> PublishResult:
        """Queue one publication behind the channel's earlier ones; its result once appended.

        Raises StreamMissing, BrokerError, or nats-py's errors (the broker maps them)."""
        future: asyncio.Future[PublishResult] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(channel)
        if queue is None:
            queue = self._queues[channel] = deque()
        queue.append(_Pending(event, data, idempotency_key, future))
        if channel not in self._tasks:
            self._tasks[channel] = asyncio.ensure_future(self._drain(channel, queue))
        return await future

    async def _drain(self, channel: str, queue: deque[_Pending]) -> None:
        try:
            while queue:
                group = self._take(queue)
                try:
                    async with asyncio.timeout(self.timeout):
                        results = await self._append(channel, group)
                except BaseException as exc:
                    # What happened to the append is unknown: read the tail next time.
                    self._tails.pop(channel, None)
                    error = exc
                    if isinstance(exc, TimeoutError):
                        error = BrokerError(f"NATS did not acknowledge within {self.timeout:g}s")
                    for pending in group:
                        if not pending.future.done():
                            pending.future.set_exception(error)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for pending, result in zip(group, results, strict=True):
                    if not pending.future.done():
                        pending.future.set_result(result)
        finally:
            self._tasks.pop(channel, None)
            if not queue:
                self._queues.pop(channel, None)

    def _take(self, queue: deque[_Pending]) -> list[_Pending]:
        """The next append: one keyed publication alone, or unkeyed ones up to the next key."""
        first = queue.popleft()
        group = [first]
        if first.key is not None or not self.atomic:
            return group
        while queue and queue[0].key is None and len(group) < MAX_BATCH:
            group.append(queue.popleft())
        return group

    async def _tail(self, channel: str) -> _Tail:
        tail = self._tails.get(channel)
        if tail is not None:
            self._tails.move_to_end(channel)
            return tail
        stored = await read_last(self._js, self.stream, append_subject(self.prefix, channel))
        if stored is None:
            return _Tail(0, 0, new_epoch())
        return _Tail(stored.seq, stored.offset, stored.epoch)

    def _remember(self, channel: str, tail: _Tail) -> None:
        self._tails[channel] = tail
        self._tails.move_to_end(channel)
        while len(self._tails) > MAX_TAILS:
            self._tails.popitem(last=False)

    async def _append(self, channel: str, group: list[_Pending]) -> list[PublishResult]:
        alone = group[0]
        # A state event alone goes as a batch too (its slot in the same atomic step), unless it
        # is a keyed one the batch said was a duplicate: alone, JetStream tells where the first is.
        batch = len(group) > 1 or (self.atomic and alone.event in self.state_events)
        for attempt in range(MAX_ATTEMPTS):
            tail = await self._tail(channel)
            try:
                if batch:
                    return await self._append_batch(channel, tail, group)
                return [await self._append_one(channel, tail, alone)]
            except _AckError as exc:
                if exc.err_code == ERR_BATCH_DUPLICATE_ID and len(group) == 1:
                    batch = False
                    continue
                if exc.err_code == ERR_ATOMIC_DISABLED:
                    # The stream was updated by a node that does not ask for atomic batches
                    # (an older version): go on one by one.
                    log.warning(
                        "NATS stream %s refuses atomic batches: appending one by one", self.stream
                    )
                    self.atomic = False
                    results = []
                    for pending in group:
                        results.extend(await self._append(channel, [pending]))
                    return results
                if exc.err_code not in _CONFLICTS:
                    raise BrokerError(f"NATS refused the append: {exc}") from None
                # Somebody appended since the tail we knew: read it again. A short random pause
                # spreads out publishers on other nodes that keep colliding on one channel.
                self._tails.pop(channel, None)
                if attempt:
                    await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
        raise BrokerError(f"{channel}: gave up after {MAX_ATTEMPTS} concurrent appends")

    async def _send(self, subject: str, data: bytes, headers: dict[str, str]) -> _Ack:
        reply, future = self._acks.expect()
        try:
            await self._nc.publish(subject, data, reply=reply, headers=headers)
            ack = await future
        finally:
            self._acks.forget(reply)
        if ack.error is not None:
            raise _AckError(ack.error)
        return ack

    async def _append_one(self, channel: str, tail: _Tail, pending: _Pending) -> PublishResult:
        publication = Publication(
            channel, tail.offset + 1, tail.epoch, pending.event, pending.data, time.time(),
            self.origin,
        )
        headers = headers_of(publication)
        headers[H_EXPECTED_LAST_SUBJECT_SEQ] = str(tail.seq)
        if pending.key is not None:
            headers[H_MSG_ID] = message_id(channel, pending.key)
        ack = await self._send(append_subject(self.prefix, channel), pending.data, headers)
        self.appends += 1
        if ack.duplicate:
            # Nothing was appended: the tail we know still holds.
            return await first_of(self._js, self.stream, channel, pending.event, pending.data,
                                  ack.seq)
        self._remember(channel, _Tail(ack.seq, publication.offset, publication.epoch))
        if pending.event in self.state_events:
            await self._write_slot(publication)
        return PublishResult(publication)

    async def _write_slot(self, publication: Publication) -> None:
        """Write the state slot of a publication appended alone (a second step: see `append`)."""
        headers = headers_of(publication)
        headers[H_ROLLUP] = "sub"
        subject = state_subject(self.prefix, publication.channel, publication.event)
        try:
            await self._send(subject, publication.data, headers)
        except (_AckError, StreamMissing, nats.errors.Error, OSError) as exc:
            # The publication is made: failing now would make the caller publish it again. The
            # slot keeps the previous state until the next one (see `append`).
            log.warning("NATS state slot %s not written: %r", subject, exc)

    async def _append_batch(
        self, channel: str, tail: _Tail, group: list[_Pending]
    ) -> list[PublishResult]:
        now = time.time()
        publications = [
            Publication(channel, tail.offset + i, tail.epoch, p.event, p.data, now, self.origin)
            for i, p in enumerate(group, 1)
        ]
        subject = append_subject(self.prefix, channel)
        messages: list[tuple[str, bytes, dict[str, str]]] = []
        for publication in publications:
            messages.append((subject, publication.data, headers_of(publication)))
        # On the first message only: the server checks it against the stream before the batch.
        messages[0][2][H_EXPECTED_LAST_SUBJECT_SEQ] = str(tail.seq)
        key = group[0].key
        if key is not None:  # a keyed publication is always alone (see `_take`)
            messages[0][2][H_MSG_ID] = message_id(channel, key)
        # The newest state of each state event, after the publications: same atomic step.
        slots: dict[str, Publication] = {}
        for publication in publications:
            if publication.event in self.state_events:
                slots[publication.event] = publication
        for publication in sorted(slots.values(), key=lambda p: p.offset):
            headers = headers_of(publication)
            headers[H_ROLLUP] = "sub"
            messages.append(
                (state_subject(self.prefix, channel, publication.event), publication.data, headers)
            )
        batch_id = uuid.uuid4().hex
        last = len(messages)
        for index, (message_subject, data, headers) in enumerate(messages, 1):
            headers[H_BATCH_ID] = batch_id
            headers[H_BATCH_SEQUENCE] = str(index)
            if index < last:
                await self._nc.publish(message_subject, data, headers=headers)
        final_subject, final_data, final_headers = messages[-1]
        final_headers[H_BATCH_COMMIT] = "1"
        ack = await self._send(final_subject, final_data, final_headers)
        self.appends += 1
        self.batches += 1
        # The batch is stored at consecutive sequences ending at ack.seq; the slots come last.
        last_seq = ack.seq - len(slots)
        self._remember(channel, _Tail(last_seq, publications[-1].offset, tail.epoch))
        return [PublishResult(p) for p in publications]

