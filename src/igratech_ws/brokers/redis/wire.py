"""How a publication is encoded in Redis, and the scripts that write and read it.

A publication is a msgpack *map* with short keys, packed by the Lua scripts with
``cmsgpack.pack`` (see ``lua/prelude.lua``): ``c`` channel, ``o`` offset, ``e`` epoch, ``v`` event,
``d`` data (the payload JSON, as a msgpack str), ``t`` time (Unix seconds, float), ``n`` origin.
The same bytes are the pub/sub message, the stream entry's ``p`` field and a state slot; an
idempotency record is the map without ``d``. Decoded by name, so the layout does not depend on the
field order of `Publication`.
"""

from __future__ import annotations

from importlib import resources

import msgspec

from igratech_ws.brokers.base import Publication


class WirePublication(msgspec.Struct, frozen=True):
    channel: str = msgspec.field(name="c")
    offset: int = msgspec.field(name="o")
    epoch: str = msgspec.field(name="e")
    event: str = msgspec.field(name="v")
    published_at: float = msgspec.field(name="t")
    origin: str = msgspec.field(name="n")
    data: str = msgspec.field(default="", name="d")


_decoder = msgspec.msgpack.Decoder(WirePublication)


def decode_publication(payload: bytes) -> Publication:
    """The `Publication` in `payload`. Raises msgspec.DecodeError (ValidationError included)."""
    wire = _decoder.decode(payload)
    return Publication(
        wire.channel,
        wire.offset,
        wire.epoch,
        wire.event,
        wire.data.encode(),
        wire.published_at,
        wire.origin,
    )


def _script(name: str) -> str:
    lua = resources.files("igratech_ws.brokers.redis").joinpath("lua")
    return lua.joinpath("prelude.lua").read_text() + "\n" + lua.joinpath(name).read_text()


#: The Lua scripts, each with the shared prelude (run with EVALSHA by redis-py's Script).
PUBLISH_SCRIPT = _script("publish.lua")
HISTORY_SCRIPT = _script("history.lua")
STATE_SCRIPT = _script("state.lua")
