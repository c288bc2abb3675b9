"""One WebSocket connection to the gateway, over picows: open, send, and how it ended.

This layer knows nothing of the protocol: text frames go to `on_text`, synchronously, in the event
loop, as they arrive; the caller (the `Client`) decodes them and enqueues events in its bounded
queue. A close frame from the server is answered (RFC 6455 section 5.5.1) and its code kept, so
that the caller can decide whether to reconnect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """How a connection ended: the server's close code (None: no close frame) and reason."""

    code: int | None
    reason: str


class _Listener(WSListener):
    def __init__(self, on_text: Callable[[bytes], None]) -> None:
        self._on_text = on_text
        self.close_info: CloseInfo | None = None
        self.closed: asyncio.Future[CloseInfo] = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self._on_text(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            code = frame.get_close_code().value
            self.close_info = CloseInfo(code or None, frame.get_close_reason())
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closed.done():
            self.closed.set_result(self.close_info or CloseInfo(None, "connection lost"))


class Connection:
    """An open connection. Create with `Connection.open`; `closed` resolves when it ends."""

    def __init__(self, transport: WSTransport, listener: _Listener) -> None:
        self._transport = transport
        self._listener = listener

    @classmethod
    async def open(
        cls,
        url: str,
        on_text: Callable[[bytes], None],
        *,
        headers: dict[str, str] | None = None,
        handshake_timeout: float = 10.0,
        max_frame_size: int = 4 * 1024 * 1024,
    ) -> Connection:
        """Connect and complete the handshake within `handshake_timeout` seconds.

        Raises `picows.WSHandshakeError` (e.g. HTTP 401), `OSError` or `TimeoutError`.
        `on_text` must not raise: it runs inside picows' frame callback.
        """
        # asyncio.timeout, not wait_for: wait_for may swallow a cancellation on Python 3.11
        async with asyncio.timeout(handshake_timeout):
            transport, listener = await ws_connect(
                lambda: _Listener(on_text),
                url,
                extra_headers=headers,
                websocket_handshake_timeout=handshake_timeout,
                max_frame_size=max_frame_size,
            )
        if not isinstance(listener, _Listener):
            # picows hands back no listener of ours when the peer dropped the connection right
            # after the upgrade: a failed connect (the supervisor retries), not a crash.
            transport.disconnect(False)
            raise ConnectionError("the connection closed during the handshake")
        return cls(transport, listener)

    @property
    def closed(self) -> asyncio.Future[CloseInfo]:
        return self._listener.closed

    def send(self, frame: bytes) -> None:
        """Queue one text frame; silently dropped once the connection is closing."""
        if not self._transport.is_disconnected and not self._transport.is_close_frame_sent:
            self._transport.send(WSMsgType.TEXT, frame)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start a clean close (the server answers; `closed` resolves when the socket ends)."""
        if not self._transport.is_close_frame_sent:
            self._transport.send_close(WSCloseCode(code), reason.encode())
        self._transport.disconnect()

    def abort(self) -> None:
        """Drop the connection at once (no close handshake), e.g. when our queue overflowed."""
        self._transport.disconnect(graceful=False)
