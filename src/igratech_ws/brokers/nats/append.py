"""Appending a publication to a channel: consecutive offsets, idempotency keys, state slots.

Offsets must be consecutive per channel (`core.recovery.decide_recovery` counts), and JetStream
numbers messages per *stream*, not per subject. So each message carries its channel offset, and
appends are made atomic per channel with JetStream's optimistic concurrency: read the channel's
newest message, publish offset + 1 with ``Nats-Expected-Last-Subject-Sequence`` set to that
message's sequence; the server refuses the publish (error 10071) if anybody appended in between,
and the publisher reads again and retries (bounded). The first message of an empty subject picks a
fresh epoch; every later one copies it.

Idempotency: a publish with a key carries ``Nats-Msg-Id: <channel token>/<key>``; JetStream
refuses a second message with that id within the stream's ``duplicate_window`` (checked before the
expected sequence) and answers with the first one's stream sequence, from which the first
publication is read back. If it has left the stream meanwhile (more than ``history_size`` newer
publications in the channel within the window), the duplicate is reported with offset 0 and
`EMPTY_EPOCH` (position unknown).

State slots: after appending a state event, the same publisher writes it to the channel's state
subject for that event with ``Nats-Rollup: sub`` (the server keeps only the newest message there).
NATS 2.9 has no atomic write of two subjects, so this is a second step: if the publisher dies
between the two, the slot keeps the previous state until the next state publication (the reader,
`NatsBroker.latest_state`, also takes the channel's newest message when it is a newer state).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from igratech_ws.brokers.base import (
    EMPTY_EPOCH,
    BrokerError,
    Publication,
    PublishResult,
    check_data,
    check_idempotency_key,
)
from igratech_ws.brokers.core import new_epoch
from igratech_ws.brokers.nats.history import StreamMissing, err_code, read_last, read_seq
from igratech_ws.brokers.nats.subjects import (
    DEFAULT_PREFIX,
    H_EPOCH,
    H_EVENT,
    H_EXPECTED_LAST_SUBJECT_SEQ,
    H_MSG_ID,
    H_OFFSET,
    H_ORIGIN,
    H_ROLLUP,
    H_TIME,
    append_subject,
    check_prefix,
    message_id,
    state_subject,
    stream_name,
)
from igratech_ws.core.channels import STATE_EVENTS

log = logging.getLogger("igratech_ws.brokers.nats")

ERR_WRONG_LAST_SEQUENCE = 10071
#: Appends lost to other publishers before giving up: each loss means another append succeeded,
#: so only heavy cross-node contention on one channel gets here.
MAX_APPEND_ATTEMPTS = 64


# The last time written, and its text: the publications of one chain or batch share one time
# (the same float object), and a float's repr costs more than the rest of the headers.
_last_time: tuple[float, str] = (0.0, repr(0.0))


def headers_of(publication: Publication) -> dict[str, str]:
    global _last_time
    published_at = publication.published_at
    last, text = _last_time
    if published_at is not last:  # identity: 0.0 == -0.0, yet their reprs differ
        text = repr(published_at)
        _last_time = (published_at, text)
    return {
        H_OFFSET: str(publication.offset),
        H_EPOCH: publication.epoch,
        H_EVENT: publication.event,
        H_TIME: text,
        H_ORIGIN: publication.origin,
    }


async def append(
    js: JetStreamContext,
    prefix: str,
    channel: str,
    event: str,
    data: bytes,
    *,
    origin: str,
    request_timeout: float,
    idempotency_key: str | None = None,
    state_events: frozenset[str] = STATE_EVENTS,
) -> PublishResult:
    """Append one publication after the channel's newest (see the module docstring).

    Raises StreamMissing, BrokerError, and nats-py's errors (the caller maps them).
    """
    stream = stream_name(prefix)
    subject = append_subject(prefix, channel)
    for attempt in range(MAX_APPEND_ATTEMPTS):
        last = await read_last(js, stream, subject)
        if last is None:
            seq, offset, epoch = 0, 0, new_epoch()
        else:
            seq, offset, epoch = last.seq, last.offset, last.epoch
        publication = Publication(channel, offset + 1, epoch, event, data, time.time(), origin)
        headers = headers_of(publication)
        headers[H_EXPECTED_LAST_SUBJECT_SEQ] = str(seq)
        if idempotency_key is not None:
            headers[H_MSG_ID] = message_id(channel, idempotency_key)
        try:
            ack = await js.publish(subject, data, timeout=request_timeout, headers=headers)
        except nats.js.errors.NoStreamResponseError as exc:
            raise StreamMissing from exc
        except nats.js.errors.APIError as exc:
            if err_code(exc) != ERR_WRONG_LAST_SEQUENCE:
                raise
            # Somebody appended since we read: read again. A short random pause spreads out
            # publishers on other nodes that keep colliding on one channel.
            await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
            continue
        if ack.duplicate:
            return await first_of(js, stream, channel, event, data, int(ack.seq))
        if event in state_events:
            await _write_slot(js, prefix, publication, request_timeout)
        return PublishResult(publication)
    raise BrokerError(f"{subject}: gave up after {MAX_APPEND_ATTEMPTS} concurrent appends")


async def first_of(
    js: JetStreamContext, stream: str, channel: str, event: str, data: bytes, seq: int
) -> PublishResult:
    """The duplicate's result: the first publication, read back by its stream sequence."""
    stored = await read_seq(js, stream, seq)
    first = stored.publication(channel) if stored is not None else None
    if first is None or first.channel != channel:
        return PublishResult(Publication(channel, 0, EMPTY_EPOCH, event, data, 0.0, ""), True)
    return PublishResult(
        Publication(
            channel, first.offset, first.epoch, first.event, data, first.published_at, first.origin
        ),
        duplicate=True,
    )


async def _write_slot(
    js: JetStreamContext, prefix: str, publication: Publication, request_timeout: float
) -> None:
    headers = headers_of(publication)
    headers[H_ROLLUP] = "sub"
    subject = state_subject(prefix, publication.channel, publication.event)
    try:
        await js.publish(subject, publication.data, timeout=request_timeout, headers=headers)
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        # The publication is made: failing now would make the caller publish it again. The slot
        # keeps the previous state until the next one (see the module docstring).
        log.warning("NATS state slot %s not written: %r", subject, exc)


async def publish_event(
    nc: NatsClient,
    channel: str,
    event: str,
    data: bytes,
    *,
    prefix: str = DEFAULT_PREFIX,
    origin: str = "backend",
    request_timeout: float = 3.0,
    idempotency_key: str | None = None,
    state_events: frozenset[str] = STATE_EVENTS,
) -> PublishResult:
    """Publish one event into `channel` from outside a node, given a connected nats-py client.

    `data` must be the compact JSON of a valid payload for `event` (validate it with
    `igratech_ws.core.publishing` first: nodes deliver it verbatim). The stream must exist (a
    node creates it at start). Raises BrokerError if NATS cannot take it, ValueError for a
    malformed key.
    """
    check_prefix(prefix)
    check_idempotency_key(idempotency_key)
    check_data(data)
    js = nc.jetstream(timeout=request_timeout)
    try:
        async with asyncio.timeout(request_timeout * 3):
            return await append(
                js,
                prefix,
                channel,
                event,
                data,
                origin=origin,
                request_timeout=request_timeout,
                idempotency_key=idempotency_key,
                state_events=state_events,
            )
    except StreamMissing as exc:
        raise BrokerError(f"stream {stream_name(prefix)} does not exist; start a node") from exc
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise BrokerError(f"NATS publish failed: {exc!r}") from exc
