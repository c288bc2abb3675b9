"""`NatsBroker`: the connection and its lifecycle, the stream's configuration, delivery, control.

Live delivery uses the stream's RePublish (NATS >= 2.9): the server republishes a message to
``P.live.<token>`` only once it is stored, in stream order for one publishing connection (two
messages stored from different connections may be republished swapped: the `Broker` contract
lets them arrive out of offset order, and the hub fills the gap from history). A node holds one
core subscription per channel its clients follow. Subscribing to the append subject instead would
be wrong: core subscribers also receive publishes that the stream *refused*.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from igratech_ws.brokers.base import (
    EMPTY_EPOCH,
    BrokerError,
    BrokerState,
    ControlHandler,
    ControlKinds,
    HistoryPage,
    Publication,
    PublicationHandler,
    PublishItem,
    PublishResult,
    StateHandler,
    StreamPosition,
    check_data,
    check_idempotency_key,
)
from igratech_ws.brokers.core import Backoff, BrokerCore, encode_control
from igratech_ws.brokers.nats.appender import MAX_CHAIN, Appender
from igratech_ws.brokers.nats.client import Client
from igratech_ws.brokers.nats.history import (
    Stored,
    StreamMissing,
    err_code,
    publication_from,
    publication_from_block,
    read_history,
    read_last,
    read_state,
    stream_exists,
)
from igratech_ws.brokers.nats.subjects import (
    DEFAULT_PREFIX,
    H_EVENT,
    append_subject,
    check_prefix,
    control_subject,
    describe_server,
    live_subject,
    parse_url,
    stream_name,
)
from igratech_ws.brokers.options import BrokerOptions

log = logging.getLogger("igratech_ws.brokers.nats")

_ERR_STREAM_NAME_IN_USE = 10058
#: The first nats-server version with atomic batch publishing.
ATOMIC_BATCHES_SINCE = (2, 12)
_T = TypeVar("_T")


@contextlib.contextmanager
def _as_broker_error(what: str) -> Iterator[None]:
    """Turn every failure of the NATS client into BrokerError, which callers know to handle."""
    try:
        yield
    except BrokerError:
        raise
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise BrokerError(f"NATS {what} failed: {exc!r}") from exc


def choose_server(servers: list[Any], backoff: Backoff) -> tuple[Any, float]:
    """nats-py's reconnect hook: the server to try next, and how long to wait first.

    The server with the fewest failed attempts since it last worked, the first listed on a tie:
    the one that just went down fails once and is then passed over while another is left to
    try. (Naming none makes nats-py take the first of its pool every time: a node whose first
    server died would retry it until it came back.) The wait grows with the failed attempts of
    the pool, with jitter (nats-py's own is fixed).
    """
    fewest = min((s.reconnects for s in servers), default=0)
    chosen = next((s for s in servers if s.reconnects == fewest), None)
    return chosen, backoff.delay(fewest)


class NatsBroker(BrokerCore):
    """`Broker` over NATS JetStream. See the package docstring for subjects, format and design.

    `url` is
    ``nats://host:port[?prefix=P&storage=file|memory&replicas=N&timeout=S&max_age=S&chain=N]``;
    the query is ours and is stripped before connecting. Every node of one deployment must use
    the same prefix and options (the stream is updated to those of the node that starts last).
    """

    def __init__(self, url: str, options: BrokerOptions | None = None) -> None:
        super().__init__(options or BrokerOptions())
        self._servers, query = parse_url(url)
        self.address = describe_server(self._servers)
        self.prefix = check_prefix(query.get("prefix") or DEFAULT_PREFIX)
        self.stream = stream_name(self.prefix)
        storage = query.get("storage", "file")
        if storage not in ("file", "memory"):
            raise ValueError("NATS URL option storage must be 'file' or 'memory'")
        self._storage = api.StorageType.FILE if storage == "file" else api.StorageType.MEMORY
        self._replicas = int(query.get("replicas", "1"))
        self._timeout = float(query.get("timeout", self.options.op_timeout))
        retention = float(query.get("max_age", self.options.retention))
        self._max_age = max(self.limits.ttl, retention)
        self._max_chain = int(query.get("chain", MAX_CHAIN))
        if self._max_chain < 1:
            raise ValueError("NATS URL option chain must be 1 or more")
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        # One entry per channel the hub follows; the hub bounds that set.
        self._subscriptions: dict[str, Subscription] = {}
        self._appender: Appender | None = None
        #: Whether the stream takes atomic batches (NATS 2.12+; decided at start).
        self.atomic_batches = False
        #: Whether the stream has replicas (decided at start): no chains then (`_chain_limit`).
        self.replicated = False
        self._closing = False

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(
        self,
        on_publication: PublicationHandler,
        on_control: ControlHandler,
        on_state: StateHandler | None = None,
    ) -> None:
        """Connect, create or update the stream, and listen for control messages.

        Raises `BrokerError` naming host:port if NATS cannot be reached within a few seconds;
        after that, an outage is reported through `on_state` and nats-py reconnects forever.
        """
        self.bind(on_publication, on_control, on_state)

        async def disconnected() -> None:
            self.set_state(BrokerState.DISCONNECTED)

        async def reconnected() -> None:
            self.set_state(BrokerState.CONNECTED)

        backoff = Backoff(self.options.backoff_min, self.options.backoff_max)

        def next_server(servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
            return choose_server(servers, backoff)

        async def error(exc: Exception) -> None:
            # nats-py reports each failed reconnect here; the state change already said it.
            log.debug("NATS client error: %r", exc)

        try:
            async with asyncio.timeout(self._timeout + 2):
                self._nc = Client()
                await self._nc.connect(
                    self._servers,
                    name=f"igratech-ws {self.node_id}",
                    # Seconds, used as a float by nats-py (wait_for) though typed int.
                    connect_timeout=self._timeout,  # type: ignore[arg-type]
                    # The first connect tries each server twice, then fails (a node that cannot
                    # reach its broker at start should say so); endless reconnects are switched
                    # on below, once connected.
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_to_server_handler=next_server,
                    ping_interval=10,
                    max_outstanding_pings=3,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=error,
                )
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            await self.close()
            raise BrokerError(f"cannot reach NATS at {self.address}: {exc!r}") from exc
        # nats-py reads these options at each disconnect; there is no other way to have a failing
        # first connect and endless reconnects afterwards.
        self._nc.options["allow_reconnect"] = True
        self._nc.options["max_reconnect_attempts"] = -1
        self._js = self._nc.jetstream(timeout=self._timeout)
        try:
            with _as_broker_error("stream setup"):
                async with asyncio.timeout(self._timeout * 2):
                    await self._ensure_stream()
                    self._appender = Appender(
                        self._nc,
                        self._js,
                        self.prefix,
                        origin=self.node_id,
                        timeout=self._timeout,
                        state_events=self.options.state_events,
                        atomic=self.atomic_batches,
                        max_chain=self._chain_limit(),
                    )
                    await self._appender.start()
                    await self._nc.subscribe(control_subject(self.prefix), cb=self._control_msg)
                    await self._nc.flush(timeout=int(max(1, self._timeout)))
        except BrokerError:
            await self.close()
            raise
        self.set_state(BrokerState.CONNECTED)

    @property
    def append_chains(self) -> tuple[int, int]:
        """Chains of appends this node sent whole and chains broken by another append in
        between (then sent again behind it), since `start`; (0, 0) before it. For metrics."""
        appender = self._appender
        return (0, 0) if appender is None else (appender.chains, appender.chain_breaks)

    async def close(self) -> None:
        """Stop delivering and disconnect. Idempotent. Does not delete the stream."""
        if self._closing:
            return
        self._closing = True
        self.mark_closed()
        self._subscriptions.clear()
        appender, self._appender = self._appender, None
        if appender is not None:
            await appender.close()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._timeout):
                    await nc.close()

    def stream_config(self, *, atomic: bool = False) -> api.StreamConfig:
        """The stream every node creates or updates at start (see the package docstring);
        `atomic` allows atomic batches (only servers from 2.12 on know the option)."""
        return api.StreamConfig(
            name=self.stream,
            description="igratech-ws channel history and state",
            subjects=[f"{self.prefix}.ch.>", f"{self.prefix}.st.>"],
            max_msgs_per_subject=self.limits.size,
            max_age=self._max_age,
            storage=self._storage,
            num_replicas=self._replicas,
            discard=api.DiscardPolicy.OLD,
            duplicate_window=min(self.options.idempotency_window, self._max_age),
            allow_rollup_hdrs=True,
            republish=api.RePublish(src=f"{self.prefix}.ch.>", dest=f"{self.prefix}.live.>"),
            allow_atomic=True if atomic else None,
        )

    def _server_has_atomic_batches(self) -> bool:
        assert self._nc is not None
        version = self._nc.connected_server_version
        return (version.major, version.minor) >= ATOMIC_BATCHES_SINCE

    async def _ensure_stream(self) -> None:
        js = self._require_js()
        config = self.stream_config(atomic=self._server_has_atomic_batches())
        try:
            info = await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if err_code(exc) != _ERR_STREAM_NAME_IN_USE:
                raise
            info = await js.update_stream(config)
        self.atomic_batches = bool(info.config.allow_atomic)
        self.replicated = (info.config.num_replicas or 1) > 1
        if self._appender is not None:
            # A recreated stream numbers from 1 again: no remembered tail holds.
            self._appender.forget_tail()
            self._appender.max_chain = self._appender.chain_limit = self._chain_limit()
            self._appender.atomic = self.atomic_batches

    async def _recreate_missing_stream(self) -> None:
        """After a 503 (nobody answered for the stream): create the stream if it is gone; raise
        BrokerError if it is there, without a leader for the moment (an election after a server
        loss): the read, or the publish the appender gave up on, was not done, and doing it again
        now could put a publish behind the channel's later ones: the caller hears of it."""
        if await stream_exists(self._require_js(), self.stream):
            raise BrokerError(
                f"NATS stream {self.stream} has no leader right now (an election?): not done"
            )
        log.warning("NATS stream %s is missing: creating it", self.stream)
        await self._ensure_stream()

    def _chain_limit(self) -> int:
        """Publications per channel in flight at once: the URL's ``chain`` (`MAX_CHAIN`), but one
        on a replicated stream. There, nats-server 2.15.1 answers a chain whose first message it
        refuses (a stale tail, or another publisher's append in between) by proposing a later
        message of the chain all the same; every replica fails to apply it and the stream takes
        and answers nothing from then on, even after a restart of every server
        (tests/brokers/test_nats_cluster.py). One append at a time never sends a message whose
        predecessor may be refused."""
        return 1 if self.replicated else self._max_chain

    async def delete_stream(self) -> None:
        """Delete the stream and with it every channel's history and state (tests, operators).

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

    async def _with_stream(self, what: str, operation: Callable[[], Awaitable[_T]]) -> _T:
        """Run `operation` within the time limit; recreate the stream once if it is missing."""
        with _as_broker_error(what):
            async with asyncio.timeout(self._timeout * 3):
                try:
                    return await operation()
                except StreamMissing:
                    await self._recreate_missing_stream()
                try:
                    return await operation()
                except StreamMissing as exc:
                    raise BrokerError(f"NATS stream {self.stream} vanished again") from exc

    # --- channels -----------------------------------------------------------------------------

    async def publish(
        self, channel: str, event: str, data: bytes, *, idempotency_key: str | None = None
    ) -> PublishResult:
        check_idempotency_key(idempotency_key)
        check_data(data)
        self._require_js()
        appender = self._appender
        assert appender is not None

        async def append_it() -> PublishResult:
            return await appender.publish(channel, event, data, idempotency_key)

        return await self._with_stream("publish", append_it)

    async def publish_many(self, items: Sequence[PublishItem]) -> list[PublishResult]:
        """See `Broker.publish_many`: as `publish` of each item at once (the appender chains
        each channel's items), with one deadline and one wait for the whole batch where
        `publish` has one per item: the items start together, so each item's own deadline
        would be the same instant; and a stream found missing is created once, then the items
        that found it missing are published again (once, in list order)."""
        if len(items) < 2:
            return await super().publish_many(items)
        for _, _, data, key in items:
            check_idempotency_key(key)
            check_data(data)
        self._require_js()
        appender = self._appender
        assert appender is not None
        futures = [appender.enqueue(c, e, d, k) for c, e, d, k in items]
        outcomes: list[PublishResult | BaseException] = []
        vanished = BrokerError(f"NATS stream {self.stream} vanished again")
        retried: set[int] = set()
        try:
            async with asyncio.timeout(self._timeout * 3):
                outcomes = await asyncio.gather(*futures, return_exceptions=True)
                missing = [i for i, o in enumerate(outcomes) if isinstance(o, StreamMissing)]
                if missing:
                    try:
                        await self._recreate_missing_stream()
                    except Exception as exc:  # each of them fails with it, as in `publish`
                        for i in missing:
                            outcomes[i] = exc
                    else:
                        for i in missing:
                            futures[i] = appender.enqueue(*items[i])
                        retried = set(missing)
                        again = await asyncio.gather(
                            *(futures[i] for i in missing), return_exceptions=True
                        )
                        for i, outcome in zip(missing, again, strict=True):
                            missed = isinstance(outcome, StreamMissing)
                            outcomes[i] = vanished if missed else outcome
        except TimeoutError as exc:
            # Past the deadline: what was settled keeps its outcome, the rest timed out.
            outcomes = []
            for i, future in enumerate(futures):
                if not future.done() or future.cancelled():
                    outcomes.append(exc)
                    continue
                error = future.exception()
                if isinstance(error, StreamMissing):
                    error = vanished if i in retried else exc
                outcomes.append(future.result() if error is None else error)
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()  # given up (cancelled with us): the appender skips it
        results: list[PublishResult] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                # The first failure once every item has settled, as `publish` would raise it.
                with _as_broker_error("publish"):
                    raise outcome
            results.append(outcome)
        return results

    async def _last(self, channel: str) -> Stored | None:
        js = self._require_js()
        subject = append_subject(self.prefix, channel)
        return await self._with_stream("read", lambda: read_last(js, self.stream, subject))

    async def position(self, channel: str) -> StreamPosition:
        last = await self._last(channel)
        if last is None:
            return StreamPosition(0, EMPTY_EPOCH)
        return StreamPosition(last.offset, last.epoch)

    async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        js = self._require_js()
        nc = self._nc
        assert nc is not None

        async def read() -> HistoryPage:
            return await read_history(
                nc,
                js,
                self.stream,
                append_subject(self.prefix, channel),
                channel,
                since_offset=since_offset,
                limit=limit,
                ttl=self.limits.ttl,
                wait=self._timeout,
            )

        return await self._with_stream("history", read)

    async def latest_state(self, channel: str) -> list[Publication]:
        """See `Broker.latest_state` and `history.read_state`."""
        js = self._require_js()

        async def read() -> list[Publication]:
            return await read_state(
                js,
                self.stream,
                self.prefix,
                channel,
                events=self.options.state_events,
                ttl=self.options.state_ttl,
            )

        return await self._with_stream("state read", read)

    async def subscribe(self, channel: str) -> None:
        """Deliver `channel`'s publications from now on (also during an outage: nats-py
        subscribes again on reconnect; only the wait for the server's confirmation is skipped)."""
        if channel in self._subscriptions:
            return
        if self._nc is None or self._closing:
            raise BrokerError("NATS broker is not started")
        nc = self._nc

        def deliver(msg: Msg) -> None:
            headers = msg.headers
            if headers is None or H_EVENT not in headers:
                return  # an epoch marker of an older version
            try:
                publication = publication_from(channel, headers, msg.data)
            except (KeyError, ValueError):
                self.malformed(f"message on {msg.subject}", msg.data)
                return
            self.deliver(publication)

        def deliver_fast(data: bytes, block: bytes | None) -> bool:
            publication = publication_from_block(channel, block, data)
            if publication is None:
                return False  # `deliver` decides, from nats-py's header dict
            self.deliver(publication)
            return True

        with _as_broker_error("subscribe"):
            self._subscriptions[channel] = await nc.subscribe_inline(
                live_subject(self.prefix, channel), deliver, deliver_fast
            )
            if nc.is_connected:
                # Returns once the server has the subscription, so no later publication is missed.
                await nc.flush(timeout=int(max(1, self._timeout)))

    async def unsubscribe(self, channel: str) -> None:
        sub = self._subscriptions.pop(channel, None)
        if sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()

    @property
    def subscription_count(self) -> int:
        return len(self._subscriptions)

    # --- control ------------------------------------------------------------------------------

    async def publish_control(self, message: ControlKinds) -> None:
        self._require_js()
        assert self._nc is not None
        with _as_broker_error("control publish"):
            await self._nc.publish(control_subject(self.prefix), encode_control(message))

    async def _control_msg(self, msg: Msg) -> None:
        self.deliver_control_bytes(msg.data)
