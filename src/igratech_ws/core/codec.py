"""JSON encoding and decoding of frames, with every failure mapped to a documented error.

The decoder never raises into its caller except as `ProtocolError`, which carries the `error`
event's code, a message, and the offending field when there is one.

Server pushes of a channel are encoded once per publication (not once per subscriber) by
`publication_frame`, which splices the already-encoded payload into the envelope.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from igratech_ws.core.contract_words import in_contract_words
from igratech_ws.core.messages import (
    CLIENT_EVENTS,
    PUBLISHED_EVENTS,
    ErrorCode,
    ErrorData,
)

_encoder = msgspec.json.Encoder()
# msgspec ends a validation message with "- at `$.path`", or "- at `key` in `$.path`" for a key.
_FIELD_RE = re.compile(r" - at (?:`key` in )?`\$\.?(?P<path>[^`]*)`$")


class ProtocolError(Exception):
    """A message that cannot be accepted; becomes an `error` event (or an HTTP 4xx)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        event: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.event = event
        self.field = field

    def to_data(self) -> ErrorData:
        return ErrorData(
            code=self.code, message=self.message[:500], event=self.event, field=self.field
        )


class _ClientEnvelope(msgspec.Struct, forbid_unknown_fields=True):
    event: str
    data: msgspec.Raw = msgspec.Raw(b"{}")


_envelope_decoder = msgspec.json.Decoder(_ClientEnvelope)
_payload_decoders = {
    event: msgspec.json.Decoder(kind)
    for event, kind in {**CLIENT_EVENTS, **PUBLISHED_EVENTS}.items()
}


def split_validation_error(error: msgspec.ValidationError) -> tuple[str, str | None]:
    """msgspec's message without the location suffix, and the field path (``bets[0].stake``);
    patterns are said in the contract's words (`core.contract_words`)."""
    text = in_contract_words(str(error))
    match = _FIELD_RE.search(text)
    if not match:
        return text, None
    return text[: match.start()], match.group("path") or None


def decode_client_frame(frame: bytes | str) -> tuple[str, Any]:
    """Decode one client text frame into (event, typed payload).

    Raises `ProtocolError` with code ``bad_json`` (not JSON), ``bad_message`` (not an envelope),
    ``unknown_event``, or ``invalid_settings`` / ``bad_message`` (payload breaks its schema).
    """
    try:
        envelope = _envelope_decoder.decode(frame)
    except msgspec.ValidationError as exc:
        message, field = split_validation_error(exc)
        raise ProtocolError("bad_message", f"Invalid envelope: {message}", field=field) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_json", f"Frame is not valid JSON: {exc}") from None
    except UnicodeEncodeError:  # a str frame holding a lone surrogate cannot be UTF-8
        raise ProtocolError("bad_json", "Frame is not valid UTF-8 text") from None
    event = envelope.event
    if event not in CLIENT_EVENTS:
        raise ProtocolError(
            "unknown_event",
            f"Unknown event {event[:64]!r}; a client may send: {', '.join(sorted(CLIENT_EVENTS))}",
            event=event[:64],
        )
    return event, decode_payload(event, envelope.data, bad_code=_bad_code(event))


def _bad_code(event: str) -> ErrorCode:
    return "invalid_settings" if event == "settings" else "bad_message"


def decode_payload(
    event: str, data: bytes | msgspec.Raw, *, bad_code: ErrorCode = "bad_message"
) -> Any:
    """Decode and validate the payload of `event` (a client or published event).

    Raises `ProtocolError` naming the field (``data.<path>``) when the payload breaks the contract.
    """
    decoder = _payload_decoders.get(event)
    if decoder is None:
        raise ProtocolError("unknown_event", f"Unknown event {event[:64]!r}", event=event[:64])
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        message, path = split_validation_error(exc)
        field = f"data.{path}" if path else "data"
        raise ProtocolError(bad_code, f"{message} at {field}", event=event, field=field) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_json", f"Payload is not valid JSON: {exc}", event=event) from None


def encode(value: Any) -> bytes:
    """Encode any msgspec struct or JSON-able value to compact JSON bytes."""
    return _encoder.encode(value)


def event_frame(event: str, data: Any) -> bytes:
    """A complete server frame without a channel: ``{"event": ..., "data": ...}``."""
    return b'{"event":' + _encoder.encode(event) + b',"data":' + _encoder.encode(data) + b"}"


def publication_frame(event: str, channel: str, offset: int, epoch: str, data_json: bytes) -> bytes:
    """The frame of one channel publication, built once and shared by every subscriber.

    `data_json` must already be the validated, compact JSON of the payload.
    """
    return b"".join(
        (
            b'{"event":',
            _encoder.encode(event),
            b',"channel":',
            _encoder.encode(channel),
            b',"offset":',
            str(offset).encode(),
            b',"epoch":',
            _encoder.encode(epoch),
            b',"data":',
            data_json,
            b"}",
        )
    )
