"""The simulated platform: every request valid, every kind present, money and scores consistent."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from igratech_ws.core.messages import BalanceData, BetData, BetsResultData, IncidentData, StatsData
from igratech_ws.core.publishing import PublishRequest, validate_publish
from igratech_ws.demo_feed import INITIAL_BALANCE, DemoPlatform, demo_requests, run_demo_feed

GAMES = ["g-1001", "g-1002", "g-1003"]
USER = "u-42"


class FakeClock:
    """Advances one second per reading, so a run is reproducible and spans several minutes."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 19, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def run(seed: int, count: int) -> list[PublishRequest]:
    feed = demo_requests(games=GAMES, demo_user_id=USER, rng=random.Random(seed), clock=FakeClock())
    return list(itertools.islice(feed, count))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_request_validates_and_every_kind_appears(seed: int) -> None:
    kinds: Counter[str] = Counter()
    for request in run(seed, 1500):
        publication = validate_publish(request)
        payload = publication.payload
        if isinstance(payload, IncidentData):
            kinds[f"incident:{payload.type}"] += 1
            assert publication.channel == f"game:{payload.gameId}"
        elif isinstance(payload, StatsData):
            kinds[f"stats:{payload.scope}"] += 1
        elif isinstance(payload, BetData):
            kinds["bet"] += 1
            assert 1 <= len(payload.bets) <= 3
            assert all("***" in (bet.player or "") for bet in payload.bets)
        elif isinstance(payload, BetsResultData):
            kinds["bets-result"] += 1
            assert publication.channel == f"user:{USER}"
            kinds.update(f"status:{r.status}" for r in payload.results)
        else:
            assert isinstance(payload, BalanceData)
            kinds["balance"] += 1
    for kind in ["incident:kick_off", "incident:goal", "incident:corner", "incident:half_time",
                 "incident:yellow_card", "stats:game", "stats:global", "bet", "bets-result",
                 "balance", "status:won", "status:lost"]:  # fmt: skip
        assert kinds[kind] > 0, kind


def test_same_seed_same_feed() -> None:
    first = [(r.event, bytes(r.data)) for r in run(7, 300)]
    assert first == [(r.event, bytes(r.data)) for r in run(7, 300)]


def test_demo_balance_is_a_consistent_running_balance() -> None:
    platform = DemoPlatform(games=GAMES, demo_user_id=USER, rng=random.Random(5), clock=FakeClock())
    balance = INITIAL_BALANCE
    expected_change: Decimal | None = None
    seen_balance = 0
    for _ in range(3000):
        for request in platform.step():
            payload = validate_publish(request).payload
            if isinstance(payload, BetData):
                mine = [b for b in payload.bets if b.player == platform.demo_player]
                if mine:
                    expected_change = -sum((Decimal(b.stake) for b in mine), Decimal(0))
            elif isinstance(payload, BetsResultData):
                expected_change = sum((Decimal(r.payout) for r in payload.results), Decimal(0))
                for result in payload.results:
                    if result.status == "lost":
                        assert Decimal(result.payout) == 0
                    if result.status == "void":
                        assert result.payout == result.stake
            elif isinstance(payload, BalanceData):
                seen_balance += 1
                if payload.reason == "deposit":
                    expected_change = Decimal(payload.balance) - balance
                    assert expected_change > 0
                assert expected_change is not None, "a balance change without a cause"
                assert Decimal(payload.balance) == balance + expected_change
                assert Decimal(payload.balance) >= 0
                balance = Decimal(payload.balance)
                expected_change = None
    assert seen_balance > 20
    assert balance == platform.balance


def test_scores_only_grow_within_a_match() -> None:
    scores: dict[str, tuple[int, int]] = {}
    for request in run(11, 3000):
        payload = validate_publish(request).payload
        if not isinstance(payload, IncidentData) or payload.score is None:
            continue
        score = (payload.score.home, payload.score.away)
        if payload.type == "kick_off":
            assert score == (0, 0)
        else:
            previous = scores[payload.gameId]
            assert score[0] >= previous[0] and score[1] >= previous[1]
            if payload.type == "goal":
                assert sum(score) == sum(previous) + 1
        scores[payload.gameId] = score


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        next(demo_requests(games=[], demo_user_id=USER, rng=random.Random(1)))
    with pytest.raises(ValueError):
        next(demo_requests(games=["bad id"], demo_user_id=USER, rng=random.Random(1)))


async def test_run_demo_feed_publishes_until_stopped() -> None:
    stop = asyncio.Event()
    published: list[PublishRequest] = []

    async def publish(request: PublishRequest) -> None:
        validate_publish(request)
        published.append(request)
        if len(published) == 20:
            stop.set()

    await asyncio.wait_for(
        run_demo_feed(
            publish, games=GAMES, demo_user_id=USER, rng=random.Random(3), rate=2000, stop=stop
        ),
        timeout=10,
    )
    assert len(published) == 20
