"""Several real node processes on one Redis or NATS behave as one gateway.

Each test starts `igratech-ws serve` processes (tests/support/cluster.py) on a namespace of its own
(a key prefix in Redis, a stream in NATS), talks to them with the `websockets` library, checks
every frame against the contract, and removes its keys or stream at the end. The broker-restart
test runs a private redis-server / nats-server so the shared services are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets

from tests.support.cluster import (
    BrokerSpace,
    Follower,
    NodeProcess,
    Publisher,
    check_log,
    eventually,
    node_group,
    private_broker,
)
from tests.support.gateway import balance, incident, recv, recv_event, send, settings

pytestmark = [pytest.mark.services]

BROKERS = ["redis", "nats"]


@pytest.fixture(params=BROKERS)
async def space(request: pytest.FixtureRequest) -> AsyncIterator[BrokerSpace]:
    """A fresh namespace on the shared Redis or NATS, deleted after the test."""
    kind = str(request.param)
    base = str(request.getfixturevalue("redis_url" if kind == "redis" else "nats_url"))
    namespace = BrokerSpace(kind, base)
    try:
        yield namespace
    finally:
        await namespace.cleanup()


def _alternating(game: str, user: str) -> Any:
    """Publication bodies: odd numbers an incident of `game`, even ones a balance of `user`."""

    def body(n: int) -> dict[str, Any]:
        return incident(game, n) if n % 2 else balance(user, f"{n}.00")

    return body


async def _expect_close(ws: Any, code: int) -> None:
    """The server closes `ws` with `code` (within a bounded wait), sending nothing else first."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await recv(ws, 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code, closed.value


# --- 1. one gateway: publish anywhere, receive everywhere ----------------------------------------


async def test_publications_through_any_node_reach_clients_on_every_node(
    space: BrokerSpace, tmp_path: Path
) -> None:
    async with (
        node_group(space.url, ["A", "B", "C"], tmp_path) as nodes,
        aiohttp.ClientSession() as http,
    ):
        a, b, c = nodes["A"], nodes["B"], nodes["C"]
        for node in nodes.values():
            status, info = await node.get("/api/v1/info", auth=True)
            assert status == 200 and info["node"] == node.name and info["broker"] == "connected"
        async with a.connect() as fan, a.connect("u-1") as user:
            assert (await recv_event(fan, "connected"))["data"]["node"] == "A"
            await recv_event(user, "connected")
            start = await settings(fan, games=["g-1"])
            assert start["channels"] == [
                {"channel": "game:g-1", "offset": 0, "epoch": start["channels"][0]["epoch"]}
            ]
            # The user channel is followed from connect; an empty settings request proves that
            # its join is complete before anything is published.
            assert [s["channel"] for s in (await settings(user))["channels"]] == ["user:u-1"]

            answers = []
            for n in range(1, 21):
                status, answer = await c.publish(incident("g-1", n), http)
                assert status == 200, answer
                answers.append(answer)
            got = [await recv_event(fan, "incident") for _ in range(20)]
            assert [f["offset"] for f in got] == list(range(1, 21))
            assert [f["offset"] for f in got] == [a["offset"] for a in answers]
            assert {f["epoch"] for f in got} == {answers[0]["epoch"]}
            assert [f["data"]["incidentId"] for f in got] == [f"inc-{n}" for n in range(1, 21)]
            assert all(f["channel"] == "game:g-1" for f in got)

            status, answer = await b.publish(balance("u-1", "42.50"), http)
            assert status == 200, answer
            pushed = await recv_event(user, "balance")
            assert pushed["channel"] == "user:u-1"
            assert (pushed["offset"], pushed["epoch"]) == (answer["offset"], answer["epoch"])
            assert pushed["data"]["balance"] == "42.50"


# --- 2. one session per user across nodes --------------------------------------------------------


async def test_single_session_and_forced_logout_span_nodes(
    space: BrokerSpace, tmp_path: Path
) -> None:
    async with (
        node_group(space.url, ["A", "B", "C"], tmp_path) as nodes,
        aiohttp.ClientSession() as http,
    ):
        a, b, c = nodes["A"], nodes["B"], nodes["C"]
        async with a.connect("u-1") as first:
            await recv_event(first, "connected")
            await settings(first)  # joined; A now knows the session
            async with b.connect("u-1") as second:
                hello = await recv_event(second, "connected")
                assert hello["data"]["userId"] == "u-1" and hello["data"]["node"] == "B"
                logout = await recv_event(first, "logout", timeout=10)
                assert logout["data"]["reason"] == "logged_in_elsewhere"
                assert logout["data"]["code"] == 4001
                await _expect_close(first, 4001)

                # The newest session stays usable: ping, and a publication through C.
                await send(second, "ping", {"ts": 7})
                assert (await recv_event(second, "pong"))["data"]["ts"] == 7
                await settings(second)
                status, answer = await c.publish(balance("u-1", "5.00"), http)
                assert status == 200, answer
                assert (await recv_event(second, "balance"))["data"]["balance"] == "5.00"

                # Back on A: now B's session is the older one and is closed the same way.
                async with a.connect("u-1") as third:
                    await recv_event(third, "connected")
                    # The current balance at once (issue 12), published through C.
                    snapshot = await recv_event(third, "balance")
                    assert snapshot["snapshot"] is True
                    assert (snapshot["offset"], snapshot["data"]["balance"]) == (
                        answer["offset"],
                        "5.00",
                    )
                    await settings(third)
                    logout = await recv_event(second, "logout", timeout=10)
                    assert logout["data"]["reason"] == "logged_in_elsewhere"
                    await _expect_close(second, 4001)

                    # Forced logout through C's API closes the connection held by A.
                    status, answer = await c.post("/api/v1/users/u-1/logout", {}, http)
                    assert status == 200, answer
                    logout = await recv_event(third, "logout", timeout=10)
                    assert logout["data"]["reason"] == "forced"
                    assert logout["data"]["code"] == 4002
                    await _expect_close(third, 4002)
        for node in nodes.values():
            assert node.alive, node.describe()


# --- 3. a node dies while events flow --------------------------------------------------------------


@pytest.mark.slow
async def test_clients_of_a_killed_node_resume_elsewhere_losing_and_repeating_nothing(
    space: BrokerSpace, tmp_path: Path
) -> None:
    async with node_group(space.url, ["A", "B", "C"], tmp_path) as nodes:
        a, b, c = nodes["A"], nodes["B"], nodes["C"]
        fan = Follower("fan", games=("g-1",))
        player = Follower("player", user="u-1", games=("g-1",))
        followers = [fan, player]
        tasks = [asyncio.ensure_future(f.run([a, b])) for f in followers]
        publisher = Publisher(c, _alternating("g-1", "u-1"))
        feed: asyncio.Future[None] | None = None
        try:
            await eventually(lambda: all(f.live.is_set() for f in followers), "clients live")
            feed = asyncio.ensure_future(publisher.run(limit=160))
            await eventually(
                lambda: fan.count("game:g-1") >= 10 and player.count("user:u-1") >= 10,
                "pushes before the kill",
            )
            await _kill(a)
            await eventually(lambda: all(len(f.sessions) >= 2 for f in followers), "reconnects")
            await asyncio.wait_for(feed, 60)
            assert not publisher.unexpected and publisher.refused == 0
            game, user = publisher.last("game:g-1"), publisher.last("user:u-1")
            assert game is not None and user is not None
            fan.targets = {"game:g-1": game}
            player.targets = {"game:g-1": game, "user:u-1": user}
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            for task in [*tasks, *([feed] if feed else [])]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        for follower in followers:
            assert follower.sessions[:2] == ["A", "B"], follower.sessions
            assert follower.closes[0] in (None, 1006), follower.closes  # no close frame: killed
        for follower, channel in [(fan, "game:g-1"), (player, "game:g-1"), (player, "user:u-1")]:
            log = follower.channel_log(channel)
            verdict = check_log(log)
            assert verdict.problems == [], (follower.name, channel, verdict)
            assert verdict.resets == 0 and verdict.epoch_switches == 0, verdict
            assert verdict.recovered >= 1, (follower.name, channel, log.entries)
            expected = [(p.offset, p.epoch, p.marker) for p in publisher.accepted_on(channel)]
            assert log.pushes() == expected, (follower.name, channel)
            assert [p[0] for p in log.pushes()] == list(range(1, len(expected) + 1))
        assert b.alive and c.alive


async def _kill(node: NodeProcess) -> None:
    from tests.support.cluster import stop

    assert await stop(node.proc, signal.SIGKILL) == -signal.SIGKILL


# --- 4. the broker restarts mid-stream -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", BROKERS)
async def test_broker_restart_mid_stream(kind: str, tmp_path: Path) -> None:
    async with (
        private_broker(kind, tmp_path) as broker,
        node_group(broker.url, ["A", "B"], tmp_path) as nodes,
    ):
        a, b = nodes["A"], nodes["B"]
        fan = Follower("fan", games=("g-1",))
        follow = asyncio.ensure_future(fan.run([a, b], timeout=60))
        # Publish errors during the outage (503 broker_unavailable) are expected; only accepted
        # publications count.
        publisher = Publisher(b, lambda n: incident("g-1", n))
        feed: asyncio.Future[None] | None = None
        try:
            await eventually(fan.live.is_set, "client live")
            feed = asyncio.ensure_future(publisher.run(limit=1500, pause=0.02))
            await eventually(lambda: fan.count("game:g-1") >= 10, "pushes before the outage")

            loop = asyncio.get_running_loop()
            down_at = loop.time()
            await broker.stop(signal.SIGTERM)
            await asyncio.gather(a.wait_readyz(503), b.wait_readyz(503))
            accepted_before = len(publisher.accepted)
            await asyncio.sleep(max(0.0, 2.0 - (loop.time() - down_at)))
            await broker.start()
            await asyncio.gather(a.wait_readyz(200), b.wait_readyz(200))
            restarted_at = len(publisher.accepted)
            await eventually(
                lambda: len(publisher.accepted) >= restarted_at + 10 or bool(publisher.unexpected),
                "publications accepted after the restart",
            )
            publisher.stop.set()
            await asyncio.wait_for(feed, 30)
            assert not publisher.unexpected, publisher.unexpected
            last = publisher.last("game:g-1")
            assert last is not None
            fan.targets = {"game:g-1": last}
            await asyncio.wait_for(follow, 60)
        finally:
            for task in [follow, *([feed] if feed else [])]:
                task.cancel()
            with contextlib.suppress(BaseException):
                await follow

        for node in (a, b):
            assert node.alive, node.describe()
            status, _ = await node.get("/healthz")
            assert status == 200
        log = fan.channel_log("game:g-1")
        verdict = check_log(log)
        assert verdict.problems == [], verdict
        accepted = publisher.accepted_on("game:g-1")
        pushes = log.pushes()
        delivered = {(p[0], p[1]): p[2] for p in pushes}
        # What the client got is what was published at that position (markers are unique).
        by_position = {(p.offset, p.epoch): p.marker for p in accepted}
        for position, marker in delivered.items():
            if position in by_position:
                assert by_position[position] == marker, position
        epochs = {p.epoch for p in accepted}
        before, after = accepted[:accepted_before], accepted[restarted_at:]
        if kind == "nats":
            # JetStream kept the stream on disk: one epoch, every accepted publication exactly once
            # (a publish refused during the outage may still have been stored: it may appear too).
            assert len(epochs) == 1 and before[0].epoch == after[-1].epoch, epochs
            assert verdict.resets == 0 and verdict.epoch_switches == 0, verdict
            missing = [p.offset for p in accepted if (p.offset, p.epoch) not in delivered]
            assert missing == [], missing
            assert [p[0] for p in pushes] == list(range(1, pushes[-1][0] + 1))
        else:
            # Redis without persistence lost the stream: a new epoch, which the client learns from
            # a push of the new epoch, a 1012 close, or `recovered: false` when it resumes.
            assert before[0].epoch != after[-1].epoch, epochs
            told = verdict.epoch_switches + verdict.resets + fan.closes.count(1012)
            assert told >= 1, (verdict, fan.closes)
            # From its start in the new epoch the client has every accepted publication once.
            final = [p for p in pushes if p[1] == after[-1].epoch]
            assert final, pushes
            wanted = [p.offset for p in accepted if p.epoch == after[-1].epoch]
            got = [p[0] for p in final]
            missing = [o for o in wanted if o >= got[0] and o not in got]
            assert missing == [], (missing, got)
            if verdict.resets == 0 and not fan.closes:
                # Never disconnected: the hub filled the new epoch from its first offset.
                assert got[0] == 1, got
