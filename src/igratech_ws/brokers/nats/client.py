"""The NATS client a node uses: nats-py's, with header encoding and parsing that cost less.

Every publication a node appends carries half a dozen headers, and every publication it receives
is a JetStream message with a dozen (ours, the republish headers, a chain's or a batch's). nats-py
encodes and parses them line by line in Python (a regex match and a translate per header sent,
a generator per header name received): most of the node's cost per publication on NATS beyond
the memory broker's. `Client` does both with a few C-level string operations over the whole
block, for the blocks our own code sends and receives, and hands anything else to nats-py's own
code, so the result is always nats-py's: the same bytes on the wire (`header_block`), the same
dict (`parse_header_lines`). `tests/brokers/test_nats_client.py` compares both with nats-py's on
random input. `subscribe_inline` hands each message of a subscription to a plain function from
the read loop, without nats-py's queue and task per subscription (the node's deliveries and
acknowledgements: a queue put, a get and a task step less per message). And `flush` returns once
the server has read every command sent before it, a subscription included (nats-py's PING
overtakes the commands its flusher task has not written yet). Everything else is nats-py's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from functools import partial
from itertools import repeat
from typing import Any

from nats.aio.client import _HEADER_KEY_RE
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol import command as prot_command

__all__ = ["Client", "header_block", "parse_header_lines"]

_CRLF = b"\r\n"
# What str.isspace() calls whitespace among ASCII characters (a header name with any is skipped).
_SPACE = re.compile(rb"[\t\n\x0b\x0c\r\x1c-\x1f ]")
_COLON_SPACE = repeat(": ")
_ONCE = repeat(1)

# Header names already found to be sent as they are (see `header_block`): ours are a dozen
# constants. Bounded, so that a caller with ever new names does not grow it.
_GOOD_NAMES: set[str] = set()
_MAX_GOOD_NAMES = 256


def _names_ok(headers: dict[str, str]) -> bool:
    """Whether nats-py sends every name of `headers` as it is (not stripped, skipped, refused)."""
    if _GOOD_NAMES.issuperset(headers):
        return True
    for name in headers:
        if not isinstance(name, str) or not _HEADER_KEY_RE.fullmatch(name):
            return False
    if len(_GOOD_NAMES) < _MAX_GOOD_NAMES:
        _GOOD_NAMES.update(headers)
    return True


def header_block(headers: dict[str, str]) -> bytes | None:
    """The HPUB header block of `headers` (``NATS/1.0``, ``Name: Value`` lines, an empty line),
    byte for byte as nats-py builds it; None where nats-py would change or refuse something.

    That is: every name an RFC 7230 token (nats-py's own test), every value a printable str
    without a leading or trailing space (so nats-py's strip and CR/LF replacement change nothing),
    at least one header. Otherwise None, and the caller must let nats-py build the block, which
    cleans or refuses it its own way. Ours qualify: constant names; values that are digits, float
    reprs, hex epochs and ids, ``<channel token>/<key>`` message ids (a key is printable ASCII
    without spaces), event names and the node id (an odd one, say with a trailing space, goes
    through nats-py's code as before)."""
    if not headers or not _names_ok(headers):
        return None
    try:
        values = "\n".join(headers.values())
    except TypeError:  # not a str: nats-py's strip() raises its own error
        return None
    # str.isprintable() is False for every whitespace character but " " (and for CR, LF and
    # lone surrogates), so with it only a space can lead or trail a value; "\n" marks the ends.
    if (
        not values.replace("\n", "").isprintable()
        or values.count("\n") != len(headers) - 1
        or values[:1] == " "
        or values[-1:] == " "
        or " \n" in values
        or "\n " in values
    ):
        return None
    return ("NATS/1.0\r\n" + "\r\n".join(map(": ".join, headers.items())) + "\r\n\r\n").encode()


def _parse_any(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip()
        if not name.isascii() or _SPACE.search(name):
            continue
        out[name.decode("ascii")] = value.strip().decode("utf-8", "replace")
    return out


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """``Name: Value`` lines (CRLF-separated) as a dict, exactly as nats-py's own parser reads
    them: names stripped and ASCII (others skipped), a name with whitespace inside skipped,
    values stripped and decoded as UTF-8 (malformed bytes replaced), the last of a name winning.

    A block as the server sends ours (ASCII lines ``Name: Value``, ending with an empty line)
    is split in one go and checked; any other goes line by line."""
    if raw.isascii() and raw.endswith(b"\r\n\r\n"):
        try:
            out = dict(map(str.split, raw[:-4].decode("ascii").split("\r\n"), _COLON_SPACE, _ONCE))
        except ValueError:  # a line without ": " (skipped by nats-py, or split elsewhere)
            pass
        else:
            # Every line left its name among the keys (a later line may have overwritten only
            # its value). A clean name (no ":", no whitespace) is the one nats-py reads from
            # that line, so each key got its value from the same line; that value is nats-py's
            # if it has nothing to strip (str.strip strips what bytes.strip does, and more).
            if _clean_names(out):
                values = tuple(out.values())
                if tuple(map(str.strip, values)) == values:
                    return out
    return _parse_any(raw)


# Header names found clean (see `parse_header_lines`): the server's and ours are a few dozen.
# Bounded, so that messages with ever new names do not grow it.
_CLEAN_NAMES: set[str] = set()
_MAX_CLEAN_NAMES = 256
_SPACE_OR_COLON = re.compile(r"[\t\n\x0b\x0c\r\x1c-\x1f :]")


def _clean_names(headers: dict[str, str]) -> bool:
    if _CLEAN_NAMES.issuperset(headers):
        return True
    if _SPACE_OR_COLON.search("".join(headers)):
        return False
    if len(_CLEAN_NAMES) < _MAX_CLEAN_NAMES:
        _CLEAN_NAMES.update(headers)
    return True


#: A `Client.subscribe_inline` fast path: given a message's payload and raw header block (or
#: None), it handles the message and returns True, or returns False having done nothing.
FastHandler = Callable[[bytes, bytes | None], bool]


async def _inline(handler: Callable[[Msg], None], fast: FastHandler | None, msg: Msg) -> None:
    """The callback of a `Client.subscribe_inline` subscription, as ``partial(_inline,
    handler, fast)`` (a form nats-py takes for a callback), which marks it for `_process_msg`.
    nats-py's task for the subscription would call it for a queued message; none is queued."""
    handler(msg)


class Client(NatsClient):
    """nats-py's client with `parse_header_lines`, `header_block` (see the module docstring),
    `subscribe_inline`, and a `flush` that waits for every command sent before it."""

    # nats-py calls it on itself, for every message with headers.
    _parse_header_lines = staticmethod(parse_header_lines)

    async def _send_publish(
        self,
        subject: str,
        reply: str,
        payload: bytes,
        payload_size: int,
        headers: dict[str, Any] | None,
    ) -> None:
        # nats-py's `publish` checks the connection, subject and size, then calls this; what
        # follows is nats-py's `_send_publish` with the header block built by `header_block`.
        block = None if headers is None or not subject else header_block(headers)
        if block is None:
            await super()._send_publish(subject, reply, payload, payload_size, headers)
            return
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(prot_command.hpub_cmd(subject, reply, block, payload))
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        # nats-py's `flush` sends a PING and waits for the PONG, but it writes the PING straight
        # to the socket, ahead of the commands still waiting for its flusher task: a SUB just
        # made is on the wire behind the PING, and the server may answer the PING, and take
        # another connection's publish, before it has the subscription (a node that subscribed
        # and flushed then missed a message). So what is pending goes to the socket first, as
        # the flusher would write it, and the PONG is for everything sent before the PING.
        if self._pending and self.is_connected and self._transport is not None:
            self._transport.writelines(self._pending)
            self._pending = []
            self._pending_data_size = 0
        await super()._send_ping(future)

    async def subscribe_inline(
        self, subject: str, handler: Callable[[Msg], None], fast: FastHandler | None = None
    ) -> Subscription:
        """Subscribe `handler`, called by the connection's read loop for each message as it is
        read, where nats-py's `subscribe(cb=...)` queues each message for a task of the
        subscription that then awaits the callback: a queue put, a get and a task step per
        message saved. Caller's duties: `handler` is a plain function that returns quickly
        (the connection reads nothing meanwhile) and does not block; what it raises goes to
        the error callback, as a callback's does. No limits of pending messages apply (none
        are pending). Unsubscribe and drain as with `subscribe`.

        `fast`, if given, is tried first with the payload and the raw header block: where it
        returns True the message was handled without a `Msg` or a header dict (their cost is
        most of a message's); where False, `handler` gets the `Msg` as usual. Same duties."""
        return await self.subscribe(subject, cb=partial(_inline, handler, fast))

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        sub = self._subs.get(sid)
        cb = sub._cb if sub is not None else None
        if sub is None or type(cb) is not partial or cb.func is not _inline or sub._max_msgs > 0:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        handler: Callable[[Msg], None]
        fast: FastHandler | None
        handler, fast = cb.args
        # nats-py's `_process_msg` for a core subscription, up to where it would queue the
        # message; then what its subscription task does with it, without the queue.
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        sub._received += 1
        if fast is not None:
            try:
                if fast(data, headers or None):
                    return
            except Exception as exc:
                await self._error_cb(exc)
                return
        msg = self._build_message(sid, subject, reply, data, await self._process_headers(headers))
        if not msg:
            return
        try:
            handler(msg)
        except Exception as exc:
            await self._error_cb(exc)
