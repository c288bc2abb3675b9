"""What the client yields: `Event`, the SDK's own lifecycle payloads, and frame decoding.

Server events are decoded into the payload types of `igratech_ws.core.messages.SERVER_EVENTS`.
A frame whose payload does not match (a newer server adding a field, an event this SDK does not
know) is still delivered, with `data` as the plain decoded JSON object, so that an old client
keeps working against a newer server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from igratech_ws.core.messages import SERVER_EVENTS

#: Events synthesized by the SDK itself (never sent by the server).
DISCONNECTED = "disconnected"
RECOVERY_FAILED = "recovery-failed"
SDK_EVENTS = frozenset({DISCONNECTED, RECOVERY_FAILED})


@dataclass(frozen=True, slots=True)
class Event:
    """One event: `data` is the typed payload (e.g. `IncidentData` for ``incident``).

    `channel`, `offset` and `epoch` are set on channel pushes (incident, bet, stats, balance,
    bets-result) and None otherwise.
    """

    event: str
    data: Any
    channel: str | None = None
    offset: int | None = None
    epoch: str | None = None


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
    """Data of the SDK's ``recovery-failed`` event, yielded right after the ``settings`` answer
    in which the server said ``recovered: false``: publications on these channels were missed
    and cannot be replayed, so the application must reload their state (e.g. from the platform's
    REST API). Delivery continues from the new position."""

    channels: list[str]


class _Envelope(msgspec.Struct):
    event: str
    data: msgspec.Raw = msgspec.Raw(b"{}")
    channel: str | None = None
    offset: int | None = None
    epoch: str | None = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_payload_decoders = {event: msgspec.json.Decoder(kind) for event, kind in SERVER_EVENTS.items()}


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
    return Event(envelope.event, data, envelope.channel, envelope.offset, envelope.epoch)
