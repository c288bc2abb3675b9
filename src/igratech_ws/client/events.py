"""What the client yields: `Event`, the SDK's own lifecycle payloads, and frame decoding.

Server events are decoded into the payload types of `igratech_ws.core.messages.SERVER_EVENTS`.
A frame whose payload does not match (a newer server adding a field, an event this SDK does not
know) is still delivered, with `data` as the plain decoded JSON object, so that an old client
keeps working against a newer server.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import msgspec

from igratech_ws.core.messages import SERVER_EVENTS, ChannelState, Status

#: Events synthesized by the SDK itself (never sent by the server).
DISCONNECTED = "disconnected"
RECOVERY_FAILED = "recovery-failed"
SDK_EVENTS = frozenset({DISCONNECTED, RECOVERY_FAILED})

#: State events: a newer one replaces the older, per channel and event (protocol decision D3).
STATE_EVENTS = frozenset({"stats", "balance"})


@dataclass(frozen=True, slots=True)
class Event:
    """One event: `data` is the typed payload (e.g. `IncidentData` for ``incident``).

    `channel`, `offset` and `epoch` are set on channel pushes (incident, bet, stats, balance,
    bets-result) and None otherwise. `snapshot` marks a channel's current state sent on follow or
    connect (its offset may be at or below the channel's position: it is neither a gap nor a
    duplicate); `conflated` marks a state push that replaced older ones under a slow connection.
    """

    event: str
    data: Any
    channel: str | None = None
    offset: int | None = None
    epoch: str | None = None
    snapshot: bool = False
    conflated: bool = False


@dataclass(frozen=True, slots=True)
class Disconnected:
    """Data of the SDK's ``disconnected`` event: a connection ended.

    `code` is the close code (None when the connection dropped without a close frame);
    `reconnect` tells whether the client will reconnect (after `delay` seconds, attempt `attempt`)
    or iteration is about to end.
    """

    code: int | None
    reason: str
    reconnect: bool
    attempt: int = 0
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class RecoveryFailed:
    """Data of the SDK's ``recovery-failed`` event (the JavaScript client's ``gap``): the client
    cannot prove that nothing was missed on these channels, so the application must reload their
    state (e.g. from the platform's REST API). Delivery continues from the new position.

    `reason`: ``not-recovered`` (the server answered ``recovered: false``: history no longer
    covers the gap, or the stream was recreated), ``not-resumed`` (joined without recovery at
    another position than the one held), ``skipped`` (a push skipped offsets), ``epoch`` (a push
    came from a new stream), ``refused`` (the server refused to resume the channel).
    """

    channels: list[str]
    reason: str = "not-recovered"


class _Envelope(msgspec.Struct):
    event: str
    data: msgspec.Raw = msgspec.Raw(b"{}")
    channel: str | None = None
    offset: int | None = None
    epoch: str | None = None
    snapshot: bool = False
    conflated: bool = False


class _ConnectedChannels(msgspec.Struct):
    """The part of ``connected`` the SDK itself needs: the positions of the connection's own
    channels (protocol decision D5). Lenient, so that it reads them whatever else is there."""

    channels: list[ChannelState] | None = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_payload_decoders = {event: msgspec.json.Decoder(kind) for event, kind in SERVER_EVENTS.items()}


_channels_decoder = msgspec.json.Decoder(_ConnectedChannels)
_STATUS_FIELDS = frozenset(Status.__struct_fields__)


def decode_frame(frame: bytes | str) -> Event:
    """Decode one server text frame. Raises `msgspec.DecodeError` if it is not an envelope."""
    envelope = _envelope_decoder.decode(frame)
    decoder = _payload_decoders.get(envelope.event)
    data: Any
    try:
        if decoder is None:
            raise msgspec.ValidationError("unknown event")
        data = decoder.decode(envelope.data)
    except msgspec.ValidationError:
        data = msgspec.json.decode(envelope.data)
        if envelope.event in ("connected", "logout") and isinstance(data, dict):
            # The SDK runs on this data (keep-alive, user id): a server that adds a field still
            # yields a `Status`, with the fields this SDK knows.
            known = {k: v for k, v in data.items() if k in _STATUS_FIELDS}
            with contextlib.suppress(msgspec.ValidationError):
                data = msgspec.convert(known, Status)
    return Event(
        envelope.event,
        data,
        envelope.channel,
        envelope.offset,
        envelope.epoch,
        envelope.snapshot,
        envelope.conflated,
    )


def connected_channels(frame: bytes | str) -> list[ChannelState]:
    """The channels a ``connected`` frame reports (empty from a server without D5)."""
    try:
        envelope = _envelope_decoder.decode(frame)
        return _channels_decoder.decode(envelope.data).channels or []
    except msgspec.ValidationError:
        return []
