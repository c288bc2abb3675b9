"""python-socketio peer (aiohttp, uvloop): the same protocol as sio_server.js."""

from __future__ import annotations

import sys
from typing import Any

import socketio  # type: ignore[import-untyped,import-not-found,unused-ignore]
import uvloop
from aiohttp import web

sio = socketio.AsyncServer(
    async_mode="aiohttp", transports=["websocket"], logger=False, engineio_logger=False
)
app = web.Application()
sio.attach(app)


@sio.on("settings")  # type: ignore[untyped-decorator,misc,unused-ignore]
async def settings(sid: str, data: dict[str, Any]) -> None:
    games = list(data.get("games") or [])
    for game in games:
        await sio.enter_room(sid, game)
    await sio.emit("settings", {"games": games}, to=sid)


@sio.on("publish")  # type: ignore[untyped-decorator,misc,unused-ignore]
async def publish(sid: str, game: str, payload: dict[str, Any]) -> None:
    await sio.emit("incident", payload, room=game)


if __name__ == "__main__":
    uvloop.install()
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        print=lambda *_: print("listening", flush=True),
    )
