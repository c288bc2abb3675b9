"""What every broker shares: handlers, state, guarded dispatch, epochs, backoff, control encoding.

A broker class derives from `BrokerCore`, defines `publish` (and may define `publish_many`, whose
default here hands every item to `publish` at once), and calls, from its own I/O code:

- `bind(...)` in `start`, `set_state(...)` on every connection change, `mark_closed()` in `close`;
- `deliver(publication)` for each publication of a subscribed channel, and
  `deliver_control_bytes(payload)` for each control message it receives.

Handlers run inside one guarded dispatch: an exception in a handler (a bug above the broker) is
logged with its traceback, rate limited, and counted in `handler_errors`; the broker goes on
delivering. So a hub bug is never silent and never stops a listener, on any broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Sequence

import msgspec

from igratech_ws.brokers.base import (
    BrokerState,
    ControlHandler,
    ControlKinds,
    HistoryLimits,
    Publication,
    PublicationHandler,
    PublishItem,
    PublishResult,
    StateHandler,
    StreamPosition,
    check_data,
    check_idempotency_key,
)
from igratech_ws.brokers.options import BrokerOptions
from igratech_ws.logs import RateLimitedLog

log = logging.getLogger("igratech_ws.brokers")


def new_epoch() -> str:
    """A fresh stream epoch: 12 random hex characters (never equal to `EMPTY_EPOCH`).

    From the OS's generator, not a seeded one: worker processes started by fork must not draw
    the same epochs. Cheap (one getrandom), since the Redis broker passes a candidate with every
    publish.
    """
    return os.urandom(6).hex()


class Backoff:
    """Reconnect delays: exponential from `minimum` to `maximum` seconds, with equal jitter.

    "Equal jitter" keeps at least half of each step, so nodes that lost the broker together do
    not all come back at the same instant, yet none retries much sooner than planned.
    """

    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def delay(self, attempt: int) -> float:
        """The pause before retry number `attempt` (0 for the first retry)."""
        ceiling = min(self.maximum, self.minimum * (2.0 ** min(attempt, 32)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


# Control messages travel as JSON on every shared broker: readable, and easy to write by hand from
# a backend (``{"kind":"logout","origin":"billing","user_id":"u-42"}``).
_control_encoder = msgspec.json.Encoder()
_control_decoder: msgspec.json.Decoder[ControlKinds] = msgspec.json.Decoder(ControlKinds)
# Nodes before this version sent msgpack on Redis; read it during a rolling upgrade.
_legacy_control_decoder: msgspec.msgpack.Decoder[ControlKinds] = msgspec.msgpack.Decoder(
    ControlKinds
)


def encode_control(message: ControlKinds) -> bytes:
    """The bytes of `message` on the control channel of any broker (JSON, tagged by ``kind``)."""
    return _control_encoder.encode(message)


def decode_control(payload: bytes) -> ControlKinds:
    """Inverse of `encode_control`. Raises msgspec.DecodeError (or ValidationError)."""
    if payload[:1] == b"{":
        return _control_decoder.decode(payload)
    return _legacy_control_decoder.decode(payload)


class BrokerCore:
    """Base of every broker: identity, options, handlers, state and the guarded dispatch."""

    #: Whether other nodes can share this broker (False for memory).
    shared = True
    publishes_at_once = False

    def __init__(self, options: BrokerOptions) -> None:
        self.options = options
        self.node_id = options.node_id
        self.limits: HistoryLimits = options.limits
        self._state = BrokerState.CONNECTING
        self._on_publication: PublicationHandler | None = None
        self._on_control: ControlHandler | None = None
        self._on_state: StateHandler | None = None
        self._handler_errors = 0
        self._handler_log = RateLimitedLog(log)
        #: Malformed messages seen on the bus (dropped); also logged, rate limited.
        self.malformed_messages = 0
        self._malformed_log = RateLimitedLog(log)

    @property
    def state(self) -> BrokerState:
        return self._state

    async def publish(
        self, channel: str, event: str, data: bytes, *, idempotency_key: str | None = None
    ) -> PublishResult:
        """See `Broker.publish`; every broker defines it."""
        raise NotImplementedError

    async def publish_many(self, items: Sequence[PublishItem]) -> list[PublishResult]:
        """See `Broker.publish_many`: every item handed to `publish` in the same loop turn.

        `publish` queues each call in call order before its first await (the `Broker`
        contract), and the tasks of `asyncio.gather` take their first step in the order they
        were made, before the broker's writer runs: so the items leave together and in order.
        """
        for _, _, data, key in items:
            check_idempotency_key(key)
            check_data(data)
        if len(items) == 1:
            channel, event, data, key = items[0]
            return [await self.publish(channel, event, data, idempotency_key=key)]
        outcomes = await asyncio.gather(
            *(self.publish(c, e, d, idempotency_key=k) for c, e, d, k in items),
            return_exceptions=True,
        )
        results: list[PublishResult] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # the first failure, once every item has settled
            results.append(outcome)
        return results

    @property
    def handler_errors(self) -> int:
        """How many times a handler given to `start` raised (each one logged, rate limited)."""
        return self._handler_errors

    @property
    def closed(self) -> bool:
        return self._state is BrokerState.CLOSED

    def bind(
        self,
        on_publication: PublicationHandler,
        on_control: ControlHandler,
        on_state: StateHandler | None,
    ) -> None:
        """Remember the handlers of `start`. Raises RuntimeError if started twice or closed."""
        if self._on_publication is not None or self.closed:
            raise RuntimeError(f"{type(self).__name__}.start() must be called once, before close()")
        self._on_publication = on_publication
        self._on_control = on_control
        self._on_state = on_state

    def set_state(self, state: BrokerState) -> None:
        """Report `state` to the state handler if it changed. Nothing changes after CLOSED."""
        if self.closed or state is self._state:
            return
        self._state = state
        handler = self._on_state
        if handler is not None:
            try:
                handler(state)
            except Exception:
                self._handler_failed("state")

    def mark_closed(self) -> None:
        """Enter CLOSED (not reported: the caller closed it) and drop the handlers."""
        self._state = BrokerState.CLOSED
        self._on_publication = None
        self._on_control = None
        self._on_state = None

    def subscribe_now(self, channel: str) -> bool:
        """See `Broker.subscribe_now`: declined unless a broker answers without I/O."""
        return False

    def unsubscribe_now(self, channel: str) -> bool:
        """See `Broker.unsubscribe_now`: declined unless a broker answers without I/O."""
        return False

    def state_now(self, channel: str) -> tuple[list[Publication], StreamPosition] | None:
        """See `Broker.state_now`: declined unless a broker answers without I/O."""
        return None

    def deliver(self, publication: Publication) -> None:
        """Hand `publication` to the publication handler, guarded."""
        handler = self._on_publication
        if handler is None:
            return
        try:
            handler(publication)
        except Exception:
            self._handler_failed("publication")

    def deliver_control(self, message: ControlKinds) -> None:
        """Hand another node's `message` to the control handler, guarded; skip our own echo."""
        handler = self._on_control
        if handler is None or message.origin == self.node_id:
            return
        try:
            handler(message)
        except Exception:
            self._handler_failed("control")

    def deliver_control_bytes(self, payload: bytes) -> None:
        """Decode a control message from the bus and deliver it; drop (and count) garbage."""
        try:
            message = decode_control(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.malformed("control message", payload)
            return
        self.deliver_control(message)

    def malformed(self, what: str, payload: bytes | str) -> None:
        """Count and log (rate limited) a message from the bus that is not ours to read."""
        self.malformed_messages += 1
        self._malformed_log.warning("dropping a malformed %s: %r", what, payload[:80])

    def _handler_failed(self, kind: str) -> None:
        self._handler_errors += 1
        self._handler_log.exception("broker %s handler failed (node %s)", kind, self.node_id)
