"""Publish validation: the target channel of each event, mismatches, and the body parsers."""

from __future__ import annotations

import copy
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from igratech_ws.core.codec import ProtocolError
from igratech_ws.core.messages import BalanceData, StatsData
from igratech_ws.core.publishing import (
    PublishRequest,
    decode_valid_publish,
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


# --- the one-pass reading of a single publish agrees with the two-pass one ----------------------

VALID_BODIES = {
    "incident": {"event": "incident", "gameId": "g-1", "data": INCIDENT},
    "bet": {"event": "bet", "gameId": "g-1", "data": BET},
    "game stats": {"event": "stats", "gameId": "g-1", "data": GAME_STATS},
    "game stats without id": {"event": "stats", "gameId": "g-1", "data": GAME_STATS_NO_ID},
    "global stats": {"event": "stats", "data": GLOBAL_STATS},
    "balance": {"event": "balance", "userId": "u-42", "data": BALANCE},
    "bets-result": {"event": "bets-result", "userId": "u-42", "data": RESULTS},
}
#: Values that break (or keep) a body: wrong types, patterns, bounds, targets, unknown members.
ODD_VALUES: list[Any] = [
    None, 0, -1, 301, 1.5, True, "", " ", "g-2", "g 1", "x" * 65, "x" * 129, "u-42", "global",
    "game", "incident", "balance", "stats", "jackpot", "2026-11-23T19:45:00Z", "1.00", "EUR",
    [], {}, [1], {"a": 1}, "\ud800",
]  # fmt: skip
TOP_KEYS = ["event", "gameId", "userId", "idempotencyKey", "data", "extra"]
DATA_KEYS = ["gameId", "incidentId", "type", "occurredAt", "minute", "side", "score", "scope",
             "values", "balance", "currency", "updatedAt", "bets", "results", "description"]  # fmt: skip

_DROP = object()
_changes = st.lists(
    st.tuples(
        st.booleans(), st.sampled_from(TOP_KEYS + DATA_KEYS), st.sampled_from([_DROP, *ODD_VALUES])
    ),
    max_size=3,
)


def two_pass(body: bytes) -> tuple[Any, str | None] | None:
    """The reference reading: `parse_publish_body` then `validate_publish` (None if refused)."""
    try:
        request = parse_publish_body(body)
        return validate_publish(request), request.idempotencyKey
    except ProtocolError:
        return None


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(VALID_BODIES)), _changes, st.sampled_from([None, "k-1", "k.2_x"]))
def test_the_one_pass_reading_accepts_exactly_what_the_two_pass_reading_does(
    kind: str, changes: list[tuple[bool, str, Any]], key: str | None
) -> None:
    body: dict[str, Any] = json.loads(json.dumps(VALID_BODIES[kind]))
    if key is not None:
        body["idempotencyKey"] = key
    for in_data, name, value in changes:
        target = body["data"] if in_data and isinstance(body.get("data"), dict) else body
        if value is _DROP:
            target.pop(name, None)
        else:
            # A copy: the odd `{}` and `[]` are shared by every example, and a body that held
            # one in two places could be made to hold itself.
            target[name] = copy.deepcopy(value)
    raw = json.dumps(body).encode()
    assert decode_valid_publish(raw) == two_pass(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.sampled_from([b"", b" ", b"{", b"[]", b"null", b"\xff{}"]))
def test_the_one_pass_reading_refuses_what_the_two_pass_reading_refuses(raw: bytes) -> None:
    one = decode_valid_publish(raw)
    assert one is None or one == two_pass(raw)


@pytest.mark.parametrize("kind", sorted(VALID_BODIES))
def test_valid_bodies_are_read_in_one_pass(kind: str) -> None:
    raw = json.dumps(VALID_BODIES[kind]).encode()
    assert decode_valid_publish(raw) is not None
    assert decode_valid_publish(raw) == two_pass(raw)


def test_a_repeated_member_is_left_to_the_two_pass_reading() -> None:
    """JSON leaves a repeated member's meaning open; the two-pass reading (the reference) takes
    the last `data`, the one-pass reading fails on the first: it refuses, and the caller reads
    the body in two passes."""
    data = json.dumps(INCIDENT)
    raw = f'{{"event": "incident", "gameId": "g-1", "data": 1, "data": {data}}}'.encode()
    assert decode_valid_publish(raw) is None
    reference = two_pass(raw)
    assert reference is not None and reference[0].channel == "game:g-1"


def test_a_body_nested_too_deeply_is_refused_in_one_pass() -> None:
    raw = b'{"event": "incident", "gameId": "g-1", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert decode_valid_publish(raw) is None
    assert two_pass(raw) is None
