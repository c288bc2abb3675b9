"""A simulated betting platform: what a real backend would publish, for demos and load.

`demo_requests` is a pure, infinite generator of publish requests (no I/O, no sleeping): a few
live football games producing incidents (kick-off, goals with the running score, corners, cards,
half-time, full-time), simulated players' bets on those games, the demo user's own bets being
placed and settled (``bets-result`` and ``balance`` with a consistent running balance), game stats
and global stats. After every match minute the game's ``stats`` carry what a scoreboard shows
(``team_home``, ``team_away``, ``score_home``, ``score_away``, ``minute``, ``period``), always
equal to the running score of the ``goal`` incidents. `run_demo_feed` paces it in real time and
hands each request to a publisher.

Every request passes `igratech_ws.core.publishing.validate_publish`. When a match reaches full
time, a new match starts on the same game id after a short break (a new ``kick_off`` incident with
the score back at 0:0), so that a demo can run for hours on a fixed list of games.

The generator is deterministic for a given `random.Random` seed and clock, which is what the tests
rely on.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import msgspec

from igratech_ws.core import channels
from igratech_ws.core.messages import (
    BalanceData,
    BalanceReason,
    BetData,
    BetDataItem,
    BetResultItem,
    BetsResultData,
    BetStatus,
    GameSide,
    IncidentData,
    ScoreData,
    StatsData,
)
from igratech_ws.core.publishing import PublishRequest

Clock = Callable[[], datetime]
Publisher = Callable[[PublishRequest], Awaitable[Any]]

#: The game ids `igratech-ws demo` plays on (the console follows them on first load).
DEMO_GAMES = ["g-1001", "g-1002", "g-1003"]
#: The user the demo publishes balance and bet results for (the console's demo token is theirs).
DEMO_USER = "demo-user"

CURRENCY = "EUR"
#: The demo user's balance before the first bet.
INITIAL_BALANCE = Decimal("1000.00")
#: Below this the demo user "deposits" DEPOSIT, so the demo never runs dry.
LOW_BALANCE = Decimal("60.00")
DEPOSIT = Decimal("500.00")
_CENT = Decimal("0.01")

_TEAMS = (
    "Dynamo Kyiv", "Shakhtar", "Dnipro-1", "Zorya", "Vorskla", "Oleksandriya", "Kryvbas",
    "Polissya", "Arsenal", "Chelsea", "Barcelona", "Sevilla", "Juventus", "Napoli", "Ajax",
    "Porto", "Benfica", "Celtic", "Galatasaray", "Legia",
)  # fmt: skip
_PLAYER_NAMES = (
    "oleksandr", "maria", "andriy", "kateryna", "dmytro", "olena", "serhiy", "iryna", "taras",
    "natalia", "max", "yulia", "bohdan", "sofia", "viktor", "anna", "roman", "daria",
)  # fmt: skip


#: The ``period`` stats value of each phase of a match.
PERIODS = {
    "pre": "pre_match",
    "first": "first_half",
    "half_time": "half_time",
    "second": "second_half",
    "full_time": "full_time",
}


def mask_player(name: str, number: int) -> str:
    """A public display name that does not reveal the player: ``ol***r42``."""
    return f"{name[:2]}***{name[-1]}{number}"


def demo_player_name(user_id: str) -> str:
    """How the demo user's own bets are named in the public bet feed: ``de***r``."""
    return f"{user_id[:2]}***{user_id[-1]}"


def _money(value: Decimal) -> str:
    return str(value.quantize(_CENT, rounding=ROUND_HALF_UP))


def _odds(value: float) -> str:
    return f"{max(value, 1.01):.2f}"


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _request(event: str, payload: msgspec.Struct, **target: str) -> PublishRequest:
    return PublishRequest(event=event, data=msgspec.Raw(msgspec.json.encode(payload)), **target)


@dataclass
class _Match:
    """One live match on a game id; replaced by a new match after full time."""

    game_id: str
    home: str
    away: str
    minute: int = -1  # -1: not kicked off yet
    phase: str = "pre"  # pre, first, half_time, second, full_time
    break_ticks: int = 0
    score: list[int] = field(default_factory=lambda: [0, 0])
    counts: dict[str, list[int]] = field(
        default_factory=lambda: {
            k: [0, 0] for k in ("shots", "on_target", "corners", "yellow", "red")
        }
    )
    possession: int = 50  # home share, percent

    def side_name(self, side: int) -> str:
        return self.home if side == 0 else self.away


@dataclass
class _OpenBet:
    bet_id: str
    game_id: str
    stake: Decimal
    odds: Decimal
    settle_after: int  # step number


class DemoPlatform:
    """The state of the simulated platform; `step` produces the next requests.

    Callers use `demo_requests` (or `run_demo_feed`); this class is public so that tests can read
    `balance` and `demo_player` after driving it.
    """

    def __init__(
        self, *, games: list[str], demo_user_id: str, rng: random.Random, clock: Clock = _utc_now
    ) -> None:
        if not games:
            raise ValueError("the demo feed needs at least one game id")
        for game_id in [*games, demo_user_id]:
            if not channels.is_valid_id(game_id):
                raise ValueError(f"not a valid identifier: {game_id!r}")
        self._rng = rng
        self._clock = clock
        self.demo_user_id = demo_user_id
        self.demo_player = demo_player_name(demo_user_id)
        self.balance = INITIAL_BALANCE
        self._matches: list[_Match] = []
        for game_id in games:
            self._matches.append(self._new_match(game_id))
        self._open_bets: list[_OpenBet] = []
        self._ids = itertools.count(1)
        self._step = 0
        self._online = 1200 + rng.randrange(400)
        # (time, stake) of recent bets for the "last minute" global figures; bounded
        self._recent_bets: collections.deque[tuple[datetime, Decimal]] = collections.deque(
            maxlen=10_000
        )

    def _new_match(self, game_id: str) -> _Match:
        # A team plays one match at a time: not one that is on another game id now.
        busy = {team for m in self._matches for team in (m.home, m.away)}
        free = [t for t in _TEAMS if t not in busy]
        home, away = self._rng.sample(free if len(free) >= 2 else list(_TEAMS), 2)
        return _Match(game_id, home, away)

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    # --- the step -------------------------------------------------------------------------

    def step(self) -> list[PublishRequest]:
        """Advance the simulation by one action; may return an empty list (a quiet minute)."""
        self._step += 1
        rng = self._rng
        if self.balance < LOW_BALANCE and rng.random() < 0.5:
            return [self._balance_change(DEPOSIT, "deposit")]
        due = [b for b in self._open_bets if b.settle_after <= self._step]
        roll = rng.random()
        if due and roll < 0.15:
            return self._settle(due[: rng.randint(1, min(3, len(due)))])
        roll = rng.random()
        match = rng.choice(self._matches)
        if roll < 0.40:
            return self._tick_with_stats(match)
        if roll < 0.72:
            return self._public_bet(match) if match.phase in ("first", "second") else []
        if roll < 0.80:
            return self._demo_bet(match) if match.phase in ("first", "second") else []
        if roll < 0.92:
            return self._game_stats(match) if match.phase != "pre" else []
        return [self._global_stats()]

    # --- games ----------------------------------------------------------------------------

    def _incident(
        self, match: _Match, kind: str, side: int | None = None, description: str | None = None
    ) -> PublishRequest:
        side_word: GameSide = "none" if side is None else ("home" if side == 0 else "away")
        data = IncidentData(
            gameId=match.game_id,
            incidentId=self._next_id("inc"),
            type=kind,
            occurredAt=_timestamp(self._clock()),
            minute=max(match.minute, 0),
            side=side_word,
            score=ScoreData(home=match.score[0], away=match.score[1]),
            description=description,
        )
        return _request("incident", data, gameId=match.game_id)

    def _tick_with_stats(self, match: _Match) -> list[PublishRequest]:
        """`_tick`, then the game's stats when the minute, the period or the match changed."""
        index = self._matches.index(match)
        before = (match.minute, match.phase)
        out = self._tick(match)
        current = self._matches[index]  # a new match after full time's break
        if out or current is not match or (current.minute, current.phase) != before:
            out.extend(self._game_stats(current))
        return out

    def _tick(self, match: _Match) -> list[PublishRequest]:
        """One match minute passes: periods change, and things happen with football's odds."""
        rng = self._rng
        if match.phase == "pre":
            match.phase, match.minute = "first", 0
            return [self._incident(match, "kick_off", None, f"{match.home} v {match.away}")]
        if match.phase in ("half_time", "full_time"):
            match.break_ticks -= 1
            if match.break_ticks > 0:
                return []
            if match.phase == "half_time":
                match.phase = "second"
                return [self._incident(match, "second_half", None, "Second half under way")]
            self._matches[self._matches.index(match)] = new = self._new_match(match.game_id)
            return self._tick(new)
        match.minute += 1
        if match.phase == "first" and match.minute > 45:
            match.phase, match.break_ticks, match.minute = "half_time", 3, 45
            return [self._incident(match, "half_time", None, "Half-time")]
        if match.phase == "second" and match.minute > 90:
            match.phase, match.break_ticks, match.minute = "full_time", 6, 90
            self._make_bets_due(match.game_id)
            return [self._incident(match, "full_time", None, "Full-time")]
        match.possession = min(75, max(25, match.possession + rng.randint(-3, 3)))
        side = 0 if rng.random() * 100 < match.possession else 1
        out: list[PublishRequest] = []
        if rng.random() < 0.20:
            match.counts["shots"][side] += 1
            if rng.random() < 0.4:
                match.counts["on_target"][side] += 1
                if rng.random() < 0.35:
                    match.score[side] += 1
                    name = match.side_name(side)
                    out.append(self._incident(match, "goal", side, f"Goal for {name}!"))
        if rng.random() < 0.11:
            match.counts["corners"][side] += 1
            out.append(self._incident(match, "corner", side, f"Corner to {match.side_name(side)}"))
        if rng.random() < 0.04:
            card = "red" if rng.random() < 0.08 else "yellow"
            match.counts[card][1 - side] += 1
            number = rng.randint(2, 30)
            text = f"{card.title()} card, #{number} ({match.side_name(1 - side)})"
            out.append(self._incident(match, f"{card}_card", 1 - side, text))
        return out

    def _game_stats(self, match: _Match) -> list[PublishRequest]:
        values: dict[str, int | float | str] = {
            "team_home": match.home,
            "team_away": match.away,
            "score_home": match.score[0],
            "score_away": match.score[1],
            "minute": max(match.minute, 0),
            "period": PERIODS[match.phase],
            "possession_home": match.possession,
            "possession_away": 100 - match.possession,
        }
        for name, (home, away) in match.counts.items():
            values[f"{name}_home"] = home
            values[f"{name}_away"] = away
        data = StatsData(
            scope="game", gameId=match.game_id, updatedAt=_timestamp(self._clock()), values=values
        )
        return [_request("stats", data, gameId=match.game_id)]

    def _global_stats(self) -> PublishRequest:
        now = self._clock()
        while self._recent_bets and self._recent_bets[0][0] < now - timedelta(seconds=60):
            self._recent_bets.popleft()
        self._online = max(100, self._online + self._rng.randint(-25, 25))
        live = sum(1 for m in self._matches if m.phase in ("first", "half_time", "second"))
        values: dict[str, int | float | str] = {
            "online_players": self._online,
            "live_games": live,
            "bets_last_minute": len(self._recent_bets),
            "stake_last_minute": _money(sum((s for _, s in self._recent_bets), Decimal(0))),
            "currency": CURRENCY,
        }
        data = StatsData(scope="global", updatedAt=_timestamp(now), values=values)
        return _request("stats", data)

    # --- bets -----------------------------------------------------------------------------

    def _market(self, match: _Match) -> tuple[str, str, float]:
        """A (market, selection, odds) a player might back right now."""
        rng = self._rng
        kind = rng.choice(("match_result", "total_goals", "both_teams_to_score", "next_goal",
                           "double_chance", "correct_score", "total_corners"))  # fmt: skip
        if kind == "match_result":
            pick = rng.choice(((match.home, 2.1), ("Draw", 3.3), (match.away, 3.6)))
            return kind, pick[0], pick[1] * rng.uniform(0.7, 1.4)
        if kind == "total_goals":
            line = sum(match.score) + rng.choice((0.5, 1.5, 2.5))
            side = rng.choice(("Over", "Under"))
            return kind, f"{side} {line}", rng.uniform(1.5, 2.6)
        if kind == "both_teams_to_score":
            return kind, rng.choice(("Yes", "No")), rng.uniform(1.6, 2.3)
        if kind == "next_goal":
            return kind, rng.choice((match.home, match.away, "No goal")), rng.uniform(1.8, 5.0)
        if kind == "double_chance":
            return kind, rng.choice(("1X", "12", "X2")), rng.uniform(1.1, 1.7)
        if kind == "correct_score":
            home, away = match.score[0] + rng.randint(0, 2), match.score[1] + rng.randint(0, 2)
            return kind, f"{home}-{away}", rng.uniform(6.0, 25.0)
        return kind, f"Over {rng.choice((7.5, 8.5, 9.5, 10.5))}", rng.uniform(1.7, 2.2)

    def _bet_items(self, match: _Match, player: str, stakes: list[Decimal]) -> list[BetDataItem]:
        placed_at = _timestamp(self._clock())
        items = []
        for stake in stakes:
            market, selection, odds = self._market(match)
            items.append(
                BetDataItem(
                    betId=self._next_id("bet"),
                    market=market,
                    selection=selection,
                    odds=_odds(odds),
                    stake=_money(stake),
                    currency=CURRENCY,
                    placedAt=placed_at,
                    player=player,
                )
            )
            self._recent_bets.append((self._clock(), stake))
        return items

    def _public_bet(self, match: _Match) -> list[PublishRequest]:
        rng = self._rng
        player = mask_player(rng.choice(_PLAYER_NAMES), rng.randint(1, 99))
        stakes = [
            Decimal(rng.choice((2, 5, 10, 20, 25, 50, 100, 250))) for _ in range(rng.randint(1, 3))
        ]
        items = self._bet_items(match, player, stakes)
        return [_request("bet", BetData(gameId=match.game_id, bets=items), gameId=match.game_id)]

    def _demo_bet(self, match: _Match) -> list[PublishRequest]:
        rng = self._rng
        stakes = [Decimal(rng.choice((5, 10, 20, 25))) for _ in range(rng.randint(1, 2))]
        if sum(stakes, Decimal(0)) > self.balance:
            return []
        items = self._bet_items(match, self.demo_player, stakes)
        for item, stake in zip(items, stakes, strict=True):
            settle = self._step + rng.randint(5, 40)
            bet = _OpenBet(item.betId, match.game_id, stake, Decimal(item.odds), settle)
            self._open_bets.append(bet)
        return [
            _request("bet", BetData(gameId=match.game_id, bets=items), gameId=match.game_id),
            self._balance_change(-sum(stakes, Decimal(0)), "bet_placed"),
        ]

    def _make_bets_due(self, game_id: str) -> None:
        # at full time every open bet on the game is settled soon, as a real book would
        for bet in self._open_bets:
            if bet.game_id == game_id:
                bet.settle_after = min(bet.settle_after, self._step)

    def _settle(self, bets: list[_OpenBet]) -> list[PublishRequest]:
        rng = self._rng
        settled_at = _timestamp(self._clock())
        results: list[BetResultItem] = []
        total = Decimal(0)
        cashout = False
        for bet in bets:
            self._open_bets.remove(bet)
            status: BetStatus = rng.choices(("won", "lost", "void", "cashout"), (35, 50, 5, 10))[0]
            if status == "won":
                payout = (bet.stake * bet.odds).quantize(_CENT, rounding=ROUND_HALF_UP)
            elif status == "void":
                payout = bet.stake
            elif status == "cashout":
                factor = Decimal(str(round(rng.uniform(0.3, 1.6), 2)))
                payout = (bet.stake * factor).quantize(_CENT, rounding=ROUND_HALF_UP)
                cashout = True
            else:
                payout = Decimal(0)
            total += payout
            results.append(
                BetResultItem(
                    betId=bet.bet_id,
                    gameId=bet.game_id,
                    status=status,
                    stake=_money(bet.stake),
                    payout=_money(payout),
                    currency=CURRENCY,
                    settledAt=settled_at,
                    odds=_odds(float(bet.odds)),
                )
            )
        out = [_request("bets-result", BetsResultData(results=results), userId=self.demo_user_id)]
        if total > 0:
            out.append(self._balance_change(total, "cashout" if cashout else "bet_settled"))
        return out

    def _balance_change(self, delta: Decimal, reason: BalanceReason) -> PublishRequest:
        self.balance += delta
        text = _money(self.balance)
        data = BalanceData(
            balance=text,
            available=text,
            bonus="0.00",
            currency=CURRENCY,
            updatedAt=_timestamp(self._clock()),
            reason=reason,
        )
        return _request("balance", data, userId=self.demo_user_id)


def demo_requests(
    *, games: list[str], demo_user_id: str, rng: random.Random, clock: Clock = _utc_now
) -> Iterator[PublishRequest]:
    """Yield the simulated platform's publish requests forever, in publishing order.

    Pure: no I/O and no sleeping; `clock` stamps the payloads (real UTC time by default). The
    caller stops iterating whenever it likes. Raises `ValueError` at the first `next()` if a game
    id or the user id is not a valid identifier, or `games` is empty.
    """
    platform = DemoPlatform(games=games, demo_user_id=demo_user_id, rng=rng, clock=clock)
    while True:
        yield from platform.step()


async def run_demo_feed(
    publish: Publisher,
    *,
    games: list[str],
    demo_user_id: str,
    rng: random.Random,
    rate: float,
    stop: asyncio.Event,
) -> None:
    """Publish the simulated platform's events, about `rate` requests per second, until `stop`.

    `publish` is awaited once per request, in order; its exceptions propagate (the caller decides
    whether a failed publish ends the demo). The pauses between requests are exponentially
    distributed, like real traffic. Returns promptly once `stop` is set.
    """
    if rate <= 0:
        raise ValueError("rate must be positive")
    for request in demo_requests(games=games, demo_user_id=demo_user_id, rng=rng):
        if stop.is_set():
            return
        await publish(request)
        try:
            await asyncio.wait_for(stop.wait(), timeout=min(rng.expovariate(rate), 10 / rate))
        except TimeoutError:
            pass
        else:
            return
