"""The client SDK against a fake gateway on 127.0.0.1: events, helpers, keep-alive, resume."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from igratech_ws.client import (
    Backoff,
    Client,
    Event,
    HandshakeRejected,
    ReconnectFailed,
    RecoveryFailed,
    SettingsRejected,
    connect,
)
from igratech_ws.client.events import decode_frame
from igratech_ws.core.messages import IncidentData, Settings, Status
from tests.support.fake_server import FakeGateway, balance, incident, wait_until

TIMEOUT = 10  # no test waits longer than this for anything


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    server = FakeGateway()
    await server.start()
    yield server
    await server.stop()


def fast_backoff(**kwargs: Any) -> Backoff:
    return Backoff(initial=0.01, maximum=0.05, rng=random.Random(1), **kwargs)


async def next_event(client: Client, *skip: str) -> Event:
    """The next event whose name is not in `skip`, within TIMEOUT."""
    async with asyncio.timeout(TIMEOUT):
        async for event in client:
            if event.event not in skip:
                return event
    raise AssertionError("iteration ended")


async def collect_until(client: Client, done: Any) -> list[Event]:
    events: list[Event] = []
    async with asyncio.timeout(TIMEOUT):
        async for event in client:
            events.append(event)
            if done(events):
                return events
    return events


async def test_typed_events_and_handshake_settings(gateway: FakeGateway) -> None:
    async with connect(gateway.url, "u-7", games=["g-1"], stats=True) as client:
        connected = await next_event(client)
        assert connected.event == "connected" and isinstance(connected.data, Status)
        assert client.user_id == "u-7"
        settings = await next_event(client)
        assert isinstance(settings.data, Settings) and settings.data.games == ["g-1"]
        assert gateway.handshakes == [{"games": ["g-1"], "stats": True}]
        assert gateway.auth_headers == ["Bearer u-7"]

        gateway.publish("game:g-1", "incident", incident("g-1", 1))
        gateway.publish("user:u-7", "balance", balance("10.00"))
        pushed = await next_event(client)
        assert isinstance(pushed.data, IncidentData) and pushed.data.gameId == "g-1"
        assert (pushed.channel, pushed.offset, pushed.epoch) == ("game:g-1", 1, "e1")
        money = await next_event(client)
        assert money.event == "balance" and money.data.balance == "10.00"
        assert client.positions["game:g-1"] == (1, "e1")
        assert client.positions["user:u-7"] == (1, "e1")


async def test_anonymous_connect_sends_no_settings_query(gateway: FakeGateway) -> None:
    async with connect(gateway.url) as client:
        assert (await next_event(client)).event == "connected"
        assert client.user_id is None
    assert gateway.handshakes == [None] and gateway.auth_headers == [None]


async def test_settings_helpers_return_the_answer(gateway: FakeGateway) -> None:
    async with connect(gateway.url, games=["g-1"]) as client:
        answer = await client.follow("g-2", "g-3")
        assert answer.games == ["g-1", "g-2", "g-3"]
        answer = await client.unfollow("g-1")
        assert answer.games == ["g-2", "g-3"] and client.games == ["g-2", "g-3"]
        assert (await client.set_stats(True)).stats is True
        answer = await client.settings()
        assert {c.channel for c in answer.channels} == {"game:g-2", "game:g-3", "global"}
        assert "game:g-1" not in client.positions
        sent = [data for event, data in gateway.received if event == "settings"]
        assert sent == [{"follow": ["g-2", "g-3"]}, {"unfollow": ["g-1"]}, {"stats": True}, {}]
        with pytest.raises(ValueError):
            await client.follow("not a game id")


async def test_settings_error_rejects_the_request(gateway: FakeGateway) -> None:
    gateway.reject_settings = True
    async with connect(gateway.url) as client:
        with pytest.raises(SettingsRejected) as info:
            await client.follow("g-9")
        assert info.value.error.code == "too_many_games"


async def test_pings_every_ping_interval() -> None:
    gateway = FakeGateway(ping_interval=1)
    await gateway.start()
    try:
        async with connect(gateway.url) as client:
            await wait_until(lambda: any(e == "ping" for e, _ in gateway.received))
            await wait_until(lambda: client.latency is not None)
            ping = next(d for e, d in gateway.received if e == "ping")
            assert isinstance(ping["ts"], int)
    finally:
        await gateway.stop()


async def test_drop_reconnects_and_resumes_every_channel(gateway: FakeGateway) -> None:
    async with connect(gateway.url, "u-7", games=["g-1"], backoff=fast_backoff()) as client:
        gateway.publish("game:g-1", "incident", incident("g-1", 1))
        gateway.publish("user:u-7", "balance", balance("1.00"))
        await collect_until(client, lambda ev: ev[-1].event == "balance")

        gateway.drop_all()
        await wait_until(lambda: not gateway.connections or len(gateway.handshakes) > 1)
        # published while the client is away: must arrive after the resume, exactly once
        gateway.publish("game:g-1", "incident", incident("g-1", 2))
        gateway.publish("game:g-1", "incident", incident("g-1", 3))
        gateway.publish("user:u-7", "balance", balance("2.00"))

        events = await collect_until(client, lambda ev: sum(e.channel is not None for e in ev) == 3)
        names = [e.event for e in events]
        assert names[0] == "disconnected" and events[0].data.reconnect is True
        assert "connected" in names and "settings" in names
        pushes = [(e.channel, e.offset) for e in events if e.channel is not None]
        assert sorted(pushes) == [("game:g-1", 2), ("game:g-1", 3), ("user:u-7", 2)]
        resume = gateway.handshakes[-1]
        assert resume is not None and resume["games"] == ["g-1"]
        assert resume["recover"] == {
            "game:g-1": {"offset": 1, "epoch": "e1"},
            "user:u-7": {"offset": 1, "epoch": "e1"},
        }
        assert RecoveryFailed not in [type(e.data) for e in events]


async def test_lost_history_yields_recovery_failed(gateway: FakeGateway) -> None:
    async with connect(gateway.url, games=["g-1"], backoff=fast_backoff()) as client:
        gateway.publish("game:g-1", "incident", incident("g-1", 1))
        await collect_until(client, lambda ev: ev[-1].event == "incident")
        gateway.epoch = "e2"  # the stream was lost (e.g. the broker restarted)
        gateway.drop_all()
        events = await collect_until(client, lambda ev: ev[-1].event == "recovery-failed")
        assert events[-1].data == RecoveryFailed(["game:g-1"])
        assert events[-2].event == "connected"  # D5: `connected` reports the positions
        assert client.positions["game:g-1"] == (1, "e2")
        gateway.publish("game:g-1", "incident", incident("g-1", 2))
        pushed = await next_event(client, "settings")
        assert (pushed.offset, pushed.epoch) == (2, "e2")


async def test_logout_ends_iteration_without_reconnecting(gateway: FakeGateway) -> None:
    async with connect(gateway.url, "u-7", backoff=fast_backoff()) as client:
        await next_event(client)
        gateway.logout(4001)
        events = await collect_until(client, lambda ev: False)
        assert [e.event for e in events] == ["logout", "disconnected"]
        assert events[1].data.code == 4001 and events[1].data.reconnect is False
    assert len(gateway.handshakes) == 1


async def test_restart_close_code_reconnects(gateway: FakeGateway) -> None:
    async with connect(gateway.url, backoff=fast_backoff()) as client:
        await next_event(client)
        gateway.close_all(1012, "restart")
        event = await next_event(client)
        assert event.event == "disconnected" and event.data.code == 1012 and event.data.reconnect
        assert (await next_event(client)).event == "connected"
        assert len(gateway.handshakes) == 2


async def test_full_queue_disconnects_and_resumes_without_loss(gateway: FakeGateway) -> None:
    async with connect(gateway.url, games=["g-1"], backoff=fast_backoff(), max_queue=4) as client:
        await wait_until(lambda: client.positions.get("game:g-1") is not None)
        for n in range(1, 31):
            gateway.publish("game:g-1", "incident", incident("g-1", n))
        events = await collect_until(
            client, lambda ev: ev[-1].channel is not None and ev[-1].offset == 30
        )
        offsets = [e.offset for e in events if e.channel is not None]
        assert offsets == list(range(1, 31))
        reasons = [e.data.reason for e in events if e.event == "disconnected"]
        assert reasons and set(reasons) == {"client queue full"}


async def test_rejected_handshake_raises(gateway: FakeGateway) -> None:
    gateway.reject_status = 401
    with pytest.raises(HandshakeRejected) as info:
        async with connect(gateway.url, "bad"):
            pass
    assert info.value.status == 401


async def test_gives_up_after_bounded_attempts() -> None:
    gateway = FakeGateway()
    await gateway.start()
    backoff = fast_backoff(max_attempts=2)
    async with connect(gateway.url, backoff=backoff) as client:
        await next_event(client)
        await gateway.stop()
        with pytest.raises(ReconnectFailed):
            await collect_until(client, lambda ev: False)
    assert backoff.attempt == 2


async def test_follow_while_disconnected_is_answered_by_the_resume(gateway: FakeGateway) -> None:
    async with connect(gateway.url, backoff=fast_backoff()) as client:
        await next_event(client)
        gateway.reject_status = 503  # keep the client away for a while
        gateway.drop_all()
        await wait_until(lambda: len(gateway.handshakes) > 2)
        follow = asyncio.create_task(client.follow("g-5"))
        await asyncio.sleep(0.05)
        gateway.reject_status = None
        async with asyncio.timeout(TIMEOUT):
            answer = await follow
        assert answer.games == ["g-5"]


def test_backoff_full_jitter_is_bounded() -> None:
    backoff = Backoff(initial=1, maximum=8, max_attempts=6, max_elapsed=None, rng=random.Random(3))
    delays = [backoff.next_delay() for _ in range(7)]
    caps = [1, 2, 4, 8, 8, 8]
    assert all(d is not None and 0 <= d <= c for d, c in zip(delays, caps, strict=False))
    assert delays[6] is None
    backoff.reset()
    assert backoff.next_delay() is not None
    timed = Backoff(initial=10, maximum=10, max_elapsed=1.0, rng=random.Random(3))
    total = 0.0
    while (delay := timed.next_delay()) is not None:
        total += delay
    assert total <= 1.0


def test_unknown_fields_and_events_still_decode() -> None:
    event = decode_frame(b'{"event":"pong","data":{"serverTime":"x","extra":1}}')
    assert event.data == {"serverTime": "x", "extra": 1}
    assert decode_frame(b'{"event":"future-thing","data":{"a":1}}').data == {"a": 1}
    with pytest.raises(msgspec.DecodeError):
        decode_frame(b"[1]")


# --- D5 positions, gaps, state, refused resumes, token change ------------------------------


async def test_connected_positions_resume_a_user_channel_that_never_got_a_push(
    gateway: FakeGateway,
) -> None:
    gateway.publish("user:u-7", "balance", balance("1.00"))  # before the client connects
    async with connect(gateway.url, "u-7", backoff=fast_backoff()) as client:
        assert (await next_event(client)).event == "connected"
        assert client.positions == {"user:u-7": (1, "e1")}  # from `connected`, no push needed
        gateway.drop_all()
        await wait_until(lambda: len(gateway.handshakes) == 2)
        gateway.publish("user:u-7", "balance", balance("2.00"))
        pushed = await next_event(client, "disconnected", "connected", "settings")
        assert (pushed.channel, pushed.offset, pushed.data.balance) == ("user:u-7", 2, "2.00")
        resume = gateway.handshakes[1]
        assert resume is not None
        assert resume["recover"] == {"user:u-7": {"offset": 1, "epoch": "e1"}}


async def test_before_d5_positions_come_from_the_settings_answer() -> None:
    gateway = FakeGateway(d5=False)
    await gateway.start()
    try:
        async with connect(gateway.url, "u-7", games=["g-1"], backoff=fast_backoff()) as client:
            await next_event(client)
            answer = await next_event(client)
            assert answer.event == "settings"
            assert client.positions == {"user:u-7": (0, "e1"), "game:g-1": (0, "e1")}
    finally:
        await gateway.stop()


async def test_a_channel_joined_elsewhere_than_held_is_a_gap(gateway: FakeGateway) -> None:
    """Nothing proves continuity when a channel is joined, without recovery, at another position
    than the one held (e.g. positions restored from storage but the resume was not asked)."""
    async with connect(gateway.url, games=["g-1"], backoff=fast_backoff()) as client:
        await collect_until(client, lambda ev: ev[-1].event == "settings")
        client.positions["game:g-2"] = (5, "e1")  # held from an earlier run, not followed now
        for n in range(1, 8):
            gateway.publish("game:g-2", "incident", incident("g-2", n))
        await client.follow("g-2")  # a follow carries no `recover`
        events = await collect_until(client, lambda ev: ev[-1].event == "recovery-failed")
        assert events[-1].data == RecoveryFailed(["game:g-2"], "not-resumed")
        assert client.positions["game:g-2"] == (7, "e1")


async def test_a_push_that_skips_offsets_or_changes_epoch_is_a_gap(gateway: FakeGateway) -> None:
    async with connect(gateway.url, games=["g-1"], backoff=fast_backoff()) as client:
        await collect_until(client, lambda ev: ev[-1].event == "settings")
        gateway.publish("game:g-1", "incident", incident("g-1", 1))
        gateway.top["game:g-1"] = 3  # offsets 2 and 3 never reach the client
        gateway.publish("game:g-1", "incident", incident("g-1", 4))
        events = await collect_until(client, lambda ev: ev[-1].offset == 4)
        assert [e.event for e in events] == ["incident", "recovery-failed", "incident"]
        assert events[1].data == RecoveryFailed(["game:g-1"], "skipped")
        gateway.epoch = "e2"
        gateway.publish("game:g-1", "incident", incident("g-1", 5))
        events = await collect_until(client, lambda ev: ev[-1].offset == 5)
        assert events[0].data == RecoveryFailed(["game:g-1"], "epoch")


async def test_state_follows_pushes_and_snapshots_without_gaps(gateway: FakeGateway) -> None:
    async with connect(gateway.url, "u-7", games=["g-1"], backoff=fast_backoff()) as client:
        await collect_until(client, lambda ev: ev[-1].event == "settings")
        assert client.state("user:u-7") == {}
        gateway.publish("user:u-7", "balance", balance("1.00"))
        gateway.publish("user:u-7", "balance", balance("2.00"))
        await collect_until(client, lambda ev: ev[-1].offset == 2)
        assert client.state("user:u-7")["balance"].balance == "2.00"
        # A snapshot at or below the position: delivered, never a gap nor a duplicate, and an
        # older one does not replace the newer state.
        snapshot = {"event": "balance", "channel": "user:u-7", "offset": 1, "epoch": "e1",
                    "snapshot": True, "data": balance("1.00")}  # fmt: skip
        gateway.send_raw("user:u-7", snapshot)
        gateway.send_raw("user:u-7", {**snapshot, "offset": 2, "data": balance("2.50")})
        events = await collect_until(client, lambda ev: len(ev) == 2)
        assert [(e.event, e.snapshot, e.offset) for e in events] == [
            ("balance", True, 1),
            ("balance", True, 2),
        ]
        assert client.positions["user:u-7"] == (2, "e1")
        assert client.state("user:u-7")["balance"].balance == "2.50"
        # A conflated state push may skip offsets (superseded states were dropped): no gap.
        gateway.top["user:u-7"] = 4
        gateway.publish("user:u-7", "balance", balance("3.00"))  # offset 5
        gateway.send_raw("user:u-7", {**snapshot, "snapshot": False, "conflated": True,
                                      "offset": 7, "data": balance("4.00")})  # fmt: skip
        events = await collect_until(client, lambda ev: ev[-1].offset == 7)
        assert [e.event for e in events] == ["recovery-failed", "balance", "balance"]
        assert client.state("user:u-7")["balance"].balance == "4.00"
        # Unfollowed channels are forgotten, state included.
        gateway.publish("game:g-1", "stats", {"scope": "game", "gameId": "g-1",
                                              "updatedAt": "2026-11-23T19:45:00Z",
                                              "values": {"bets": 3}})  # fmt: skip
        await collect_until(client, lambda ev: ev[-1].event == "stats")
        assert client.state("game:g-1")["stats"].values == {"bets": 3}
        await client.unfollow("g-1")
        assert client.state("game:g-1") == {} and "game:g-1" not in client.positions


async def test_a_refused_resume_drops_what_was_refused_and_recovers_the_rest(
    gateway: FakeGateway,
) -> None:
    async with connect(gateway.url, "u-7", games=["g-1"], backoff=fast_backoff()) as client:
        await collect_until(client, lambda ev: ev[-1].event == "settings")
        gateway.publish("game:g-1", "incident", incident("g-1", 1))
        await collect_until(client, lambda ev: ev[-1].offset == 1)
        client.positions["user:u-9"] = (3, "e1")  # not this token's channel: 403 at the handshake
        gateway.forbidden_recover = {"user:u-9"}
        gateway.drop_all()
        gateway.publish("game:g-1", "incident", incident("g-1", 2))
        events = await collect_until(client, lambda ev: ev[-1].offset == 2)
        lost = [e.data for e in events if e.event == "recovery-failed"]
        assert lost == [RecoveryFailed(["user:u-9"], "refused")]
        assert "user:u-9" not in client.positions
        assert [e.offset for e in events if e.channel == "game:g-1"] == [2]
        assert gateway.handshakes[-1] is not None
        assert set(gateway.handshakes[-1]["recover"]) == {"user:u-7", "game:g-1"}


async def test_a_refusal_of_something_else_ends_iteration(gateway: FakeGateway) -> None:
    async with connect(gateway.url, "u-7", backoff=fast_backoff()) as client:
        await next_event(client)
        gateway.reject_status = 401
        gateway.drop_all()
        with pytest.raises(HandshakeRejected) as info:
            await collect_until(client, lambda ev: False)
        assert info.value.status == 401


async def test_set_token_switches_user_on_reconnect(gateway: FakeGateway) -> None:
    async with connect(gateway.url, "u-7", backoff=fast_backoff()) as client:
        gateway.publish("user:u-7", "balance", balance("1.00"))
        await collect_until(client, lambda ev: ev[-1].event == "balance")
        assert client.state("user:u-7") != {}
        client.set_token("u-8")
        assert "user:u-7" not in client.positions and client.state("user:u-7") == {}
        client.reconnect()
        events = await collect_until(client, lambda ev: ev[-1].event == "connected")
        assert events[0].event == "disconnected" and events[0].data.delay == 0
        assert client.user_id == "u-8" and gateway.auth_headers[-1] == "Bearer u-8"
        assert "user:u-7" not in (gateway.handshakes[-1] or {}).get("recover", {})
        gateway.publish("user:u-8", "balance", balance("8.00"))
        pushed = await next_event(client, "settings")
        assert (pushed.channel, pushed.data.balance) == ("user:u-8", "8.00")
