"""What the platform's backend may publish, and the validation every publication passes first.

A publish request names an event, its payload and its target: ``gameId`` (incident, bet, game
stats), ``userId`` (balance, bets-result) or neither (global stats). Validation resolves the target
channel and checks the payload against the contract; nothing is published unless all of it holds.
The payload is re-encoded compactly, so what subscribers receive is canonical JSON.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta

from igratech_ws.core import channels
from igratech_ws.core.codec import ProtocolError, decode_json, decode_payload, encode
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


class ValidatedPublication(msgspec.Struct, frozen=True):
    """A publication that passed validation: ready to hand to `Node.publish`.

    (A frozen struct, not a frozen dataclass: one is built per published event, and a frozen
    dataclass's constructor sets each field through ``object.__setattr__``, several times slower.)
    """

    event: str
    channel: str
    data_json: bytes
    payload: Any


_request_decoder = msgspec.json.Decoder(PublishRequest)
_batch_decoder = msgspec.json.Decoder(PublishBatch)


def _invalid(message: str, field: str | None, event: str | None = None) -> ProtocolError:
    return ProtocolError("bad_message", message, event=event, field=field)


def parse_publish_body(body: bytes) -> PublishRequest:
    """Decode a publish body; raises `ProtocolError` naming the field (the codec's one mapping
    of decode failures, nesting too deep included)."""
    return decode_json(_request_decoder, body, what="Body")


def parse_batch_body(body: bytes, max_items: int) -> list[PublishRequest]:
    """Decode a batch body (at most `max_items` items); raises `ProtocolError` naming the field."""
    batch = decode_json(_batch_decoder, body, what="Body")
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
    return _resolve(event, payload, request.gameId, request.userId)


def _resolve(
    event: str, payload: Any, game_id: str | None, user_id: str | None
) -> ValidatedPublication:
    """The target channel of a decoded, valid `payload`; raises `ProtocolError` if the target is
    missing, doubled or wrong for the event."""
    allowed = channels.TARGETS_BY_EVENT[event]
    if game_id is not None and user_id is not None:
        raise _invalid("Give gameId or userId, not both", "userId", event)
    if game_id is not None:
        if "game" not in allowed:
            raise _invalid(
                f"{event!r} is published to a user (userId), not a game", "gameId", event
            )
        payload_game = getattr(payload, "gameId", None)
        if payload_game is not None and payload_game != game_id:
            raise _invalid(
                f"data.gameId {payload_game!r} does not match the target gameId {game_id!r}",
                "data.gameId",
                event,
            )
        if getattr(payload, "scope", "game") != "game":
            raise _invalid("Stats for a game must have scope 'game'", "data.scope", event)
        channel = channels.game_channel(game_id)
    elif user_id is not None:
        if "user" not in allowed:
            raise _invalid(f"{event!r} cannot be published to a user", "userId", event)
        channel = channels.user_channel(user_id)
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


# --- one decoding pass for a valid batch ---------------------------------------------------------
#
# `parse_batch_body` leaves each item's `data` raw, to be decoded by the event's type once the
# event is known: two passes over every item, so that the first error is found and worded with
# the right field. A valid batch can be decoded in one pass, as a list of a union of one request
# type per event, tagged by `event`. `decode_valid_batch` tries that and returns None on any
# failure, so that the caller takes the two-pass path, which finds (and words) the error: both
# accept exactly the same bodies, with the same results.
#
# The target `gameId` is read there without the `Identifier` pattern (a regex call per item, a
# good part of the decoding): every payload's `gameId` is an `Identifier`, and must equal the
# target's, so a target equal to it needs no check of its own; any other is checked after.

#: `Identifier` but its pattern: see above.
_TargetGameId = Annotated[str, Meta(min_length=1, max_length=64)]


def _typed_request(event: str, payload: type) -> type[msgspec.Struct]:
    return msgspec.defstruct(
        f"Publish_{event.replace('-', '_')}",
        [
            ("data", payload),
            ("gameId", _TargetGameId | None, None),
            ("userId", Identifier | None, None),
            ("idempotencyKey", IdempotencyKey | None, None),
        ],
        kw_only=True,
        forbid_unknown_fields=True,
        tag_field="event",
        tag=event,
    )


_EVENT_OF_TYPED = {_typed_request(event, kind): event for event, kind in PUBLISHED_EVENTS.items()}
assert all(
    field.type in (Identifier, Identifier | None)
    for kind in PUBLISHED_EVENTS.values()
    for field in msgspec.structs.fields(kind)
    if field.name == "gameId"
), "decode_valid_batch trusts a target gameId equal to the payload's: keep that one checked"
_TypedBatch = msgspec.defstruct(
    "PublishBatchTyped",
    [("items", list[Union[tuple(_EVENT_OF_TYPED)]])],  # type: ignore[misc]  # noqa: UP007
    forbid_unknown_fields=True,
)
_typed_batch_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(_TypedBatch)


def _validated_typed(item: Any) -> tuple[ValidatedPublication, str | None]:
    """One request read by a typed decoder, validated: the one place both one-pass readings
    finish an item. Raises ProtocolError where the two-pass reading would refuse it."""
    payload, game_id = item.data, item.gameId
    # The target `gameId` was read without its pattern (see above): check it unless the
    # payload's own, checked, `gameId` equals it.
    if (
        game_id is not None
        and getattr(payload, "gameId", None) != game_id
        and not channels.is_valid_id(game_id)
    ):
        raise _invalid("gameId is not an identifier", "gameId")
    return (
        _resolve(_EVENT_OF_TYPED[type(item)], payload, game_id, item.userId),
        item.idempotencyKey,
    )


def decode_valid_batch(
    body: bytes, max_items: int
) -> list[tuple[ValidatedPublication, str | None]] | None:
    """Each item of a valid batch body (1 to `max_items` items) as its validated publication
    and idempotency key, in one decoding pass; None if anything is wrong with the body (then
    `parse_batch_body` and `validate_publish` say what)."""
    try:
        items = _typed_batch_decoder.decode(body).items
        if not 0 < len(items) <= max_items:
            return None
        return [_validated_typed(item) for item in items]
    except (msgspec.DecodeError, RecursionError, MemoryError, UnicodeError, ProtocolError):
        return None


# --- one decoding pass for a valid single publish ------------------------------------------------
#
# The same one-pass reading as `decode_valid_batch`, for the body of ``POST /api/v1/publish``:
# `parse_publish_body` + `validate_publish` are the reference, and explain what the one pass
# refuses. tests/core/test_publishing.py holds the two readings to the same answers.

_typed_request_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
    Union[tuple(_EVENT_OF_TYPED)]  # noqa: UP007
)


def decode_valid_publish(body: bytes) -> tuple[ValidatedPublication, str | None] | None:
    """A valid publish body as its validated publication and idempotency key, in one decoding
    pass; None if the one-pass reading refuses the body. Then `parse_publish_body` and
    `validate_publish` say what is wrong, or accept the body after all: a JSON object with a
    repeated member is read by its last value there, and fails here if an earlier one is invalid.
    """
    try:
        return _validated_typed(_typed_request_decoder.decode(body))
    except (msgspec.DecodeError, RecursionError, MemoryError, UnicodeError, ProtocolError):
        return None
