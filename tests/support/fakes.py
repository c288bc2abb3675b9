"""Test doubles of the hub's and the node's tests: a subscriber that records what the hub writes,
the memory broker recording (un)subscribe calls, a node connection, and `settle`, which drives the
loop by hand (the memory broker delivers synchronously and the hub flushes on the next loop
iteration, so nothing depends on timing).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from typing import Any

import msgspec

from igratech_ws.brokers.base import ControlKinds, HistoryPage, StreamPosition
from igratech_ws.brokers.memory import MemoryBroker
from igratech_ws.contract import validate_frame
from igratech_ws.core.close_codes import CloseCode
from igratech_ws.core.messages import SettingsRequest
from igratech_ws.core.recovery import EMPTY_EPOCH
from igratech_ws.core.session import Session, SettingsPlan
from igratech_ws.hub import Hub, Outbox
from igratech_ws.node import Node

CH = "game:g-1"


class FakeSubscriber:
    """A connection as the hub sees it, recording every write and close.

    `backlog` plays the socket's write buffer: what `write_wire` wrote stays there (counted
    against the budget) while `reading` is False; a reading client drains it at once.
    """

    def __init__(self, name: str, *, reading: bool = True) -> None:
        self.name = name
        self.pending: Outbox | None = None
        self.open = True
        self.writes: list[bytes] = []
        self.closes: list[CloseCode] = []
        self.reading = reading
        self.backlog = 0

    def backlog_bytes(self) -> int:
        return self.backlog

    def drain(self, hub: Hub | None = None) -> None:
        """The client read everything: the socket buffer is empty (and the hub is told)."""
        self.backlog = 0
        if hub is not None:
            hub.on_writable(self)

    def queued(self) -> list[bytes]:
        return list(self.pending or [])

    def __repr__(self) -> str:
        return f"FakeSubscriber({self.name})"

    @property
    def is_open(self) -> bool:
        return self.open

    def write_wire(self, data: bytes) -> None:
        self.writes.append(data)
        if not self.reading:
            self.backlog += len(data)

    def close_with(self, code: CloseCode) -> None:
        self.closes.append(code)
        self.open = False

    def frames(self) -> list[dict[str, Any]]:
        """Every frame written, parsed (RFC 6455 5.2, unmasked server frames)."""
        return [json.loads(p) for p in split_frames(b"".join(self.writes))]

    def offsets(self, channel: str = CH) -> list[int]:
        return [f["offset"] for f in self.frames() if f.get("channel") == channel]


def split_frames(wire: bytes) -> list[bytes]:
    """The payloads of the text frames in `wire` (RFC 6455 5.2, unmasked server frames); control
    frames (a pong queued through `send_wire`) are skipped."""
    payloads = []
    at = 0
    while at < len(wire):
        opcode = wire[at] & 0x0F
        assert wire[at] & 0x80 and opcode in (0x1, 0x8, 0x9, 0xA), wire[at : at + 8]
        length = wire[at + 1]
        at += 2
        if length == 126:
            length = int.from_bytes(wire[at : at + 2], "big")
            at += 2
        elif length == 127:
            length = int.from_bytes(wire[at : at + 8], "big")
            at += 8
        if opcode == 0x1:
            payloads.append(wire[at : at + length])
        at += length
    return payloads


class RecordingBroker(MemoryBroker):
    """The memory broker, recording (un)subscribe calls; `gate` can hold history and position."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(node_id="n-test", **kwargs)
        self.calls: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def subscribe(self, channel: str) -> None:
        self.calls.append(("subscribe", channel))
        await super().subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        self.calls.append(("unsubscribe", channel))
        await super().unsubscribe(channel)

    async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        await self.gate.wait()
        return await super().history(channel, since_offset, limit)

    async def position(self, channel: str) -> StreamPosition:
        await self.gate.wait()
        return await super().position(channel)

    def lose_subscription(self, channel: str) -> None:
        """What a broker outage does: publications keep going to history, not to this node."""
        self._subscribed.discard(channel)

    def restore_subscription(self, channel: str) -> None:
        self._subscribed.add(channel)


def _ignore(message: ControlKinds) -> None:
    pass


async def settle(rounds: int = 20) -> None:
    """Run the loop until the hub's flushes and resync tasks (all synchronous here) are done."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def make_hub(broker: RecordingBroker, **kwargs: Any) -> Hub:
    # No flush waits for the real clock (a flush over 2 ms would defer the next): `settle` then
    # drives everything, whatever the machine's load.
    kwargs.setdefault("max_flush_delay", 0.0)
    kwargs.setdefault("flush_linger", 0.0)
    hub = Hub(broker, **kwargs)
    await broker.start(hub.on_publication, _ignore)
    return hub


class EmptyEpochBroker(RecordingBroker):
    """A broker as D1 has them: a channel without a stream is (0, "none") and creates nothing."""

    async def position(self, channel: str) -> StreamPosition:
        if channel not in self._streams:
            return StreamPosition(0, EMPTY_EPOCH)
        return await super().position(channel)

    async def history(self, channel: str, since_offset: int, limit: int) -> HistoryPage:
        if channel not in self._streams:
            return HistoryPage([], StreamPosition(0, EMPTY_EPOCH))
        return await super().history(channel, since_offset, limit)


# --- the node -----------------------------------------------------------------------------------

NOW = 1_800_000_000.0  # wall clock of the tests (Unix seconds)
MONO = 5_000.0  # monotonic clock of the tests


class FakeConnection(FakeSubscriber):
    """A client connection as the node sees it; closes like the real transport does."""

    def __init__(
        self, node: Node, session: Session, *, connected_at: float, address: str = "10.0.0.1"
    ) -> None:
        super().__init__(f"{session.user_id}@{connected_at}")
        self.node = node
        self.session = session
        self.connected_at = connected_at
        self.address = address
        # the rate limit runs on the real monotonic clock, as in the transport
        self.rate_at = time.monotonic()
        self.rate_tokens = node.config.message_burst
        self.rate_strikes = 0
        self.expires_at: float | None = None
        self.last_seen = MONO
        self.settings_queue: deque[tuple[SettingsPlan, bool]] | None = None

    def __repr__(self) -> str:
        return f"FakeConnection({self.session.user_id}, {self.connected_at})"

    def close_with(self, code: CloseCode) -> None:
        if not self.session.begin_close():
            return
        self.node.hub.flush_one(self)
        self.open = False
        self.closes.append(code)
        self.node.on_closed(self, int(code))

    def frames(self) -> list[dict[str, Any]]:
        raw = split_frames(b"".join(self.writes) + b"".join(self.queued()))
        for payload in raw:
            validate_frame(payload, sender="server")
        return [json.loads(p) for p in raw]

    def events(self) -> list[str]:
        return [f["event"] for f in self.frames()]

    def errors(self) -> list[str]:
        return [f["data"]["code"] for f in self.frames() if f["event"] == "error"]


def connect(
    node: Node,
    user: str | None,
    *,
    at: float = NOW,
    settings: dict[str, Any] | None = None,
    session_id: str | None = None,
    address: str = "10.0.0.1",
) -> FakeConnection:
    """What the transport does after a successful handshake."""
    session = Session(
        session_id or uuid.uuid4().hex, user, max_games=node.config.max_games_per_connection
    )
    plan = session.plan_settings(msgspec.convert(settings or {}, SettingsRequest))
    connection = FakeConnection(node, session, connected_at=at, address=address)
    node.accept(connection, plan, settings is not None)
    return connection


def text(node: Node, connection: FakeConnection, event: str, data: Any) -> None:
    node.on_text(connection, json.dumps({"event": event, "data": data}).encode())
