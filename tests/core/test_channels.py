"""Channel names, kinds, ids and who may follow what."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from igratech_ws.core import channels
from igratech_ws.core.messages import PUBLISHED_EVENTS


@pytest.mark.parametrize("value", ["g", "1", "g-1001", "A.b_c-9", "x" * 64, "0" + "-" * 63, "u-42"])
def test_valid_ids(value: str) -> None:
    assert channels.is_valid_id(value)


@pytest.mark.parametrize(
    "value", ["", "-g", ".g", "_g", "x" * 65, "g 1", "g:1", "g/1", "é", "g\t", "g\x00"]
)
def test_invalid_ids(value: str) -> None:
    assert not channels.is_valid_id(value)


def test_channel_names() -> None:
    assert channels.game_channel("g-1") == "game:g-1"
    assert channels.user_channel("u-1") == "user:u-1"
    assert channels.GLOBAL_CHANNEL == "global"


@pytest.mark.parametrize(
    ("channel", "kind"),
    [
        ("global", "global"),
        ("game:g-1", "game"),
        ("user:u-1", "user"),
        ("game:", None),
        ("user:", None),
        ("game:bad id", None),
        ("Global", None),
        ("global:x", None),
        ("games:g-1", None),
        ("", None),
        ("game:" + "x" * 65, None),
    ],
)
def test_channel_kind(channel: str, kind: str | None) -> None:
    assert channels.channel_kind(channel) == kind


@pytest.mark.parametrize(
    ("channel", "user_id", "allowed"),
    [
        ("global", None, True),
        ("global", "u-1", True),
        ("game:g-1", None, True),
        ("game:g-1", "u-1", True),
        ("user:u-1", "u-1", True),
        ("user:u-1", None, False),
        ("user:u-1", "u-2", False),
        ("user:u-1", "u-10", False),
        ("user:u-10", "u-1", False),
        ("junk", "u-1", False),
        ("game:", None, False),
    ],
)
def test_may_follow(channel: str, user_id: str | None, allowed: bool) -> None:
    assert channels.may_follow(channel, user_id) is allowed


def test_events_by_kind_and_targets_agree() -> None:
    assert set(channels.TARGETS_BY_EVENT) == set(PUBLISHED_EVENTS)
    for event, kinds in channels.TARGETS_BY_EVENT.items():
        for kind in kinds:
            assert event in channels.EVENTS_BY_KIND[kind]
    for kind, events in channels.EVENTS_BY_KIND.items():
        for event in events:
            assert kind in channels.TARGETS_BY_EVENT[event]


ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", fullmatch=True)


@settings(max_examples=50, deadline=None)
@given(game=ids, user=ids, other=ids)
def test_names_and_kinds_round_trip(game: str, user: str, other: str) -> None:
    assert channels.is_valid_id(game)
    assert channels.channel_kind(channels.game_channel(game)) == "game"
    assert channels.channel_kind(channels.user_channel(user)) == "user"
    assert channels.may_follow(channels.game_channel(game), None)
    assert channels.may_follow(channels.user_channel(user), user)
    assert channels.may_follow(channels.user_channel(user), other) is (user == other)


def test_trailing_newline_is_not_an_id() -> None:
    assert not channels.is_valid_id("g-1\n")
    assert channels.channel_kind("game:g-1\n") is None
