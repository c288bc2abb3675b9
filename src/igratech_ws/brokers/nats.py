"""The NATS JetStream broker: channel history in one stream, live fan-out by republish.

Names (``P`` is the prefix, the URL's ``prefix`` query parameter, ``igws`` by default; it is one or
more subject tokens of ``A-Z a-z 0-9 _ -`` joined by ``.``)::

    stream            IGWS_<P with "." replaced by "_">
    append subject    P.ch.<token>      captured by the stream (subjects ["P.ch.>"])
    live subject      P.live.<token>    the stream republishes every *stored* message here
    control subject   P.control         core NATS, no storage

``<token>`` is the channel name as one subject token: every character outside ``A-Z a-z 0-9 _ - :``
becomes ``%XX`` (the hex of its UTF-8 bytes), so ``game:g-1.5`` is ``game:g-1%2E5``
(`channel_token` / `channel_from_token`). NATS splits subjects on ``.`` and treats ``*`` / ``>`` as
wildcards; ``%`` itself is escaped, so the mapping is reversible.

A message on the append subject is one publication: the payload is the event's ``data`` (compact
JSON, verbatim) and the headers are::

    Igws-Offset   decimal offset, consecutive per channel from 1 ("0" marks an epoch marker)
    Igws-Epoch    the epoch of the channel's stream (random hex, chosen by its first message)
    Igws-Event    the event name (absent on an epoch marker)
    Igws-Time     publication time, Unix seconds as a Python float repr
    Igws-Origin   the publishing node id (or any name a backend chooses)
    Nats-Expected-Last-Subject-Sequence   the stream sequence of the message it follows (0: none)

Why this design. Offsets must be consecutive per channel (`core.recovery.decide_recovery` counts),
and JetStream numbers messages per *stream*, not per subject. So each message carries its channel
offset, and appends are made atomic per channel with JetStream's optimistic concurrency: read the
channel's last message, publish offset + 1 with ``Nats-Expected-Last-Subject-Sequence`` set to that
message's sequence; the server refuses the publish (error 10071) if anybody appended in between,
and the publisher reads again and retries (bounded). One stream holds every channel, bounded by
``MaxMsgsPerSubject = limits.size`` and ``MaxAge`` (below); a stream per channel would cost a
stream (and its server-side state and API calls) per game and user, which NATS does not scale to.

Live delivery uses the stream's RePublish (NATS >= 2.9): the server republishes a message to
``P.live.<token>`` only once it is stored, in stream order for one publishing connection; two
messages stored from different connections were once seen republished swapped (CI, NATS 2.9.10),
which the hub repairs as a gap (history fill, late duplicate dropped). A node holds one core
subscription per channel its clients follow. Subscribing to the append subject instead would be
wrong: core subscribers also receive publishes that the stream *refused*.

Epochs. The first message of a channel's (empty) subject picks a random epoch, and every later
message copies it. When the channel's messages are all gone (idle longer than ``MaxAge``, or the
stream deleted or lost), the next message starts over at offset 1 with a new epoch, so a client
holding an old position is told recovery failed rather than receiving a wrong sequence. `position`
and `history` of a channel with no message append an *epoch marker* (offset 0, no event, empty
payload) so that the epoch they answer is the one the next publication will carry; it occupies one
of the ``size`` slots until ``size`` publications push it out, and subscribers skip it.

Expiry. History is cut at read time by ``limits.ttl`` (from ``Igws-Time``), while the stream keeps
messages for ``MaxAge = max(10 * ttl, 1 day)`` (URL option ``max_age``, seconds, at least ``ttl``),
like the Redis broker's stream metadata: expiry drops a channel's history but not its position
(offset and epoch), which goes on until the channel has been idle for ``MaxAge``. The cost is
storage: up to ``size`` messages per channel used within ``MaxAge``.

Publishing from a backend straight into NATS: use `publish_event` with a connected ``nats`` client
(it does the read / expected-sequence / retry dance); a plain publish without the headers would
break the offsets. A control message is the JSON of a `brokers.base.ControlMessage` on
``P.control``, e.g. ``{"kind":"logout","origin":"backend","user_id":"u-1","reason":"forced"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from igratech_ws.brokers.base import (
    BrokerError,
    BrokerState,
    ControlHandler,
    ControlKinds,
    HistoryLimits,
    HistoryPage,
    Publication,
    PublicationHandler,
    StateHandler,
    StreamPosition,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "igws"

H_OFFSET = "Igws-Offset"
H_EPOCH = "Igws-Epoch"
H_EVENT = "Igws-Event"
H_TIME = "Igws-Time"
H_ORIGIN = "Igws-Origin"
H_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"

#: JetStream error codes we act on.
_ERR_WRONG_LAST_SEQUENCE = 10071
_ERR_STREAM_NOT_FOUND = 10059
_ERR_STREAM_NAME_IN_USE = 10058

#: Appends lost to other publishers before giving up: each loss means another append succeeded,
#: so only heavy cross-node contention on one channel gets here.
MAX_APPEND_ATTEMPTS = 64
#: Local publishers to one channel wait on one of this many locks (by hash) instead of racing
#: each other through JetStream; a fixed array keeps the map bounded whatever the channel names.
_LOCK_STRIPES = 256
#: Backward probes for the start of a history read before reading the subject from its start.
_START_PROBES = 6

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-:")
_ESCAPE_RE = re.compile(r"%([0-9A-F]{2})")


# --- names ------------------------------------------------------------------------------------


def channel_token(channel: str) -> str:
    """`channel` as one valid NATS subject token (reversible; see the module docstring)."""
    if not channel:
        raise ValueError("a channel name is not empty")
    raw = channel.encode()
    if all(b in _SAFE for b in raw):
        return channel
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


def channel_from_token(token: str) -> str:
    """The channel name that `channel_token` turned into `token`."""
    if "%" not in token:
        return token
    out = bytearray()
    index = 0
    while index < len(token):
        char = token[index]
        if char == "%":
            match = _ESCAPE_RE.match(token, index)
            if match is None:
                raise ValueError(f"bad escape in subject token {token!r}")
            out.append(int(match.group(1), 16))
            index += 3
        else:
            out.extend(char.encode())
            index += 1
    return out.decode()


def stream_name(prefix: str) -> str:
    """The JetStream stream that holds the channels of `prefix`."""
    return "IGWS_" + prefix.replace(".", "_")


def check_prefix(prefix: str) -> str:
    """Return `prefix` if it is valid subject tokens, else raise ValueError."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"NATS prefix {prefix!r} must be tokens of A-Z a-z 0-9 _ - joined by '.'")
    return prefix


def append_subject(prefix: str, channel: str) -> str:
    return f"{prefix}.ch.{channel_token(channel)}"


def live_subject(prefix: str, channel: str) -> str:
    return f"{prefix}.live.{channel_token(channel)}"


def control_subject(prefix: str) -> str:
    return f"{prefix}.control"


def parse_url(url: str) -> tuple[str, dict[str, str]]:
    """Split a broker URL into the server URL for nats-py and our own query options.

    Options: ``prefix`` (subject/stream namespace), ``storage`` (``file`` or ``memory``),
    ``replicas`` (stream replicas), ``timeout`` (seconds per request), ``max_age`` (seconds the
    stream keeps messages, hence an idle channel's position). Unknown ones are refused
    so that a typo is not silently ignored.
    """
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(options) - {"prefix", "storage", "replicas", "timeout", "max_age"}
    if unknown:
        raise ValueError(f"unknown NATS URL option(s): {', '.join(sorted(unknown))}")
    server = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return server, options


# --- one stored message -------------------------------------------------------------------------


class _Last(msgspec.Struct, frozen=True):
    """A channel's newest stored message: its stream sequence, offset, epoch, and (when read
    back, not when just appended) its headers and payload."""

    seq: int
    offset: int
    epoch: str
    headers: dict[str, str] | None = None
    data: bytes = b""


def _publication_from(channel: str, headers: dict[str, str] | None, data: bytes) -> Publication:
    """Decode a stored publication. Raises KeyError/ValueError if the headers are not ours."""
    if headers is None:
        raise KeyError(H_OFFSET)
    return Publication(
        channel=channel,
        offset=int(headers[H_OFFSET]),
        epoch=headers[H_EPOCH],
        event=headers[H_EVENT],
        data=data,
        published_at=float(headers[H_TIME]),
        origin=headers.get(H_ORIGIN, ""),
    )


def _new_epoch() -> str:
    return uuid.uuid4().hex[:12]


class _StreamMissing(Exception):
    """The stream does not exist (deleted, or the server lost it)."""


def _err_code(exc: BaseException) -> int | None:
    code = getattr(exc, "err_code", None)
    return code if isinstance(code, int) else None


async def _read_last(js: JetStreamContext, stream: str, subject: str) -> _Last | None:
    """The subject's newest message, or None if it has none. Raises _StreamMissing."""
    try:
        # The JetStream API (not direct get): a missing stream answers 10059 at once, where a
        # direct get would wait for its timeout.
        raw = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError as exc:
        if _err_code(exc) == _ERR_STREAM_NOT_FOUND:
            raise _StreamMissing from exc
        return None
    headers = raw.headers or {}
    try:
        return _Last(
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


async def _append(
    js: JetStreamContext,
    stream: str,
    subject: str,
    *,
    event: str | None,
    data: bytes,
    origin: str,
    request_timeout: float,
) -> tuple[_Last, float]:
    """Append one message after the subject's newest, atomically (see the module docstring).

    `event` None appends an epoch marker, only onto an empty subject: if the subject is not empty
    by then, nothing is appended and its newest message is returned. Returns the stored position
    and the time put in ``Igws-Time``. Raises _StreamMissing, BrokerError.
    """
    for attempt in range(MAX_APPEND_ATTEMPTS):
        last = await _read_last(js, stream, subject)
        if event is None and last is not None:
            return last, 0.0
        if last is None:
            seq, offset, epoch = 0, 0, _new_epoch()
        else:
            seq, offset, epoch = last.seq, last.offset, last.epoch
        offset = offset + 1 if event is not None else 0
        now = time.time()
        headers = {
            H_EXPECTED_LAST_SUBJECT_SEQ: str(seq),
            H_OFFSET: str(offset),
            H_EPOCH: epoch,
            H_TIME: repr(now),
            H_ORIGIN: origin,
        }
        if event is not None:
            headers[H_EVENT] = event
        try:
            ack = await js.publish(subject, data, timeout=request_timeout, headers=headers)
        except nats.js.errors.NoStreamResponseError as exc:
            raise _StreamMissing from exc
        except nats.js.errors.APIError as exc:
            if _err_code(exc) != _ERR_WRONG_LAST_SEQUENCE:
                raise
            # Somebody appended since we read: read again. A short random pause spreads out
            # publishers on other nodes that keep colliding on one channel.
            await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
            continue
        return _Last(ack.seq, offset, epoch), now
    raise BrokerError(f"{subject}: gave up after {MAX_APPEND_ATTEMPTS} concurrent appends")


@contextlib.contextmanager
def _as_broker_error(what: str) -> Iterator[None]:
    """Turn every failure of the NATS client into BrokerError, which callers know to handle."""
    try:
        yield
    except BrokerError:
        raise
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise BrokerError(f"NATS {what} failed: {exc!r}") from exc


async def publish_event(
    nc: NatsClient,
    channel: str,
    event: str,
    data: bytes,
    *,
    prefix: str = DEFAULT_PREFIX,
    origin: str = "backend",
    request_timeout: float = 3.0,
) -> Publication:
    """Publish one event into `channel` from outside a node, given a connected nats-py client.

    `data` must be the compact JSON of a valid payload for `event` (validate it with
    `igratech_ws.core.publishing` first: nodes deliver it verbatim). The stream must exist (a
    node creates it at start). Raises BrokerError if NATS cannot take it.
    """
    check_prefix(prefix)
    js = nc.jetstream(timeout=request_timeout)
    with _as_broker_error("publish"):
        try:
            async with asyncio.timeout(request_timeout * 3):
                last, now = await _append(
                    js,
                    stream_name(prefix),
                    append_subject(prefix, channel),
                    event=event,
                    data=data,
                    origin=origin,
                    request_timeout=request_timeout,
                )
        except _StreamMissing as exc:
            raise BrokerError(f"stream {stream_name(prefix)} does not exist; start a node") from exc
    return Publication(channel, last.offset, last.epoch, event, data, now, origin)


# --- the broker ---------------------------------------------------------------------------------

_control_decoder = msgspec.json.Decoder(ControlKinds)


class NatsBroker:
    """`Broker` over NATS JetStream. See the module docstring for subjects, format and design.

    `url` is ``nats://host:port[?prefix=P&storage=file|memory&replicas=N&timeout=S]``; the query is
    ours and is stripped before connecting. Every node of one deployment must use the same prefix
    and limits (the stream is updated to the limits of the node that starts last).
    """

    def __init__(self, url: str, *, node_id: str, limits: HistoryLimits | None = None) -> None:
        self.node_id = node_id
        self.shared = True
        self.limits = limits or HistoryLimits()
        self._server, options = parse_url(url)
        self.prefix = check_prefix(options.get("prefix") or DEFAULT_PREFIX)
        self.stream = stream_name(self.prefix)
        storage = options.get("storage", "file")
        if storage not in ("file", "memory"):
            raise ValueError("NATS URL option storage must be 'file' or 'memory'")
        self._storage = api.StorageType.FILE if storage == "file" else api.StorageType.MEMORY
        self._replicas = int(options.get("replicas", "1"))
        self._timeout = float(options.get("timeout", "3"))
        default_max_age = max(10 * self.limits.ttl, 86_400.0)
        self._max_age = max(self.limits.ttl, float(options.get("max_age", default_max_age)))
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._state = BrokerState.CONNECTING
        self._on_publication: PublicationHandler | None = None
        self._on_control: ControlHandler | None = None
        self._on_state: StateHandler | None = None
        # One entry per channel the hub follows; the hub bounds that set.
        self._subscriptions: dict[str, Subscription] = {}
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]
        self._closing = False

    @property
    def state(self) -> BrokerState:
        return self._state

    def _set_state(self, state: BrokerState) -> None:
        if self._closing or state is self._state:
            return
        self._state = state
        if self._on_state is not None:
            self._on_state(state)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(
        self,
        on_publication: PublicationHandler,
        on_control: ControlHandler,
        on_state: StateHandler | None = None,
    ) -> None:
        """Connect, create or update the stream, and listen for control messages.

        Raises BrokerError if NATS cannot be reached within a few seconds; after that, an outage
        is reported through `on_state` and nats-py reconnects forever.
        """
        self._on_publication = on_publication
        self._on_control = on_control
        self._on_state = on_state

        async def disconnected() -> None:
            self._set_state(BrokerState.DISCONNECTED)

        async def reconnected() -> None:
            self._set_state(BrokerState.CONNECTED)

        async def error(exc: Exception) -> None:
            # nats-py reports each failed reconnect here; the state change already said it.
            log.debug("NATS client error: %r", exc)

        try:
            async with asyncio.timeout(self._timeout + 2):
                self._nc = await nats.connect(
                    self._server,
                    name=f"igratech-ws {self.node_id}",
                    connect_timeout=self._timeout,
                    # The first connect tries each server twice, then fails (a node that cannot
                    # reach its broker at start should say so); endless reconnects are switched
                    # on below, once connected.
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=1,
                    ping_interval=10,
                    max_outstanding_pings=3,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=error,
                )
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise BrokerError(f"cannot connect to NATS at {self._server}: {exc!r}") from exc
        # nats-py reads these options at each disconnect; there is no other way to have a failing
        # first connect and endless reconnects afterwards.
        self._nc.options["allow_reconnect"] = True
        self._nc.options["max_reconnect_attempts"] = -1
        self._js = self._nc.jetstream(timeout=self._timeout)
        try:
            with _as_broker_error("stream setup"):
                async with asyncio.timeout(self._timeout * 2):
                    await self._ensure_stream()
                    await self._nc.subscribe(control_subject(self.prefix), cb=self._control_msg)
                    await self._nc.flush(timeout=int(max(1, self._timeout)))
        except BrokerError:
            await self._nc.close()
            raise
        self._set_state(BrokerState.CONNECTED)

    async def close(self) -> None:
        """Stop delivering and disconnect. Idempotent. Does not delete the stream."""
        if self._closing:
            return
        self._closing = True
        self._state = BrokerState.CLOSED
        self._on_publication = None
        self._on_control = None
        self._subscriptions.clear()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await nc.close()

    async def _ensure_stream(self) -> None:
        js = self._require_js()
        config = api.StreamConfig(
            name=self.stream,
            description="igratech-ws channel history",
            subjects=[f"{self.prefix}.ch.>"],
            max_msgs_per_subject=self.limits.size,
            max_age=self._max_age,
            storage=self._storage,
            num_replicas=self._replicas,
            discard=api.DiscardPolicy.OLD,
            republish=api.RePublish(src=f"{self.prefix}.ch.>", dest=f"{self.prefix}.live.>"),
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if _err_code(exc) != _ERR_STREAM_NAME_IN_USE:
                raise
            await js.update_stream(config)

    async def delete_stream(self) -> None:
        """Delete the stream and with it every channel's history (for tests and operators).

        Every channel starts over with a new epoch. Raises BrokerError if NATS cannot do it.
        """
        js = self._require_js()
        with _as_broker_error("stream delete"), contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(self.stream)

    def _require_js(self) -> JetStreamContext:
        """The JetStream context, or BrokerError at once if NATS is not connected right now."""
        if self._js is None or self._nc is None or self._closing:
            raise BrokerError("NATS broker is not started")
        if not self._nc.is_connected:
            raise BrokerError("NATS is disconnected")
        return self._js

    async def _with_stream(self, what: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        """Run `operation` within the time limit; recreate the stream once if it is missing."""
        with _as_broker_error(what):
            async with asyncio.timeout(self._timeout * 3):
                try:
                    return await operation()
                except _StreamMissing:
                    log.warning("NATS stream %s is missing: creating it", self.stream)
                    await self._ensure_stream()
                try:
                    return await operation()
                except _StreamMissing as exc:
                    raise BrokerError(f"NATS stream {self.stream} vanished again") from exc

    # --- channels -----------------------------------------------------------------------------

    async def publish(self, channel: str, event: str, data: bytes) -> Publication:
        js = self._require_js()
        subject = append_subject(self.prefix, channel)
        lock = self._locks[hash(channel) % _LOCK_STRIPES]

        async def append() -> tuple[_Last, float]:
            return await _append(
                js,
                self.stream,
                subject,
                event=event,
                data=data,
                origin=self.node_id,
                request_timeout=self._timeout,
            )

        async with lock:
            last, now = await self._with_stream("publish", append)
        return Publication(channel, last.offset, last.epoch, event, data, now, self.node_id)

    async def _top(self, js: JetStreamContext, subject: str) -> _Last:
        """The subject's newest message, appending an epoch marker if it has none."""
        last = await _read_last(js, self.stream, subject)
        if last is not None:
            return last
        marker, _ = await _append(
            js,
            self.stream,
            subject,
            event=None,
            data=b"",
            origin=self.node_id,
            request_timeout=self._timeout,
        )
        return marker

    async def position(self, channel: str) -> StreamPosition:
        js = self._require_js()
        subject = append_subject(self.prefix, channel)

        async def top() -> _Last:
            return await self._top(js, subject)

        last: _Last = await self._with_stream("position", top)
        return StreamPosition(last.offset, last.epoch)

    async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        js = self._require_js()
        subject = append_subject(self.prefix, channel)

        async def read() -> HistoryPage:
            last = await self._top(js, subject)
            top = StreamPosition(last.offset, last.epoch)
            if since_offset >= last.offset or limit <= 0:
                return HistoryPage([], top)
            # History is what is younger than the ttl (the stream keeps messages longer).
            cutoff = time.time() - self.limits.ttl
            if since_offset == last.offset - 1 and last.headers is not None:
                # Missed only the newest: it is at hand, no consumer needed.
                newest = _publication_from(channel, last.headers, last.data)
                publications = [newest] if newest.published_at >= cutoff else []
            else:
                publications = await self._read_range(
                    js, subject, channel, since_offset, limit, last, cutoff
                )
            return HistoryPage(publications, top)

        page: HistoryPage = await self._with_stream("history", read)
        return page

    async def _start_seq(
        self, js: JetStreamContext, subject: str, since_offset: int, last: _Last
    ) -> int:
        """A stream sequence at or before the message with offset `since_offset` + 1, or 0.

        Offsets are not sequences, but the wanted message is at least `last.offset - want`
        sequences before the newest; other channels' messages in between push it further. So
        probe backwards with growing steps (each probe: the subject's first message at or after a
        sequence) until one lands at or before it: a few requests instead of reading the whole
        subject from its oldest message.
        """
        want = since_offset + 1
        step = max(1, last.offset - want)
        for _ in range(_START_PROBES):
            guess = last.seq - step
            if guess <= 1:
                return 0
            try:
                raw = await js.get_msg(self.stream, seq=guess, subject=subject, next=True)
                offset = int((raw.headers or {})[H_OFFSET])
            except (nats.js.errors.NotFoundError, KeyError, ValueError):
                return 0
            if offset <= want:
                return int(raw.seq or 0)
            step *= 4
        return 0

    async def _read_range(
        self,
        js: JetStreamContext,
        subject: str,
        channel: str,
        since_offset: int,
        limit: int,
        last: _Last,
        cutoff: float,
    ) -> list[Publication]:
        """Publications with since_offset < offset <= last.offset, published at or after
        `cutoff` (at most `limit`), in order.

        Reads the subject through a short-lived pull consumer from `_start_seq` on; the subject
        holds at most `limits.size` messages, which bounds the read.
        """
        nc = self._nc
        assert nc is not None
        start = await self._start_seq(js, subject, since_offset, last)
        config = api.ConsumerConfig(
            filter_subject=subject,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=max(5.0, self._timeout * 3),
            mem_storage=True,
            num_replicas=1,
        )
        if start:
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = start
        try:
            info = await js.add_consumer(self.stream, config)
        except nats.js.errors.NotFoundError as exc:
            if _err_code(exc) == _ERR_STREAM_NOT_FOUND:
                raise _StreamMissing from exc
            raise
        pending = int(info.num_pending or 0)
        out: list[Publication] = []
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def collect(msg: Msg) -> None:
            # A callback, not `next_msg` / `messages`, which cost tasks per message.
            nonlocal pending
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
            if since_offset < offset <= last.offset and H_EVENT in headers:
                try:
                    publication = _publication_from(channel, headers, msg.data)
                except (KeyError, ValueError):
                    log.warning("skipping a malformed message in %s", subject)
                else:
                    if publication.published_at >= cutoff:
                        out.append(publication)
            if msg.metadata.sequence.stream >= last.seq or len(out) >= limit or pending <= 0:
                finished.set_result(None)

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=collect, pending_msgs_limit=max(1024, pending + 16))
        try:
            if pending > 0:
                # One request for everything: `pending` is at most the subject's bound.
                request = json.dumps({"batch": pending, "no_wait": True}).encode()
                await nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.{info.name}", request, reply=inbox
                )
                async with asyncio.timeout(self._timeout):
                    await finished
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await js.delete_consumer(self.stream, info.name)
        return out

    async def subscribe(self, channel: str) -> None:
        """Deliver `channel`'s publications from now on (also during an outage: nats-py
        subscribes again on reconnect; only the wait for the server's confirmation is skipped)."""
        if channel in self._subscriptions:
            return
        if self._nc is None or self._closing:
            raise BrokerError("NATS broker is not started")
        nc = self._nc

        async def deliver(msg: Msg) -> None:
            handler = self._on_publication
            if handler is None:
                return
            headers = msg.headers
            if headers is None or H_EVENT not in headers:
                return  # an epoch marker
            try:
                publication = _publication_from(channel, headers, msg.data)
            except (KeyError, ValueError):
                log.warning("dropping a malformed message on %s", msg.subject)
                return
            handler(publication)

        with _as_broker_error("subscribe"):
            self._subscriptions[channel] = await nc.subscribe(
                live_subject(self.prefix, channel), cb=deliver
            )
            if nc.is_connected:
                # Returns once the server has the subscription, so no later publication is missed.
                await nc.flush(timeout=int(max(1, self._timeout)))

    async def unsubscribe(self, channel: str) -> None:
        sub = self._subscriptions.pop(channel, None)
        if sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()

    # --- control ------------------------------------------------------------------------------

    async def publish_control(self, message: ControlKinds) -> None:
        self._require_js()
        assert self._nc is not None
        with _as_broker_error("control publish"):
            await self._nc.publish(control_subject(self.prefix), msgspec.json.encode(message))

    async def _control_msg(self, msg: Msg) -> None:
        handler = self._on_control
        if handler is None:
            return
        try:
            message = _control_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.warning("dropping a malformed control message: %s", exc)
            return
        if message.origin == self.node_id:
            return
        handler(message)
