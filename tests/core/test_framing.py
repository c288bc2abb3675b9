"""Server frames per RFC 6455 section 5.2, parsed back by an independent reader."""

from __future__ import annotations

import pytest

from igratech_ws.core.framing import close_frame, text_frame


def parse(frame: bytes) -> tuple[bool, int, bytes]:
    """(fin, opcode, payload) of one unmasked frame; asserts it is well-formed and minimal."""
    first, second = frame[0], frame[1]
    fin = bool(first & 0x80)
    assert first & 0x70 == 0, "RSV1-3 must be 0 without extensions"
    opcode = first & 0x0F
    assert second & 0x80 == 0, "a server must not mask (section 5.1)"
    length = second & 0x7F
    at = 2
    if length == 126:
        length = int.from_bytes(frame[2:4], "big")
        assert length >= 126, "the minimal number of bytes must be used"
        at = 4
    elif length == 127:
        assert frame[2] & 0x80 == 0, "the most significant bit must be 0"
        length = int.from_bytes(frame[2:10], "big")
        assert length >= 65536, "the minimal number of bytes must be used"
        at = 10
    payload = frame[at:]
    assert len(payload) == length
    return fin, opcode, payload


@pytest.mark.parametrize(
    ("size", "header"), [(0, 2), (1, 2), (125, 2), (126, 4), (65535, 4), (65536, 10), (70000, 10)]
)
def test_text_frame_lengths(size: int, header: int) -> None:
    payload = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    frame = text_frame(payload)
    assert len(frame) == header + size
    assert parse(frame) == (True, 0x1, payload)


def test_text_frame_is_shareable_bytes() -> None:
    frame = text_frame(b'{"event":"pong"}')
    assert isinstance(frame, bytes)
    assert frame == b'\x81\x10{"event":"pong"}'


def test_close_frame() -> None:
    fin, opcode, payload = parse(close_frame(4001, "logged in from another client"))
    assert (fin, opcode) == (True, 0x8)
    assert int.from_bytes(payload[:2], "big") == 4001
    assert payload[2:] == b"logged in from another client"


def test_close_frame_without_reason() -> None:
    assert parse(close_frame(1000, "")) == (True, 0x8, b"\x03\xe8")


def test_close_frame_reason_is_cut_to_fit_a_control_frame() -> None:
    _, _, payload = parse(close_frame(1013, "x" * 500))
    assert len(payload) == 125  # section 5.5: control frames carry at most 125 bytes
    assert payload[2:] == b"x" * 123


def test_close_frame_reason_stays_valid_utf8() -> None:
    _, _, payload = parse(close_frame(1000, "\u00e9" * 100))
    assert len(payload) <= 125
    payload[2:].decode("utf-8")
