"""RFC 6455 server-to-client text frames, built once per message and shared by every receiver.

Section 5.2: a server's frames are unmasked, so a frame is a header plus the payload, the same bytes
for every connection. Building it once per publication lets the hub write a client's pending frames
in one system call (`b"".join`) instead of one `send()` per frame.
"""

from __future__ import annotations

_FIN_TEXT = 0x81


def text_frame(payload: bytes) -> bytes:
    """A complete, final, unmasked text frame carrying `payload` (which must be UTF-8)."""
    size = len(payload)
    if size < 126:
        return bytes((_FIN_TEXT, size)) + payload
    if size < 65_536:
        return bytes((_FIN_TEXT, 126)) + size.to_bytes(2, "big") + payload
    return bytes((_FIN_TEXT, 127)) + size.to_bytes(8, "big") + payload


def close_frame(code: int, reason: str) -> bytes:
    """A close frame (section 5.5.1) with `code` and a UTF-8 `reason` cut to fit 125 bytes."""
    # Cut to 123 bytes without splitting a character: the reason must stay valid UTF-8.
    body = code.to_bytes(2, "big") + reason.encode()[:123].decode(errors="ignore").encode()
    return bytes((0x88, len(body))) + body
