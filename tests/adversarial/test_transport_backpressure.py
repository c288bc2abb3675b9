"""TCP backpressure (decision D7, the transport's side).

A client that does not drain its socket stops being read: once the socket's buffer passes a
quarter of `max_write_buffer_bytes` the transport pauses reading it (so its pings and messages
wait in the kernel, costing the server nothing), says `writable = False`, and reports its
`backlog_bytes()`. When the client drains, reading resumes and the node hears `on_writable`.
On the old listener none of this existed: a non-reading client was read (and answered) on.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from igratech_ws.app import running_app
from igratech_ws.core.codec import event_frame
from tests.support.gateway import base_config
from tests.support.raw_ws import LOOPS, connect, frame, in_thread, read_frames, run_on

BUDGET = 256 * 1024
HIGH_WATERMARK = BUDGET // 4


def drain_until_pong(sock: socket.socket) -> int:
    frames, code = read_frames(sock, b'"pong"')
    assert code is None, code
    return len(frames)


async def _backpressure(aiofastnet: bool) -> None:
    async with running_app(
        base_config(max_write_buffer_bytes=BUDGET, use_aiofastnet=aiofastnet)
    ) as app:
        node = app.node
        drained: list[object] = []
        node.on_writable = drained.append  # type: ignore[method-assign]
        sock = await in_thread(connect, app.port)
        try:
            for _ in range(500):
                if node.connection_count:
                    break
                await asyncio.sleep(0.01)
            (connection,) = list(node._connections)
            raw = connection._transport  # type: ignore[attr-defined]
            # A small kernel buffer on the server's side: its own buffer fills at once.
            raw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            push = event_frame("error", {"code": "bad_json", "message": "x" * 8000})
            for _ in range(200):  # bounded: 1.6 MB at most, far past the watermark
                node.hub.send(connection, push)
                await asyncio.sleep(0)
                if not connection.writable:
                    break
            assert not connection.writable
            assert connection.backlog_bytes() > HIGH_WATERMARK
            assert not raw.is_reading()
            assert node.closes == {}  # paused, not a slow consumer: under the budget
            # The client asks for a pong, which waits unread in the kernel; then it drains.
            await in_thread(sock.sendall, frame(0x1, b'{"event":"ping","data":{"ts":1}}'))
            received = await in_thread(drain_until_pong, sock)
            assert received > HIGH_WATERMARK // 8000
            assert connection.writable and raw.is_reading()
            assert drained == [connection]
        finally:
            sock.close()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_does_not_drain_stops_being_read(loop: str) -> None:
    run_on(loop, _backpressure)
