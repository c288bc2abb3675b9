"""Attacks on how the hub hands a slow client's frames to its socket (`Hub._release`,
`_release_some`, the 0.25 s poll of held connections): the socket's buffer gets at most a
quarter of the budget (and a frame) while the client does not read, the rest stays queued and
conflatable. Written as a hostile or unlucky client: one that reads in bursts, one whose socket
drains without the transport saying so, one whose write raises, one closed in the middle of a
release, one with a 4 KiB receive buffer on a real socket.

What must hold (docs/reliability.md "Conflation under a slow client"): stream frames never
dropped nor reordered, only superseded state skipped (the replacement marked conflated),
non-live frames (answers, pongs, snapshots, replays) never overtaken, no slow-consumer close for
a stats flood while the stream fits three quarters of the budget, memory within the budget, and
nothing stuck: held frames go out once the client reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igratech_ws import hub as hub_module
from igratech_ws.app import running_app
from igratech_ws.brokers.base import Publication
from igratech_ws.core.close_codes import CloseCode
from igratech_ws.hub import Hub
from tests.support.conflation import (
    GAME,
    OTHER,
    big_stats,
    check_view,
    followed,
    incident,
    incident_data,
    stats_data,
)
from tests.support.fakes import FakeSubscriber, RecordingBroker, make_hub, settle, split_frames
from tests.support.gateway import base_config, raw_upgrade
from tests.support.raw_ws import LOOPS, frame, next_frame, run_on

BUDGET = 64 * 1024
FOLLOW_G1 = "?settings=%7B%22games%22%3A%5B%22g-1%22%5D%7D"
PONG = b'{"event":"pong","data":{"serverTime":"2026-11-23T19:45:00Z"}}'


class Phone(FakeSubscriber):
    """A client on a socket like the transport's: a write past a quarter of the budget pauses
    it, and only a read that takes it below an eighth tells the hub (`on_writable`), as
    `resume_writing` does. `read(n)` takes `n` bytes off the socket's buffer; with `tell=False`
    the hub is never told (a transport that reports nothing: only the poll can see it)."""

    def __init__(self, name: str, hub: Hub, *, tell: bool = True) -> None:
        super().__init__(name, reading=False)
        self.hub = hub
        self.tell = tell
        self.paused = False
        self.peak = 0

    def write_wire(self, data: bytes) -> None:
        super().write_wire(data)
        self.peak = max(self.peak, self.backlog + (self.pending.size if self.pending else 0))
        if self.backlog > self.hub.low_water:
            self.paused = True

    def read(self, n: int) -> None:
        self.backlog = max(0, self.backlog - n)
        if self.paused and self.backlog <= self.hub.low_water // 2:
            self.paused = False
            if self.tell:
                self.hub.on_writable(self)


def held_bytes(sub: FakeSubscriber) -> int:
    return sub.backlog + sum(map(len, sub.queued()))


# --- the poll: the safety net for a transport that reports nothing -----------------------------


async def test_a_poll_that_releases_part_of_a_held_queue_keeps_one_timer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client reads a little before every poll, never enough to take all that is held: each
    poll writes part of it and holds the rest again (`_release_some` -> `_hold`). The poll must
    stay one timer, not start a second chain each time (polls doubling every 0.25 s)."""
    monkeypatch.setattr(hub_module, "WRITABLE_POLL", 0.02)
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    polls = 0
    poll = hub._poll_behind

    def counted() -> None:
        nonlocal polls
        polls += 1
        poll()

    monkeypatch.setattr(hub, "_poll_behind", counted)
    try:
        sub = Phone("sipping", hub, tell=False)
        await followed(hub, sub, GAME)
        published: list[Publication] = []
        for n in range(12):  # stream frames, each with the stats before it: ~40 KB, all kept
            published.append(big_stats(broker, n))
            published.append(incident(broker, n))
        await settle()
        assert hub._behind, "the client never fell behind"
        loop = asyncio.get_running_loop()
        chains = []
        for _ in range(15):
            sub.read(4096)  # one poll's worth: part of what is held
            await asyncio.sleep(0.021)
            timers = [
                t
                for t in loop._scheduled  # type: ignore[attr-defined]
                if not t.cancelled() and t._callback is counted
            ]
            chains.append(len(timers))
        assert max(chains) <= 1, f"poll timers pending at once, per round: {chains}"
        # Nothing stuck: with only the poll to see the socket drain, everything goes out.
        for _ in range(20):
            sub.read(1 << 30)
            await asyncio.sleep(0.021)
            if not sub.queued():
                break
        assert sub.queued() == [] and hub._behind == set()
        check_view(sub.frames(), published)
    finally:
        await hub.close()
        await broker.close()


class BrokenOnce(FakeSubscriber):
    """A connection whose next write after `arm()` raises (a transport bug, not a client's)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, reading=False)
        self.armed = False

    def write_wire(self, data: bytes) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("unable to perform operation: the handler is closed")
        super().write_wire(data)


async def test_a_write_that_raises_in_a_poll_does_not_stop_the_poll(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two held connections; the first's socket drains and its write raises in the poll, the
    second's drains later, with no `on_writable` for either. The poll must carry on: the second's
    held frames go out (before, the raise left no timer and them held for good)."""
    monkeypatch.setattr(hub_module, "WRITABLE_POLL", 0.02)
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        broken = BrokenOnce("broken")
        quiet = FakeSubscriber("quiet", reading=False)
        await followed(hub, broken, GAME)
        await followed(hub, quiet, GAME)
        published = [incident(broker, 0)]
        published += [big_stats(broker, n) for n in range(30)]
        published.append(incident(broker, 1))
        await settle()
        assert broken in hub._behind and quiet in hub._behind
        broken.armed = True
        broken.backlog = 0  # drained, the transport says nothing: the poll finds it
        await asyncio.sleep(0.1)
        assert not broken.armed, "the poll never tried the drained socket"
        quiet.backlog = 0
        quiet.reading = True
        await asyncio.sleep(0.1)
        assert quiet.queued() == [], "held frames stuck: the poll stopped after a raising write"
        check_view(quiet.frames(), published)
        # The broken one lost what the raising write carried, and nothing after it is stuck.
        assert broken.queued() == [] or broken in hub._behind
    finally:
        await hub.close()
        await broker.close()


# --- a real socket: a phone that reads a few KB every 100 ms on a stats flood ------------------


def _sip(sock: socket.socket, stop: threading.Event) -> tuple[bytes, int]:
    """Read at most ~3 KB every 100 ms and ping every 500 ms until `stop`, then read everything
    until a second of silence. The bytes read, and the pings sent."""
    data = bytearray()
    pings = 0
    rounds = 0
    while not stop.is_set():
        sock.settimeout(0.02)
        with contextlib.suppress(TimeoutError):
            data += sock.recv(3000)
        if rounds % 5 == 0:
            sock.sendall(frame(0x9, f"p-{pings}".encode()))
            pings += 1
        rounds += 1
        time.sleep(0.1)
    sock.settimeout(1.0)
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except TimeoutError:
        pass
    return bytes(data), pings


def _parse(data: bytes) -> tuple[list[dict[str, Any]], list[bytes], int | None]:
    """Text frames (parsed), pong payloads, and the close code if a close came."""
    texts, pongs, code, at = [], [], None, 0
    while (parsed := next_frame(data, at)) is not None:
        opcode, payload, at = parsed
        if opcode == 0x1:
            texts.append(json.loads(payload))
        elif opcode == 0xA:
            pongs.append(payload)
        elif opcode == 0x8:
            code = int.from_bytes(payload[:2], "big")
    assert at == len(data), "a frame cut short"
    return texts, pongs, code


@pytest.mark.parametrize("loop", LOOPS)
def test_a_phone_sipping_its_socket_on_a_stats_flood_stays_and_sees_every_incident(
    loop: str,
) -> None:
    """A client with a 4 KiB receive buffer reads ~3 KB every 100 ms and pings every 500 ms
    while its game publishes ~3 KB stats as fast as the node takes them, an incident every 25.
    It stays connected; once it reads everything it has every incident in order, the newest
    stats last, only superseded stats skipped, a pong for every ping; the node never holds more
    than the budget for it (socket buffer and queue). On every loop and transport the
    listener runs on (asyncio, uvloop, aiofastnet)."""
    run_on(loop, _sipping_phone)


async def _sipping_phone(aiofastnet: bool) -> None:
    config = base_config(max_write_buffer_bytes=BUDGET, use_aiofastnet=aiofastnet)
    async with running_app(config) as app:
        sock = await asyncio.to_thread(raw_upgrade, app.port, query=FOLLOW_G1, rcvbuf=4096)
        stop = threading.Event()
        reader = asyncio.ensure_future(asyncio.to_thread(_sip, sock, stop))
        await asyncio.sleep(0.3)
        node = app.node
        peak = 0

        def sample() -> None:
            nonlocal peak
            for connection in node._connections:
                queued = connection.pending
                held = sum(map(len, queued)) if queued else 0
                peak = max(peak, connection.backlog_bytes() + held)

        published: list[Publication] = []
        for n in range(1200):
            if n % 25 == 0:
                result = await node.broker.publish(GAME, "incident", incident_data(n))
            else:
                result = await node.broker.publish(GAME, "stats", stats_data(n))
            published.append(result.publication)
            sample()
            if n % 6 == 0:
                await asyncio.sleep(0.005)
                sample()
        for _ in range(20):
            await asyncio.sleep(0.02)
            sample()
        stop.set()
        data, pings = await reader
        sock.close()
        texts, pongs, code = _parse(data)
        assert code is None, f"closed {code} on a stats flood"
        assert node.hub.slow_consumers == 0
        assert node.hub.conflated_frames > 0, "the flood never put the client behind"
        pushes = [f for f in texts if f.get("channel") == GAME and not f.get("snapshot")]
        check_view(pushes, published)
        assert [p for p in pongs] == [f"p-{n}".encode() for n in range(pings)]
        assert peak <= BUDGET, f"{peak} bytes held for one connection, budget {BUDGET}"


# --- the fake hub: bursts, barriers, a replay, and reads in bursts --------------------------------

REPLAY = "game:g-3"


def pong(hub: Hub, sub: FakeSubscriber, n: int) -> None:
    hub.send(sub, json.dumps({"event": "pong", "data": {"n": n}}).encode())


def poll(hub: Hub) -> None:
    """What the 0.25 s poll does, now."""
    if hub._behind_timer is not None:
        hub._behind_timer.cancel()
        hub._behind_timer = None
    hub._poll_behind()


def check_tracking(sub: FakeSubscriber) -> None:
    """The outbox's tracking never points past its end, nor at a frame of another channel."""
    pending = sub.pending
    if pending is None or pending.tracked is None:
        return
    for key, at in pending.tracked.items():
        assert 0 <= at < len(pending), (key, at, len(pending))
        channel = key if isinstance(key, str) else key[0]
        assert f'"channel":"{channel}"'.encode() in pending[at][:200], (key, at)


def check_barriers(frames: list[dict[str, Any]], before: dict[int, dict[str, int]]) -> None:
    """Every pong comes once, in order, and after exactly the newest publication of each channel
    delivered before it was queued (a barrier: not overtaken, not conflated past)."""
    seen: dict[str, int] = {}
    pongs = []
    for frame_ in frames:
        if frame_["event"] == "pong":
            n = frame_["data"]["n"]
            pongs.append(n)
            for channel, offset in before[n].items():
                assert seen.get(channel) == offset, (n, channel, seen.get(channel), offset)
        elif "offset" in frame_ and not frame_.get("snapshot"):
            seen[frame_["channel"]] = frame_["offset"]
    assert pongs == sorted(before), pongs


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("burst"), st.sampled_from([GAME, OTHER]), st.integers(1, 25)),
        st.tuples(st.just("incident"), st.sampled_from([GAME, OTHER]), st.just(0)),
        st.tuples(st.just("huge"), st.sampled_from([GAME, OTHER]), st.integers(0, 1)),
        st.tuples(st.just("read"), st.just(""), st.integers(0, 40_000)),
        st.tuples(
            st.sampled_from(["stop", "pong", "tick", "poll", "resume"]), st.just(""), st.just(0)
        ),
    ),
    max_size=40,
)


def huge(
    broker: RecordingBroker, n: int, channel: str, stream: bool, size: int = 20_000
) -> Publication:
    """A frame larger than a quarter of the budget (20 KB): stats, or an incident."""
    if stream:
        body = {"incidentId": f"i-{n}", "pad": "x" * size}
        return broker.publish_now(channel, "incident", json.dumps(body).encode())
    values = {"pad": "y" * size, "n": n}
    body = {"scope": "game", "gameId": channel[5:], "updatedAt": "2026-11-23T19:45:00Z"}
    return broker.publish_now(channel, "stats", json.dumps({**body, "values": values}).encode())


async def _run_reader(ops: list[tuple[str, str, int]], tell: bool) -> None:
    # A replay waiting for a socket no one reports drained looks again after WRITABLE_POLL.
    poll_interval = hub_module.WRITABLE_POLL
    hub_module.WRITABLE_POLL = 0.002
    try:
        await _read_in_bursts(ops, tell)
    finally:
        hub_module.WRITABLE_POLL = poll_interval


async def _read_in_bursts(ops: list[tuple[str, str, int]], tell: bool) -> None:
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        sub = Phone("bursts", hub, tell=tell)
        sub.reading = True
        await followed(hub, sub, GAME, OTHER)
        published: list[Publication] = []
        replayed = [incident(broker, 1000 + n, REPLAY) for n in range(6)]
        resumed = False
        pongs: dict[int, dict[str, int]] = {}
        delivered: dict[str, int] = {}
        unread = 0  # stream frames and barriers since the client last had nothing left to read
        huge_seen = False
        for n, (op, channel, count) in enumerate(ops):
            unread += op in ("incident", "pong") or (op == "resume" and not resumed) * 9
            huge_seen = huge_seen or op == "huge"
            if op == "burst":
                published.extend(big_stats(broker, 100 * n + k, channel) for k in range(count))
            elif op == "incident":
                published.append(incident(broker, n, channel))
            elif op == "huge":
                published.append(huge(broker, n, channel, bool(count)))
            elif op == "stop":
                sub.reading = False
            elif op == "read":
                sub.reading = False  # reads in bursts: what it has not read stays
                sub.read(count)
            elif op == "pong":
                pong(hub, sub, len(pongs))
                pongs[len(pongs)] = dict(delivered)
            elif op == "poll":
                poll(hub)
            elif op == "resume" and not resumed:
                resumed = True  # a replay from history, barriers among the live frames
                replayed += [incident(broker, 2000 + k, REPLAY) for k in range(3)]
                epoch = (await broker.position(REPLAY)).epoch
                hub.finish_join(sub, await hub.join(sub, REPLAY, (0, epoch)))
            else:
                await settle(3)
            for p in published[-30:]:
                delivered[p.channel] = max(delivered.get(p.channel, 0), p.offset)
            check_tracking(sub)
            if not sub.closes:
                assert held_bytes(sub) <= BUDGET, held_bytes(sub)
            if held_bytes(sub) == 0:
                unread = 0
        await settle()
        # What conflation cannot shrink: the socket's share (a quarter and a frame), each stream
        # frame or barrier with the stats before it, the newest stats of each channel.
        frame_ = 3_600
        if (
            not huge_seen
            and hub.low_water + frame_ + unread * (frame_ + 300) + 2 * frame_ <= BUDGET
        ):
            assert sub.closes == [], ("closed on a stats flood", unread)
        if sub.closes:
            return  # a slow consumer of its own stream (huge incidents): closed, not stuck
        # The client reads everything; the transport may say so, or only the poll sees it.
        sub.reading = True
        for _ in range(200):
            sub.read(1 << 30)
            poll(hub)
            await settle(5)
            if not sub.queued() and not hub._replays:
                break
            await asyncio.sleep(0.002)
        assert sub.closes == []
        assert sub.queued() == [], "held frames stuck after the client read everything"
        assert hub._behind == set()
        frames = sub.frames()
        if published:
            check_view(frames, published)
        check_barriers(frames, pongs)
        if resumed:
            got = [f["offset"] for f in frames if f.get("channel") == REPLAY]
            assert got == [p.offset for p in replayed], got
        assert sub.peak <= BUDGET + 21_000  # the socket's share may pass by one (huge) frame
    finally:
        await hub.close()
        await broker.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, st.booleans())
def test_a_client_reading_in_bursts_sees_a_complete_ordered_view(
    ops: list[tuple[str, str, int]], tell: bool
) -> None:
    asyncio.run(_run_reader(ops, tell))


# --- a close, a connection loss or a raising write in the middle of `_release_some` -------------


class FailsMidRelease(Phone):
    """A socket that takes nothing (the client stopped reading) and, on the `at`-th write from
    now, does `what`: "raise" (the loop logs it), "close" (the application closes it, as on a
    protocol error: `close_with` flushes what is queued first), or "lose" (the transport's abort:
    the connection ends under the write, its outbox reset to None as `_ended` does)."""

    def __init__(self, name: str, hub: Hub, what: str, at: int) -> None:
        super().__init__(name, hub)
        self.what = what
        self.at = at
        self.take = 0  # bytes the kernel takes off the buffer after each write

    def write_wire(self, data: bytes) -> None:
        self._write(data)
        self.backlog = max(0, self.backlog - self.take)

    def _write(self, data: bytes) -> None:
        self.at -= 1
        if self.at == 0:
            if self.what == "raise":
                raise RuntimeError("unable to perform operation: the handler is closed")
            super().write_wire(data)
            if self.what == "close":
                self.hub.flush_one(self)  # what the transport's close_with does first
                self.close_with(CloseCode.POLICY_VIOLATION)
            else:
                self.closes.append(CloseCode.TRY_AGAIN_LATER)
                self.open = False
                self.pending = None
            for channel in (GAME, OTHER):
                self.hub.leave(self, channel)
            return
        super().write_wire(data)


@pytest.mark.parametrize("what", ["raise", "close", "lose"])
@pytest.mark.parametrize("at", [1, 2, 3])
async def test_a_failure_in_the_middle_of_a_release_leaves_nothing_behind(
    what: str, at: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's socket drains and `on_writable` releases its held frames in several writes
    (more than a quarter of the budget is held); the `at`-th write raises, or the connection is
    closed or lost under it. No tracking may point past the outbox, the hub must not keep the
    connection as behind, and the other client of the game (and this one, when its write only
    raised) must get every later publication."""
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        victim = FailsMidRelease("victim", hub, what, at=10**9)
        other = FakeSubscriber("other")
        await followed(hub, victim, GAME, OTHER)
        await followed(hub, other, GAME, OTHER)
        published = []
        for n in range(12):  # stream frames, each kept with the stats before it: ~42 KB
            published.append(big_stats(broker, n, GAME if n % 2 else OTHER))
            published.append(incident(broker, n, GAME if n % 2 else OTHER))
        await settle()
        assert victim in hub._behind and len(victim.queued()) > 4
        victim.at = at
        victim.take = 6_000  # the kernel takes some of each write: the release goes on
        writes = len(victim.writes)
        # The transport tells the hub (`on_writable`, several writes); a raise there reaches the
        # transport's `resume_writing`, and the loop logs it.
        with contextlib.suppress(RuntimeError):
            victim.read(1 << 30)
        assert victim.at <= 0, "the release ended before the failure"
        assert len(victim.writes) - writes >= at - (what == "raise")
        victim.take = 0
        victim.at = 10**9
        check_tracking(victim)
        if what != "raise":
            assert victim not in hub._behind
            assert victim.pending is None or victim.pending.tracked is None
        later = [incident(broker, 100 + n, GAME) for n in range(3)]
        later.append(big_stats(broker, 100, OTHER))
        await settle()
        victim.read(1 << 30)
        poll(hub)
        await settle()
        check_tracking(victim)
        check_view(other.frames(), published + later)
        if what == "raise":
            assert victim.closes == []
            assert victim.queued() == [] and victim not in hub._behind
            got = [f["offset"] for f in victim.frames() if f.get("channel") == GAME]
            offsets = [p.offset for p in later if p.channel == GAME]
            assert got[-3:] == offsets, "later writes stopped after the raise"
        else:
            assert len(victim.closes) == 1
            assert victim not in hub._behind and hub.subscriber_count(GAME) == 1
            got_later = {(f["channel"], f["offset"]) for f in victim.frames()}
            assert got_later.isdisjoint((p.channel, p.offset) for p in later)
    finally:
        await hub.close()
        await broker.close()


async def test_a_frame_larger_than_a_quarter_of_the_budget_goes_out_whole_and_in_order() -> None:
    """17 KB frames (over low water, 16 KB) among 3 KB stats and incidents, to a client that
    stops reading and then reads in bursts: each goes out in one write of its own (at least a
    frame per write), none is reordered or lost, only superseded stats skipped, the socket never
    holds more than a quarter of the budget and a frame, and what is held never passes the
    budget."""
    broker = RecordingBroker()
    hub = await make_hub(broker, max_buffer_bytes=BUDGET)
    try:
        sub = Phone("huge", hub)
        await followed(hub, sub, GAME, OTHER)
        published = [incident(broker, 0)]
        published.append(huge(broker, 1, GAME, stream=True, size=17_000))
        published += [big_stats(broker, n, OTHER) for n in range(10)]
        published.append(huge(broker, 2, OTHER, stream=False, size=17_000))
        published.append(incident(broker, 3, OTHER))
        await settle()
        assert sub.closes == [] and hub._behind
        for round_ in range(8):
            published.append(huge(broker, 10 + round_, GAME, stream=False, size=17_000))
            published += [big_stats(broker, 100 * round_ + k, OTHER) for k in range(5)]
            if round_ % 2:
                published.append(incident(broker, 20 + round_, OTHER))
            await settle()
            assert sub.backlog <= hub.low_water + 17_200, sub.backlog
            assert held_bytes(sub) <= BUDGET
            sub.read(20_000)
            poll(hub)
            await settle()
        assert sub.closes == []
        assert hub.conflated_frames > 0
        for _ in range(6):
            sub.read(1 << 30)
            poll(hub)
            await settle()
        assert sub.queued() == []
        for write in sub.writes:  # every write holds whole frames
            assert split_frames(write)
        check_view(sub.frames(), published)
    finally:
        await hub.close()
        await broker.close()
