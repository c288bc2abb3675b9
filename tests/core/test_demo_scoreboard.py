"""The demo feed's scoreboard data: what the console's scoreboard renders must add up.

The console shows a game from its latest ``stats`` (teams, score, minute, period) and its
``incident`` stream. A viewer would notice at once a score that goes down within a match, a goal
that the score does not count, a score that changes without a goal, or a minute that runs
backwards: each is checked here over long runs of the pure generator.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from igratech_ws.core.messages import IncidentData, StatsData
from igratech_ws.core.publishing import validate_publish
from igratech_ws.demo_feed import DEMO_GAMES, DEMO_USER, PERIODS, demo_requests

SCOREBOARD_FIELDS = {"team_home", "team_away", "score_home", "score_away", "minute", "period"}


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 19, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@dataclass
class Game:
    """What a viewer of one game has seen so far in the current match."""

    goals: list[int] = field(default_factory=lambda: [0, 0])
    score: tuple[int, int] | None = None  # from the latest stats
    teams: tuple[str, str] | None = None
    minute: int = 0
    period: str = "pre_match"
    kick_offs: int = 0
    stats_seen: int = 0


def _feed(seed: int, count: int) -> list[StatsData | IncidentData]:
    feed = demo_requests(
        games=DEMO_GAMES, demo_user_id=DEMO_USER, rng=random.Random(seed), clock=FakeClock()
    )
    payloads: list[StatsData | IncidentData] = []
    for request in itertools.islice(feed, count):
        payload = validate_publish(request).payload
        if isinstance(payload, StatsData | IncidentData):
            payloads.append(payload)
    return payloads


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_stats_score_matches_goal_incidents_and_only_goes_up(seed: int) -> None:
    games: dict[str, Game] = {}
    goals_total = 0
    full_matches = 0
    for payload in _feed(seed, 6000):
        if isinstance(payload, IncidentData):
            game = games.setdefault(payload.gameId, Game())
            if payload.type == "kick_off":
                if game.kick_offs:
                    full_matches += 1
                    assert game.period == "full_time", "a new match before full time"
                games[payload.gameId] = game = Game(kick_offs=game.kick_offs + 1)
            elif payload.type == "goal":
                side = 0 if payload.side == "home" else 1
                assert payload.side in ("home", "away")
                game.goals[side] += 1
                goals_total += 1
            assert payload.score is not None
            # Every incident carries the running score: the goals of this match so far.
            assert (payload.score.home, payload.score.away) == tuple(game.goals)
            continue
        if payload.scope == "global":
            continue
        assert payload.gameId is not None
        game = games[payload.gameId]  # stats never come before the match's kick-off
        values = payload.values
        assert set(values) >= SCOREBOARD_FIELDS, values
        home, away = values["score_home"], values["score_away"]
        assert isinstance(home, int) and isinstance(away, int)
        assert [home, away] == game.goals, "the score differs from the goals shown"
        if game.score is not None:
            assert home >= game.score[0] and away >= game.score[1]
        game.score = (home, away)
        teams = (values["team_home"], values["team_away"])
        assert all(isinstance(t, str) and t for t in teams) and teams[0] != teams[1]
        if game.teams is not None:
            assert teams == game.teams, "teams changed within a match"
        game.teams = teams  # type: ignore[assignment]
        minute = values["minute"]
        assert isinstance(minute, int) and 0 <= minute <= 90
        assert minute >= game.minute, "the clock ran backwards"
        game.minute = minute
        assert values["period"] in PERIODS.values()
        game.period = str(values["period"])
        game.stats_seen += 1
    assert goals_total > 5 and full_matches >= 1
    assert all(game.stats_seen > 0 for game in games.values())


def test_every_match_minute_publishes_the_scoreboard() -> None:
    # The scoreboard is never stale by more than a minute of play: each minute of each game has
    # its stats, and the game's next stats after a goal already show it.
    seen: dict[str, set[int]] = {g: set() for g in DEMO_GAMES}
    pending_goal: dict[str, tuple[int, int]] = {}
    checked = 0
    for payload in _feed(9, 4000):
        if isinstance(payload, IncidentData) and payload.type == "goal":
            assert payload.score is not None
            pending_goal[payload.gameId] = (payload.score.home, payload.score.away)
        elif isinstance(payload, StatsData) and payload.gameId is not None:
            values = payload.values
            if payload.gameId in pending_goal:
                score = pending_goal.pop(payload.gameId)
                assert (values["score_home"], values["score_away"]) == score
                checked += 1
            if values["period"] in ("first_half", "second_half"):
                seen[payload.gameId].add(int(values["minute"]))
    for game, minutes in seen.items():
        # Minutes 0-90 of play, every one of them published (across this run's matches).
        assert sorted(minutes) == list(range(0, 91)), game
    assert checked > 5


def test_a_team_plays_one_match_at_a_time() -> None:
    # A customer watching three games would notice the same club on two of them.
    teams: dict[str, tuple[str, str]] = {}
    for payload in _feed(5, 8000):
        if isinstance(payload, StatsData) and payload.gameId is not None:
            values = payload.values
            teams[payload.gameId] = (str(values["team_home"]), str(values["team_away"]))
            playing = [team for pair in teams.values() for team in pair]
            assert len(playing) == len(set(playing)), teams
