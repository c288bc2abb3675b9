"""One table of client scenarios, run against both SDKs with the same assertions.

Each scenario drives a real gateway (in process, or `igratech-ws serve` processes on Redis for the
node kill) and a client through `Driver` (`drivers.py`): the Python SDK in this process, or the
JavaScript client under Node with the `ws` package. The assertions read the same event records,
so a behaviour one SDK has and the other lacks fails here.

The table is the `test_*` functions of this module; the `driver` fixture runs each with both SDKs.
The rule every scenario checks: on every channel, each publication arrives exactly once and in
order, or the client reports a gap for that channel; never a silent hole.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from igratech_ws.app import App, running_app
from tests.support.cluster import BrokerSpace, stop
from tests.support.conformance_drivers import Driver, JsDriver, PythonDriver
from tests.support.conformance_nodes import two_nodes
from tests.support.gateway import API_KEY, balance, base_config, connect, incident, publish, token

# --- helpers ------------------------------------------------------------------------------------


def drop(app: App, code: int = 1012) -> None:
    """Close every connection of `app` with `code` (1012: restart, reconnect)."""
    for connection in list(app.node._connections):
        connection.close_with(code)  # type: ignore[arg-type]


class Held:
    """While entered, `app` refuses new handshakes (503, as a full node does): a client that
    was dropped stays away while the test publishes what it must recover."""

    def __init__(self, app: App, monkeypatch: pytest.MonkeyPatch) -> None:
        self.app, self.monkeypatch = app, monkeypatch

    def __enter__(self) -> None:
        self.monkeypatch.setattr(self.app.node, "at_capacity", lambda: True)

    def __exit__(self, *exc: object) -> None:
        self.monkeypatch.undo()


async def published(app: App, body: dict[str, Any]) -> int:
    status, answer = await publish(app, body)
    assert status == 200, answer
    offset: int = answer["offset"]
    return offset


def assert_exactly_once(driver: Driver, channel: str, expected: list[int]) -> None:
    got = driver.offsets(channel)
    assert got == expected, f"{driver.name}: {channel} received {got}, expected {expected}"


def assert_no_gap(driver: Driver) -> None:
    assert not driver.of("gap"), f"{driver.name}: unexpected gaps {driver.of('gap')}"


async def connected_as(driver: Driver, user: str | None, count: int = 1) -> None:
    await driver.wait_count("connected", count)
    assert driver.of("connected")[count - 1]["userId"] == user


# --- the scenarios ------------------------------------------------------------------------------


async def test_connect_follow(driver: Driver, app: App) -> None:
    """Typed pushes on the user channel and on games, the one in the handshake and one followed
    later; the state of the user channel follows its `balance` pushes."""
    await driver.start(app.ws_url, token("u-cf"), games=("g-cf1",))
    await connected_as(driver, "u-cf")
    await driver.wait_count("settings", 1)
    await published(app, incident("g-cf1", 1))
    await published(app, balance("u-cf", "1.00"))
    await driver.follow("g-cf2")
    await published(app, incident("g-cf2", 1))
    await published(app, balance("u-cf", "2.00"))
    await driver.wait_count("push", 4)
    assert_exactly_once(driver, "game:g-cf1", [1])
    assert_exactly_once(driver, "game:g-cf2", [1])
    assert_exactly_once(driver, "user:u-cf", [1, 2])
    state = await driver.state("user:u-cf")
    assert state["balance"]["balance"] == "2.00", state
    assert_no_gap(driver)


async def test_resume_after_drop(driver: Driver, app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node drops the client (1012); what is published meanwhile arrives once, in order,
    on the game and on the user channel, which never got a push before (D5 positions)."""
    await driver.start(app.ws_url, token("u-rd"), games=("g-rd",))
    await driver.wait_count("settings", 1)
    await published(app, incident("g-rd", 1))
    await driver.wait_count("push", 1)
    with Held(app, monkeypatch):
        drop(app)
        await driver.wait_count("disconnected", 1)
        for n in range(2, 6):
            await published(app, incident("g-rd", n))
        await published(app, balance("u-rd", "5.00"))
    await driver.wait_for(lambda: len(driver.offsets("game:g-rd")) >= 5, "the missed pushes")
    await driver.wait_for(lambda: driver.offsets("user:u-rd"), "the missed balance")
    await published(app, incident("g-rd", 6))
    await driver.wait_for(lambda: len(driver.offsets("game:g-rd")) >= 6, "a live push")
    assert_exactly_once(driver, "game:g-rd", [1, 2, 3, 4, 5, 6])
    assert_exactly_once(driver, "user:u-rd", [1])
    assert_no_gap(driver)


async def test_resume_refused(driver: Driver, app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume the server refuses (403: it names another user's channel) is told apart from a
    node that is down: the refused channel is reported as a gap, the others are recovered."""
    await driver.start(app.ws_url, token("u-rr"), games=("g-rr",))
    await driver.wait_count("settings", 1)
    await published(app, incident("g-rr", 1))
    await driver.wait_count("push", 1)
    await driver.inject("user:u-someone-else", 3, "deadbeef")
    with Held(app, monkeypatch):
        drop(app)
        await driver.wait_count("disconnected", 1)
        await published(app, incident("g-rr", 2))
    await driver.wait_for(lambda: len(driver.offsets("game:g-rr")) >= 2, "the recovered push")
    await published(app, incident("g-rr", 3))
    await driver.wait_for(lambda: len(driver.offsets("game:g-rr")) >= 3, "a live push")
    assert_exactly_once(driver, "game:g-rr", [1, 2, 3])
    gaps = [(g["channel"], g["reason"]) for g in driver.of("gap")]
    assert gaps == [("user:u-someone-else", "refused")], f"{driver.name}: {gaps}"
    assert not driver.of("ended"), f"{driver.name} gave up: {driver.events}"


async def test_gap(driver: Driver, small_history_app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    """History no longer covers what was missed: the client says so (gap) and goes on live."""
    app = small_history_app
    await driver.start(app.ws_url, None, games=("g-gap",))
    await driver.wait_count("settings", 1)
    await published(app, incident("g-gap", 1))
    await driver.wait_count("push", 1)
    with Held(app, monkeypatch):
        drop(app)
        await driver.wait_count("disconnected", 1)
        for n in range(2, 8):  # history keeps 3: offsets 2 to 4 are gone
            await published(app, incident("g-gap", n))
    await driver.wait_count("gap", 1)
    assert [(g["channel"], g["reason"]) for g in driver.of("gap")] == [
        ("game:g-gap", "not-recovered")
    ]
    await published(app, incident("g-gap", 8))
    await driver.wait_for(lambda: 8 in driver.offsets("game:g-gap"), "a live push after the gap")
    assert_exactly_once(driver, "game:g-gap", [1, 8])


async def test_logout_4001(driver: Driver, app: App) -> None:
    """The same user logs in elsewhere: `logout`, close 4001, and no reconnect."""
    await driver.start(app.ws_url, token("u-l1"))
    await connected_as(driver, "u-l1")
    async with connect(app, "u-l1") as other:
        await other.recv()
        await driver.wait_count("ended", 1)
    await assert_logged_out(driver, "logged_in_elsewhere", 4001)


async def test_logout_4002(driver: Driver, app: App) -> None:
    """The platform logs the user out: `logout`, close 4002, and no reconnect."""
    await driver.start(app.ws_url, token("u-l2"))
    await connected_as(driver, "u-l2")
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{app.api_url}/api/v1/users/u-l2/logout",
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as answer,
    ):
        assert answer.status == 200
    await driver.wait_count("ended", 1)
    await assert_logged_out(driver, "forced", 4002)


async def test_logout_4003(driver: Driver, app: App) -> None:
    """The token expires while connected: `logout`, close 4003, and no reconnect."""
    await driver.start(app.ws_url, token("u-l3", ttl=2))
    await connected_as(driver, "u-l3")
    await driver.wait_count("ended", 1)
    await assert_logged_out(driver, "token_expired", 4003)


async def assert_logged_out(driver: Driver, reason: str, code: int) -> None:
    assert driver.of("logout") == [{"kind": "logout", "reason": reason, "code": code}]
    last = driver.of("disconnected")[-1]
    assert (last["code"], last["reconnect"]) == (code, False), driver.events
    await asyncio.sleep(0.5)  # a reconnect would show up as a second `connected`
    assert len(driver.of("connected")) == 1, driver.events


async def test_ping_idle(driver: Driver, idle_app: App) -> None:
    """On a quiet channel, the client's pings keep the connection open past the idle timeout."""
    app = idle_app  # ping every 1 s, idle after 2 s
    await driver.start(app.ws_url, None, games=("g-idle",))
    await driver.wait_count("connected", 1)
    await asyncio.sleep(4.5)
    assert not driver.of("disconnected"), f"{driver.name}: {driver.events}"
    assert len(driver.of("connected")) == 1


async def test_token_change(driver: Driver, app: App) -> None:
    """A new token takes effect on reconnect: the new user's channel, not the old one's."""
    await driver.start(app.ws_url, token("u-ta"), games=("g-tc",))
    await connected_as(driver, "u-ta")
    await published(app, balance("u-ta", "1.00"))
    await driver.wait_for(lambda: driver.offsets("user:u-ta"), "the first user's balance")
    await driver.set_token(token("u-tb"))
    await driver.reconnect()
    await connected_as(driver, "u-tb", count=2)
    await driver.wait_count("settings", 2)
    await published(app, balance("u-ta", "2.00"))
    await published(app, balance("u-tb", "9.00"))
    await published(app, incident("g-tc", 1))
    await driver.wait_for(lambda: driver.offsets("game:g-tc"), "the game push")
    await driver.wait_for(lambda: driver.offsets("user:u-tb"), "the new user's balance")
    assert_exactly_once(driver, "user:u-ta", [1])
    assert_exactly_once(driver, "user:u-tb", [1])
    assert (await driver.state("user:u-ta")) == {}
    assert_no_gap(driver)


async def test_node_kill_restart(driver: Driver, redis_space: BrokerSpace, tmp_path: Path) -> None:
    """Two nodes on Redis; the client's node is killed (no close frame) and restarted on the same
    port while the other node publishes: everything arrives once, in order, without a gap."""
    async with two_nodes(redis_space, tmp_path) as (restart, nodes):
        a, b = nodes
        await driver.start(a.ws_url, token("u-nk"), games=("g-nk",))
        await driver.wait_count("settings", 1)
        async with aiohttp.ClientSession() as http:

            async def send(body: dict[str, Any]) -> None:
                status, answer = await b.publish(body, http)
                assert status == 200, answer

            await send(incident("g-nk", 1))
            await driver.wait_count("push", 1)
            await stop(a.proc, signal.SIGKILL)
            for n in range(2, 6):
                await send(incident("g-nk", n))
            await send(balance("u-nk", "3.00"))
            await restart()
            await send(incident("g-nk", 6))
        await driver.wait_for(lambda: len(driver.offsets("game:g-nk")) >= 6, "every push")
        await driver.wait_for(lambda: driver.offsets("user:u-nk"), "the balance")
    assert_exactly_once(driver, "game:g-nk", [1, 2, 3, 4, 5, 6])
    assert_exactly_once(driver, "user:u-nk", [1])
    assert_no_gap(driver)


# --- gateways -----------------------------------------------------------------------------------


@pytest.fixture
async def app() -> AsyncIterator[App]:
    async with running_app(base_config()) as gateway:
        yield gateway


@pytest.fixture
async def small_history_app() -> AsyncIterator[App]:
    async with running_app(base_config(history_size=3)) as gateway:
        yield gateway


@pytest.fixture
async def idle_app() -> AsyncIterator[App]:
    async with running_app(base_config(ping_interval=1, idle_timeout=2)) as gateway:
        yield gateway


# --- both SDKs ----------------------------------------------------------------------------------

DRIVERS: dict[str, Callable[[], Driver]] = {"python": PythonDriver, "js": JsDriver}


@pytest.fixture(params=sorted(DRIVERS))
async def driver(request: pytest.FixtureRequest) -> AsyncIterator[Driver]:
    """Every scenario (each `test_*` above) runs once per SDK."""
    client = DRIVERS[request.param]()
    try:
        async with asyncio.timeout(60):
            yield client
    finally:
        await client.stop()
