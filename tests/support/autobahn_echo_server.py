"""The Autobahn testee: the gateway's own listener with an echo for an application.

`WebSocketConnection` is the class every /wspublic connection is (`ClientConnection` is a
subclass): the same upgrade through picows, the same frame parser, UTF-8 and close handling, the
same write path. Only the application is swapped: every text or binary message is sent back as it
came. The limits are raised so that the suite's largest cases (16 MiB messages, 1,000 messages in a
burst) stay inside them.

Run: ``python -m tests.support.autobahn_echo_server --port 9001 [--aiofastnet]``; it prints ``ready
<port>`` once listening and serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from picows import WSUpgradeRequest, WSUpgradeResponse

from igratech_ws.config import Config
from igratech_ws.core.framing import binary_frame, text_frame
from igratech_ws.transport.wsconnection import WebSocketConnection, serve

#: Limits of the testee: the suite sends messages of up to 16 MiB and bursts of 1,000 frames.
ECHO_CONFIG = Config(
    max_frame_bytes=16 * 1024 * 1024 + 1024,
    max_write_buffer_bytes=64 * 1024 * 1024,
    max_message_rate=1e9,
    message_burst=1e9,
)


class EchoConnection(WebSocketConnection):
    """Accepts any upgrade; sends every message back."""

    __slots__ = ()

    def _decide(self, request: WSUpgradeRequest) -> WSUpgradeResponse | None:
        return None

    def _text(self, payload: bytes) -> None:
        self._send(text_frame(payload))

    def _binary(self, payload: bytes) -> None:
        self._send(binary_frame(payload))


async def main(port: int, aiofastnet: bool) -> None:
    config = ECHO_CONFIG.with_overrides({"use_aiofastnet": aiofastnet})
    server = await serve(lambda: EchoConnection(config), config, "127.0.0.1", port)
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--aiofastnet", action="store_true")
    args = parser.parse_args()
    import uvloop

    try:
        uvloop.run(main(args.port, args.aiofastnet))
    except KeyboardInterrupt:
        sys.exit(0)
