"""The session state machine: transitions, settings semantics, recover rules, and a fuzzer.

`Session.handle_frame` promises never to raise and to answer every bad input with an `error`
frame carrying one of the documented codes; the hypothesis tests below feed it arbitrary bytes,
text and JSON and check every frame that comes back against the AsyncAPI document.
"""

from __future__ import annotations

import json
from typing import Any, get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igratech_ws.contract import validate_frame
from igratech_ws.core.codec import ProtocolError
from igratech_ws.core.messages import (
    ChannelState,
    ErrorCode,
    SettingsRequest,
    StreamPositionData,
)
from igratech_ws.core.session import Reply, Session, SessionState, SettingsPlan

NOW = "2026-11-23T19:45:00Z"
DOCUMENTED_CODES = frozenset(get_args(ErrorCode))
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(event: Any, data: Any = None, **extra: Any) -> bytes:
    envelope: dict[str, Any] = {"event": event, **extra}
    if data is not None:
        envelope["data"] = data
    return json.dumps(envelope).encode()


def reply_of(action: object) -> dict[str, Any]:
    assert isinstance(action, Reply), action
    validate_frame(action.frame, sender="server")
    parsed: dict[str, Any] = json.loads(action.frame)
    return parsed


def error_of(action: object) -> dict[str, Any]:
    parsed = reply_of(action)
    assert parsed["event"] == "error", parsed
    data: dict[str, Any] = parsed["data"]
    return data


def plan_of(session: Session, **request: Any) -> SettingsPlan:
    return session.plan_settings(SettingsRequest(**request))


def pos(offset: int, epoch: str = "e1") -> StreamPositionData:
    return StreamPositionData(offset=offset, epoch=epoch)


def snapshot(session: Session) -> tuple[list[str], bool, list[str]]:
    return list(session.games), session.stats, list(session.subscribed)


@pytest.fixture
def anon() -> Session:
    return Session("s-anon", None, max_games=3)


@pytest.fixture
def user() -> Session:
    return Session("s-user", "u-1", max_games=3)


# --- lifecycle --------------------------------------------------------------------------------


def test_new_session_is_open_and_follows_nothing(anon: Session) -> None:
    assert anon.state is SessionState.OPEN
    assert (anon.games, anon.stats, anon.subscribed) == ([], False, [])
    assert anon.own_channels() == ()


def test_own_channels_of_an_authenticated_session(user: Session) -> None:
    assert user.own_channels() == ("user:u-1",)


def state_of(session: Session) -> SessionState:
    return session.state


def test_states_only_move_forward(anon: Session) -> None:
    assert anon.begin_close() is True
    assert state_of(anon) is SessionState.CLOSING
    assert anon.begin_close() is False
    assert state_of(anon) is SessionState.CLOSING
    anon.closed()
    assert state_of(anon) is SessionState.CLOSED
    assert anon.begin_close() is False
    assert state_of(anon) is SessionState.CLOSED


def test_closed_without_closing_first(anon: Session) -> None:
    anon.closed()
    assert anon.state is SessionState.CLOSED
    assert anon.begin_close() is False


@pytest.mark.parametrize(
    "raw",
    [
        frame("ping", {"ts": 1}),
        frame("settings", {"games": ["g-1"]}),
        b"not json",
        frame("nope"),
    ],
)
def test_frames_after_begin_close_are_ignored(anon: Session, raw: bytes) -> None:
    anon.begin_close()
    before = snapshot(anon)
    assert anon.handle_frame(raw, server_time=NOW) is None
    anon.closed()
    assert anon.handle_frame(raw, server_time=NOW) is None
    assert snapshot(anon) == before


def test_connected_frame_follows_the_contract(user: Session) -> None:
    states = [ChannelState(channel="user:u-1", offset=3, epoch="e1", recovered=True)]
    raw = user.connected_frame(
        server_time=NOW, ping_interval=25, idle_timeout=60, node="n-1", channels=states
    )
    validate_frame(raw, sender="server")
    assert json.loads(raw) == {
        "event": "connected",
        "data": {
            "status": "connected",
            "serverTime": NOW,
            "sessionId": "s-user",
            "userId": "u-1",
            "pingInterval": 25,
            "idleTimeout": 60,
            "protocolVersion": "1.0",
            "node": "n-1",
            "channels": [{"channel": "user:u-1", "offset": 3, "epoch": "e1", "recovered": True}],
        },
    }


def test_connected_frame_of_an_anonymous_session(anon: Session) -> None:
    raw = anon.connected_frame(
        server_time=NOW, ping_interval=25, idle_timeout=60, node="n-1", channels=[]
    )
    validate_frame(raw, sender="server")
    data = json.loads(raw)["data"]
    assert data["channels"] == []
    # `userId` is omitted (or null) for anonymous connections: never another value.
    assert data.get("userId") is None


# --- ping -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ts", [123, 1.5, "client-ts", None])
def test_ping_is_answered_with_pong_echoing_ts(anon: Session, ts: Any) -> None:
    answer = reply_of(anon.handle_frame(frame("ping", {"ts": ts}), server_time=NOW))
    assert answer["event"] == "pong"
    assert answer["data"]["serverTime"] == NOW
    assert answer["data"].get("ts") == ts


def test_ping_without_data(anon: Session) -> None:
    answer = reply_of(anon.handle_frame(b'{"event":"ping"}', server_time=NOW))
    assert answer == {"event": "pong", "data": {"serverTime": NOW}}


def test_the_clock_is_asked_only_for_a_pong(anon: Session) -> None:
    asked: list[int] = []

    def clock() -> str:
        asked.append(1)
        return NOW

    anon.handle_frame(frame("settings", {"games": ["g-1"]}), server_time=clock)
    anon.handle_frame(b"not json", server_time=clock)
    assert asked == []
    answer = reply_of(anon.handle_frame(b'{"event":"ping"}', server_time=clock))
    assert answer == {"event": "pong", "data": {"serverTime": NOW}}
    assert asked == [1]


def test_ping_accepts_str_frames(anon: Session) -> None:
    answer = reply_of(anon.handle_frame('{"event":"ping","data":{"ts":7}}', server_time=NOW))
    assert answer["data"]["ts"] == 7


# --- error answers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [
        (b"{", "bad_json", None),
        (b"", "bad_json", None),
        (b"\xff\xfe", "bad_json", None),
        (b"[]", "bad_message", None),
        (b'"ping"', "bad_message", None),
        (b'{"data":{}}', "bad_message", None),
        (b'{"event":1}', "bad_message", "event"),
        (b'{"event":"ping","extra":1}', "bad_message", None),
        (b'{"event":"subscribe"}', "unknown_event", None),
        (b'{"event":"pong","data":{}}', "unknown_event", None),
        (b'{"event":"ping","data":{"foo":1}}', "bad_message", "data"),
        (b'{"event":"ping","data":{"ts":[1]}}', "bad_message", "data.ts"),
        (b'{"event":"ping","data":[]}', "bad_message", "data"),
        (b'{"event":"settings","data":[]}', "invalid_settings", "data"),
        (b'{"event":"settings","data":{"games":"g-1"}}', "invalid_settings", "data.games"),
        (b'{"event":"settings","data":{"games":[1]}}', "invalid_settings", "data.games[0]"),
        (b'{"event":"settings","data":{"games":["g 1"]}}', "invalid_settings", "data.games[0]"),
        (
            b'{"event":"settings","data":{"follow":["ok","-bad"]}}',
            "invalid_settings",
            "data.follow[1]",
        ),
        (b'{"event":"settings","data":{"stats":"yes"}}', "invalid_settings", "data.stats"),
        (b'{"event":"settings","data":{"bogus":true}}', "invalid_settings", "data"),
    ],
)
def test_bad_input_becomes_a_documented_error(
    anon: Session, raw: bytes, code: str, field: str | None
) -> None:
    before = snapshot(anon)
    error = error_of(anon.handle_frame(raw, server_time=NOW))
    assert error["code"] == code
    assert error.get("field") == field
    assert error["message"]
    assert snapshot(anon) == before
    assert anon.state is SessionState.OPEN


def test_errors_name_the_event(anon: Session) -> None:
    error = error_of(
        anon.handle_frame(b'{"event":"settings","data":{"games":[1]}}', server_time=NOW)
    )
    assert error["event"] == "settings"
    error = error_of(anon.handle_frame(b'{"event":"frobnicate"}', server_time=NOW))
    assert error["event"] == "frobnicate"


def test_unknown_event_name_is_cut_to_64_chars(anon: Session) -> None:
    error = error_of(anon.handle_frame(frame("x" * 5000), server_time=NOW))
    assert error["code"] == "unknown_event"
    assert error["event"] == "x" * 64
    assert len(error["message"]) <= 500


# --- settings semantics -----------------------------------------------------------------------


def test_first_plan_adds_the_user_channel(user: Session) -> None:
    plan = plan_of(user)
    assert plan == SettingsPlan(add=("user:u-1",), remove=(), recover={})
    assert user.subscribed == ["user:u-1"]
    assert plan_of(user) == SettingsPlan(add=(), remove=(), recover={})


def test_anonymous_first_plan_adds_nothing(anon: Session) -> None:
    assert plan_of(anon) == SettingsPlan(add=(), remove=(), recover={})
    assert anon.subscribed == []


def test_settings_through_handle_frame_returns_the_plan(user: Session) -> None:
    action = user.handle_frame(
        frame("settings", {"games": ["g-1"], "stats": True}), server_time=NOW
    )
    assert action == SettingsPlan(add=("user:u-1", "game:g-1", "global"), remove=(), recover={})


def test_games_replace_the_followed_set(anon: Session) -> None:
    assert plan_of(anon, games=["g-1", "g-2"]).add == ("game:g-1", "game:g-2")
    plan = plan_of(anon, games=["g-2", "g-3"])
    assert (plan.add, plan.remove) == (("game:g-3",), ("game:g-1",))
    assert anon.games == ["g-2", "g-3"]
    assert anon.subscribed == ["game:g-2", "game:g-3"]


def test_games_are_deduplicated_in_order(anon: Session) -> None:
    plan = plan_of(anon, games=["g-2", "g-1", "g-2"])
    assert anon.games == ["g-2", "g-1"]
    assert plan.add == ("game:g-2", "game:g-1")
    plan = plan_of(anon, follow=["g-3", "g-1", "g-3"])
    assert anon.games == ["g-2", "g-1", "g-3"]
    assert plan.add == ("game:g-3",)


@pytest.mark.parametrize("name", ["games", "follow", "unfollow"])
def test_a_list_longer_than_the_game_limit_is_refused_before_any_work(
    anon: Session, name: str
) -> None:
    """Duplicates included: the bound is on what the client sent, checked before the work."""
    plan_of(anon, games=["g-1"])
    before = snapshot(anon)
    with pytest.raises(ProtocolError) as caught:
        anon.plan_settings(SettingsRequest(**{name: ["g-1"] * 4}))
    assert (caught.value.code, caught.value.field) == ("too_many_games", f"data.{name}")
    assert snapshot(anon) == before


def test_a_recover_map_longer_than_the_limit_is_refused(user: Session) -> None:
    recover = {f"game:g-{i}": StreamPositionData(offset=1, epoch="e") for i in range(6)}
    with pytest.raises(ProtocolError) as caught:
        user.plan_settings(SettingsRequest(recover=recover))
    assert (caught.value.code, caught.value.field) == ("too_many_games", "data.recover")


def test_empty_games_unfollows_everything(anon: Session) -> None:
    plan_of(anon, games=["g-1", "g-2"], stats=True)
    plan = plan_of(anon, games=[])
    assert plan.remove == ("game:g-1", "game:g-2")
    assert anon.games == []
    assert anon.subscribed == ["global"]  # stats untouched when not given


def test_follow_and_unfollow_are_incremental(anon: Session) -> None:
    plan_of(anon, games=["g-1"])
    plan = plan_of(anon, follow=["g-2", "g-1", "g-2"])
    assert (plan.add, plan.remove) == (("game:g-2",), ())
    assert anon.games == ["g-1", "g-2"]
    plan = plan_of(anon, unfollow=["g-1", "g-9"])
    assert (plan.add, plan.remove) == ((), ("game:g-1",))
    assert anon.games == ["g-2"]


def test_follow_and_unfollow_apply_after_games(anon: Session) -> None:
    plan_of(anon, games=["g-1"])
    plan_of(anon, games=["g-2", "g-3"], follow=["g-4"], unfollow=["g-3", "g-4"])
    assert anon.games == ["g-2"]
    assert anon.subscribed == ["game:g-2"]


def test_unfollow_wins_over_follow_in_one_request(anon: Session) -> None:
    plan_of(anon, follow=["g-1"], unfollow=["g-1"])
    assert anon.games == []


def test_stats_switch_the_global_channel(anon: Session) -> None:
    assert plan_of(anon, stats=True).add == ("global",)
    assert anon.stats is True
    assert plan_of(anon, games=["g-1"]).add == ("game:g-1",)
    assert anon.stats is True  # None keeps the current value
    plan = plan_of(anon, stats=False)
    assert (plan.add, plan.remove) == ((), ("global",))
    assert anon.stats is False
    assert plan_of(anon, stats=False) == SettingsPlan(add=(), remove=(), recover={})


def test_the_user_channel_is_never_removed(user: Session) -> None:
    plan_of(user, games=["g-1"], stats=True)
    plan = plan_of(user, games=[], stats=False)
    assert "user:u-1" not in plan.remove
    assert user.subscribed == ["user:u-1"]


def test_subscribed_keeps_the_order_channels_were_added(anon: Session) -> None:
    plan_of(anon, games=["g-1", "g-2"])
    plan_of(anon, stats=True)
    plan_of(anon, follow=["g-0"])
    assert anon.subscribed == ["game:g-1", "game:g-2", "global", "game:g-0"]


def test_settings_answer_reports_games_stats_and_positions(user: Session) -> None:
    plan_of(user, games=["g-1"], stats=True)
    raw = user.settings_answer(
        [
            ChannelState(channel="user:u-1", offset=0, epoch="e0"),
            ChannelState(channel="game:g-1", offset=7, epoch="e1", recovered=True),
        ]
    )
    validate_frame(raw, sender="server")
    assert json.loads(raw) == {
        "event": "settings",
        "data": {
            "games": ["g-1"],
            "stats": True,
            "channels": [
                {"channel": "user:u-1", "offset": 0, "epoch": "e0"},
                {"channel": "game:g-1", "offset": 7, "epoch": "e1", "recovered": True},
            ],
        },
    }


# --- limits -----------------------------------------------------------------------------------


def test_too_many_games(anon: Session) -> None:
    plan_of(anon, games=["g-1"])
    before = snapshot(anon)
    with pytest.raises(ProtocolError) as caught:
        plan_of(anon, games=["a", "b", "c", "d"])
    assert caught.value.code == "too_many_games"
    assert caught.value.field == "data.games"
    assert snapshot(anon) == before


def test_too_many_games_through_follow(anon: Session) -> None:
    plan_of(anon, games=["a", "b", "c"])
    error = error_of(anon.handle_frame(frame("settings", {"follow": ["d"]}), server_time=NOW))
    assert error["code"] == "too_many_games"
    assert anon.games == ["a", "b", "c"]


def test_the_limit_counts_distinct_games_after_unfollow(anon: Session) -> None:
    # Each list is within the limit; the result is counted after follow and unfollow.
    plan_of(anon, games=["a", "b", "a"])
    plan_of(anon, games=["a", "b", "c"], follow=["d"], unfollow=["d"])
    assert anon.games == ["a", "b", "c"]


# --- recover rules ----------------------------------------------------------------------------


def test_recover_a_game_added_by_the_same_request(anon: Session) -> None:
    plan = plan_of(anon, games=["g-1"], recover={"game:g-1": pos(5, "ab12")})
    assert plan.recover == {"game:g-1": (5, "ab12")}


def test_recover_the_global_channel_when_switching_stats_on(anon: Session) -> None:
    plan = plan_of(anon, stats=True, recover={"global": pos(0)})
    assert plan.recover == {"global": (0, "e1")}


def test_recover_the_own_user_channel_in_the_first_plan(user: Session) -> None:
    plan = plan_of(user, recover={"user:u-1": pos(3)})
    assert plan.add == ("user:u-1",)
    assert plan.recover == {"user:u-1": (3, "e1")}


@pytest.mark.parametrize(
    ("session_user", "channel"),
    [
        ("u-1", "user:u-2"),
        (None, "user:u-1"),
        (None, "nonsense"),
        ("u-1", "game:"),
        ("u-1", "game:bad id"),
        ("u-1", "user:"),
    ],
)
def test_recover_forbidden_channel(session_user: str | None, channel: str) -> None:
    session = Session("s", session_user, max_games=3)
    before = snapshot(session)
    action = session.handle_frame(
        frame("settings", {"games": ["g-1"], "recover": {channel: {"offset": 1, "epoch": "e"}}}),
        server_time=NOW,
    )
    error = error_of(action)
    assert error["code"] == "forbidden_channel"
    assert error["field"] == f"data.recover.{channel}"
    assert error["event"] == "settings"
    assert snapshot(session) == before  # nothing was committed


def test_recover_a_channel_not_followed_is_invalid_settings(anon: Session) -> None:
    with pytest.raises(ProtocolError) as caught:
        plan_of(anon, games=["g-1"], recover={"game:g-2": pos(1)})
    assert caught.value.code == "invalid_settings"
    assert caught.value.field == "data.recover.game:g-2"
    assert anon.games == []
    with pytest.raises(ProtocolError) as caught:
        plan_of(anon, recover={"global": pos(1)})
    assert caught.value.code == "invalid_settings"


def test_recover_a_channel_unfollowed_by_the_same_request(anon: Session) -> None:
    with pytest.raises(ProtocolError) as caught:
        plan_of(anon, games=["g-1"], unfollow=["g-1"], recover={"game:g-1": pos(1)})
    assert caught.value.code == "invalid_settings"


def test_recover_a_channel_already_followed_is_too_late(anon: Session) -> None:
    plan_of(anon, games=["g-1"])
    with pytest.raises(ProtocolError) as caught:
        plan_of(anon, games=["g-1", "g-2"], recover={"game:g-1": pos(1)})
    assert caught.value.code == "recover_too_late"
    assert caught.value.field == "data.recover.game:g-1"
    assert anon.games == ["g-1"]  # the whole request was refused


def test_recover_the_user_channel_after_the_first_plan_is_too_late(user: Session) -> None:
    plan_of(user)
    action = user.handle_frame(
        frame("settings", {"recover": {"user:u-1": {"offset": 1, "epoch": "e"}}}), server_time=NOW
    )
    assert error_of(action)["code"] == "recover_too_late"


def test_recover_field_cuts_long_channel_names(anon: Session) -> None:
    channel = "game:" + "x" * 60 + "\u00e9" * 40
    with pytest.raises(ProtocolError) as caught:
        plan_of(anon, recover={channel: pos(1)})
    assert caught.value.code == "forbidden_channel"
    assert caught.value.field == "data.recover." + channel[:80]


# --- fuzzing ----------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["g-1", "g-2", "game:g-1", "user:u-1", "global", "e1"])
)
json_keys = st.sampled_from(
    [
        "games",
        "follow",
        "unfollow",
        "stats",
        "recover",
        "ts",
        "offset",
        "epoch",
        "game:g-1",
        "user:u-1",
        "user:u-2",
        "global",
    ]
) | st.text(max_size=10)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(json_keys, children, max_size=5)
    ),
    max_leaves=15,
)


def check_action(session: Session, action: object, event: object = None) -> None:
    """Every answer to a client frame is a contract-valid pong or error, or a consistent plan."""
    assert action is not None  # the session is open: every frame gets an answer
    if isinstance(action, SettingsPlan):
        assert event in (None, "settings")
        assert set(action.recover) <= set(action.add)
        assert len(session.games) <= session.max_games
        assert len(set(session.subscribed)) == len(session.subscribed)
        assert set(session.own_channels()) <= set(session.subscribed)
        return
    parsed = reply_of(action)
    if parsed["event"] == "error":
        assert parsed["data"]["code"] in DOCUMENTED_CODES
    else:
        assert parsed["event"] == "pong"
        assert event in (None, "ping")


@FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    session = Session("s", "u-1", max_games=3)
    check_action(session, session.handle_frame(raw, server_time=NOW))


@FUZZ
@given(raw=st.text(max_size=200))
def test_fuzz_arbitrary_text(raw: str) -> None:
    session = Session("s", "u-1", max_games=3)
    check_action(session, session.handle_frame(raw, server_time=NOW))


@FUZZ
@given(envelope=json_values)
def test_fuzz_arbitrary_json_frames(envelope: Any) -> None:
    session = Session("s", "u-1", max_games=3)
    check_action(session, session.handle_frame(json.dumps(envelope).encode(), server_time=NOW))


@FUZZ
@given(
    event=st.sampled_from(["ping", "settings"]),
    data=json_values,
    history=st.lists(json_values, max_size=3),
)
def test_fuzz_arbitrary_data(event: str, data: Any, history: list[Any]) -> None:
    session = Session("s", "u-1", max_games=3)
    for earlier in history:  # some state first, so that recover and unfollow rules come into play
        session.handle_frame(frame("settings", earlier), server_time=NOW)
    before = snapshot(session)
    action = session.handle_frame(json.dumps({"event": event, "data": data}), server_time=NOW)
    check_action(session, action, event)
    if isinstance(action, Reply):
        assert snapshot(session) == before  # refused requests change nothing


game_ids = st.sampled_from(["g-1", "g-2", "g-3", "g-4", "bad id"])
channel_names = st.sampled_from(
    ["game:g-1", "game:g-2", "game:g-5", "user:u-1", "user:u-2", "global", "junk"]
)
settings_requests = st.fixed_dictionaries(
    {},
    optional={
        "games": st.lists(game_ids, max_size=5),
        "follow": st.lists(game_ids, max_size=3),
        "unfollow": st.lists(game_ids, max_size=3),
        "stats": st.booleans(),
        "recover": st.dictionaries(
            channel_names,
            st.fixed_dictionaries(
                {"offset": st.integers(-1, 5), "epoch": st.sampled_from(["e1", ""])}
            ),
            max_size=2,
        ),
    },
)


@FUZZ
@given(requests=st.lists(settings_requests, min_size=1, max_size=6))
def test_fuzz_settings_sequences_keep_the_session_consistent(requests: list[Any]) -> None:
    """A model check: after every accepted request, subscriptions equal what the settings imply."""
    session = Session("s", "u-1", max_games=3)
    subscribed: set[str] = set()
    for request in requests:
        action = session.handle_frame(frame("settings", request), server_time=NOW)
        check_action(session, action, "settings")
        if isinstance(action, SettingsPlan):
            assert not set(action.add) & subscribed
            assert set(action.remove) <= subscribed
            subscribed = (subscribed - set(action.remove)) | set(action.add)
            for channel in action.recover:
                assert channel not in set(session.subscribed) - set(action.add)
        expected = {"user:u-1"} | {f"game:{g}" for g in session.games}
        if session.stats:
            expected.add("global")
        if session.subscribed:  # before the first accepted plan nothing is in force
            assert set(session.subscribed) == expected == subscribed


# --- known bugs -------------------------------------------------------------------------------


def test_handle_frame_with_a_lone_surrogate_never_raises(anon: Session) -> None:
    action = anon.handle_frame('{"event":"ping","data":{"ts":"\ud800"}}', server_time=NOW)
    assert error_of(action)["code"] == "bad_json"
