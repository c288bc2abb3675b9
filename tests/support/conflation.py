"""What the conflation tests share (issue 12): publications of a game's stats and incidents on
the fake hub, the payloads the real-socket tests publish, joining channels, and `check_view`,
the one verdict on what a slow client received."""

from __future__ import annotations

import json
from typing import Any

from igratech_ws.brokers.base import Publication
from igratech_ws.core.channels import STATE_EVENTS
from tests.support.fakes import FakeSubscriber, RecordingBroker, settle
from tests.support.gateway import NOW

GAME = "game:g-1"
OTHER = "game:g-2"


def stats(broker: RecordingBroker, n: int, channel: str = GAME) -> Publication:
    body = {"scope": "game", "gameId": channel[5:], "updatedAt": "2026-11-23T19:45:00Z"}
    return broker.publish_now(channel, "stats", json.dumps({**body, "values": {"n": n}}).encode())


def incident(broker: RecordingBroker, n: int, channel: str = GAME) -> Publication:
    return broker.publish_now(channel, "incident", json.dumps({"incidentId": f"i-{n}"}).encode())


def fall_behind(sub: FakeSubscriber, hub: Any) -> None:
    """The client stopped reading long ago: its socket holds more than a quarter of the budget."""
    sub.reading = False
    sub.backlog = hub.low_water + 1


async def followed(hub: Any, sub: FakeSubscriber, *channels: str) -> None:
    for channel in channels:
        hub.finish_join(sub, await hub.join(sub, channel, None))
    await settle()


def check_view(frames: list[dict[str, Any]], published: list[Publication]) -> None:
    """Per channel: offsets increase; every stream publication is there; a skip is only over
    state publications of the event of the frame after it, which is marked conflated."""
    by_offset = {(p.channel, p.offset): p for p in published}
    for channel in {p.channel for p in published}:
        mine = [f for f in frames if f.get("channel") == channel and not f.get("snapshot")]
        seen = [f["offset"] for f in mine]
        assert seen == sorted(set(seen)), seen
        streams = [
            p.offset for p in published if p.channel == channel and p.event not in STATE_EVENTS
        ]
        assert [o for o in seen if by_offset[(channel, o)].event not in STATE_EVENTS] == streams
        previous = 0
        for frame in mine:
            skipped = [by_offset[(channel, o)] for o in range(previous + 1, frame["offset"])]
            if skipped:
                assert frame.get("conflated") is True, (frame, skipped)
                assert frame["event"] in STATE_EVENTS
                assert {p.event for p in skipped} == {frame["event"]}, skipped
            else:
                assert "conflated" not in frame, frame
            assert json.loads(by_offset[(channel, frame["offset"])].data) == frame["data"]
            previous = frame["offset"]
        last = max(p.offset for p in published if p.channel == channel)
        assert previous == last, "the newest publication of the channel never arrived"


async def read_and_check(hub: Any, sub: FakeSubscriber, published: list[Publication]) -> None:
    """The client reads everything at last: what it got must pass `check_view`."""
    sub.reading = True
    sub.drain(hub)
    await settle()
    check_view(sub.frames(), published)


def big_stats(broker: RecordingBroker, n: int, channel: str = GAME) -> Publication:
    """A stats publication of about 3 KB (a game's full table), as in the socket test."""
    values = {f"v{i:03d}": f"{n}-{i}-xxxxxxxx" for i in range(120)}
    body = {"scope": "game", "gameId": channel[5:], "updatedAt": "2026-11-23T19:45:00Z"}
    return broker.publish_now(channel, "stats", json.dumps({**body, "values": values}).encode())


# --- payloads for the real-socket tests ---------------------------------------------------------


def stats_data(n: int) -> bytes:
    values = {f"v{i:03d}": f"{n}-{i}-" + "x" * 8 for i in range(120)}
    values["seq"] = str(n)
    return json.dumps(
        {"scope": "game", "gameId": "g-1", "updatedAt": NOW, "values": values},
        separators=(",", ":"),
    ).encode()


def bet_data(n: int) -> bytes:
    item = {
        "market": "match_winner",
        "selection": "home",
        "odds": "2.10",
        "stake": "5.00",
        "currency": "EUR",
        "placedAt": NOW,
    }
    bets = [{"betId": f"b-{n}-{i}", **item} for i in range(50)]
    return json.dumps({"gameId": "g-1", "bets": bets}, separators=(",", ":")).encode()


def incident_data(n: int) -> bytes:
    return json.dumps(
        {"gameId": "g-1", "incidentId": f"i-{n}", "type": "corner", "occurredAt": NOW},
        separators=(",", ":"),
    ).encode()
