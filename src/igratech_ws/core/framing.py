"""RFC 6455 server-to-client frames, built once per message and shared by every receiver.

Section 5.2: a server's frames are unmasked, so a frame is a header plus the payload, the same bytes
for every connection. Building it once per publication lets the hub write a client's pending frames
in one system call (`b"".join`) instead of one `send()` per frame.
"""

from __future__ import annotations

_FIN_TEXT = 0x81
_FIN_BINARY = 0x82
_CLOSE = 0x88
_PONG = 0x8A


def _frame(first: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65_536:
        return bytes((first, 126)) + size.to_bytes(2, "big") + payload
    return bytes((first, 127)) + size.to_bytes(8, "big") + payload


def text_frame(payload: bytes) -> bytes:
    """A complete, final, unmasked text frame carrying `payload` (which must be UTF-8)."""
    return _frame(_FIN_TEXT, payload)


def binary_frame(payload: bytes) -> bytes:
    """A complete, final, unmasked binary frame carrying `payload`."""
    return _frame(_FIN_BINARY, payload)


def pong_frame(payload: bytes) -> bytes:
    """The pong answering a ping with `payload` (section 5.5.3: the same application data; the
    caller's duty is that `payload` comes from a valid ping, so at most 125 bytes)."""
    return _frame(_PONG, payload)


def close_frame(code: int, reason: str) -> bytes:
    """A close frame (section 5.5.1) with `code` and a UTF-8 `reason` cut to fit 125 bytes."""
    # Cut to 123 bytes without splitting a character: the reason must stay valid UTF-8.
    body = code.to_bytes(2, "big") + reason.encode()[:123].decode(errors="ignore").encode()
    return bytes((_CLOSE, len(body))) + body
