"""The client frame parser (core.wsframes): bytes in, events out, every failure mapped to its code.

Frames are built here by hand (an independent writer that can break every rule); every test feeds
the same bytes whole and cut at every position, so TCP's cutting can never change a decision.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from igratech_ws.core.close_codes import CloseCode
from igratech_ws.core.ratelimit import STRIKES
from igratech_ws.core.wsframes import (
    MAX_HEADER_BYTES,
    BinaryMessage,
    CloseFrame,
    Event,
    Failure,
    Inbound,
    Ping,
    Pong,
    Refused,
    TextMessage,
    is_valid_close_code,
    unmask,
)

LIMIT = 1000
MANY = 1_000_000.0  # a budget that never runs out


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bool = True,
    rsv: int = 0,
    length: int | None = None,
    width: int | None = None,
) -> bytes:
    """One client frame; `length`/`width` (7, 16 or 64 bits) may lie about the payload."""
    size = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    masked = 0x80 if mask else 0
    width = width or (7 if size < 126 else 16 if size < 65536 else 64)
    if width == 7:
        head += bytes([masked | size])
    elif width == 16:
        head += bytes([masked | 126]) + struct.pack("!H", size)
    else:
        head += bytes([masked | 127]) + struct.pack("!Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close(code: int | None = None, reason: bytes = b"") -> bytes:
    return frame(0x8, b"" if code is None else struct.pack("!H", code) + reason)


def feed(
    data: bytes, *, cut: list[int] | None = None, limit: int = LIMIT, rate: float = MANY
) -> list[Event]:
    """Events for `data` fed at once (or cut at the positions in `cut`)."""
    inbound = Inbound(max_message_bytes=limit, rate=rate, burst=rate, now=0.0)
    events: list[Event] = []
    start = 0
    for end in [*(cut or []), len(data)]:
        events += inbound.receive_data(data[start:end], 0.0)
        start = end
    return events


def decide(data: bytes, **kwargs: float) -> list[Event]:
    """Events for `data` whole, asserting that every single cut gives the same events."""
    whole = feed(data, **kwargs)  # type: ignore[arg-type]
    for at in range(1, len(data)):
        assert feed(data, cut=[at], **kwargs) == whole, at  # type: ignore[arg-type]
    assert feed(data, cut=list(range(1, len(data))), **kwargs) == whole  # type: ignore[arg-type]
    return whole


def failure(events: list[Event]) -> CloseCode | None:
    assert all(not isinstance(e, Failure) for e in events[:-1])
    last = events[-1] if events else None
    return last.code if isinstance(last, Failure) else None


# --- what goes through ---------------------------------------------------------------------------


def test_messages_and_control_frames_come_out_in_order() -> None:
    data = (
        frame(0x1, b'{"event":"ping"}')
        + frame(0x9, b"are you there")
        + frame(0x2, b"\x00\xff")
        + frame(0xA, b"")
        + frame(0x1, "κόσμε".encode())
        + close(1000, b"bye")
    )
    assert decide(data) == [
        TextMessage(b'{"event":"ping"}'),
        Ping(b"are you there"),
        BinaryMessage(b"\x00\xff"),
        Pong(b""),
        TextMessage("κόσμε".encode()),
        CloseFrame(1000, "bye"),
    ]


def test_fragments_are_joined_and_control_frames_may_come_between_them() -> None:
    data = (
        frame(0x1, b"ab", fin=False)
        + frame(0x9, b"p")
        + frame(0x0, b"", fin=False)
        + frame(0x0, b"cd", fin=False)
        + frame(0x0, b"e")
        + frame(0x2, b"x", fin=False)
        + frame(0x0, b"y")
    )
    assert decide(data) == [Ping(b"p"), TextMessage(b"abcde"), BinaryMessage(b"xy")]


def test_a_character_cut_between_fragments_is_valid() -> None:
    text = "€uro".encode()
    data = frame(0x1, text[:1], fin=False) + frame(0x0, text[1:2], fin=False)
    assert decide(data + frame(0x0, text[2:])) == [TextMessage(text)]


def test_lengths_of_every_width_are_read() -> None:
    for size in (0, 125, 126, 65535, 65536, 70000):
        payload = os.urandom(size)
        events = feed(frame(0x2, payload), limit=100_000)
        assert events == [BinaryMessage(payload)], size


def test_an_empty_close_has_no_code() -> None:
    assert decide(close()) == [CloseFrame(None, "")]


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1011, 1012, 1014, 3000, 4999])
def test_valid_close_codes_are_reported(code: int) -> None:
    assert decide(close(code, "ok ✓".encode())) == [CloseFrame(code, "ok ✓")]


def test_nothing_is_parsed_after_the_close() -> None:
    events = feed(close(1000) + frame(0x1, b"late") + b"\xff\xff garbage")
    assert events == [CloseFrame(1000, "")]


def test_unmask_is_the_xor_of_section_5_3() -> None:
    for size in (0, 1, 3, 4, 5, 1000):
        data, key = os.urandom(size), os.urandom(4)
        assert unmask(data, key) == bytes(b ^ key[i % 4] for i, b in enumerate(data))


# --- failures: one code per rule ------------------------------------------------------------------

FAILURES: list[tuple[str, bytes, CloseCode]] = [
    *[
        (f"RSV bits {rsv:03b}", frame(0x1, b"x", rsv=rsv), CloseCode.PROTOCOL_ERROR)
        for rsv in range(1, 8)
    ],
    *[
        (f"reserved opcode {op:#x}", frame(op, b"x"), CloseCode.PROTOCOL_ERROR)
        for op in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15)
    ],
    ("unmasked frame", frame(0x1, b"x", mask=False), CloseCode.PROTOCOL_ERROR),
    ("fragmented ping", frame(0x9, b"p", fin=False), CloseCode.PROTOCOL_ERROR),
    ("fragmented close", frame(0x8, b"\x03\xe8", fin=False), CloseCode.PROTOCOL_ERROR),
    ("ping of 126 bytes", frame(0x9, b"p" * 126), CloseCode.PROTOCOL_ERROR),
    ("pong of 126 bytes", frame(0xA, b"p" * 126), CloseCode.PROTOCOL_ERROR),
    ("close of 126 bytes", frame(0x8, b"\x03\xe8" + b"r" * 124), CloseCode.PROTOCOL_ERROR),
    ("16-bit length under 126", frame(0x1, b"x" * 10, width=16), CloseCode.PROTOCOL_ERROR),
    ("64-bit length under 65536", frame(0x1, b"x" * 10, width=64), CloseCode.PROTOCOL_ERROR),
    (
        "64-bit length with the top bit",
        frame(0x2, length=1 << 63, width=64),
        CloseCode.PROTOCOL_ERROR,
    ),
    ("continuation without a message", frame(0x0, b"x"), CloseCode.PROTOCOL_ERROR),
    (
        "text inside a fragmented text",
        frame(0x1, b"a", fin=False) + frame(0x1, b"b"),
        CloseCode.PROTOCOL_ERROR,
    ),
    (
        "binary inside a fragmented text",
        frame(0x1, b"a", fin=False) + frame(0x2, b"b"),
        CloseCode.PROTOCOL_ERROR,
    ),
    ("invalid UTF-8 text", frame(0x1, b"\xff"), CloseCode.INVALID_DATA),
    ("a surrogate in text", frame(0x1, b"\xed\xa0\x80"), CloseCode.INVALID_DATA),
    ("an overlong encoding in text", frame(0x1, b"\xc0\xaf"), CloseCode.INVALID_DATA),
    ("text ending inside a character", frame(0x1, "€".encode()[:2]), CloseCode.INVALID_DATA),
    (
        "fragmented text ending inside a character",
        frame(0x1, b"ok", fin=False) + frame(0x0, "€".encode()[:2]),
        CloseCode.INVALID_DATA,
    ),
    ("a frame over the limit", frame(0x2, b"x" * (LIMIT + 1)), CloseCode.MESSAGE_TOO_BIG),
    (
        "fragments over the limit in total",
        frame(0x1, b"a" * 600, fin=False) + frame(0x0, b"a" * 401),
        CloseCode.MESSAGE_TOO_BIG,
    ),
    ("close with a 1-byte body", frame(0x8, b"\x03"), CloseCode.PROTOCOL_ERROR),
    *[
        (f"close code {code}", close(code), CloseCode.PROTOCOL_ERROR)
        for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)
    ],
    ("close reason not UTF-8", close(1000, b"\xff"), CloseCode.INVALID_DATA),
]


@pytest.mark.parametrize(("case", "data", "code"), FAILURES, ids=[c[0] for c in FAILURES])
def test_every_broken_rule_fails_with_its_code(case: str, data: bytes, code: CloseCode) -> None:
    # A valid message first: what came before the failure is still delivered.
    events = decide(frame(0x1, b"before") + data + frame(0x1, b"never"))
    assert events[0] == TextMessage(b"before")
    assert failure(events) == code, (case, events)
    assert TextMessage(b"never") not in events


def test_a_message_over_the_limit_fails_from_its_header_alone() -> None:
    """Section 10.4: 1009 before reading (or holding) the payload."""
    header = frame(0x2, length=10 * LIMIT, width=16)
    assert failure(feed(header)) == CloseCode.MESSAGE_TOO_BIG  # no payload byte sent


def test_invalid_utf8_fails_before_the_message_ends() -> None:
    """Autobahn 6.4.x: fail fast on the fragment, or the piece of a frame, that breaks UTF-8."""
    inbound = Inbound(max_message_bytes=LIMIT, rate=MANY, burst=MANY, now=0.0)
    assert inbound.receive_data(frame(0x1, "κόσμε".encode(), fin=False), 0.0) == []
    assert failure(inbound.receive_data(frame(0x0, b"\xf4\x90\x80\x80", fin=False), 0.0))
    # and inside one frame cut by TCP: the bad bytes are enough, the rest never comes
    inbound = Inbound(max_message_bytes=LIMIT, rate=MANY, burst=MANY, now=0.0)
    whole = frame(0x1, "κόσμε".encode() + b"\xf4\x90\x80\x80" + b"x" * 100)
    assert failure(inbound.receive_data(whole[: 6 + 10 + 2], 0.0)) == CloseCode.INVALID_DATA


def test_valid_close_code_ranges() -> None:
    valid = [code for code in range(70_000) if is_valid_close_code(code)]
    expected = [*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)]
    assert valid == expected


# --- the inbound budget ------------------------------------------------------------------------


def budget(burst: float, rate: float = 0.001) -> Inbound:
    return Inbound(max_message_bytes=LIMIT, rate=rate, burst=burst, now=0.0)


@pytest.mark.parametrize(
    "kind",
    [frame(0x1, b"t"), frame(0x2, b"b"), frame(0x9, b"p"), frame(0xA, b"p")],
    ids=["text", "binary", "ping", "pong"],  # the same on every xdist worker (masks are random)
)
def test_every_kind_of_frame_takes_a_token(kind: bytes) -> None:
    inbound = budget(burst=3)
    events = inbound.receive_data(kind * 3, 0.0)
    assert not any(isinstance(e, Refused) for e in events)
    events = inbound.receive_data(kind, 0.0)
    assert events == [Refused(kind[0] & 0x0F)]


def test_continuations_take_tokens_and_a_refused_fragment_drops_its_message() -> None:
    inbound = budget(burst=1)
    events = inbound.receive_data(
        frame(0x1, b"a", fin=False) + frame(0x0, b"b", fin=False) + frame(0x0, b"c"), 0.0
    )
    assert events == [Refused(0x0), Refused(0x0)]
    # the message is dropped whole, and the connection goes on with the next one
    inbound = budget(burst=1, rate=1.0)
    assert inbound.receive_data(frame(0x1, b"a", fin=False) + frame(0x0, b"b"), 0.0) == [
        Refused(0x0)
    ]
    assert inbound.receive_data(frame(0x1, b"next"), 5.0) == [TextMessage(b"next")]


def test_refused_frames_in_a_row_end_with_1008_and_an_accepted_one_resets_the_count() -> None:
    inbound = budget(burst=1, rate=1.0)
    assert inbound.receive_data(frame(0x9, b"p"), 0.0) == [Ping(b"p")]
    refused = inbound.receive_data(frame(0x9, b"p") * STRIKES, 0.0)
    assert refused == [Refused(0x9)] * STRIKES
    assert inbound.receive_data(frame(0x9, b"p"), 1.5) == [Ping(b"p")]  # a token came back
    assert inbound.receive_data(frame(0x9, b"p") * STRIKES, 1.5) == [Refused(0x9)] * STRIKES
    assert failure(inbound.receive_data(frame(0xA, b"p"), 1.5)) == CloseCode.POLICY_VIOLATION
    assert inbound.refused == 2 * STRIKES + 1


def test_a_close_is_never_refused() -> None:
    inbound = budget(burst=1)
    inbound.receive_data(frame(0x9, b"p"), 0.0)
    assert inbound.receive_data(close(1000), 0.0) == [CloseFrame(1000, "")]


def test_after_our_close_only_the_clients_close_is_reported() -> None:
    inbound = budget(burst=1)
    inbound.discard_data()
    data = frame(0x1, b"\xff") + frame(0x9, b"p") * 50 + frame(0x2, b"x") + close(1001)
    assert inbound.receive_data(data, 0.0) == [CloseFrame(1001, "")]


# --- memory and CPU ------------------------------------------------------------------------------


def test_only_a_header_of_raw_input_is_ever_kept() -> None:
    inbound = Inbound(max_message_bytes=1 << 20, rate=MANY, burst=MANY, now=0.0)
    data = frame(0x2, os.urandom(300_000))
    for start in range(0, len(data), 7):
        inbound.receive_data(data[start : start + 7], 0.0)
        assert len(inbound._pending) < MAX_HEADER_BYTES


def test_a_delivered_message_leaves_nothing_behind() -> None:
    inbound = Inbound(max_message_bytes=1 << 20, rate=MANY, burst=MANY, now=0.0)
    data = frame(0x1, b"a" * 100_000, fin=False) + frame(0x0, b"b" * 100_000)
    for start in range(0, len(data), 1000):
        inbound.receive_data(data[start : start + 1000], 0.0)
    assert inbound._parts == [] and inbound._decoder is None and inbound._pending == b""


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0x0, 0x1, 0x2, 0x9, 0xA]),
            st.binary(max_size=40) | st.text(max_size=20).map(str.encode),
            st.booleans(),
        ),
        max_size=8,
    ),
    st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_how_tcp_cuts_the_bytes_never_changes_the_events(
    frames: list[tuple[int, bytes, bool]], cuts: list[int]
) -> None:
    data = b"".join(frame(op, payload, fin=fin or op >= 8) for op, payload, fin in frames)
    positions = sorted({c for c in cuts if 0 < c < len(data)})
    assert feed(data, cut=positions) == feed(data)
