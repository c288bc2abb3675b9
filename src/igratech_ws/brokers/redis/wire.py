"""How a publication is encoded in Redis, and the scripts that write and read it.

A publication is a msgpack *map* with short keys, packed by the Lua scripts with
``cmsgpack.pack`` (see ``lua/prelude.lua``): ``c`` channel, ``o`` offset, ``e`` epoch, ``v`` event,
``d`` data (the payload JSON, as a msgpack str), ``t`` time (Unix seconds, float), ``n`` origin.
The same bytes are the pub/sub message, the stream entry's ``p`` field and a state slot; an
idempotency record is the map without ``d``. Decoded by name, so the layout does not depend on the
field order of `Publication`. Data must be UTF-8 (it is JSON): `StreamStore.publish` refuses
anything else, since a msgpack str carries it.
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
# Versions before this one wrote `Publication` as a msgpack array of 7 (first byte 0x97, where a
# map starts with 0x8X): still read, so that history written by them survives an upgrade.
_legacy_decoder = msgspec.msgpack.Decoder(Publication)


def decode_publication(payload: bytes) -> Publication:
    """The `Publication` in `payload`. Raises msgspec.DecodeError (ValidationError included)."""
    if payload[:1] == b"\x97":
        return _legacy_decoder.decode(payload)
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


def _script(*names: str) -> str:
    lua = resources.files("igratech_ws.brokers.redis").joinpath("lua")
    return "\n".join(lua.joinpath(name).read_text() for name in ("prelude.lua", *names))


#: The Lua scripts, each with the shared prelude (run with EVALSHA).
PUBLISH_SCRIPT = _script("publish_one.lua", "publish.lua")
#: Several publications in one call (a node's publishes of one loop turn to one Redis).
PUBLISH_MANY_SCRIPT = _script("publish_one.lua", "publish_many.lua")
HISTORY_SCRIPT = _script("history.lua")
STATE_SCRIPT = _script("state.lua")
