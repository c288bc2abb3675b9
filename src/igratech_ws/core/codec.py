"""JSON encoding and decoding of frames, with every failure mapped to a documented error.

The decoder never raises into its caller except as `ProtocolError`, which carries the `error`
event's code, a message, and the offending field when there is one.

Server pushes of a channel are encoded once per publication (not once per subscriber) by
`publication_frame`, which splices the already-encoded payload into the envelope.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from igratech_ws.core.contract_words import in_contract_words
from igratech_ws.core.messages import (
    CLIENT_EVENTS,
    PUBLISHED_EVENTS,
    ErrorCode,
    ErrorData,
)

_encoder = msgspec.json.Encoder()
T = TypeVar("T")
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


#: Every exception msgspec's JSON decoder raises for what it is given (found by fuzzing it with
#: malformed, deeply nested and non-UTF-8 input; tests/core/test_codec.py keeps fuzzing it):
#: `ValidationError` (valid JSON that breaks the type), `DecodeError` (not JSON), `UnicodeError`
#: (a `str` holding a lone surrogate cannot be UTF-8), `RecursionError` (nesting deeper than the
#: interpreter's recursion limit allows: about 1000 levels less the caller's stack depth, so it
#: is not a fixed number), and `MemoryError`, which one oversized input must not turn into a
#: crash of the request or connection that carried it.
DECODE_FAILURES = (msgspec.DecodeError, UnicodeError, RecursionError, MemoryError)


def decode_failure(
    exc: BaseException,
    *,
    what: str,
    bad_code: ErrorCode = "bad_message",
    event: str | None = None,
    field_prefix: str = "",
) -> ProtocolError:
    """The one mapping of a decode failure (an exception of `DECODE_FAILURES`) to the documented
    error: ``bad_json`` for input that is not JSON (or not UTF-8), `bad_code` for JSON that breaks
    the schema or is nested too deeply, with the offending field (`field_prefix` + msgspec's path).

    `what` names the input in the messages of undecodable input ("Frame", "Body", "Payload").
    Used by every decoder of untrusted input: client frames, the handshake `settings` parameter
    and the HTTP API (through `decode_json`).
    """
    if isinstance(exc, msgspec.ValidationError):
        message, path = split_validation_error(exc)
        field = (field_prefix + path if path else field_prefix.rstrip(".")) or None
        where = f" at {field}" if field else ""
        return ProtocolError(bad_code, f"{message}{where}", event=event, field=field)
    if isinstance(exc, (RecursionError, MemoryError)):
        return ProtocolError(
            bad_code,
            f"{what} is nested too deeply (or too large) to decode",
            event=event,
        )
    if isinstance(exc, UnicodeError):
        return ProtocolError("bad_json", f"{what} is not valid UTF-8 text", event=event)
    return ProtocolError("bad_json", f"{what} is not valid JSON: {exc}", event=event)


def decode_json(
    decoder: msgspec.json.Decoder[T],
    data: bytes | str | msgspec.Raw,
    *,
    what: str,
    bad_code: ErrorCode = "bad_message",
    event: str | None = None,
    field_prefix: str = "",
) -> T:
    """`decoder.decode(data)`, raising only `ProtocolError` (see `decode_failure`)."""
    try:
        return decoder.decode(data)
    except DECODE_FAILURES as exc:
        raise decode_failure(
            exc, what=what, bad_code=bad_code, event=event, field_prefix=field_prefix
        ) from None


def decode_client_frame(frame: bytes | str) -> tuple[str, Any]:
    """Decode one client text frame into (event, typed payload).

    Raises `ProtocolError` with code ``bad_json`` (not JSON), ``bad_message`` (not an envelope,
    or nested too deeply), ``unknown_event``, or ``invalid_settings`` / ``bad_message`` (payload
    breaks its schema).
    """
    envelope = decode_json(_envelope_decoder, frame, what="Frame")
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
    event: str, data: bytes | str | msgspec.Raw, *, bad_code: ErrorCode = "bad_message"
) -> Any:
    """Decode and validate the payload of `event` (a client or published event).

    Raises `ProtocolError` naming the field (``data.<path>``) when the payload breaks the contract.
    """
    decoder = _payload_decoders.get(event)
    if decoder is None:
        raise ProtocolError("unknown_event", f"Unknown event {event[:64]!r}", event=event[:64])
    return decode_json(
        decoder, data, what="Payload", bad_code=bad_code, event=event, field_prefix="data."
    )


def encode(value: Any) -> bytes:
    """Encode any msgspec struct or JSON-able value to compact JSON bytes."""
    return _encoder.encode(value)


def event_frame(event: str, data: Any) -> bytes:
    """A complete server frame without a channel: ``{"event": ..., "data": ...}``."""
    return b'{"event":' + _encoder.encode(event) + b',"data":' + _encoder.encode(data) + b"}"


#: Marks spliced into a publication's frame (`publication_frame`'s `mark`): the channel's current
#: state sent on follow (AsyncAPI `snapshot`), and a state push that replaced older ones queued to
#: a slow connection (`conflated`).
SNAPSHOT_MARK = b',"snapshot":true'
CONFLATED_MARK = b',"conflated":true'


def publication_frame(
    event: str, channel: str, offset: int, epoch: str, data_json: bytes, mark: bytes = b""
) -> bytes:
    """The frame of one channel publication, built once and shared by every subscriber.

    `data_json` must already be the validated, compact JSON of the payload; `mark` is empty,
    `SNAPSHOT_MARK` or `CONFLATED_MARK` (each variant is built once per publication).
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
            mark,
            b',"data":',
            data_json,
            b"}",
        )
    )
