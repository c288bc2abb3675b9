"""The node with fake connections on a real MemoryBroker: single session, control messages from
other nodes, timers (driven by calling `sweep` with chosen clocks), the settings queue bound, info.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from igratech_ws.brokers.base import BrokerState, UserLogin, UserLogout
from igratech_ws.config import Config
from igratech_ws.core.close_codes import CloseCode
from igratech_ws.node import MAX_EARLY_FRAMES, MAX_QUEUED_SETTINGS, Node
from tests.support.fakes import MONO, NOW, FakeConnection, RecordingBroker, connect, settle, text

INCIDENT = json.dumps(
    {"gameId": "g-1", "incidentId": "i-1", "type": "goal", "occurredAt": "2026-11-23T19:45:00Z"}
).encode()


@pytest.fixture
async def node(broker: RecordingBroker) -> AsyncIterator[Node]:
    # No flush waits for the real clock: `settle` drives everything, whatever the load.
    config = Config(
        idle_timeout=60,
        ping_interval=25,
        max_games_per_connection=50,
        message_burst=1000,
        max_flush_delay=0.0,
    )
    node = Node(config, broker)
    # Node.start would also start the once-a-second sweeper on the real clock; tests call sweep().
    await broker.start(node.hub.on_publication, node.on_control, node.on_broker_state)
    yield node
    await node.close()


# --- accept -----------------------------------------------------------------------------------


async def test_accept_greets_and_subscribes_the_user_channel(
    node: Node, broker: RecordingBroker
) -> None:
    a = connect(node, "u-1")
    await settle()
    assert a.events() == ["connected"]
    assert node.hub.subscriber_count("user:u-1") == 1
    broker.publish_now(
        "user:u-1",
        "balance",
        b'{"balance":"1.00","currency":"EUR","updatedAt":"2026-11-23T19:45:00Z"}',
    )
    await settle()
    assert a.events() == ["connected", "balance"]


async def test_handshake_settings_are_answered_before_any_push(
    node: Node, broker: RecordingBroker
) -> None:
    a = connect(node, "u-1", settings={"games": ["g-1"], "stats": True})
    await settle()
    frames = a.frames()
    assert [f["event"] for f in frames] == ["connected", "settings"]
    answer = frames[1]["data"]
    assert answer["games"] == ["g-1"] and answer["stats"] is True
    assert [c["channel"] for c in answer["channels"]] == ["user:u-1", "game:g-1", "global"]


# --- connected: the line from which nothing is missed (D5) -------------------------------------


BALANCE = b'{"balance":"1.00","currency":"EUR","updatedAt":"2026-11-23T19:45:00Z"}'


async def test_connected_waits_for_the_user_channel_and_carries_its_position(
    node: Node, broker: RecordingBroker
) -> None:
    """On main `connected` went out before the user channel's join completed: a balance
    published right after it could be lost, and `connected` carried no position to resume."""
    for _ in range(3):
        broker.publish_now("user:u-1", "balance", BALANCE)
    broker.gate.clear()  # the join's broker round trip is held
    a = connect(node, "u-1")
    await settle()
    assert a.frames() == []  # nothing before the join: not even `connected`
    broker.gate.set()
    await settle()
    connected, snapshot = a.frames()
    epoch = (await broker.position("user:u-1")).epoch
    assert connected["data"]["channels"] == [{"channel": "user:u-1", "offset": 3, "epoch": epoch}]
    # The current balance at once (D9): the latest state, at the held position, marked.
    assert (snapshot["event"], snapshot["offset"], snapshot["epoch"]) == ("balance", 3, epoch)
    assert snapshot["snapshot"] is True
    broker.publish_now("user:u-1", "balance", BALANCE)  # right after `connected`
    await settle()
    frames = a.frames()
    assert [f.get("offset") for f in frames] == [None, 3, 4]
    assert "snapshot" not in frames[2]


async def test_connected_of_an_anonymous_connection_without_settings_is_immediate(
    node: Node, broker: RecordingBroker
) -> None:
    broker.gate.clear()
    a = connect(node, None)
    await settle()
    assert a.frames()[0]["data"]["channels"] == []
    broker.gate.set()


async def test_a_resume_in_the_handshake_is_told_in_connected_then_replayed(
    node: Node, broker: RecordingBroker
) -> None:
    for _ in range(5):
        broker.publish_now("user:u-1", "balance", BALANCE)
    epoch = (await broker.position("user:u-1")).epoch
    a = connect(
        node,
        "u-1",
        settings={"games": ["g-1"], "recover": {"user:u-1": {"offset": 2, "epoch": epoch}}},
    )
    await settle()
    frames = a.frames()
    assert [f["event"] for f in frames] == [
        "connected",
        "settings",
        "balance",
        "balance",
        "balance",
    ]
    states = {c["channel"]: c for c in frames[0]["data"]["channels"]}
    assert states["user:u-1"] == {
        "channel": "user:u-1",
        "offset": 5,
        "epoch": epoch,
        "recovered": True,
    }
    assert "recovered" not in states["game:g-1"]
    assert frames[1]["data"]["channels"] == frames[0]["data"]["channels"]
    assert [f["offset"] for f in frames[2:]] == [3, 4, 5]


async def test_frames_sent_before_connected_are_carried_out_after_it_in_order(
    node: Node, broker: RecordingBroker
) -> None:
    broker.gate.clear()
    a = connect(node, "u-1")
    text(node, a, "ping", {"ts": 1})
    text(node, a, "settings", {"games": ["g-1"]})
    node.on_text(a, b"garbage")
    text(node, a, "ping", {"ts": 2})
    await settle()
    assert a.frames() == []
    broker.gate.set()
    await settle()
    # Carried out in order; a settings answer comes once its joins are done, as ever.
    assert a.events() == ["connected", "pong", "error", "pong", "settings"]
    assert [f["data"].get("ts") for f in a.frames() if f["event"] == "pong"] == [1, 2]
    assert node.hub.subscriber_count("game:g-1") == 1


async def test_frames_held_before_connected_are_bounded(
    node: Node, broker: RecordingBroker
) -> None:
    broker.gate.clear()
    a = connect(node, "u-1")
    for i in range(MAX_EARLY_FRAMES):
        text(node, a, "ping", {"ts": i})
    assert a.closes == []
    text(node, a, "ping", {"ts": "one too many"})
    assert a.closes == [CloseCode.POLICY_VIOLATION]
    broker.gate.set()
    await settle()
    assert a.frames() == []
    assert node._greeting == {}
    assert node.hub.subscriber_count("user:u-1") == 0


async def test_a_connection_closed_while_joining_leaves_nothing_behind(
    node: Node, broker: RecordingBroker
) -> None:
    broker.gate.clear()
    a = connect(node, "u-1", settings={"games": ["g-1", "g-2"]})
    await settle()
    a.close_with(CloseCode.IDLE_TIMEOUT)
    broker.gate.set()
    await settle()
    assert a.frames() == []
    assert node._greeting == {}
    assert node.hub.channel_count == 0


async def test_settings_through_text_frames(node: Node) -> None:
    a = connect(node, None)
    text(node, a, "settings", {"games": ["g-1", "g-2"]})
    await settle()
    text(node, a, "settings", {"unfollow": ["g-1"]})
    await settle()
    answers = [f["data"] for f in a.frames() if f["event"] == "settings"]
    assert [[c["channel"] for c in ans["channels"]] for ans in answers] == [
        ["game:g-1", "game:g-2"],
        ["game:g-2"],
    ]
    assert node.hub.subscriber_count("game:g-1") == 0
    assert node.hub.subscriber_count("game:g-2") == 1


async def test_ping_and_errors_go_back_in_order(node: Node) -> None:
    a = connect(node, None)
    text(node, a, "ping", {"ts": 1})
    node.on_text(a, b"garbage")
    text(node, a, "ping", {"ts": 2})
    await settle()
    assert a.events() == ["connected", "pong", "error", "pong"]
    assert a.errors() == ["bad_json"]


# --- single session ---------------------------------------------------------------------------


async def test_newest_login_wins_locally(node: Node) -> None:
    old = connect(node, "u-1", at=NOW)
    await settle()  # greeted: its logout is a `logout` frame, then the close
    new = connect(node, "u-1", at=NOW + 1)
    other = connect(node, "u-2", at=NOW + 2)
    await settle()
    assert old.closes == [CloseCode.LOGGED_IN_ELSEWHERE]
    logout = old.frames()[-1]
    assert logout["event"] == "logout"
    assert logout["data"]["reason"] == "logged_in_elsewhere"
    assert logout["data"]["code"] == 4001
    assert new.closes == [] and new.open
    assert other.closes == []
    assert node.connection_count == 2
    assert node.hub.subscriber_count("user:u-1") == 1


async def test_a_login_before_the_older_one_was_greeted_closes_it_without_frames(
    node: Node,
) -> None:
    """`connected` is always the first frame: a connection logged out while its own channels are
    still being joined gets nothing but the close code (issue 10, D5)."""
    old = connect(node, "u-1", at=NOW)
    new = connect(node, "u-1", at=NOW + 1)
    await settle()
    assert old.closes == [CloseCode.LOGGED_IN_ELSEWHERE]
    assert old.frames() == []
    assert new.events() == ["connected"]
    assert node.hub.subscriber_count("user:u-1") == 1


async def test_single_session_holds_across_three_logins(node: Node) -> None:
    first = connect(node, "u-1", at=NOW)
    second = connect(node, "u-1", at=NOW + 1)
    assert node.user_connection_count("u-1") == 1
    third = connect(node, "u-1", at=NOW + 2)
    await settle()
    assert first.closes == [CloseCode.LOGGED_IN_ELSEWHERE]
    assert second.closes == [CloseCode.LOGGED_IN_ELSEWHERE]
    assert third.closes == []
    assert await node.logout_user("u-1") == 1


async def test_anonymous_connections_are_not_single_session(node: Node) -> None:
    connections = [connect(node, None) for _ in range(3)]
    await settle()
    assert all(c.closes == [] for c in connections)
    assert node.connection_count == 3


async def test_user_login_elsewhere_logs_out_older_local_connections(node: Node) -> None:
    older = connect(node, "u-1", at=NOW, session_id="s-b")
    await settle()
    node.on_control(
        UserLogin(origin="n-other", user_id="u-1", session_id="s-x", connected_at=NOW + 1)
    )
    await settle()
    assert older.closes == [CloseCode.LOGGED_IN_ELSEWHERE]
    assert older.events()[-1] == "logout"


async def test_user_login_elsewhere_keeps_newer_local_connections(node: Node) -> None:
    newer = connect(node, "u-1", at=NOW + 10)
    node.on_control(UserLogin(origin="n-other", user_id="u-1", session_id="s-x", connected_at=NOW))
    await settle()
    assert newer.closes == []


async def test_simultaneous_logins_are_settled_by_session_id(node: Node) -> None:
    mine = connect(node, "u-1", at=NOW, session_id="s-m")
    node.on_control(UserLogin(origin="n-other", user_id="u-1", session_id="s-a", connected_at=NOW))
    await settle()
    assert mine.closes == []  # ("s-m") > ("s-a"): mine is the newer one
    node.on_control(UserLogin(origin="n-other", user_id="u-1", session_id="s-z", connected_at=NOW))
    await settle()
    assert mine.closes == [CloseCode.LOGGED_IN_ELSEWHERE]


async def test_own_control_messages_are_ignored(node: Node) -> None:
    a = connect(node, "u-1", at=NOW)
    node.on_control(
        UserLogin(origin=node.node_id, user_id="u-1", session_id="s", connected_at=NOW + 5)
    )
    node.on_control(UserLogout(origin=node.node_id, user_id="u-1"))
    await settle()
    assert a.closes == []


@pytest.mark.parametrize(
    ("reason", "code"),
    [("forced", CloseCode.FORCED_LOGOUT), ("token_expired", CloseCode.TOKEN_EXPIRED)],
)
async def test_user_logout_from_another_node(node: Node, reason: Any, code: CloseCode) -> None:
    a = connect(node, "u-1")
    b = connect(node, "u-2")
    await settle()
    node.on_control(UserLogout(origin="n-other", user_id="u-1", reason=reason))
    await settle()
    assert a.closes == [code]
    logout = a.frames()[-1]
    assert (logout["event"], logout["data"]["reason"], logout["data"]["code"]) == (
        "logout",
        reason,
        int(code),
    )
    assert b.closes == []
    assert node.user_connection_count("u-1") == 0


async def test_logout_user_through_the_api(node: Node) -> None:
    a = connect(node, "u-1")
    assert await node.logout_user("u-1") == 1
    assert await node.logout_user("u-1") == 0
    assert a.closes == [CloseCode.FORCED_LOGOUT]


async def test_logout_of_a_closing_connection_sends_nothing(node: Node) -> None:
    a = connect(node, "u-1")
    await settle()
    a.session.begin_close()
    node.logout(a, "forced")
    await settle()
    assert a.events() == ["connected"]


# --- timers -----------------------------------------------------------------------------------


async def test_sweep_closes_idle_connections(node: Node) -> None:
    idle = connect(node, None)
    busy = connect(node, None)
    edge = connect(node, None)
    idle.last_seen = MONO - 61
    busy.last_seen = MONO - 1
    edge.last_seen = MONO - 60  # exactly the timeout: not yet
    node.sweep(MONO, NOW)
    assert idle.closes == [CloseCode.IDLE_TIMEOUT]
    assert busy.closes == [] and edge.closes == []
    assert node.connection_count == 2
    node.sweep(MONO + 0.5, NOW)
    assert edge.closes == [CloseCode.IDLE_TIMEOUT]


async def test_sweep_logs_out_expired_tokens(node: Node) -> None:
    expired = connect(node, "u-1")
    fresh = connect(node, "u-2")
    edge = connect(node, "u-3")
    await settle()
    expired.expires_at = NOW - 1
    fresh.expires_at = NOW + 100
    edge.expires_at = NOW
    node.sweep(MONO, NOW)
    await settle()
    assert expired.closes == [CloseCode.TOKEN_EXPIRED]
    assert expired.frames()[-1]["data"]["reason"] == "token_expired"
    assert edge.closes == [CloseCode.TOKEN_EXPIRED]
    assert fresh.closes == []


async def test_expiry_wins_over_idleness(node: Node) -> None:
    a = connect(node, "u-1")
    a.expires_at = NOW - 1
    a.last_seen = MONO - 1000
    node.sweep(MONO, NOW)
    assert a.closes == [CloseCode.TOKEN_EXPIRED]


# --- settings queue ---------------------------------------------------------------------------


async def _flood(node: Node, broker: RecordingBroker, count: int) -> FakeConnection:
    """`count` settings requests while the first is held inside the broker."""
    a = connect(node, None)
    await settle()
    broker.gate.clear()
    for i in range(count):
        text(node, a, "settings", {"follow": [f"g-{i}"]})
        await settle()
    return a


async def test_settings_queue_is_bounded(node: Node, broker: RecordingBroker) -> None:
    a = await _flood(node, broker, 30)
    errors = a.errors()
    assert errors and set(errors) == {"rate_limited"}
    assert len(errors) >= 30 - (MAX_QUEUED_SETTINGS + 1)
    broker.gate.set()
    await settle(100)
    answers = [f for f in a.frames() if f["event"] == "settings"]
    assert len(answers) == 30 - len(errors)
    assert a.closes == []


async def test_the_ninth_waiting_settings_request_is_rate_limited(
    node: Node, broker: RecordingBroker
) -> None:
    a = await _flood(node, broker, 1 + MAX_QUEUED_SETTINGS)  # one in progress, 8 waiting
    assert a.errors() == []
    text(node, a, "settings", {"follow": ["g-last"]})
    await settle()
    assert a.errors() == ["rate_limited"]
    broker.gate.set()


async def test_a_rate_limited_request_can_be_sent_again(
    node: Node, broker: RecordingBroker
) -> None:
    a = await _flood(node, broker, 20)
    assert "rate_limited" in a.errors()
    broker.gate.set()
    await settle(100)
    text(node, a, "settings", {"follow": ["g-19"]})  # the last one was refused: send it again
    await settle()
    broker.publish_now("game:g-19", "incident", INCIDENT.replace(b"g-1", b"g-19"))
    await settle()
    assert node.hub.subscriber_count("game:g-19") == 1
    assert "incident" in a.events()


# --- broker state, drain, info ----------------------------------------------------------------


async def test_broker_reconnect_resyncs_followers(node: Node, broker: RecordingBroker) -> None:
    a = connect(node, None, settings={"games": ["g-1"]})
    await settle()
    broker.publish_now("game:g-1", "incident", INCIDENT)
    broker.lose_subscription("game:g-1")
    broker.publish_now("game:g-1", "incident", INCIDENT)
    broker.publish_now("game:g-1", "incident", INCIDENT)
    broker.restore_subscription("game:g-1")
    node.on_broker_state(BrokerState.DISCONNECTED)
    node.on_broker_state(BrokerState.CONNECTED)
    await settle()
    assert [f["offset"] for f in a.frames() if f["event"] == "incident"] == [1, 2, 3]


async def test_a_connected_state_without_a_disconnect_does_not_resync(node: Node) -> None:
    connect(node, None, settings={"games": ["g-1"]})
    await settle()
    node.on_broker_state(BrokerState.CONNECTED)
    assert node.hub.resyncs == 0


async def test_drain_closes_everyone_with_1012(node: Node) -> None:
    connections = [connect(node, "u-1"), connect(node, None)]
    node.drain()
    assert node.draining and not node.ready
    assert [c.closes for c in connections] == [[CloseCode.SERVICE_RESTART]] * 2
    assert node.connection_count == 0


async def test_info_counts(node: Node) -> None:
    assert node.ready
    a = connect(node, "u-1", settings={"games": ["g-1"]})
    connect(node, "u-2")
    connect(node, None, settings={"games": ["g-1", "g-2"]})
    await settle()
    info = node.info()
    assert info["node"] == node.node_id
    assert (info["connections"], info["users"], info["channels"]) == (3, 2, 4)
    assert info["broker"] == "connected" and info["draining"] is False
    assert info["uptimeSeconds"] >= 0
    a.close_with(CloseCode.NORMAL)
    await settle()
    info = node.info()
    assert (info["connections"], info["users"], info["channels"]) == (2, 1, 3)
    assert node.closes == {1000: 1}
    assert node.connections_total == 3


async def test_closed_connections_are_forgotten_once(node: Node) -> None:
    a = connect(node, "u-1", settings={"games": ["g-1"]})
    await settle()
    node.on_closed(a, 1000)
    node.on_closed(a, 1000)
    assert node.closes == {1000: 1}
    assert node.hub.subscriber_count("game:g-1") == 0
    assert node.user_connection_count("u-1") == 0


# --- inbound limits ---------------------------------------------------------------------------


async def test_per_address_limit_closes_with_1013(broker: RecordingBroker) -> None:
    node = Node(Config(max_connections_per_ip=2), broker)
    await broker.start(node.hub.on_publication, node.on_control, node.on_broker_state)
    try:
        first = [connect(node, None, address="10.0.0.9") for _ in range(2)]
        refused = connect(node, None, address="10.0.0.9")
        elsewhere = connect(node, None, address="10.0.0.10")
        await settle()
        assert refused.closes == [CloseCode.TRY_AGAIN_LATER]
        assert refused.writes == []  # closed before it is greeted
        assert [c.closes for c in [*first, elsewhere]] == [[], [], []]
        first[0].close_with(CloseCode.NORMAL)
        again = connect(node, None, address="10.0.0.9")
        assert again.closes == []
    finally:
        await node.close()
