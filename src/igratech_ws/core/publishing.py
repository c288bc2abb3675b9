"""What the platform's backend may publish, and the validation every publication passes first.

A publish request names an event, its payload and its target: ``gameId`` (incident, bet, game
stats), ``userId`` (balance, bets-result) or neither (global stats). Validation resolves the target
channel and checks the payload against the contract; nothing is published unless all of it holds.
The payload is re-encoded compactly, so what subscribers receive is canonical JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from igratech_ws.core import channels
from igratech_ws.core.codec import ProtocolError, decode_payload, encode, split_validation_error
from igratech_ws.core.messages import PUBLISHED_EVENTS, IdempotencyKey, Identifier


class PublishRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of ``POST /api/v1/publish`` (and one item of a batch, and an outbox row's body).

    `idempotencyKey`: a repeat with the same key to the same channel, within the broker's
    window, publishes nothing and answers the first publication (`Node.publish`).
    """

    event: str
    data: msgspec.Raw
    gameId: Identifier | None = None
    userId: Identifier | None = None
    idempotencyKey: IdempotencyKey | None = None


class PublishBatch(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /api/v1/publish/batch``: published in order, all or nothing validated."""

    items: list[PublishRequest]


@dataclass(frozen=True, slots=True)
class ValidatedPublication:
    """A publication that passed validation: ready to hand to `Node.publish`."""

    event: str
    channel: str
    data_json: bytes
    payload: Any


_request_decoder = msgspec.json.Decoder(PublishRequest)
_batch_decoder = msgspec.json.Decoder(PublishBatch)


def _invalid(message: str, field: str | None, event: str | None = None) -> ProtocolError:
    return ProtocolError("bad_message", message, event=event, field=field)


def parse_publish_body(body: bytes) -> PublishRequest:
    """Decode a publish body; raises `ProtocolError` naming the field."""
    try:
        return _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, field = split_validation_error(exc)
        raise _invalid(f"{message}" + (f" at {field}" if field else ""), field) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_json", f"Body is not valid JSON: {exc}") from None


def parse_batch_body(body: bytes, max_items: int) -> list[PublishRequest]:
    """Decode a batch body (at most `max_items` items); raises `ProtocolError` naming the field."""
    try:
        batch = _batch_decoder.decode(body)
    except msgspec.ValidationError as exc:
        message, field = split_validation_error(exc)
        raise _invalid(f"{message}" + (f" at {field}" if field else ""), field) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_json", f"Body is not valid JSON: {exc}") from None
    if not batch.items:
        raise _invalid("A batch needs at least one item", "items")
    if len(batch.items) > max_items:
        raise _invalid(f"A batch holds at most {max_items} items", "items")
    return batch.items


def validate_publish(request: PublishRequest) -> ValidatedPublication:
    """Resolve the target channel and validate the payload of `request`.

    Raises `ProtocolError` (code ``unknown_event`` or ``bad_message``, with `field` set) when the
    event is not publishable, the target is missing or wrong for the event, or the payload breaks
    the contract.
    """
    event = request.event
    if event not in PUBLISHED_EVENTS:
        raise ProtocolError(
            "unknown_event",
            f"Unknown event {event[:64]!r}; publishable: {', '.join(sorted(PUBLISHED_EVENTS))}",
            event=event[:64],
            field="event",
        )
    payload = decode_payload(event, request.data)
    allowed = channels.TARGETS_BY_EVENT[event]
    if request.gameId is not None and request.userId is not None:
        raise _invalid("Give gameId or userId, not both", "userId", event)
    if request.gameId is not None:
        if "game" not in allowed:
            raise _invalid(
                f"{event!r} is published to a user (userId), not a game", "gameId", event
            )
        payload_game = getattr(payload, "gameId", None)
        if payload_game is not None and payload_game != request.gameId:
            raise _invalid(
                f"data.gameId {payload_game!r} does not match the target gameId {request.gameId!r}",
                "data.gameId",
                event,
            )
        if getattr(payload, "scope", "game") != "game":
            raise _invalid("Stats for a game must have scope 'game'", "data.scope", event)
        channel = channels.game_channel(request.gameId)
    elif request.userId is not None:
        if "user" not in allowed:
            raise _invalid(f"{event!r} cannot be published to a user", "userId", event)
        channel = channels.user_channel(request.userId)
    else:
        if "global" not in allowed:
            field = "userId" if "user" in allowed else "gameId"
            raise _invalid(f"{event!r} needs a target: {field}", field, event)
        if getattr(payload, "scope", None) != "global" or getattr(payload, "gameId", None):
            raise _invalid(
                "Global stats must have scope 'global' and no gameId", "data.scope", event
            )
        channel = channels.GLOBAL_CHANNEL
    return ValidatedPublication(event, channel, encode(payload), payload)
