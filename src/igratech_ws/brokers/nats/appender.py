"""A node's appends to JetStream: one round trip per append, many publications in flight at once.

The append protocol is `append`'s (consecutive offsets by ``Nats-Expected-Last-Subject-Sequence``,
idempotency keys by ``Nats-Msg-Id``, state slots by ``Nats-Rollup: sub``); what this module adds is
how a node drives it fast:

- **The channel's tail is remembered.** After each acknowledged append the node knows the
  channel's newest stream sequence, offset and epoch, so the next append needs no read first: one
  round trip instead of two. If another node or a backend appended meanwhile, the server refuses
  the expectation (error 10071) and the node reads the tail again and retries; so a remembered
  tail is only ever a guess that the server checks. Tails are kept for the `MAX_TAILS` channels
  published last.
- **Per channel, one append is in flight; what arrives meanwhile goes together next**, as a
  *chain*: the publications are sent back to back without waiting, the first expecting the
  channel's tail (``Nats-Expected-Last-Subject-Sequence``), each later one the message id of the
  one before it (``Nats-Expected-Last-Msg-Id``; the chained ones carry a unique
  ``Nats-Msg-Id``, the last one none). The server stores a chain message only right after its
  predecessor, so what it stored of a chain is always a prefix of it, at consecutive offsets:
  nothing behind a hole, nothing out of order. A refusal in the middle settles the stored ones;
  if the refusal was ``wrong last msg id`` (any other message of the stream came in between: the
  expectation is stream-wide, so another node's or a backend's append to any channel breaks a
  chain), the rest go back to the front of the queue and are sent again behind the new tail; any
  other refusal fails that publication and the ones after it, and so does a timeout (their fate
  is unknown, as for a single append: the tail is read again). A whole chain doubles the node's
  chain limit (`MAX_CHAIN`, the URL option ``chain``), a broken one halves it: on a stream that
  other publishers keep appending to, a node ends up appending one at a time and tries chaining
  again after `PROBE_AFTER` single appends. A node's chain leaves in one write, so its own
  appends to other channels do not break it. Cost: the server keeps each chained id in its
  duplicate table for the stream's duplicate window (about 0.2 KB each).
- **State events go in an atomic batch** on a server that has them (NATS 2.12 and later, stream
  option ``allow_atomic``): the state event and the unkeyed publications queued behind it, then
  the newest state slot of each state event, all stored or none, with the expectation on the
  first message, so a state slot is written in the same atomic step as its publication. Only
  where atomicity is needed: 2.12+ writes every atomic batch to disk with several fsyncs (file
  storage), which made batching every burst slower than chains. On a server without atomic
  batches a state event goes alone, and its slot is a second step (see `append`).
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
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from igratech_ws.brokers.base import BrokerError, Publication, PublishResult
from igratech_ws.brokers.core import new_epoch
from igratech_ws.brokers.nats.append import first_of, headers_of
from igratech_ws.brokers.nats.client import Client
from igratech_ws.brokers.nats.history import StreamMissing, read_last, stream_exists
from igratech_ws.brokers.nats.subjects import (
    H_EXPECTED_LAST_MSG_ID,
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

#: Longest pause between appends again to a stream that has no leader for the moment.
LEADERLESS_PAUSE_S = 0.25

#: Publications sent as one chain at most (see the module docstring).
MAX_CHAIN = 128
#: Single appends in a row after which a node whose chains kept breaking tries chaining again.
PROBE_AFTER = 64

ERR_WRONG_LAST_MSG_ID = 10070
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


class _ChainBroken(Exception):
    """The server refused message `stored` of a chain (the ones before it are stored)."""

    def __init__(self, stored: int, error: _AckError) -> None:
        super().__init__(f"chain broken after {stored}: {error}")
        self.stored = stored
        self.error = error


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


def _settle(pending: _Pending, result: PublishResult) -> None:
    if not pending.future.done():  # the caller may have given up
        pending.future.set_result(result)


class Acks:
    """The node's acknowledgement inbox: `expect()` a token, publish with `reply_to(token)`."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox()
        self._waiting: dict[str, asyncio.Future[_Ack]] = {}
        self._next = 0
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe_inline(self._prefix + ".*", self._on_ack)

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

    def _on_ack(self, msg: Msg) -> None:
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
        nc: Client,
        js: JetStreamContext,
        prefix: str,
        *,
        origin: str,
        timeout: float,
        state_events: frozenset[str],
        atomic: bool,
        max_chain: int = MAX_CHAIN,
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
        #: Appends made (messages acknowledged as stored, or batches), how many of them were
        #: atomic batches, chains sent whole, chains broken (for tests and metrics).
        self.appends = 0
        self.batches = 0
        self.chains = 0
        self.chain_breaks = 0
        #: Publications chained at most (1: no chains); `chain_limit` is the current limit, halved
        #: at each broken chain and doubled after each whole one.
        self.max_chain = max(1, max_chain)
        self.chain_limit = self.max_chain
        self._calm = 0
        # Chain message ids: unique to this appender; no "/", so never an idempotency key's id.
        self._chain_prefix = uuid.uuid4().hex[:16] + "."
        self._chained = 0

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
        return await self.enqueue(channel, event, data, idempotency_key)

    def enqueue(
        self, channel: str, event: str, data: bytes, idempotency_key: str | None
    ) -> asyncio.Future[PublishResult]:
        """`publish` without the wait: the future of its result (or of its error). The caller
        awaits it or cancels it (given up: not sent, if it has not been yet)."""
        future: asyncio.Future[PublishResult] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(channel)
        if queue is None:
            queue = self._queues[channel] = deque()
        queue.append(_Pending(event, data, idempotency_key, future))
        if channel not in self._tasks:
            self._tasks[channel] = asyncio.ensure_future(self._drain(channel, queue))
        return future

    async def _drain(self, channel: str, queue: deque[_Pending]) -> None:
        try:
            while queue:
                # A publication whose caller gave up (its deadline passed, or it was cancelled)
                # before it was sent is not sent: its caller was told it failed. They wait at
                # the front: deadlines pass in the order the publications were queued.
                if queue[0].future.done():
                    queue.popleft()
                    continue
                group = self._take(queue)
                try:
                    async with asyncio.timeout(self.timeout):
                        await self._append(channel, group, queue)
                except BaseException as exc:
                    # What happened to the append is unknown: read the tail next time. The
                    # publications already acknowledged keep their results.
                    self._tails.pop(channel, None)
                    error = exc
                    if isinstance(exc, TimeoutError):
                        error = BrokerError(f"NATS did not acknowledge within {self.timeout:g}s")
                    for pending in group:
                        if not pending.future.done():
                            pending.future.set_exception(error)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
        finally:
            self._tasks.pop(channel, None)
            if not queue:
                self._queues.pop(channel, None)

    def _take(self, queue: deque[_Pending]) -> list[_Pending]:
        """The next append: a keyed publication alone; on a server with atomic batches, a state
        event and the unkeyed ones after it (one batch); otherwise a chain of unkeyed non-state
        publications (`chain_limit` at most; one when chaining is off)."""
        first = queue.popleft()
        group = [first]
        if first.key is not None:
            return group
        if first.event in self.state_events:
            if not self.atomic:
                return group  # appended, then its slot written (`_append_one`)
            while queue and queue[0].key is None and len(group) < MAX_BATCH:
                group.append(queue.popleft())
            return group
        while (
            queue
            and queue[0].key is None
            and queue[0].event not in self.state_events
            and len(group) < self.chain_limit
        ):
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

    async def _append(self, channel: str, group: list[_Pending], queue: deque[_Pending]) -> None:
        """Append `group` (one `_take`) and settle each publication's future with its result."""
        alone = group[0]
        # A state event goes as a batch (its slot in the same atomic step), unless it is a keyed
        # one the batch said was a duplicate: alone, JetStream tells where the first one is.
        batch = self.atomic and alone.event in self.state_events
        rest = group
        for attempt in range(MAX_ATTEMPTS):
            tail = await self._tail(channel)
            try:
                if batch:
                    results = await self._append_batch(channel, tail, rest)
                    for pending, result in zip(rest, results, strict=True):
                        _settle(pending, result)
                    return
                if len(rest) == 1:
                    _settle(rest[0], await self._append_one(channel, tail, rest[0]))
                    self._single_held()
                    return
                await self._append_chain(channel, tail, rest)
                self._chain_held(len(rest))
                return
            except StreamMissing:
                # Nobody answered for the stream (a 503): what of `rest` is not settled was not
                # stored, and the tail we know still holds. A stream that is gone, the broker
                # creates. One without a leader for the moment (an election after a server
                # loss) gets the same publications again, in their place before the channel's
                # later ones, once a leader answers (or their callers give up).
                if not await stream_exists(self._js, self.stream):
                    raise
                rest = [pending for pending in rest if not pending.future.done()]
                if not rest:
                    return
                await asyncio.sleep(random.uniform(0, min(LEADERLESS_PAUSE_S, 0.005 * 2**attempt)))
                continue
            except _ChainBroken as broken:
                stored, exc = broken.stored, broken.error
                rest = rest[stored:]
                if stored and exc.err_code == ERR_WRONG_LAST_MSG_ID:
                    # Another append came between two of the chain (another node's, a backend's:
                    # any message of the stream): the stored ones are settled and the tail is
                    # known; the rest go back to the front of the queue, in order.
                    self._chain_broken()
                    queue.extendleft(reversed(rest))
                    return
                if stored:
                    # The chain's message `stored` was refused for its own reason: it and the
                    # ones after it (refused too: each expects its predecessor) fail.
                    raise BrokerError(f"NATS refused the append: {exc}") from None
                # Nothing of the chain was stored: the first one's error decides, below.
            except _AckError as error:
                exc = error
            if exc.err_code == ERR_BATCH_DUPLICATE_ID and batch and len(rest) == 1:
                batch = False
                continue
            if exc.err_code == ERR_ATOMIC_DISABLED:
                # The stream was updated by a node that does not ask for atomic batches
                # (an older version): go on one by one.
                log.warning(
                    "NATS stream %s refuses atomic batches: appending one by one", self.stream
                )
                self.atomic = False
                for pending in rest:
                    await self._append(channel, [pending], queue)
                return
            if exc.err_code not in _CONFLICTS:
                raise BrokerError(f"NATS refused the append: {exc}") from None
            # Somebody appended since the tail we knew: read it again. A short random pause
            # spreads out publishers on other nodes that keep colliding on one channel.
            self._tails.pop(channel, None)
            if attempt:
                await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
        raise BrokerError(f"{channel}: gave up after {MAX_ATTEMPTS} concurrent appends")

    def _single_held(self) -> None:
        if self.chain_limit == 1 and self.max_chain > 1:
            self._calm += 1
            if self._calm >= PROBE_AFTER:  # try chaining again
                self._calm = 0
                self.chain_limit = 2

    def _chain_held(self, length: int) -> None:
        self.chains += 1
        if length >= self.chain_limit:
            self.chain_limit = min(self.max_chain, self.chain_limit * 2)

    def _chain_broken(self) -> None:
        self.chain_breaks += 1
        self.chain_limit = max(1, self.chain_limit // 2)
        self._calm = 0

    def _chain_id(self) -> str:
        self._chained += 1
        return f"{self._chain_prefix}{self._chained:x}"

    async def _append_chain(self, channel: str, tail: _Tail, group: list[_Pending]) -> None:
        """Send `group` (two or more unkeyed publications) without waiting in between: the first
        expects the channel's tail, each later one the previous one's message id. Settles the
        future of each one stored; raises `_ChainBroken` (how many were stored, and the first
        refusal) if the server refused one."""
        now = time.time()
        subject = append_subject(self.prefix, channel)
        sent: list[tuple[Publication, str, asyncio.Future[_Ack]]] = []
        last = len(group) - 1
        previous = ""
        try:
            # No await yields in between unless nats-py's buffer is full, so a node's chain
            # reaches the server in one piece, between no other appends of the same node.
            for index, pending in enumerate(group):
                publication = Publication(
                    channel,
                    tail.offset + 1 + index,
                    tail.epoch,
                    pending.event,
                    pending.data,
                    now,
                    self.origin,
                )
                headers = headers_of(publication)
                if index == 0:
                    headers[H_EXPECTED_LAST_SUBJECT_SEQ] = str(tail.seq)
                else:
                    headers[H_EXPECTED_LAST_MSG_ID] = previous
                if index < last:
                    previous = headers[H_MSG_ID] = self._chain_id()
                reply, future = self._acks.expect()
                sent.append((publication, reply, future))
                await self._nc.publish(subject, pending.data, reply=reply, headers=headers)
            # The acknowledgements come in order. What the server stored is a prefix of the
            # chain: a message is stored only right after its predecessor (the id is unique).
            for stored, (pending, (publication, _, future)) in enumerate(
                zip(group, sent, strict=True)
            ):
                ack = await future
                if ack.error is not None:
                    raise _ChainBroken(stored, _AckError(ack.error))
                if ack.duplicate:  # a chain id is never sent twice
                    raise BrokerError(f"NATS took chain message {stored} for a duplicate")
                self.appends += 1
                self._remember(channel, _Tail(ack.seq, publication.offset, publication.epoch))
                _settle(pending, PublishResult(publication))
        finally:
            for _, reply, future in sent:
                self._acks.forget(reply)
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: no "never retrieved" report

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
            channel,
            tail.offset + 1,
            tail.epoch,
            pending.event,
            pending.data,
            time.time(),
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
            return await first_of(
                self._js, self.stream, channel, pending.event, pending.data, ack.seq
            )
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
