"""Channel names, which events travel on which channel, and who may follow a channel.

Names: ``game:<gameId>`` (public: incident, bet, game stats), ``user:<userId>`` (private to that
user's own connections: balance, bets-result), ``global`` (public: global stats).
"""

from __future__ import annotations

import re
from typing import Literal

GLOBAL_CHANNEL = "global"
GAME_PREFIX = "game:"
USER_PREFIX = "user:"

ChannelKind = Literal["game", "user", "global"]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")

#: The events that may be published on each kind of channel.
EVENTS_BY_KIND: dict[ChannelKind, frozenset[str]] = {
    "game": frozenset({"incident", "bet", "stats"}),
    "user": frozenset({"balance", "bets-result"}),
    "global": frozenset({"stats"}),
}

#: The kind of target each published event needs (stats may go to a game or to everyone).
TARGETS_BY_EVENT: dict[str, frozenset[ChannelKind]] = {
    "incident": frozenset({"game"}),
    "bet": frozenset({"game"}),
    "stats": frozenset({"game", "global"}),
    "balance": frozenset({"user"}),
    "bets-result": frozenset({"user"}),
}

#: State events: a newer one replaces the older, per channel and event (brokers keep the latest);
#: the other events are stream events, each of which matters.
STATE_EVENTS = frozenset({"stats", "balance"})
#: Stream events: each one matters; never dropped, never replaced.
STREAM_EVENTS = frozenset({"incident", "bet", "bets-result"})

EventKind = Literal["state", "stream"]


def event_kind(event: str) -> EventKind:
    """Whether a published event is *state* (a newer one replaces the older for its key: the
    channel and event, so `stats` per channel and scope, `balance` per user) or *stream*."""
    return "state" if event in STATE_EVENTS else "stream"


def is_valid_id(value: str) -> bool:
    """True if `value` may be a game or user id (the `Identifier` format of the contract)."""
    return bool(_ID_RE.fullmatch(value))


def game_channel(game_id: str) -> str:
    return GAME_PREFIX + game_id


def user_channel(user_id: str) -> str:
    return USER_PREFIX + user_id


def channel_kind(channel: str) -> ChannelKind | None:
    """The kind of a well-formed channel name, or None if the name is not one of ours."""
    if channel == GLOBAL_CHANNEL:
        return "global"
    if channel.startswith(GAME_PREFIX) and is_valid_id(channel[len(GAME_PREFIX) :]):
        return "game"
    if channel.startswith(USER_PREFIX) and is_valid_id(channel[len(USER_PREFIX) :]):
        return "user"
    return None


def may_follow(channel: str, user_id: str | None) -> bool:
    """Whether a connection authenticated as `user_id` (None: anonymous) may receive `channel`.

    A ``user:<id>`` channel belongs to that user alone; game and global channels are public.
    """
    kind = channel_kind(channel)
    if kind is None:
        return False
    if kind == "user":
        return user_id is not None and channel == user_channel(user_id)
    return True
