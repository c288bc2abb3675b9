"""Publish validation: the target channel of each event, mismatches, and the body parsers."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from igratech_ws.core.codec import ProtocolError
from igratech_ws.core.messages import BalanceData, StatsData
from igratech_ws.core.publishing import (
    PublishRequest,
    parse_batch_body,
    parse_publish_body,
    validate_publish,
)

T = "2026-11-23T19:45:00Z"
INCIDENT = {"gameId": "g-1", "incidentId": "i-1", "type": "goal", "occurredAt": T}
BET = {
    "gameId": "g-1",
    "bets": [
        {
            "betId": "b-1",
            "market": "match_winner",
            "selection": "home",
            "odds": "2.10",
            "stake": "10.00",
            "currency": "EUR",
            "placedAt": T,
        }
    ],
}
RESULTS = {
    "results": [
        {
            "betId": "b-1",
            "gameId": "g-1",
            "status": "won",
            "stake": "10.00",
            "payout": "21.00",
            "currency": "EUR",
            "settledAt": T,
        }
    ]
}
BALANCE = {"balance": "125.50", "currency": "EUR", "updatedAt": T}
GAME_STATS = {"scope": "game", "gameId": "g-1", "updatedAt": T, "values": {"bets": 12}}
GAME_STATS_NO_ID = {"scope": "game", "updatedAt": T, "values": {"bets": 12}}
GLOBAL_STATS = {"scope": "global", "updatedAt": T, "values": {"online": 1000, "ratio": 0.5}}


def request(event: str, data: Any, **target: str) -> PublishRequest:
    body = json.dumps({"event": event, "data": data, **target}).encode()
    return parse_publish_body(body)


def refused(event: str, data: Any, **target: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        validate_publish(request(event, data, **target))
    return caught.value


@pytest.mark.parametrize(
    ("event", "data", "target", "channel"),
    [
        ("incident", INCIDENT, {"gameId": "g-1"}, "game:g-1"),
        ("bet", BET, {"gameId": "g-1"}, "game:g-1"),
        ("stats", GAME_STATS, {"gameId": "g-1"}, "game:g-1"),
        ("stats", GAME_STATS_NO_ID, {"gameId": "g-1"}, "game:g-1"),
        ("stats", GLOBAL_STATS, {}, "global"),
        ("balance", BALANCE, {"userId": "u-42"}, "user:u-42"),
        ("bets-result", RESULTS, {"userId": "u-42"}, "user:u-42"),
    ],
)
def test_targets_per_event(event: str, data: Any, target: dict[str, str], channel: str) -> None:
    validated = validate_publish(request(event, data, **target))
    assert (validated.event, validated.channel) == (event, channel)
    assert json.loads(validated.data_json) == data
    assert validated.payload == msgspec.json.decode(
        validated.data_json, type=type(validated.payload)
    )


def test_payload_is_re_encoded_compactly() -> None:
    body = b'{"event": "balance", "userId": "u-1", "data": {\n  "balance" : "1.00",  "currency": "EUR", "updatedAt": "2026-11-23T19:45:00Z"}}'
    validated = validate_publish(parse_publish_body(body))
    assert (
        validated.data_json
        == b'{"balance":"1.00","currency":"EUR","updatedAt":"2026-11-23T19:45:00Z"}'
    )
    assert isinstance(validated.payload, BalanceData)


@pytest.mark.parametrize(
    ("event", "data", "target", "field"),
    [
        ("incident", INCIDENT, {}, "gameId"),
        ("bet", BET, {}, "gameId"),
        ("incident", INCIDENT, {"userId": "u-1"}, "userId"),
        ("balance", BALANCE, {}, "userId"),
        ("bets-result", RESULTS, {}, "userId"),
        ("balance", BALANCE, {"gameId": "g-1"}, "gameId"),
        ("bets-result", RESULTS, {"gameId": "g-1"}, "gameId"),
        ("stats", GAME_STATS, {"userId": "u-1"}, "userId"),
        ("incident", INCIDENT, {"gameId": "g-2"}, "data.gameId"),
        ("bet", BET, {"gameId": "g-2"}, "data.gameId"),
        ("stats", GAME_STATS, {"gameId": "g-2"}, "data.gameId"),
        ("stats", GLOBAL_STATS, {"gameId": "g-1"}, "data.scope"),
        ("stats", GAME_STATS_NO_ID, {}, "data.scope"),
        ("stats", {**GLOBAL_STATS, "gameId": "g-1"}, {}, "data.scope"),
        ("balance", BALANCE, {"gameId": "g-1", "userId": "u-1"}, "userId"),
    ],
)
def test_mismatches_name_the_field(
    event: str, data: Any, target: dict[str, str], field: str
) -> None:
    error = refused(event, data, **target)
    assert (error.code, error.field, error.event) == ("bad_message", field, event)


def test_unknown_event() -> None:
    error = refused("connected", {"status": "connected", "serverTime": T})
    assert (error.code, error.field) == ("unknown_event", "event")


def test_invalid_payload_names_the_field() -> None:
    error = refused("balance", {**BALANCE, "balance": 12}, userId="u-1")
    assert (error.code, error.field) == ("bad_message", "data.balance")


def test_stats_values_may_mix_numbers_and_strings() -> None:
    validated = validate_publish(
        request("stats", {**GLOBAL_STATS, "values": {"a": 1, "b": 1.5, "c": "x"}})
    )
    assert isinstance(validated.payload, StatsData)
    assert validated.payload.values == {"a": 1, "b": 1.5, "c": "x"}


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (b"{", "bad_json", None),
        (b"[]", "bad_message", None),
        (b'{"data":{}}', "bad_message", None),
        (b'{"event":"bet","data":{},"channel":"x"}', "bad_message", None),
        (b'{"event":"bet","data":{},"gameId":"bad id"}', "bad_message", "gameId"),
        (b'{"event":"bet","data":{},"userId":7}', "bad_message", "userId"),
        (b'{"event":7,"data":{}}', "bad_message", "event"),
    ],
)
def test_parse_publish_body_errors(body: bytes, code: str, field: str | None) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_publish_body(body)
    assert (caught.value.code, caught.value.field) == (code, field)
    if field:
        assert field in caught.value.message


def test_parse_batch_body() -> None:
    items = [
        {"event": "incident", "gameId": "g-1", "data": INCIDENT},
        {"event": "stats", "data": GLOBAL_STATS},
    ]
    parsed = parse_batch_body(json.dumps({"items": items}).encode(), max_items=2)
    assert [validate_publish(p).channel for p in parsed] == ["game:g-1", "global"]


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (b"nope", "bad_json", None),
        (b"{}", "bad_message", None),
        (b'{"items":[]}', "bad_message", "items"),
        (
            b'{"items":[{"event":"x","data":{}},{"event":"x","data":{}},{"event":"x","data":{}}]}',
            "bad_message",
            "items",
        ),
        (b'{"items":[{"event":"x","data":{}},{"data":{}}]}', "bad_message", "items[1]"),
        (b'{"items":[{"event":"x","data":{},"gameId":""}]}', "bad_message", "items[0].gameId"),
    ],
)
def test_parse_batch_body_errors(body: bytes, code: str, field: str | None) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_batch_body(body, max_items=2)
    assert (caught.value.code, caught.value.field) == (code, field)
