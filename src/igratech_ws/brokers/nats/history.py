"""Reading a channel back from the JetStream stream: its newest message, a range, a state slot.

Nothing here writes: a read of a subject with no message answers None / empty and leaves no trace
(no epoch marker, no consumer). A range read of a channel that has messages uses one short-lived
ephemeral pull consumer, deleted at the end (and by the server after its inactivity threshold if
the delete is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from igratech_ws.brokers.base import (
    EMPTY_EPOCH,
    BrokerError,
    HistoryPage,
    Publication,
    StreamPosition,
)
from igratech_ws.brokers.nats.subjects import (
    H_EPOCH,
    H_EVENT,
    H_OFFSET,
    H_ORIGIN,
    H_TIME,
    append_subject,
    state_subject,
)

log = logging.getLogger("igratech_ws.brokers.nats")

ERR_STREAM_NOT_FOUND = 10059
#: Backward probes for the start of a history read before reading the subject from its start.
_START_PROBES = 6


class StreamMissing(Exception):
    """The stream does not exist (deleted, or the server lost it)."""


def err_code(exc: BaseException) -> int | None:
    code = getattr(exc, "err_code", None)
    return code if isinstance(code, int) else None


class Stored(msgspec.Struct, frozen=True):
    """A stored message of a channel: its stream sequence, offset, epoch, and (when read back,
    not when just appended) its headers and payload."""

    seq: int
    offset: int
    epoch: str
    headers: dict[str, str] | None = None
    data: bytes = b""

    def publication(self, channel: str) -> Publication | None:
        """The publication this message holds; None for an epoch marker (older versions)."""
        if self.headers is None or H_EVENT not in self.headers:
            return None
        return publication_from(channel, self.headers, self.data)


# The last time read, and its value: the publications of one chain or batch share one time,
# and parsing a float costs more than the rest of the headers.
_last_time: tuple[str, float] = ("0.0", 0.0)


def publication_from(channel: str, headers: dict[str, str] | None, data: bytes) -> Publication:
    """Decode a stored publication. Raises KeyError/ValueError if the headers are not ours."""
    global _last_time
    if headers is None:
        raise KeyError(H_OFFSET)
    offset = int(headers[H_OFFSET])
    epoch = headers[H_EPOCH]
    event = headers[H_EVENT]
    text = headers[H_TIME]
    last, published_at = _last_time
    if text != last:
        published_at = float(text)
        _last_time = (text, published_at)
    return Publication(
        channel=channel,
        offset=offset,
        epoch=epoch,
        event=event,
        data=data,
        published_at=published_at,
        origin=headers.get(H_ORIGIN, ""),
    )


_BLOCK_START = b"NATS/1.0\r\nIgws-Offset:"
_OURS_IN_REST = b"Igws-"


def publication_from_block(channel: str, block: bytes | None, data: bytes) -> Publication | None:
    """`publication_from` of a message's raw header block (``NATS/1.0`` line included) as our
    appends leave it: our five headers first, in `headers_of`'s order. The same publication as
    `publication_from` of the header dict nats-py would parse from `block`; None where that is
    not certain (another order, a name of ours again further on, non-ASCII, a value that does
    not convert): the caller then takes the usual path. About a tenth of the cost of parsing
    the dozen headers of a republished message into a dict."""
    global _last_time
    if block is None or not block.startswith(_BLOCK_START) or not block.isascii():
        return None
    lines = block.split(b"\r\n", 6)
    if len(lines) != 7:
        return None
    _, offset, epoch, event, text, origin, rest = lines
    # Each line names its header exactly (nats-py strips names, then values); a line further
    # on whose name is one of ours would win in the dict: none may mention one.
    if (
        not epoch.startswith(b"Igws-Epoch:")
        or not event.startswith(b"Igws-Event:")
        or not text.startswith(b"Igws-Time:")
        or not origin.startswith(b"Igws-Origin:")
        or _OURS_IN_REST in rest
    ):
        return None
    try:
        number = int(offset[12:])
        time_text = text[10:].strip().decode()
        last, published_at = _last_time
        if time_text != last:
            published_at = float(time_text)
            _last_time = (time_text, published_at)
    except ValueError:
        return None
    return Publication(
        channel,
        number,
        epoch[11:].strip().decode(),
        event[11:].strip().decode(),
        data,
        published_at,
        origin[12:].strip().decode(),
    )


async def stream_exists(js: JetStreamContext, stream: str) -> bool:
    """Whether `stream` is there, asked after a 503 (nobody answered for it): False only if the
    server says it is not; True when it is, or when the question gets no answer either (the
    JetStream meta leader may be in an election too): a stream without a leader for the moment."""
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return False
    except (nats.errors.Error, OSError, TimeoutError):
        return True
    return True


async def read_last(js: JetStreamContext, stream: str, subject: str) -> Stored | None:
    """The subject's newest message, or None if it has none. Raises StreamMissing."""
    try:
        # The JetStream API (not direct get): a missing stream answers 10059 at once, where a
        # direct get would wait for its timeout.
        raw = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError as exc:
        if err_code(exc) == ERR_STREAM_NOT_FOUND:
            raise StreamMissing from exc
        return None
    return _stored(raw, subject)


async def read_seq(js: JetStreamContext, stream: str, seq: int) -> Stored | None:
    """The message at stream sequence `seq`, or None if it is gone. Raises StreamMissing."""
    try:
        raw = await js.get_msg(stream, seq=seq)
    except nats.js.errors.NotFoundError as exc:
        if err_code(exc) == ERR_STREAM_NOT_FOUND:
            raise StreamMissing from exc
        return None
    return _stored(raw, raw.subject or "")


def _stored(raw: api.RawStreamMsg, subject: str) -> Stored:
    headers = raw.headers or {}
    try:
        return Stored(
            int(raw.seq or 0),
            int(headers[H_OFFSET]),
            headers[H_EPOCH],
            dict(headers),
            raw.data or b"",
        )
    except (KeyError, ValueError) as exc:
        raise BrokerError(
            f"{subject} holds a message without igws headers (seq {raw.seq})"
        ) from exc


async def _start_seq(
    js: JetStreamContext, stream: str, subject: str, since_offset: int, last: Stored
) -> int:
    """A stream sequence at or before the message with offset `since_offset` + 1, or 0.

    Offsets are not sequences, but the wanted message is at least `last.offset - want` sequences
    before the newest; other channels' messages in between push it further. So probe backwards
    with growing steps (each probe: the subject's first message at or after a sequence) until
    one lands at or before it: a few requests instead of reading the whole subject.
    """
    want = since_offset + 1
    step = max(1, last.offset - want)
    for _ in range(_START_PROBES):
        guess = last.seq - step
        if guess <= 1:
            return 0
        try:
            raw = await js.get_msg(stream, seq=guess, subject=subject, next=True)
            offset = int((raw.headers or {})[H_OFFSET])
        except (nats.js.errors.NotFoundError, KeyError, ValueError):
            return 0
        if offset <= want:
            return int(raw.seq or 0)
        step *= 4
    return 0


#: Reads of a history page that come back short (see `read_range`) before giving up, and the
#: pauses between them (doubling up to the longest: about 2.3 s in all).
_SHORT_READ_ATTEMPTS = 8
_SHORT_READ_PAUSE_S = 0.05
_SHORT_READ_PAUSE_MAX_S = 0.5


async def read_range(
    nc: NatsClient,
    js: JetStreamContext,
    stream: str,
    subject: str,
    channel: str,
    *,
    since_offset: int,
    limit: int,
    last: Stored,
    cutoff: float,
    wait: float,
) -> tuple[list[Publication], int | None]:
    """Publications with since_offset < offset <= last.offset, published at or after `cutoff`
    (at most `limit`), in order, waiting at most `wait` seconds for the messages; and None if
    the read got as far as `last` (or `limit`), else the highest offset it saw (`since_offset`
    if none): the read came back short.

    Reads the subject through a short-lived pull consumer from `_start_seq` on; the subject holds
    at most `history_size` messages, which bounds the read. On a replicated stream the consumer
    may sit on a replica that is still catching up: it then knows of fewer messages and ends
    early, without an error (tests/brokers/test_nats_cluster.py), hence the short answer.
    """
    start = await _start_seq(js, stream, subject, since_offset, last)
    config = api.ConsumerConfig(
        filter_subject=subject,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.NONE,
        inactive_threshold=max(5.0, wait * 3),
        mem_storage=True,
        num_replicas=1,
    )
    if start:
        config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = start
    try:
        info = await js.add_consumer(stream, config)
    except nats.js.errors.NotFoundError as exc:
        if err_code(exc) == ERR_STREAM_NOT_FOUND:
            raise StreamMissing from exc
        raise
    pending = int(info.num_pending or 0)
    out: list[Publication] = []
    seen = since_offset
    reached = False
    finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def collect(msg: Msg) -> None:
        # A callback, not `next_msg` / `messages`, which cost tasks per message.
        nonlocal pending, seen, reached
        if finished.done():
            return
        headers = msg.headers or {}
        if "Status" in headers and not msg.data:
            finished.set_result(None)  # 404 / 408: nothing more (e.g. expired meanwhile)
            return
        pending -= 1
        try:
            offset = int(headers.get(H_OFFSET, "0"))
        except ValueError:
            offset = 0
        seen = max(seen, offset)
        if since_offset < offset <= last.offset and H_EVENT in headers:
            try:
                publication = publication_from(channel, headers, msg.data)
            except (KeyError, ValueError):
                log.warning("skipping a malformed message in %s", subject)
            else:
                if publication.published_at >= cutoff:
                    out.append(publication)
        if msg.metadata.sequence.stream >= last.seq or len(out) >= limit:
            reached = True
            finished.set_result(None)
        elif pending <= 0:
            finished.set_result(None)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect, pending_msgs_limit=max(1024, pending + 16))
    try:
        if pending > 0:
            # One request for everything: `pending` is at most the subject's bound.
            request = json.dumps({"batch": pending, "no_wait": True}).encode()
            next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{info.name}"
            await nc.publish(next_subject, request, reply=inbox)
            async with asyncio.timeout(wait):
                await finished
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, info.name)
    return out, None if reached else seen


async def read_history(
    nc: NatsClient,
    js: JetStreamContext,
    stream: str,
    subject: str,
    channel: str,
    *,
    since_offset: int,
    limit: int,
    ttl: float,
    wait: float,
) -> HistoryPage:
    """`Broker.history` of the channel stored on `subject`: younger than `ttl` seconds (the
    stream keeps messages longer). Raises StreamMissing."""
    last = await read_last(js, stream, subject)
    if last is None:
        return HistoryPage([], StreamPosition(0, EMPTY_EPOCH))
    top = StreamPosition(last.offset, last.epoch)
    if since_offset >= last.offset or limit <= 0:
        return HistoryPage([], top)
    cutoff = time.time() - ttl
    newest = last.publication(channel)
    if since_offset == last.offset - 1 and newest is not None:
        # Missed only the newest: it is at hand, no consumer needed.
        return HistoryPage([newest] if newest.published_at >= cutoff else [], top)
    publications: list[Publication] = []
    for attempt in range(_SHORT_READ_ATTEMPTS):
        page, short_at = await read_range(
            nc,
            js,
            stream,
            subject,
            channel,
            since_offset=since_offset,
            limit=limit - len(publications),
            last=last,
            cutoff=cutoff,
            wait=wait,
        )
        publications += page
        if short_at is None:
            return HistoryPage(publications, top)
        if short_at == last.offset - 1 and newest is not None:
            # Only the newest is missing, and it is at hand (read from the leader).
            if newest.published_at >= cutoff and len(publications) < limit:
                publications.append(newest)
            return HistoryPage(publications, top)
        # A replica catching up (see `read_range`): read on from where it stopped, after a
        # pause that lets it catch up.
        since_offset = short_at
        await asyncio.sleep(min(_SHORT_READ_PAUSE_MAX_S, _SHORT_READ_PAUSE_S * 2**attempt))
    raise BrokerError(
        f"{subject}: history read stopped at offset {since_offset} of {last.offset} "
        f"{_SHORT_READ_ATTEMPTS} times (a stream replica catching up?)"
    )


async def read_state(
    js: JetStreamContext,
    stream: str,
    prefix: str,
    channel: str,
    *,
    events: frozenset[str],
    ttl: float,
) -> list[Publication]:
    """The channel's state slots of its current epoch younger than `ttl` seconds, oldest offset
    first, and its newest message if that is a newer state (a slot write lost with its
    publisher, see `append`). Raises StreamMissing."""
    last, *slots = await asyncio.gather(
        read_last(js, stream, append_subject(prefix, channel)),
        *(read_last(js, stream, state_subject(prefix, channel, event)) for event in sorted(events)),
    )
    if last is None:
        return []
    cutoff = time.time() - ttl
    latest: dict[str, Publication] = {}
    for stored in [*slots, last]:
        publication = stored.publication(channel) if stored is not None else None
        if (
            publication is not None
            and publication.event in events
            and publication.epoch == last.epoch
            and publication.published_at >= cutoff
        ):
            known = latest.get(publication.event)
            if known is None or known.offset < publication.offset:
                latest[publication.event] = publication
    return sorted(latest.values(), key=lambda p: p.offset)
