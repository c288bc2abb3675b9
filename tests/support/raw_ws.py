"""A raw WebSocket client for attacks: frames built by hand (so they can break every rule), a
blocking socket past a real upgrade, and a reader of what the server answers.

Blocking sockets: call these from a worker thread (`in_thread`) when the server runs in-process,
so the event loop keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from tests.support.gateway import raw_upgrade

T = TypeVar("T")
WAIT_S = 10.0  # bound of every wait; nothing here asserts on speed


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True, rsv: int = 0
) -> bytes:
    """One client frame (RFC 6455 section 5.2), masked unless told otherwise."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    length = len(payload)
    masked = 0x80 if mask else 0
    if length < 126:
        head += bytes([masked | length])
    elif length < 65536:
        head += bytes([masked | 126]) + struct.pack("!H", length)
    else:
        head += bytes([masked | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    # The masking XOR as a big integer: fast enough for megabytes of attack traffic.
    if not payload:
        return head + key
    repeated = (key * (length // 4 + 1))[:length]
    masked_payload = (
        int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")
    ).to_bytes(length, "little")
    return head + key + masked_payload


def close(code: int, reason: bytes = b"") -> bytes:
    return frame(0x8, struct.pack("!H", code) + reason)


def connect(port: int, *, query: str = "", rcvbuf: int | None = None) -> socket.socket:
    """A blocking socket past a valid upgrade (the server's first frames unread)."""
    sock = raw_upgrade(port, query=query, rcvbuf=rcvbuf)
    sock.settimeout(WAIT_S)
    return sock


def next_frame(data: bytes, at: int = 0) -> tuple[int, bytes, int] | None:
    """The unmasked server frame at `data[at:]` (RFC 6455 5.2): its opcode, its payload and
    where the next one starts; None while it is incomplete. (An index, not the rest of `data`:
    a loop over megabytes of frames copies nothing but the payloads.)"""
    if len(data) < at + 2:
        return None
    opcode, length, start = data[at] & 0x0F, data[at + 1] & 0x7F, at + 2
    if length == 126:
        if len(data) < at + 4:
            return None
        length, start = struct.unpack("!H", data[at + 2 : at + 4])[0], at + 4
    elif length == 127:
        if len(data) < at + 10:
            return None
        length, start = struct.unpack("!Q", data[at + 2 : at + 10])[0], at + 10
    if len(data) < start + length:
        return None
    return opcode, bytes(data[start : start + length]), start + length


def read_frames(
    sock: socket.socket,
    until: bytes | None = None,
    timeout: float = WAIT_S,
    *,
    until_opcode: int | None = None,
) -> tuple[list[tuple[int, bytes]], int | None]:
    """Server frames until its close frame (returns its code), a text frame holding `until`, a
    frame of `until_opcode`, end of stream or `timeout`."""
    buffer = b""
    frames: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        buffer += chunk
        while (parsed := next_frame(buffer)) is not None:
            opcode, payload, end = parsed
            buffer = buffer[end:]
            frames.append((opcode, payload))
            if until is not None and opcode == 0x1 and until in payload:
                return frames, None
            if opcode == until_opcode:
                return frames, None
            if opcode == 0x8:
                return frames, struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
    return frames, None


def texts(frames: list[tuple[int, bytes]]) -> list[bytes]:
    return [payload for opcode, payload in frames if opcode == 0x1]


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


#: Event loops and transports the listener is tested on: asyncio's own, uvloop's (production),
#: and aiofastnet's on uvloop (`use_aiofastnet`).
LOOPS = ("asyncio", "uvloop", "aiofastnet")


def run_on(loop: str, main: Callable[[bool], Coroutine[Any, Any, T]]) -> T:
    """Run `main(use_aiofastnet)` to completion on a fresh `loop` (one of LOOPS)."""
    if loop == "asyncio":
        return asyncio.run(main(False))
    import uvloop

    return uvloop.run(main(loop == "aiofastnet"))
