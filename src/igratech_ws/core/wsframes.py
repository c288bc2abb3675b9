"""RFC 6455 frames from a client, as events: parsing, unmasking, message assembly, validation and
the per-connection inbound budget, without I/O (in the style of python-websockets' `protocol.py`).

The adapter feeds every byte it reads after the upgrade to `Inbound.receive_data` and acts on the
events it gets back, in order:

- `TextMessage`: a complete text message, its payload already checked to be UTF-8 (section 8.1).
- `BinaryMessage`: a complete binary message.
- `Ping` / `Pong`: control frames (section 5.5.2, 5.5.3); answer a `Ping` with a pong.
- `CloseFrame`: the client's close frame, checked (section 5.5.1, 7.4); answer it and close.
  Nothing after it is parsed.
- `Refused`: a frame the inbound budget refused (a token bucket of `rate` frames per second,
  `burst` at most; section 10.4 leaves limits to the server). The frame is dropped, and the
  message it belongs to with it; the connection goes on.
- `Failure`: the one decision to fail the connection (section 7.1.7), with its close code. It is
  always the last event: nothing after it is parsed. Every rule broken maps to its code here and
  only here: 1002 for the framing rules, 1007 for invalid UTF-8, 1009 for a message over the size
  bound (decided from the frame header, before the payload is read), 1008 for a client that goes
  on past the budget after `STRIKES` refused frames in a row.

Memory: the parser keeps at most one frame header (14 bytes) of raw input. Payload bytes are
unmasked as they arrive and kept only while their message is incomplete (at most
`max_message_bytes`); once a message is delivered or dropped, nothing of it is held. The CPU
spent on a message is linear in its size: each byte is unmasked once and UTF-8-checked once,
whatever the fragmentation or the way TCP cut it.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from igratech_ws.core.close_codes import CloseCode
from igratech_ws.core.ratelimit import STRIKES, take

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
_KNOWN_OPCODES = frozenset((*_DATA_OPCODES, OP_CLOSE, OP_PING, OP_PONG))

#: The longest frame header a client sends: 2 bytes, 8 of extended length, 4 of mask.
MAX_HEADER_BYTES = 14

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


# --- events --------------------------------------------------------------------------------------


@dataclass(slots=True)
class TextMessage:
    """A complete text message; `payload` is valid UTF-8."""

    payload: bytes


@dataclass(slots=True)
class BinaryMessage:
    """A complete binary message."""

    payload: bytes


@dataclass(slots=True)
class Ping:
    """A ping frame; the answer is a pong with the same `payload` (section 5.5.3)."""

    payload: bytes


@dataclass(slots=True)
class Pong:
    """A pong frame (unsolicited or not: nothing to do but count it as activity)."""

    payload: bytes


@dataclass(slots=True)
class CloseFrame:
    """The client's valid close frame: `code` None when it carried no body (section 5.5.1)."""

    code: int | None
    reason: str


@dataclass(slots=True)
class Refused:
    """A frame with `opcode` dropped by the inbound budget; the connection goes on."""

    opcode: int


@dataclass(slots=True)
class Failure:
    """Fail the connection with `code` (section 7.1.7); `detail` says why, for logs only."""

    code: CloseCode
    detail: str


Event = TextMessage | BinaryMessage | Ping | Pong | CloseFrame | Refused | Failure


def is_valid_close_code(code: int) -> bool:
    """Whether a peer may send `code` in a close frame (section 7.4 and the IANA registry).

    1004-1006 and 1015 are reserved and must never be sent; 1016-2999 are not registered; 0-999
    and 5000 and above are outside every range.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def unmask(data: bytes | memoryview, mask: bytes) -> bytes:
    """`data` XOR-ed with the 4-byte `mask` repeated (section 5.3).

    One big-integer XOR over the whole payload: the fastest pure-Python way measured here (about
    1.2 us for 16 bytes and 4 ns per byte up to 64 KiB, 10-40x faster than a loop per byte).
    """
    size = len(data)
    if not size:
        return b""
    key = (mask * ((size >> 2) + 1))[:size]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


def _check_header(first: int, second: int) -> str | None:
    """What breaks the framing rules of section 5.2 in a frame's first two bytes (1002), if any."""
    if first & 0x70:
        return "RSV bits set without a negotiated extension"
    opcode = first & 0x0F
    if opcode not in _KNOWN_OPCODES:
        return f"reserved opcode {opcode:#x}"
    if not second & 0x80:
        return "unmasked client frame (section 5.1)"
    if opcode >= OP_CLOSE:
        if not first & 0x80:
            return "fragmented control frame"
        if second & 0x7F > 125:
            return "control frame payload over 125 bytes"
    return None


# --- the parser ----------------------------------------------------------------------------------


class Inbound:
    """Client frames of one connection in, events out. See the module docstring.

    Caller's duties: pass every byte received after the upgrade, in order, to `receive_data`
    with the current monotonic time; act on the events in order; after a `Failure` or a
    `CloseFrame`, stop using the parser (it ignores anything else it is given). Call
    `discard_data` once the server has sent its own close frame: from then on only a close frame
    is reported (RFC 6455 section 5.5.1: the server waits for the client's close).
    """

    __slots__ = (
        "_burst",
        "_closing",
        "_control",
        "_decoder",
        "_done",
        "_frame_fin",
        "_frame_opcode",
        "_frame_skip",
        "_mask",
        "_max_message",
        "_message_opcode",
        "_message_skip",
        "_offset",
        "_parts",
        "_pending",
        "_rate",
        "_rate_at",
        "_remaining",
        "_size",
        "_strikes",
        "_tokens",
        "frames_received",
        "refused",
    )

    def __init__(self, *, max_message_bytes: int, rate: float, burst: float, now: float) -> None:
        self._max_message = max_message_bytes
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._rate_at = now
        self._strikes = 0
        #: Raw bytes of an incomplete frame header (never more than MAX_HEADER_BYTES - 1).
        self._pending = b""
        #: Payload bytes of the current frame still to come, its mask and how many came already.
        self._remaining = 0
        self._mask = b""
        self._offset = 0
        self._frame_opcode = 0
        self._frame_fin = True
        #: The current frame's payload is dropped unread (refused, or after our close).
        self._frame_skip = False
        #: Payload of the current control frame while it arrives in pieces (125 bytes at most).
        self._control: list[bytes] = []
        #: The data message in progress: its opcode (0: none), size, pieces, UTF-8 decoder.
        self._message_opcode = 0
        self._size = 0
        self._parts: list[bytes] = []
        self._decoder: codecs.IncrementalDecoder | None = None
        #: The message in progress is being dropped (one of its frames was refused).
        self._message_skip = False
        self._closing = False
        self._done = False
        #: Complete frames received, for the caller's idle timer.
        self.frames_received = 0
        #: Frames refused by the budget so far (for metrics).
        self.refused = 0

    def discard_data(self) -> None:
        """The server sent its close frame: drop every frame but the client's close from now on."""
        self._closing = True
        self._reset_message()

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Parse `data` (the next bytes from the client); the events it completes, in order."""
        events: list[Event] = []
        if self._done:
            return events
        if self._pending:
            data = self._pending + data
            self._pending = b""
        view = memoryview(data)
        end = len(data)
        pos = 0
        while pos < end:
            if self._remaining:
                piece = min(self._remaining, end - pos)
                self._payload_piece(view[pos : pos + piece], events)
                pos += piece
                self._remaining -= piece
                if self._done:
                    return events
                if not self._remaining:
                    self._frame_complete(b"", events, streamed=True)
                    if self._done:
                        return events
                continue
            if end - pos < 2:
                self._pending = bytes(view[pos:])
                break
            first = data[pos]
            second = data[pos + 1]
            problem = _check_header(first, second)
            if problem is not None:
                return self._fail(events, CloseCode.PROTOCOL_ERROR, problem)
            length = second & 0x7F
            header = 6 if length < 126 else 8 if length == 126 else 14
            if end - pos < header:
                self._pending = bytes(view[pos:])
                break
            if length == 126:
                length = int.from_bytes(view[pos + 2 : pos + 4], "big")
                if length < 126:
                    return self._fail(events, CloseCode.PROTOCOL_ERROR, "non-minimal length")
            elif length == 127:
                length = int.from_bytes(view[pos + 2 : pos + 10], "big")
                if length < 65536 or length >> 63:
                    return self._fail(events, CloseCode.PROTOCOL_ERROR, "invalid 64-bit length")
            self._mask = bytes(view[pos + header - 4 : pos + header])
            pos += header
            if not self._start_frame(first & 0x0F, bool(first & 0x80), length, now, events):
                return events
            if end - pos >= length and not self._frame_skip:
                # The whole payload is here: unmask it in one go (the common case).
                payload = unmask(view[pos : pos + length], self._mask) if length else b""
                pos += length
                self._frame_complete(payload, events, streamed=False)
                if self._done:
                    return events
            else:
                self._remaining = length
                self._offset = 0
                if not length:
                    self._frame_complete(b"", events, streamed=False)
                    if self._done:
                        return events
        return events

    # --- frames ----------------------------------------------------------------------------------

    def _start_frame(
        self, opcode: int, fin: bool, length: int, now: float, events: list[Event]
    ) -> bool:
        """Decide on a frame from its header; False when the connection failed."""
        self._frame_opcode = opcode
        self._frame_fin = fin
        self._frame_skip = False
        if self._closing:
            # After our close only the client's close matters (section 5.5.1); the rest is
            # dropped unread and unchecked.
            self._frame_skip = opcode != OP_CLOSE
            return True
        if opcode <= OP_BINARY:
            if opcode == OP_CONTINUATION:
                if not self._message_opcode:
                    self._fail(events, CloseCode.PROTOCOL_ERROR, "continuation without a message")
                    return False
            elif self._message_opcode:
                self._fail(events, CloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
                return False
            else:
                self._message_opcode = opcode
            # Section 10.4: refuse what is too big before reading it.
            self._size += length
            if self._size > self._max_message:
                self._fail(events, CloseCode.MESSAGE_TOO_BIG, f"message over {self._max_message}")
                return False
        allowed = self._spend(now)
        if opcode == OP_CLOSE:
            return True  # a close is never refused: it ends the connection anyway
        if not allowed:
            self.refused += 1
            self._strikes += 1
            if self._strikes > STRIKES:
                self._fail(events, CloseCode.POLICY_VIOLATION, "over the message rate")
                return False
            events.append(Refused(opcode))
            self._frame_skip = True
            if opcode <= OP_BINARY:
                self._message_skip = True
                self._parts.clear()
                self._decoder = None
            return True
        self._strikes = 0
        if opcode <= OP_BINARY and self._message_skip:
            self._frame_skip = True
        return True

    def _spend(self, now: float) -> bool:
        allowed, self._tokens = take(self._tokens, self._rate_at, now, self._rate, self._burst)
        self._rate_at = now
        return allowed

    def _payload_piece(self, piece: memoryview, events: list[Event]) -> None:
        """Part of the current frame's payload, arrived without the rest of it."""
        if self._frame_skip:
            return
        offset = self._offset & 3
        mask = self._mask[offset:] + self._mask[:offset] if offset else self._mask
        self._offset += len(piece)
        data = unmask(piece, mask)
        if self._frame_opcode >= OP_CLOSE:
            self._control.append(data)
            return
        self._parts.append(data)
        if self._message_opcode == OP_TEXT:
            # Fail fast (Autobahn 6.4.x): check each piece as it arrives.
            self._check_text(data, final=False, events=events)

    def _frame_complete(self, payload: bytes, events: list[Event], *, streamed: bool) -> None:
        """The current frame is complete; `payload` is its whole payload unless `streamed`."""
        self.frames_received += 1
        opcode = self._frame_opcode
        if opcode >= OP_CLOSE:
            if self._frame_skip:
                return
            if streamed:
                payload = b"".join(self._control)
                self._control.clear()
            if opcode == OP_CLOSE:
                self._close_frame(payload, events)
            elif opcode == OP_PING:
                events.append(Ping(payload))
            else:
                events.append(Pong(payload))
            return
        if self._frame_skip:
            if self._frame_fin and not self._closing:
                self._reset_message()
            return
        fin = self._frame_fin
        if not streamed:
            if fin and not self._parts:
                # A message in one frame (the common case): one UTF-8 check, no copies.
                if self._message_opcode == OP_TEXT:
                    if not payload.isascii():
                        try:
                            payload.decode("utf-8")
                        except UnicodeDecodeError:
                            self._fail(events, CloseCode.INVALID_DATA, "invalid UTF-8 text")
                            return
                    events.append(TextMessage(payload))
                else:
                    events.append(BinaryMessage(payload))
                self._reset_message()
                return
            if payload:
                self._parts.append(payload)
                if self._message_opcode == OP_TEXT:
                    self._check_text(payload, final=False, events=events)
                    if self._done:
                        return
        if not fin:
            return
        if self._message_opcode == OP_TEXT:
            self._check_text(b"", final=True, events=events)
            if self._done:
                return
        parts = self._parts
        message = parts[0] if len(parts) == 1 else b"".join(parts)
        if self._message_opcode == OP_TEXT:
            events.append(TextMessage(message))
        else:
            events.append(BinaryMessage(message))
        self._reset_message()

    def _check_text(self, data: bytes, *, final: bool, events: list[Event]) -> None:
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = _Utf8Decoder()
        try:
            decoder.decode(data, final)
        except UnicodeDecodeError:
            self._fail(events, CloseCode.INVALID_DATA, "invalid UTF-8 text")

    def _close_frame(self, payload: bytes, events: list[Event]) -> None:
        """Section 5.5.1: an empty body, or a 2-byte code then a UTF-8 reason."""
        if not payload:
            events.append(CloseFrame(None, ""))
        elif len(payload) == 1:
            self._fail(events, CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte body")
            return
        else:
            code = int.from_bytes(payload[:2], "big")
            if not is_valid_close_code(code):
                self._fail(events, CloseCode.PROTOCOL_ERROR, "invalid close code")
                return
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                self._fail(events, CloseCode.INVALID_DATA, "close reason is not UTF-8")
                return
            events.append(CloseFrame(code, reason))
        self._done = True
        self._reset_message()

    def _reset_message(self) -> None:
        self._message_opcode = 0
        self._size = 0
        self._parts = []
        self._decoder = None
        self._message_skip = False

    def _fail(self, events: list[Event], code: CloseCode, detail: str) -> list[Event]:
        events.append(Failure(code, detail))
        self._done = True
        self._pending = b""
        self._remaining = 0
        self._control = []
        self._reset_message()
        return events
