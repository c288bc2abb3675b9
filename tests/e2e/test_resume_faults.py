"""Property: the resume guarantee holds across faults — a node killed, the broker restarted.

Hypothesis draws a program that interleaves publications (through a node's HTTP API or straight
through `Node.publish`, on a game channel and on the client's own user channel), client
disconnects and reconnects with `recover` (the game through a settings message, the user channel
through the handshake `settings` query parameter), and fault steps:

- **node killed** (memory, Redis, NATS): every client socket of the node is aborted (no close
  frame, as when the process dies) and the node is stopped; a new node takes its place. On Redis
  and NATS the other node and the broker keep the streams, so the client resumes elsewhere and
  recovers. On memory the only node is the broker: its replacement has new streams, so a resuming
  client must be told `recovered: false` (a new epoch), never handed a wrong sequence.
- **broker restarted** (a private redis-server / nats-server): Redis runs without persistence, so
  its streams are lost (new epochs: the client must learn it from `recovered: false`, a push of
  the new epoch starting at offset 1, or a 1012 close); NATS keeps JetStream on disk, so nothing
  is lost and the epoch must not change. Publications attempted during the outage must fail
  (503 / `BrokerError`); only accepted ones count (a failed NATS publish may still be stored: a
  push carrying the marker of a failed attempt is allowed, any other unknown push is not).

Checked on every frame, as it arrives: within an epoch each push is the next offset after the
position held (no gap, no duplicate, no reordering); no (offset, epoch) arrives twice; every push
carries the payload that was accepted at that position; an epoch changes only away from a stream
that was lost; a resume inside the history window (`WINDOW`) of a live epoch is `recovered: true`
followed by exactly the missed publications, beyond it `recovered: false` with nothing replayed,
and from a lost epoch `recovered: false` into an epoch that is not a lost one (except from
offset 0, of no stream: nothing seen yet, so any life continues it, D1). At the end, after a
sentinel publication per channel, every accepted publication of each epoch the client was in was
either received once or skipped by a `recovered: false` / fresh start the client was told about.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from igratech_ws.app import App, running_app
from igratech_ws.brokers.base import BrokerError
from igratech_ws.core.publishing import parse_publish_body, validate_publish
from igratech_ws.core.recovery import EMPTY_EPOCH
from tests.support.cluster import BrokerSpace, PrivateBroker, quick_broker
from tests.support.gateway import API_KEY, balance, base_config, connect, incident, recv, send

WINDOW = 6  # history_size of every node under test
#: Bound of one wait for frames, readiness or a publish; generous: nothing here asserts speed.
WAIT_S = 15.0
EXAMPLE_BOUND_S = 90.0
#: Examples per (fault, broker): the whole file stays well under 90 s on this machine.
EXAMPLES = {
    ("kill", "memory"): 15,
    ("kill", "redis"): 12,
    ("kill", "nats"): 10,
    ("restart", "redis"): 10,
    ("restart", "nats"): 8,
}

# --- programs --------------------------------------------------------------------------------------

#: ("pub", channel 0 game / 1 user, count, node index, through Node.publish instead of the API)
#: ("drop",)  ("resume", node index)
#: ("fault", a, b): kill -> a = node index (2: the client's node); restart -> a = publications
#: attempted during the outage, b = SIGKILL instead of SIGTERM.
Op = tuple[Any, ...]

_plain_op = st.one_of(
    st.tuples(
        st.just("pub"),
        st.integers(0, 1),
        st.integers(1, 4),
        st.integers(0, 1),
        st.booleans(),
    ),
    st.tuples(st.just("drop")),
    st.tuples(st.just("resume"), st.integers(0, 1)),
)
_segment = st.lists(_plain_op, min_size=0, max_size=4)
_fault = st.tuples(st.just("fault"), st.integers(0, 2), st.booleans())


@st.composite
def _programs(draw: st.DrawFn) -> list[Op]:
    """One or two faults, with a few plain steps before, between and after them."""
    program: list[Op] = [*draw(_segment), draw(_fault), *draw(_segment)]
    if draw(st.booleans()):
        program += [draw(_fault), *draw(_segment)]
    return program


#: Programs always run first, so that every test covers both sides of the window across a fault.
EXPLICIT: dict[str, list[list[Op]]] = {
    "kill": [
        # Connected at the kill; recovers (Redis, NATS) or is told the streams are new (memory).
        [("pub", 0, 2, 0, False), ("fault", 2, False), ("pub", 0, 3, 1, True), ("resume", 1)],
        # Away while the game passes the window: the game is not recovered, the user channel is.
        [
            ("drop",),
            ("pub", 0, 4, 0, False),
            ("pub", 0, 4, 1, True),
            ("pub", 1, 2, 0, False),
            ("fault", 0, False),
            ("resume", 1),
        ],
    ],
    "restart": [
        # Connected through the restart, then away across more publications.
        [
            ("pub", 0, 2, 0, False),
            ("pub", 1, 1, 1, True),
            ("fault", 1, False),
            ("pub", 0, 2, 1, True),
            ("drop",),
            ("pub", 1, 3, 0, False),
            ("resume", 0),
        ],
    ],
}

# --- one example -------------------------------------------------------------------------------


Position = tuple[int, str]


@dataclass
class Gateway:
    app: App
    stack: contextlib.AsyncExitStack


@dataclass
class Figures:
    """What the examples of one test went through (reported when the test ends)."""

    examples: int = 0
    faults: int = 0
    recovered: int = 0
    not_recovered: int = 0
    epoch_switches: int = 0
    server_closes: dict[int, int] = field(default_factory=dict)
    failed_publishes: int = 0
    ghosts: int = 0


class Example:
    """Runs one program against real gateways and checks every frame the client receives."""

    def __init__(
        self,
        fault: str,
        kind: str,
        base: str,
        private: PrivateBroker | None,
        figures: Figures,
    ) -> None:
        self.fault = fault
        self.kind = kind
        self.private = private
        self.figures = figures
        tag = "f" + uuid.uuid4().hex[:10]
        self.tag = tag
        # A namespace of this example alone: a key prefix (Redis) or a stream (NATS).
        self.space: BrokerSpace | None = None
        if kind == "memory":
            self.url = "memory://"
        else:
            self.space = BrokerSpace(kind, base, tag)
            # NATS: one second per request, so that a publish during an outage fails soon.
            self.url = self.space.url + ("&timeout=1" if kind == "nats" else "")
        self.game = "g-" + tag
        self.user = "u-" + tag
        self.game_channel = "game:" + self.game
        self.user_channel = "user:" + self.user
        self.channels = [self.game_channel, self.user_channel]
        self.gateways: list[Gateway] = []
        self.started = 0
        self.ws: Any = None
        self.ws_node = -1
        self.http: aiohttp.ClientSession | None = None
        # What the client holds and has seen.
        self.held: dict[str, Position | None] = dict.fromkeys(self.channels)
        self.seen: dict[str, set[Position]] = {c: set() for c in self.channels}
        self.skipped: dict[str, set[Position]] = {c: set() for c in self.channels}
        self.reached: dict[str, dict[str, int]] = {c: {} for c in self.channels}
        self.targets: dict[str, Position | None] = dict.fromkeys(self.channels)
        self.asked: deque[dict[str, Position | None]] = deque()
        self.log: dict[str, list[tuple[Any, ...]]] = {c: [] for c in self.channels}
        # What the gateways accepted, and what the faults destroyed.
        self.accepted: dict[tuple[str, int, str], str] = {}
        self.last: dict[str, Position | None] = dict.fromkeys(self.channels)
        self.failed: set[str] = set()  # markers of publications refused (maybe stored anyway)
        self.dead: set[str] = set()  # epochs of streams that a fault destroyed
        self.known: set[str] = set()  # every epoch seen so far
        self.outage = False
        self.n = 0

    # --- gateways ------------------------------------------------------------------------------

    async def start_gateway(self) -> Gateway:
        self.started += 1
        config = base_config(
            broker=self.url,
            history_size=WINDOW,
            history_ttl=600.0,
            node_id=f"{self.tag}-{self.started}",
        )
        stack = contextlib.AsyncExitStack()
        app = await stack.enter_async_context(running_app(config))
        return Gateway(app, stack)

    def gateway(self, index: int) -> Gateway:
        return self.gateways[index % len(self.gateways)]

    async def kill(self, target: int) -> None:
        """Abort every client socket of one node (no close frame), stop it, start a new one."""
        if target >= 2:
            target = self.ws_node if self.ws is not None else 0
        index = target % len(self.gateways)
        victim = self.gateways[index]
        # Python 3.11's asyncio.Server cannot abort its clients: reach the node's connections.
        for connection in list(getattr(victim.app.node, "_connections", ())):
            transport = getattr(connection, "_transport", None)  # the connection's raw socket
            if transport is not None:
                transport.abort()
        if self.ws is not None and self.ws_node == index:
            # Everything owed was received before the fault: the next thing is the dead socket.
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await recv(self.ws, WAIT_S)
            assert closed.value.rcvd is None, f"a killed node sent a close frame: {closed.value}"
            self.forget_connection()
        await victim.stack.aclose()
        if self.kind == "memory":
            self.dead |= self.known  # the streams lived in the stopped process
        self.gateways[index] = await self.start_gateway()

    async def restart_broker(self, attempts: int, hard: bool) -> None:
        """Stop the private broker, try `attempts` publications, start it, wait until ready."""
        assert self.private is not None
        await self.private.stop(signal.SIGKILL if hard else signal.SIGTERM)
        self.outage = True
        await self.wait_ready(False)
        for attempt in range(attempts):
            await self.publish(attempt % 2, 1, attempt, attempt % 2 == 0)
        await self.private.start()
        await self.wait_ready(True)
        self.outage = False
        if self.kind == "redis":
            self.dead |= self.known  # no persistence: every stream is gone

    async def wait_ready(self, ready: bool) -> None:
        """Wait until every node reports `ready` (the broker state it sees), bounded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while any(g.app.node.ready is not ready for g in self.gateways):
            if loop.time() > deadline:
                pytest.fail(f"nodes not {'ready' if ready else 'unready'} after {WAIT_S} s")
            await asyncio.sleep(0.02)

    # --- publishing ----------------------------------------------------------------------------

    async def publish(self, channel_index: int, count: int, via: int, direct: bool) -> None:
        for _ in range(count):
            self.n += 1
            if channel_index == 0:
                body, marker = incident(self.game, self.n), f"inc-{self.n}"
            else:
                body, marker = balance(self.user, f"{self.n}.00"), f"{self.n}.00"
            position = await self.publish_one(body, via, direct)
            if position is None:
                assert self.outage, f"publication {marker} refused while the broker was up"
                self.failed.add(marker)
                self.figures.failed_publishes += 1
                continue
            assert not self.outage, f"publication {marker} accepted while the broker was down"
            channel, offset, epoch = position
            last = self.last[channel]
            if last is not None and last[1] == epoch:
                assert offset > last[0], (channel, last, position)
                if not self.failed:
                    assert offset == last[0] + 1, (channel, last, position)
            else:
                # A new stream: only where a fault destroyed the previous one.
                assert last is None or last[1] in self.dead, (channel, last, position)
                assert epoch not in self.dead, ("a lost epoch came back", position)
                if not self.failed:
                    assert offset == 1, (channel, last, position)
            self.known.add(epoch)
            self.last[channel] = (offset, epoch)
            self.accepted[(channel, offset, epoch)] = marker

    async def publish_one(
        self, body: dict[str, Any], via: int, direct: bool
    ) -> tuple[str, int, str] | None:
        """Publish through one node: the position, or None when refused (broker unavailable)."""
        app = self.gateway(via).app
        if direct:
            validated = validate_publish(parse_publish_body(json.dumps(body).encode()))
            try:
                async with asyncio.timeout(WAIT_S):
                    publication = (await app.node.publish(validated)).publication
            except BrokerError:
                return None
            return publication.channel, publication.offset, publication.epoch
        assert self.http is not None
        async with self.http.post(
            app.api_url + "/api/v1/publish",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as answer:
            status, data = answer.status, await answer.json()
        if status == 503:
            assert data["error"]["code"] == "broker_unavailable", data
            return None
        assert status == 200, (status, data)
        return data["channel"], data["offset"], data["epoch"]

    # --- the client ----------------------------------------------------------------------------

    def forget_connection(self) -> None:
        self.ws = None
        self.ws_node = -1
        self.asked.clear()  # unanswered requests died with the connection
        self.targets = dict.fromkeys(self.channels)

    async def drop(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.forget_connection()

    async def resume(self, index: int) -> None:
        """Reconnect to node `index`, recovering the user channel in the handshake and the game
        in the first settings message (or following them fresh the first time)."""
        await self.drop()
        index %= len(self.gateways)
        held = self.held[self.user_channel]
        if held is None:
            handshake: dict[str, Any] = {}
        else:
            handshake = {"recover": {self.user_channel: {"offset": held[0], "epoch": held[1]}}}
        self.asked.append({self.user_channel: held})
        ws = await connect(self.gateway(index).app, self.user, settings=json.dumps(handshake))
        self.ws, self.ws_node = ws, index
        await self.pump_one(expect="connected")
        if self.ws is None:
            return  # closed at once (broker unavailable): the next step reconnects
        held = self.held[self.game_channel]
        request: dict[str, Any] = {"games": [self.game]}
        if held is not None:
            request["recover"] = {self.game_channel: {"offset": held[0], "epoch": held[1]}}
        self.asked.append({self.game_channel: held})
        await send(ws, "settings", request)
        await self.sync()

    def caught_up(self, channel: str) -> bool:
        held = self.held[channel]
        for goal in (self.last[channel], self.targets[channel]):
            if goal is None or goal[0] == 0:
                continue  # nothing to reach (offset 0: of no stream, D1)
            if held is None:
                return False
            if goal[1] == held[1]:
                if held[0] < goal[0]:
                    return False
            elif goal[1] not in self.dead:
                return False  # a live epoch the client has not reached yet
        return True

    async def sync(self) -> None:
        """Read until every answer is in and the client holds every channel's newest position,
        or the server closed the connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while self.ws is not None and (
            self.asked or not all(self.caught_up(c) for c in self.channels)
        ):
            if loop.time() > deadline:
                pytest.fail(
                    f"client stuck: held {self.held}, newest {self.last}, targets {self.targets}, "
                    f"asked {list(self.asked)}, log {self.log}"
                )
            await self.pump_one()

    async def pump_one(self, expect: str | None = None) -> None:
        try:
            frame = await recv(self.ws, WAIT_S)
        except websockets.ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            # The hub closes with 1012 when history cannot fill a gap, with 1013 when the broker
            # cannot answer a join: both only around a broker restart.
            assert self.fault == "restart" and code in (1012, 1013), (code, self.log)
            self.figures.server_closes[code] = self.figures.server_closes.get(code, 0) + 1
            for channel in self.channels:
                self.log[channel].append(("closed", code))
            self.forget_connection()
            return
        if expect is not None:
            assert frame["event"] == expect, frame
        self.note(frame)

    def note(self, frame: dict[str, Any]) -> None:
        event = frame["event"]
        if "channel" in frame:
            self.note_push(frame)
        elif event == "settings":
            assert self.asked, f"unrequested settings answer {frame}"
            self.note_answer(self.asked.popleft(), frame["data"]["channels"])
        elif event not in ("connected", "pong"):
            pytest.fail(f"unexpected frame {frame}")

    def note_push(self, frame: dict[str, Any]) -> None:
        channel, offset, epoch = frame["channel"], frame["offset"], frame["epoch"]
        data = frame["data"]
        marker = str(data.get("incidentId") or data.get("balance"))
        if frame.get("snapshot"):
            self.note_snapshot(frame, marker)
            return
        self.log[channel].append(("push", offset, epoch, marker))
        held = self.held[channel]
        assert held is not None, f"push before the channel's start: {frame}"
        if epoch == held[1]:
            assert offset == held[0] + 1, f"{offset}@{epoch} after {held}: {self.log[channel]}"
        elif held[0] == 0:
            # Offset 0 has seen nothing: the stream's first epoch is new to it (D1).
            assert offset == 1, f"{offset}@{epoch} after offset 0: {self.log[channel]}"
        else:
            # Only a lost stream (or none at all: D1) may be left, and the new one is
            # delivered from its start.
            assert held[1] in self.dead or held == (0, EMPTY_EPOCH), (
                f"epoch switch away from a live stream: {frame} {held}"
            )
            assert epoch not in self.dead, f"push of a lost epoch: {frame}"
            assert offset == 1, f"new epoch not from its first offset: {self.log[channel]}"
            self.figures.epoch_switches += 1
        position = (offset, epoch)
        assert position not in self.seen[channel], f"duplicate {position}: {self.log[channel]}"
        self.seen[channel].add(position)
        accepted = self.accepted.get((channel, offset, epoch))
        if accepted is not None:
            assert accepted == marker, f"{position} carries {marker}, accepted {accepted}"
        else:
            assert marker in self.failed, f"push of a publication never attempted: {frame}"
            self.figures.ghosts += 1
        self.hold(channel, position)

    def note_snapshot(self, frame: dict[str, Any], marker: str) -> None:
        """A channel's current state on follow (D9): right after its start and before any push,
        a state event at or below the held position in its epoch, the latest accepted one there,
        never moving the position."""
        channel, offset, epoch = frame["channel"], frame["offset"], frame["epoch"]
        log = self.log[channel]
        log.append(("snapshot", offset, epoch, marker))
        held = self.held[channel]
        assert held is not None, f"snapshot before the channel's start: {frame}"
        assert frame["event"] == "balance", f"a snapshot of a stream event unasked: {frame}"
        assert log[-2][0] in ("start", "snapshot"), f"snapshot after a push: {log}"
        assert epoch == held[1] and 0 < offset <= held[0], f"snapshot past {held}: {log}"
        accepted = self.accepted.get((channel, offset, epoch))
        if accepted is not None:
            assert accepted == marker, f"snapshot {offset}@{epoch} carries {marker}: {log}"
        else:
            assert marker in self.failed, f"snapshot of a publication never attempted: {frame}"
        newer = [
            off
            for (ch, off, ep) in self.accepted
            if ch == channel and ep == epoch and offset < off <= held[0]
        ]
        assert not newer, f"stale snapshot {offset}@{epoch}: {newer} accepted since: {log}"

    def hold(self, channel: str, position: Position) -> None:
        self.held[channel] = position
        if position[0] == 0:
            return  # offset 0 has seen nothing, of no stream (D1): no epoch to know or reach
        self.known.add(position[1])
        reached = self.reached[channel]
        reached[position[1]] = max(reached.get(position[1], 0), position[0])

    def note_answer(self, asked: dict[str, Position | None], states: list[dict[str, Any]]) -> None:
        by_channel = {s["channel"]: s for s in states}
        for channel, held in asked.items():
            state = by_channel.get(channel)
            assert state is not None, f"{channel} missing from the answer {states}"
            offset, epoch = state["offset"], state["epoch"]
            self.log[channel].append(("start", offset, epoch, state.get("recovered")))
            if held is None:
                assert "recovered" not in state, state
                self.skip(channel, 0, offset, epoch)
                self.hold(channel, (offset, epoch))
                continue
            recovered = state["recovered"]
            if held[0] == 0:
                # Offset 0 has seen nothing: its epoch does not matter (D1).
                assert epoch not in self.dead, f"a lost epoch came back: {state}"
                assert recovered is (offset <= WINDOW), f"window {WINDOW}: {held} -> {state}"
            elif held[1] in self.dead:
                assert recovered is False, f"recovered from a lost epoch: {held} -> {state}"
                assert epoch not in self.dead, f"a lost epoch came back: {state}"
            else:
                # The stream survived the faults: same epoch, and at least every accepted one.
                assert epoch == held[1], f"epoch changed without a lost stream: {held} {state}"
                last = self.last[channel]
                if last is not None and last[1] == epoch:
                    assert offset >= last[0], (state, last)
                    if not self.failed:
                        assert offset == last[0], (state, last)
                missed = offset - held[0]
                assert missed >= 0, (held, state)
                assert recovered is (missed <= WINDOW), f"window {WINDOW}: {held} -> {state}"
            if recovered:
                self.figures.recovered += 1
                self.targets[channel] = (offset, epoch)
            else:
                self.figures.not_recovered += 1
                self.skip(channel, held[0] if held[1] == epoch else 0, offset, epoch)
                self.hold(channel, (offset, epoch))

    def skip(self, channel: str, after: int, upto: int, epoch: str) -> None:
        """The client was told it will not get offsets after..upto of `epoch`."""
        self.skipped[channel].update((o, epoch) for o in range(after + 1, upto + 1))

    # --- the whole example ---------------------------------------------------------------------

    async def run(self, program: list[Op]) -> None:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S)) as http:
                self.http = http
                for _ in range(1 if self.kind == "memory" else 2):
                    self.gateways.append(await self.start_gateway())
                await self.resume(0)
                for op in program:
                    await self.step(op)
                await self.finish()
        finally:
            with contextlib.suppress(Exception):
                if self.ws is not None:
                    await self.ws.close()
            for gateway in self.gateways:
                with contextlib.suppress(Exception):
                    await gateway.stack.aclose()
            if self.space is not None:
                await self.space.cleanup()

    async def step(self, op: Op) -> None:
        if op[0] == "pub":
            await self.publish(op[1], op[2], op[3], op[4])
            await self.sync()
        elif op[0] == "drop":
            await self.drop()
        elif op[0] == "resume":
            await self.resume(op[1])
        else:
            self.figures.faults += 1
            if self.fault == "kill":
                await self.kill(op[1])
            else:
                await self.restart_broker(op[1], op[2])
                await self.sync()

    async def finish(self) -> None:
        """Be connected, publish a sentinel per channel, then account for every publication."""
        for attempt in range(3):
            if self.ws is None:
                await self.resume(attempt)
            if self.ws is None:
                continue
            for index in (0, 1):
                await self.publish(index, 1, index, False)
            await self.sync()
            if self.ws is not None:
                break
        assert self.ws is not None, f"closed at the end, three times: {self.log}"
        for channel in self.channels:
            last = self.last[channel]
            assert last is not None and self.held[channel] == last, (channel, self.held, last)
            pushes = [e for e in self.log[channel] if e[0] == "push"]
            assert pushes[-1][1:3] == last, (channel, pushes[-1], last)
            seen, skipped = self.seen[channel], self.skipped[channel]
            assert not seen & skipped, ("received and skipped", sorted(seen & skipped))
            for (accepted_channel, offset, epoch), _marker in self.accepted.items():
                if accepted_channel != channel or offset > self.reached[channel].get(epoch, 0):
                    continue  # another channel, or a lost stream's tail the client was told of
                assert ((offset, epoch) in seen) != ((offset, epoch) in skipped), (
                    f"{channel} {offset}@{epoch} neither received nor announced as skipped: "
                    f"{self.log[channel]}"
                )
            if (self.fault == "kill" and self.kind != "memory") or self.kind == "nats":
                # Nothing was lost: the client never left its first epoch.
                assert len(self.reached[channel]) == 1, (channel, self.log[channel])


# --- the tests -----------------------------------------------------------------------------------


def _run_examples(
    fault: str, kind: str, base: str, private: PrivateBroker | None, loop: asyncio.AbstractEventLoop
) -> Figures:
    """Run the hypothesis search in this (worker) thread, each example on the test's loop."""
    figures = Figures()

    @settings(
        max_examples=EXAMPLES[(fault, kind)],
        deadline=None,
        # A failing example is reported as drawn: shrinking reruns real gateways for minutes.
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(_programs())
    def check(program: list[Op]) -> None:
        example = Example(fault, kind, base, private, figures)
        future = asyncio.run_coroutine_threadsafe(example.run(program), loop)
        try:
            future.result(EXAMPLE_BOUND_S)
        except TimeoutError:
            future.cancel()
            raise
        figures.examples += 1

    for program in EXPLICIT[fault]:
        check = example(program=program)(check)
    check()
    return figures


def _report(fault: str, kind: str, figures: Figures) -> None:
    print(f"{fault}/{kind}: {figures}")  # shown with -s or -rP: the figures asked for in review


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["memory", "redis", "nats"])
async def test_resume_survives_a_killed_node(kind: str, request: pytest.FixtureRequest) -> None:
    base = "" if kind == "memory" else str(request.getfixturevalue(f"{kind}_url"))
    loop = asyncio.get_running_loop()
    figures = await loop.run_in_executor(None, _run_examples, "kill", kind, base, None, loop)
    _report("kill", kind, figures)
    assert figures.examples >= 5 and figures.faults >= figures.examples, figures
    # The explicit programs make both outcomes certain, whatever hypothesis draws.
    assert figures.not_recovered >= 1, figures
    if kind != "memory":
        assert figures.recovered >= 1, figures


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_resume_survives_a_broker_restart(kind: str, tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with quick_broker(kind, tmp_path) as broker:
        figures = await loop.run_in_executor(
            None, _run_examples, "restart", kind, broker.url, broker, loop
        )
    _report("restart", kind, figures)
    assert figures.examples >= 5 and figures.faults >= figures.examples, figures
    if kind == "redis":
        told = figures.not_recovered + figures.epoch_switches + figures.server_closes.get(1012, 0)
        assert told >= 1, figures
