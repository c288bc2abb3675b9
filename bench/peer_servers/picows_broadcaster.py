"""The limit: a bare picows broadcaster that coalesces each client's frames into one write per tick.

Protocol (shared with ws_server.js): subscribers send {"event":"settings","data":{"games":[..]}}
and get {"event":"settings","data":{"games":[..]}} back; a publisher connects to /pub and sends
text frames "<game>\\n<frame JSON>", each broadcast as is to the game's subscribers. It does nothing
a gateway must do (no auth, no validation, no history): it is how fast Python + picows can push.
"""

from __future__ import annotations

import asyncio
import json
import sys

import picows
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest


def text_frame(payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65_536:
        return bytes((0x81, 126)) + size.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + size.to_bytes(8, "big") + payload


class Hub:
    def __init__(self) -> None:
        self.rooms: dict[bytes, set[Subscriber]] = {}
        self.dirty: list[Subscriber] = []
        self.scheduled = False

    def broadcast(self, game: bytes, frame: bytes) -> None:
        room = self.rooms.get(game)
        if not room:
            return
        for sub in room:
            if sub.pending is None:
                sub.pending = [frame]
                self.dirty.append(sub)
            else:
                sub.pending.append(frame)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        dirty, self.dirty = self.dirty, []
        self.scheduled = False
        for sub in dirty:
            pending = sub.pending
            sub.pending = None
            if pending is not None and sub.raw is not None:
                sub.raw.write(pending[0] if len(pending) == 1 else b"".join(pending))


HUB = Hub()


class Subscriber(WSListener):
    def __init__(self, publisher: bool) -> None:
        self.publisher = publisher
        self.pending: list[bytes] | None = None
        self.raw: asyncio.Transport | None = None
        self.games: list[bytes] = []

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.raw = transport.underlying_transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            data = frame.get_payload_as_bytes()
            if self.publisher:
                game, _, body = data.partition(b"\n")
                HUB.broadcast(game, text_frame(body))
                return
            try:
                games: list[str] = [str(g) for g in json.loads(data)["data"]["games"]]
            except (ValueError, KeyError, TypeError):
                return
            for name in games:
                key = name.encode()
                HUB.rooms.setdefault(key, set()).add(self)
                self.games.append(key)
            answer = json.dumps({"event": "settings", "data": {"games": games}})
            transport.send(WSMsgType.TEXT, answer.encode())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.raw = None
        for game in self.games:
            room = HUB.rooms.get(game)
            if room is not None:
                room.discard(self)
                if not room:
                    del HUB.rooms[game]


def factory(request: WSUpgradeRequest) -> Subscriber:
    return Subscriber(publisher=request.path.startswith(b"/pub"))


async def main(port: int) -> None:
    server = await picows.ws_create_server(factory, "127.0.0.1", port)
    print("listening", port, flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
