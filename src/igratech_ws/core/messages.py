"""Typed payloads of every message of the Igratech WebSocket API.

The contract is the AsyncAPI document `asyncapi/igratech-ws.yaml`.

Each struct mirrors one component schema of the AsyncAPI document; the contract tests check that
the two agree field for field (names, types, required-ness) and that every example in the document
decodes here. Constraints (patterns, bounds) live in the `Annotated` aliases below so that decoding
a publish body with msgspec *is* the validation the contract promises: an invalid body fails with
an error that names the field (for example ``Expected `str`, got `int` - at `$.bets[0].stake```).

Field names are camelCase on the wire, as the seed's API is consumed by JavaScript front ends.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

# --- scalar types --------------------------------------------------------------------------

#: Identifiers are strings (never numbers): platforms use UUIDs, prefixed ids or big integers.
Identifier = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$(?!\n)",
        description="An opaque identifier: 1-64 of A-Z a-z 0-9 _ . - (starting alphanumeric).",
    ),
]
#: A publish's idempotency key (HTTP API, outbox): a repeat within the window is not published.
IdempotencyKey = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$(?!\n)",
        description="1-128 of A-Z a-z 0-9 _ . - (starting alphanumeric), unique per channel.",
    ),
]
#: Money is a decimal string so that no client rounds it through a binary float.
Money = Annotated[
    str,
    Meta(
        pattern=r"^-?[0-9]{1,15}(\.[0-9]{1,8})?$(?!\n)",
        description='A decimal amount as a string, e.g. "125.50".',
    ),
]
#: Decimal odds (European format), at least 1.
Odds = Annotated[
    str,
    Meta(
        pattern=r"^[1-9][0-9]{0,5}(\.[0-9]{1,4})?$(?!\n)",
        description='Decimal odds as a string, e.g. "2.10".',
    ),
]
#: ISO 4217 code, or a platform token code for crypto currencies.
Currency = Annotated[
    str, Meta(pattern=r"^[A-Z][A-Z0-9]{2,7}$(?!\n)", description='Currency code, e.g. "EUR".')
]
#: RFC 3339 timestamp in UTC with a trailing Z.
Timestamp = Annotated[
    str,
    Meta(
        pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$(?!\n)",
        description='RFC 3339 timestamp in UTC, e.g. "2026-11-23T19:45:00Z".',
    ),
]
#: A short machine-readable word: incident types, markets, stat names.
Keyword = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=64,
        pattern=r"^[a-z][a-z0-9_]*$(?!\n)",
        description="A lowercase snake_case word.",
    ),
]
ShortText = Annotated[str, Meta(max_length=500)]
Score = Annotated[int, Meta(ge=0, le=999)]

BetStatus = Literal["pending", "won", "lost", "void", "cashout", "half_won", "half_lost"]
GameSide = Literal["home", "away", "none"]
LogoutReason = Literal["logged_in_elsewhere", "forced", "token_expired"]


class _Payload(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every payload: unknown fields are refused so that typos are caught at publish."""


# --- status: connected and logout (seed schema uid `status`) --------------------------------


class Status(_Payload, kw_only=True):
    """Seed schema `status`: the data of `connected` and of `logout`.

    `channels` (`connected` only): the connection's own channels (its user channel, and those of
    the handshake `settings` parameter), joined before `connected` was sent, with their positions:
    the line from which the client misses nothing.
    """

    status: Literal["connected", "logout"]
    serverTime: Timestamp
    sessionId: str | None = None
    #: Null for an anonymous connection in `connected` (sent explicitly); absent in `logout`.
    userId: str | msgspec.UnsetType | None = msgspec.UNSET
    pingInterval: int | None = None
    idleTimeout: int | None = None
    protocolVersion: str | None = None
    node: str | None = None
    channels: list[ChannelState] | None = None
    reason: LogoutReason | None = None
    code: int | None = None
    message: ShortText | None = None


# --- ping / pong -----------------------------------------------------------------------------

ClientTimestamp = Annotated[
    int | float | str | None, Meta(description="Any client timestamp, echoed back in `pong`.")
]


class Ping(_Payload, kw_only=True):
    """`subscribe-ping`: the client keeps the connection alive."""

    ts: ClientTimestamp = None


class Pong(_Payload, kw_only=True):
    """`publish-pong`: the answer to `ping`, echoing the client's `ts`."""

    serverTime: Timestamp
    ts: ClientTimestamp = None


# --- settings ---------------------------------------------------------------------------------


class StreamPositionData(_Payload, kw_only=True):
    """A position in a channel's stream: the last offset a client has seen, and the epoch."""

    offset: Annotated[int, Meta(ge=0)]
    epoch: Annotated[str, Meta(min_length=1, max_length=64)]


GameIdList = Annotated[list[Identifier], Meta(max_length=1000)]

#: The most stream events a `settings` request may ask for per channel it adds (`history`).
MAX_HISTORY = 100


class SettingsRequest(_Payload, kw_only=True):
    """`subscribe-settings`: what the client wants to follow. Every field is optional.

    `games` replaces the followed set; `follow` / `unfollow` change it incrementally (applied after
    `games`); `stats` switches the global stats channel; `recover` maps channel names to the last
    position the client saw, so that it receives exactly what it missed; `history` (0 to
    `MAX_HISTORY`) asks for the last stream events of each channel this request adds, sent with
    its current state (`"snapshot": true`) right after the answer. An empty object asks for the
    settings in force.
    """

    games: GameIdList | None = None
    follow: GameIdList | None = None
    unfollow: GameIdList | None = None
    stats: bool | None = None
    recover: Annotated[dict[str, StreamPositionData], Meta(max_length=1001)] | None = None
    history: Annotated[int, Meta(ge=0, le=MAX_HISTORY)] | None = None


class ChannelState(_Payload, kw_only=True):
    """One channel in force for the connection, with its stream position.

    `recovered` is present only for channels the client asked to recover: true when every missed
    publication is delivered right after this answer, false when history no longer covers the gap
    (the client must then reload state from the platform's REST API).
    """

    channel: str
    offset: int
    epoch: str
    recovered: bool | None = None


class Settings(_Payload, kw_only=True):
    """`publish-settings`: the settings now in force."""

    games: list[str]
    stats: bool
    channels: list[ChannelState]


# --- incident ---------------------------------------------------------------------------------


class ScoreData(_Payload, kw_only=True):
    home: Score
    away: Score


class IncidentData(_Payload, kw_only=True):
    """Seed schema `incident-data`: something that happened, or is about to, in a game."""

    gameId: Identifier
    incidentId: Identifier
    type: Keyword
    occurredAt: Timestamp
    minute: Annotated[int, Meta(ge=0, le=300)] | None = None
    side: GameSide | None = None
    score: ScoreData | None = None
    description: ShortText | None = None


# --- bet --------------------------------------------------------------------------------------


class BetDataItem(_Payload, kw_only=True):
    """Seed schema `bet-data-item`: one bet placed on a game, as shown in a public live feed."""

    betId: Identifier
    market: Keyword
    selection: Annotated[str, Meta(min_length=1, max_length=64)]
    odds: Odds
    stake: Money
    currency: Currency
    placedAt: Timestamp
    player: Annotated[str, Meta(max_length=64)] | None = None


class BetData(_Payload, kw_only=True):
    """`publish-bet`: bets placed on a game."""

    gameId: Identifier
    bets: Annotated[list[BetDataItem], Meta(min_length=1, max_length=500)]


# --- bets-result ------------------------------------------------------------------------------


class BetResultItem(_Payload, kw_only=True):
    """The new status of one of the user's bets."""

    betId: Identifier
    gameId: Identifier
    status: BetStatus
    stake: Money
    payout: Money
    currency: Currency
    settledAt: Timestamp
    odds: Odds | None = None


class BetsResultData(_Payload, kw_only=True):
    """Seed schema `bets-result-data`: status updates of the user's bets."""

    results: Annotated[list[BetResultItem], Meta(min_length=1, max_length=500)]


# --- balance ----------------------------------------------------------------------------------

BalanceReason = Literal[
    "bet_placed", "bet_settled", "cashout", "deposit", "withdrawal", "bonus", "adjustment"
]


class BalanceData(_Payload, kw_only=True):
    """`publish-balance`: the user's balance after a change."""

    balance: Money
    currency: Currency
    updatedAt: Timestamp
    available: Money | None = None
    bonus: Money | None = None
    reason: BalanceReason | None = None


# --- stats ------------------------------------------------------------------------------------

StatValue = int | float | str


class StatsData(_Payload, kw_only=True):
    """Seed schema `stats-data`: a set of named figures for one game or for the whole platform."""

    scope: Literal["game", "global"]
    updatedAt: Timestamp
    values: Annotated[dict[Keyword, StatValue], Meta(min_length=1, max_length=200)]
    gameId: Identifier | None = None


# --- error ------------------------------------------------------------------------------------

ErrorCode = Literal[
    "bad_json",
    "bad_message",
    "unknown_event",
    "invalid_settings",
    "forbidden_channel",
    "too_many_games",
    "rate_limited",
    "recover_too_late",
]


class ErrorData(_Payload, kw_only=True):
    """`error` (an addition to the seed): why a client message was not accepted.

    The connection stays open after an error unless the close-code table says otherwise.
    """

    code: ErrorCode
    message: ShortText
    event: str | None = None
    field: str | None = None


# --- envelopes --------------------------------------------------------------------------------

#: Events a client may send, with their payload types.
CLIENT_EVENTS: dict[str, type[_Payload]] = {
    "ping": Ping,
    "settings": SettingsRequest,
}

#: Events the platform's backend may publish, with their payload types and target kind.
PUBLISHED_EVENTS: dict[str, type[_Payload]] = {
    "incident": IncidentData,
    "bet": BetData,
    "bets-result": BetsResultData,
    "balance": BalanceData,
    "stats": StatsData,
}

#: Every event the server sends, with its payload type.
SERVER_EVENTS: dict[str, type[_Payload]] = {
    "connected": Status,
    "logout": Status,
    "pong": Pong,
    "settings": Settings,
    "error": ErrorData,
    **PUBLISHED_EVENTS,
}

#: The seed's message ids mapped to (event on the wire, payload type).
SEED_MESSAGES: dict[str, tuple[str, type[_Payload]]] = {
    "publish-stats": ("stats", StatsData),
    "publish-balance": ("balance", BalanceData),
    "publish-bets-result": ("bets-result", BetsResultData),
    "publish-bet": ("bet", BetData),
    "publish-incident": ("incident", IncidentData),
    "publish-connected": ("connected", Status),
    "publish-logout": ("logout", Status),
    "subscribe-settings": ("settings", SettingsRequest),
    "publish-settings": ("settings", Settings),
    "subscribe-ping": ("ping", Ping),
    "publish-pong": ("pong", Pong),
}

PROTOCOL_VERSION = "1.0"
