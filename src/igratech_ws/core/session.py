"""One connection's protocol state, without I/O.

The adapter feeds the session every text frame the client sends and acts on what comes back:
a frame to send (`Reply`), or a change of subscriptions to carry out (`SettingsPlan`), after which
it reports the resulting positions to `settings_answer`. The session never raises into the adapter:
every bad input becomes an `error` reply (AsyncAPI message `publish-error`) and the connection goes
on. States only move forward: OPEN -> CLOSING -> CLOSED; frames after OPEN are ignored.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from igratech_ws.core import channels
from igratech_ws.core.codec import ProtocolError, decode_client_frame, event_frame
from igratech_ws.core.messages import (
    PROTOCOL_VERSION,
    ChannelState,
    Ping,
    Pong,
    Settings,
    SettingsRequest,
    Status,
)


class SessionState(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Reply:
    """Send `frame` to this client."""

    frame: bytes


class SettingsPlan(msgspec.Struct, frozen=True):
    """Subscriptions to change, in this order: drop `remove`, then add `add` (recovering those in
    `recover` from the given (offset, epoch)), then send `settings_answer(...)`, then each added
    channel's current state and its last `history` stream events (marked `snapshot`) unless it
    was recovered."""

    add: tuple[str, ...]
    remove: tuple[str, ...]
    recover: dict[str, tuple[int, str]] = msgspec.field(default_factory=dict)
    history: int = 0


Action = Reply | SettingsPlan


class Session:
    """Protocol state of one connection. See the module docstring for the caller's duties."""

    __slots__ = ("games", "max_games", "session_id", "state", "stats", "subscribed", "user_id")

    def __init__(self, session_id: str, user_id: str | None, *, max_games: int) -> None:
        self.session_id = session_id
        self.user_id = user_id
        self.max_games = max_games
        self.state = SessionState.OPEN
        self.games: list[str] = []
        self.stats = False
        #: Channels in force (including the user's own), in the order they were added.
        self.subscribed: list[str] = []

    # --- lifecycle -------------------------------------------------------------------------------

    def connected_frame(
        self,
        *,
        server_time: str,
        ping_interval: int,
        idle_timeout: int,
        node: str,
        channels: list[ChannelState],
    ) -> bytes:
        """The `connected` frame (AsyncAPI `publish-connected`), the first of every connection,
        sent once the channels of the first plan are joined; `channels` are their positions."""
        return event_frame(
            "connected",
            Status(
                status="connected",
                serverTime=server_time,
                sessionId=self.session_id,
                userId=self.user_id,
                pingInterval=ping_interval,
                idleTimeout=idle_timeout,
                protocolVersion=PROTOCOL_VERSION,
                node=node,
                channels=channels,
            ),
        )

    def own_channels(self) -> tuple[str, ...]:
        """Channels an authenticated connection follows without asking: its user channel."""
        return (channels.user_channel(self.user_id),) if self.user_id else ()

    def begin_close(self) -> bool:
        """Move to CLOSING. Returns False if the session was already closing or closed."""
        if self.state is not SessionState.OPEN:
            return False
        self.state = SessionState.CLOSING
        return True

    def closed(self) -> None:
        self.state = SessionState.CLOSED

    # --- input -----------------------------------------------------------------------------------

    def handle_frame(
        self,
        frame: bytes | str,
        *,
        server_time: str | Callable[[], str],
        settings_allowed: bool = True,
    ) -> Action | None:
        """Decide what to do with one client text frame. Never raises.

        `server_time` is the `Timestamp` a `pong` carries, or the clock that tells it (asked only
        for a ping).

        `settings_allowed` False (the caller's queue of settings is full) answers a `settings`
        request with ``rate_limited`` without changing anything, so it can be sent again.
        """
        if self.state is not SessionState.OPEN:
            return None
        try:
            event, payload = decode_client_frame(frame)
            if event == "ping":
                assert isinstance(payload, Ping)
                now = server_time if isinstance(server_time, str) else server_time()
                return Reply(event_frame("pong", Pong(serverTime=now, ts=payload.ts)))
            assert isinstance(payload, SettingsRequest)
            if not settings_allowed:
                raise ProtocolError(
                    "rate_limited",
                    "Too many settings requests are waiting; this one changed nothing, send it "
                    "again once the answers arrive",
                    event="settings",
                )
            return self.plan_settings(payload)
        except ProtocolError as error:
            return Reply(event_frame("error", error.to_data()))

    def plan_settings(self, request: SettingsRequest) -> SettingsPlan:
        """Validate `request` and commit the new settings; return what to subscribe and drop.

        The first plan of a session (from the handshake `settings` parameter, or empty) also adds
        the user's own channel, which is why that channel can only be recovered there. Raises
        `ProtocolError`
        (``invalid_settings``, ``too_many_games``, ``forbidden_channel``, ``recover_too_late``).

        The work is linear in the size of the request, and a request with more ids in one list
        (or more positions in `recover`) than a connection may follow games is refused before
        any of it: a client inside the rate limit must not be able to buy CPU by the square.
        """
        limit = self.max_games
        asked, follow, unfollow = request.games, request.follow, request.unfollow
        # Spelled out, not a loop over the names with `getattr`, and no generators below: every
        # handshake plans twice, and those cost more than the checks themselves.
        if asked is not None and len(asked) > limit:
            raise self._too_many("data.games", len(asked))
        if follow is not None and len(follow) > limit:
            raise self._too_many("data.follow", len(follow))
        if unfollow is not None and len(unfollow) > limit:
            raise self._too_many("data.unfollow", len(unfollow))
        # The user channel and `global` may be recovered besides the games.
        if request.recover is not None and len(request.recover) > limit + 2:
            raise self._too_many("data.recover", len(request.recover))

        # Dicts as ordered sets: membership in O(1), order of first mention kept.
        games = dict.fromkeys(asked if asked is not None else self.games)
        if follow:
            games.update(dict.fromkeys(follow))
        if unfollow:
            for game in unfollow:
                games.pop(game, None)
        if len(games) > limit:
            raise self._too_many("data.games", len(games))
        stats = self.stats if request.stats is None else request.stats

        wanted = dict.fromkeys(self.own_channels())
        for game in games:
            wanted[channels.GAME_PREFIX + game] = None
        if stats:
            wanted[channels.GLOBAL_CHANNEL] = None
        add = wanted.copy()
        kept: list[str] = []
        removed: list[str] = []
        for channel in self.subscribed:
            if channel in wanted:
                kept.append(channel)
                del add[channel]
            else:
                removed.append(channel)

        recover: dict[str, tuple[int, str]] = {}
        for channel, position in request.recover.items() if request.recover else ():
            where = f"data.recover.{channel[:80]}"
            if not channels.may_follow(channel, self.user_id):
                raise ProtocolError(
                    "forbidden_channel",
                    f"Channel {channel[:80]!r} is not one this connection may follow",
                    event="settings",
                    field=where,
                )
            if channel not in wanted:
                raise ProtocolError(
                    "invalid_settings",
                    f"Cannot recover {channel[:80]!r}: it is not followed by these settings",
                    event="settings",
                    field=where,
                )
            if channel not in add:
                raise ProtocolError(
                    "recover_too_late",
                    f"{channel[:80]!r} is already followed; recovery is only possible when a "
                    "channel is added (the user channel: in the handshake `settings` parameter)",
                    event="settings",
                    field=where,
                )
            recover[channel] = (position.offset, position.epoch)

        self.games = list(games)
        self.stats = stats
        self.subscribed = kept + list(add)
        return SettingsPlan(
            add=tuple(add), remove=tuple(removed), recover=recover, history=request.history or 0
        )

    def _too_many(self, field: str, asked: int) -> ProtocolError:
        return ProtocolError(
            "too_many_games",
            f"A connection may follow at most {self.max_games} games ({asked} asked in {field})",
            event="settings",
            field=field,
        )

    def settings_answer(self, states: list[ChannelState]) -> bytes:
        """The `settings` frame (AsyncAPI `publish-settings`) with the positions now in force."""
        return event_frame(
            "settings", Settings(games=list(self.games), stats=self.stats, channels=states)
        )
