"""The codec: decoding client frames and payloads with errors that name the field, and encoding
frames (including the shared publication frame) that parse back to what was meant.

The round-trip tests generate payloads from the msgspec types themselves (their patterns, bounds
and optional fields), so a constraint added to `messages.py` is exercised without editing here.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igratech_ws.contract import validate_frame
from igratech_ws.core import channels
from igratech_ws.core.codec import (
    DECODE_FAILURES,
    ProtocolError,
    decode_client_frame,
    decode_failure,
    decode_json,
    decode_payload,
    encode,
    event_frame,
    publication_frame,
    split_validation_error,
)
from igratech_ws.core.messages import (
    CLIENT_EVENTS,
    PUBLISHED_EVENTS,
    SERVER_EVENTS,
    ErrorData,
    IncidentData,
    Ping,
    SettingsRequest,
    StreamPositionData,
)

ROUND_TRIP = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))

# --- strategies built from msgspec type information -------------------------------------------


_ALNUM = "ABCXYZabcxyz0189"
_DIGITS = st.integers(0, 9).map(str)


def _digits(low: int, high: int) -> st.SearchStrategy[str]:
    return st.text(alphabet="0123456789", min_size=low, max_size=high)


#: Fast generators for the contract's patterns (from_regex is correct but slow on these).
_KNOWN_PATTERNS: dict[str, st.SearchStrategy[str]] = {
    r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$": st.builds(
        str.__add__,
        st.sampled_from(_ALNUM),
        st.text(alphabet=_ALNUM + "_.-", max_size=12),
    ),
    r"^[a-z][a-z0-9_]*$": st.builds(
        str.__add__, st.sampled_from("abkz"), st.text(alphabet="abz09_", max_size=8)
    ),
    r"^-?[0-9]{1,15}(\.[0-9]{1,8})?$": st.builds(
        lambda sign, whole, frac: sign + whole + frac,
        st.sampled_from(["", "-"]),
        _digits(1, 15),
        st.just("") | _digits(1, 8).map(lambda d: "." + d),
    ),
    r"^[1-9][0-9]{0,5}(\.[0-9]{1,4})?$": st.builds(
        lambda head, tail, frac: head + tail + frac,
        st.sampled_from("19"),
        _digits(0, 5),
        st.just("") | _digits(1, 4).map(lambda d: "." + d),
    ),
    r"^[A-Z][A-Z0-9]{2,7}$": st.builds(
        str.__add__, st.sampled_from("EUB"), st.text(alphabet="EURSD0T", min_size=2, max_size=7)
    ),
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z$": st.builds(
        lambda stamp, frac: stamp + frac + "Z",
        st.datetimes()
        .map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S"))
        .filter(lambda s: len(s) == 19),
        st.just("") | _digits(1, 9).map(lambda d: "." + d),
    ),
}


def _pattern_strategy(pattern: str, min_size: int, max_size: int) -> st.SearchStrategy[str]:
    known = _KNOWN_PATTERNS.get(pattern)
    if known is not None:
        return known.filter(lambda s: min_size <= len(s) <= max_size)
    body = pattern.removeprefix("^").removesuffix("$")
    return st.from_regex(re.compile(body), fullmatch=True).filter(
        lambda s: min_size <= len(s) <= max_size
    )


def strategy_for(info: mi.Type) -> st.SearchStrategy[Any]:
    """A hypothesis strategy of values valid for the msgspec type `info` (small collections)."""
    if isinstance(info, mi.Metadata):
        return strategy_for(info.type)
    if isinstance(info, mi.StrType):
        low = info.min_length or 0
        high = info.max_length if info.max_length is not None else 40
        if info.pattern:
            return _pattern_strategy(info.pattern, low, high)
        return st.text(min_size=low, max_size=min(high, 40))
    if isinstance(info, mi.BoolType):
        return st.booleans()
    if isinstance(info, mi.IntType):
        low = info.ge if info.ge is not None else (info.gt + 1 if info.gt is not None else -(2**63))
        high = (
            info.le if info.le is not None else (info.lt - 1 if info.lt is not None else 2**63 - 1)
        )
        return st.integers(low, high)
    if isinstance(info, mi.FloatType):
        return st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(info, mi.NoneType):
        return st.none()
    if isinstance(info, mi.LiteralType):
        return st.sampled_from(info.values)
    if isinstance(info, mi.UnionType):
        return st.one_of([strategy_for(member) for member in info.types])
    if isinstance(info, mi.ListType):
        low = info.min_length or 0
        return st.lists(strategy_for(info.item_type), min_size=low, max_size=max(low, 3))
    if isinstance(info, mi.DictType):
        low = info.min_length or 0
        return st.dictionaries(
            strategy_for(info.key_type),
            strategy_for(info.value_type),
            min_size=low,
            max_size=max(low, 3),
        )
    if isinstance(info, mi.StructType):
        required = {f.name: strategy_for(f.type) for f in info.fields if f.required}
        optional = {f.name: strategy_for(f.type) for f in info.fields if not f.required}
        cls = info.cls
        return st.fixed_dictionaries(required, optional=optional).map(lambda kw: cls(**kw))
    raise NotImplementedError(f"no strategy for {info!r}")


def payloads(kind: type[msgspec.Struct]) -> st.SearchStrategy[Any]:
    return strategy_for(mi.type_info(kind))


#: Published payloads are covered (with the contract check) by the next test.
OTHER_TYPES = sorted(
    {*CLIENT_EVENTS.values(), *SERVER_EVENTS.values()} - set(PUBLISHED_EVENTS.values()),
    key=lambda k: k.__name__,
)


@pytest.mark.parametrize("kind", OTHER_TYPES, ids=lambda k: k.__name__)
@ROUND_TRIP
@given(data=st.data())
def test_payload_round_trip(kind: type[msgspec.Struct], data: st.DataObject) -> None:
    value = data.draw(payloads(kind))
    encoded = encode(value)
    assert msgspec.json.decode(encoded, type=kind) == value
    # compact: encoding again gives the same bytes
    assert encode(msgspec.json.decode(encoded, type=kind)) == encoded


def _channel_for(event: str, payload: Any) -> str:
    if event in ("balance", "bets-result"):
        return "user:u-1"
    if event == "stats" and payload.scope == "global":
        return channels.GLOBAL_CHANNEL
    return channels.game_channel(getattr(payload, "gameId", None) or "g-1")


@pytest.mark.parametrize("event", sorted(PUBLISHED_EVENTS))
@ROUND_TRIP
@given(
    data=st.data(),
    offset=st.integers(1, 2**53),
    epoch=st.from_regex(r"[0-9a-f]{8}", fullmatch=True),
)
def test_published_payload_round_trip_and_contract(
    event: str, data: st.DataObject, offset: int, epoch: str
) -> None:
    """A valid payload decodes to itself, and its publication frame passes the AsyncAPI schema."""
    payload = data.draw(payloads(PUBLISHED_EVENTS[event]))
    data_json = encode(payload)
    assert decode_payload(event, data_json) == payload
    channel = _channel_for(event, payload)
    raw = publication_frame(event, channel, offset, epoch, data_json)
    parsed = json.loads(raw)
    assert parsed == {
        "event": event,
        "channel": channel,
        "offset": offset,
        "epoch": epoch,
        "data": json.loads(data_json),
    }
    validate_frame(raw, sender="server")


# --- decode_client_frame ----------------------------------------------------------------------


def test_decode_ping() -> None:
    assert decode_client_frame(b'{"event":"ping","data":{"ts":5}}') == ("ping", Ping(ts=5))
    assert decode_client_frame('{"event":"ping"}') == ("ping", Ping())


def test_decode_settings() -> None:
    event, payload = decode_client_frame(
        b'{"event":"settings","data":{"games":["g-1"],"recover":{"game:g-1":{"offset":5,"epoch":"ab12"}}}}'
    )
    assert event == "settings"
    assert payload == SettingsRequest(
        games=["g-1"], recover={"game:g-1": StreamPositionData(offset=5, epoch="ab12")}
    )


def _error(frame: bytes | str) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode_client_frame(frame)
    return caught.value


@pytest.mark.parametrize(
    ("raw", "code", "event", "field"),
    [
        (b"nope", "bad_json", None, None),
        (b'{"event":"ping"', "bad_json", None, None),
        (b'{"event":"ping","data":{"ts":1,}}', "bad_json", None, None),
        (b"7", "bad_message", None, None),
        (b'{"event":null}', "bad_message", None, "event"),
        (b'{"event":"ping","data":{"ts":{}}}', "bad_message", "ping", "data.ts"),
        (
            b'{"event":"settings","data":{"games":[1]}}',
            "invalid_settings",
            "settings",
            "data.games[0]",
        ),
        (
            b'{"event":"settings","data":{"unfollow":[""]}}',
            "invalid_settings",
            "settings",
            "data.unfollow[0]",
        ),
        (
            b'{"event":"settings","data":{"games":["' + b"a" * 65 + b'"]}}',
            "invalid_settings",
            "settings",
            "data.games[0]",
        ),
        (b'{"event":"incident","data":{}}', "unknown_event", "incident", None),
    ],
)
def test_decode_errors(raw: bytes, code: str, event: str | None, field: str | None) -> None:
    error = _error(raw)
    assert (error.code, error.event, error.field) == (code, event, field)
    assert error.message


def test_recover_errors_name_the_recover_field() -> None:
    error = _error(
        b'{"event":"settings","data":{"recover":{"game:g-1":{"offset":-1,"epoch":"x"}}}}'
    )
    assert error.code == "invalid_settings"
    assert error.field is not None
    assert error.field.startswith("data.recover")
    assert error.field.endswith(".offset")


def test_too_many_games_in_one_list_is_invalid_settings() -> None:
    games = json.dumps([f"g{i}" for i in range(1001)])
    error = _error(('{"event":"settings","data":{"games":' + games + "}}").encode())
    assert (error.code, error.field) == ("invalid_settings", "data.games")


def test_error_data_is_cut_to_the_contract() -> None:
    data = ProtocolError("bad_message", "x" * 2000, event="ping", field="data").to_data()
    assert data == ErrorData(code="bad_message", message="x" * 500, event="ping", field="data")
    validate_frame(event_frame("error", data), sender="server")


# --- decode_payload (published events) --------------------------------------------------------

INCIDENT: dict[str, Any] = {
    "gameId": "g-1",
    "incidentId": "i-1",
    "type": "goal",
    "occurredAt": "2026-11-23T19:45:00Z",
}
BET_ITEM = {
    "betId": "b-1",
    "market": "match_winner",
    "selection": "home",
    "odds": "2.10",
    "stake": "10.00",
    "currency": "EUR",
    "placedAt": "2026-11-23T19:45:00Z",
}


def test_decode_payload_accepts_a_valid_incident() -> None:
    assert decode_payload("incident", json.dumps(INCIDENT).encode()) == IncidentData(**INCIDENT)


@pytest.mark.parametrize(
    ("event", "data", "field"),
    [
        ("incident", {**INCIDENT, "minute": 301}, "data.minute"),
        ("incident", {**INCIDENT, "score": {"home": 1, "away": -1}}, "data.score.away"),
        ("incident", {**INCIDENT, "extra": 1}, "data"),
        ("incident", {k: v for k, v in INCIDENT.items() if k != "type"}, "data"),
        ("bet", {"gameId": "g-1", "bets": [{**BET_ITEM, "stake": 10}]}, "data.bets[0].stake"),
        (
            "bet",
            {"gameId": "g-1", "bets": [BET_ITEM, {**BET_ITEM, "odds": "0.5"}]},
            "data.bets[1].odds",
        ),
        ("bet", {"gameId": "g-1", "bets": []}, "data.bets"),
        (
            "balance",
            {"balance": "1", "currency": "eur", "updatedAt": "2026-11-23T19:45:00Z"},
            "data.currency",
        ),
    ],
)
def test_decode_payload_names_the_field(event: str, data: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_payload(event, json.dumps(data).encode())
    error = caught.value
    assert (error.code, error.event) == ("bad_message", event)
    if field == "data":
        assert error.field == "data"
    else:
        assert error.field is not None
        assert error.field.startswith(field), (error.field, field)
    assert error.field in error.message


def test_decode_payload_bad_code_is_chosen_by_the_caller() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_payload("settings", b'{"games":7}', bad_code="invalid_settings")
    assert caught.value.code == "invalid_settings"


def test_decode_payload_of_an_unknown_event() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_payload("connected", b"{}")
    assert caught.value.code == "unknown_event"


def test_decode_payload_of_bad_json() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_payload("incident", b"{not json")
    assert (caught.value.code, caught.value.event) == ("bad_json", "incident")


# --- every decode failure is a documented error (issue 9, item 5) ----------------------------


def _nested(depth: int, open_: bytes = b"[", close: bytes = b"]", inner: bytes = b"") -> bytes:
    return open_ * depth + inner + close * depth


@pytest.mark.parametrize("depth", [999, 1000, 5000, 30_000])
@pytest.mark.parametrize(
    ("template", "code", "event"),
    [
        (b'{"event":"ping","data":%s}', "bad_message", None),
        (b'{"event":"ping","data":{"ts":%s}}', "bad_message", None),
        (b'{"event":"settings","data":{"games":%s}}', "bad_message", None),
        (b"%s", "bad_message", None),
    ],
)
def test_deep_nesting_in_a_frame_is_an_error_event_not_a_crash(
    depth: int, template: bytes, code: str, event: str | None
) -> None:
    """On main a 30,000-deep array escaped as RecursionError: the socket closed with 1011 and a
    traceback was logged. Whatever the depth, it is an `error` the client can read."""
    for body in (_nested(depth), _nested(depth, b'{"a":', b"}", b"1")):
        frame = template % body
        error = _error(frame)
        assert error.code in ("bad_json", "bad_message", "invalid_settings"), error.code
        assert len(error.to_data().message) <= 500


@pytest.mark.parametrize("event", sorted(PUBLISHED_EVENTS))
def test_deep_nesting_in_a_published_payload_is_bad_message(event: str) -> None:
    """The HTTP API's payload validation goes through `decode_payload`: a 999-deep body is a 400
    with `bad_message`, never an exception (main answered 500)."""
    with pytest.raises(ProtocolError) as caught:
        decode_payload(event, b'{"x":' + _nested(999) + b"}")
    assert caught.value.code in ("bad_message", "bad_json")


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (RecursionError("maximum recursion depth exceeded"), "invalid_settings"),
        (MemoryError(), "invalid_settings"),
        (msgspec.DecodeError("JSON is malformed"), "bad_json"),
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), "bad_json"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "bad_json"),
    ],
)
def test_decode_failure_maps_every_failure_msgspec_raises(exc: Exception, code: str) -> None:
    assert isinstance(exc, DECODE_FAILURES)
    error = decode_failure(exc, what="Body", bad_code="invalid_settings", event="settings")
    assert (error.code, error.event) == (code, "settings")


def test_decode_json_names_the_field_with_its_prefix() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_json(
            msgspec.json.Decoder(SettingsRequest),
            b'{"games":[1]}',
            what="Body",
            bad_code="invalid_settings",
            field_prefix="settings.",
        )
    assert (caught.value.code, caught.value.field) == ("invalid_settings", "settings.games[0]")
    assert caught.value.message.endswith("at settings.games[0]")


_JSONISH = st.lists(
    st.sampled_from(
        [
            b"{",
            b"}",
            b"[",
            b"]",
            b'"',
            b":",
            b",",
            b"1",
            b"-",
            b"e",
            b"1e999999",
            b"null",
            b"true",
            b'"\\ud800"',
            b'"event"',
            b'"data"',
            b'"ping"',
            b'"settings"',
            b'"games"',
            b"\xff",
            b"\xed\xa0\x80",
            b" ",
            b"0.",
            b"NaN",
            b"[" * 1200,
            b'{"a":' * 1200,
            b"18446744073709551616",
            b'"recover"',
            b'"offset"',
            b'"epoch"',
            b'"ts"',
        ]
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=_JSONISH, as_text=st.booleans())
def test_fuzzed_input_only_ever_raises_protocol_error(raw: bytes, as_text: bool) -> None:
    """Whatever a client or the backend sends, decoding raises `ProtocolError` or succeeds."""
    frame: bytes | str = raw.decode("utf-8", "surrogateescape") if as_text else raw
    try:
        decode_client_frame(frame)
    except ProtocolError as error:
        assert error.code in ("bad_json", "bad_message", "unknown_event", "invalid_settings")
    for event in (*CLIENT_EVENTS, *PUBLISHED_EVENTS):
        try:
            decode_payload(event, frame)
        except ProtocolError as error:
            assert error.code in ("bad_json", "bad_message")


def test_split_validation_error() -> None:
    try:
        msgspec.json.decode(b'{"games":[1]}', type=SettingsRequest)
    except msgspec.ValidationError as exc:
        assert split_validation_error(exc) == ("Expected `str`, got `int`", "games[0]")
    try:
        msgspec.json.decode(b"[]", type=SettingsRequest)
    except msgspec.ValidationError as exc:
        assert split_validation_error(exc) == ("Expected `object`, got `array`", None)


# --- encoding ---------------------------------------------------------------------------------


def test_event_frame_is_the_envelope() -> None:
    raw = event_frame("pong", {"serverTime": "2026-11-23T19:45:00Z", "ts": 1})
    assert json.loads(raw) == {
        "event": "pong",
        "data": {"serverTime": "2026-11-23T19:45:00Z", "ts": 1},
    }
    validate_frame(raw, sender="server")


def test_encode_is_compact() -> None:
    assert encode({"a": [1, 2], "b": None}) == b'{"a":[1,2],"b":null}'
    assert encode(Ping()) == b"{}"  # omit_defaults


@settings(max_examples=100, deadline=None)
@given(
    event=st.text(max_size=20),
    channel=st.text(max_size=40),
    offset=st.integers(0, 2**63 - 1),
    epoch=st.text(max_size=20),
    data=st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
        max_leaves=15,
    ),
)
def test_publication_frame_is_valid_json_equal_to_the_envelope(
    event: str, channel: str, offset: int, epoch: str, data: Any
) -> None:
    raw = publication_frame(event, channel, offset, epoch, encode(data))
    assert json.loads(raw) == {
        "event": event,
        "channel": channel,
        "offset": offset,
        "epoch": epoch,
        "data": data,
    }
    assert msgspec.json.decode(raw) == json.loads(raw)


def test_publication_frame_example() -> None:
    raw = publication_frame(
        "incident", "game:g-1", 17, "a1b2c3d4", encode(IncidentData(**INCIDENT))
    )
    assert raw == (
        b'{"event":"incident","channel":"game:g-1","offset":17,"epoch":"a1b2c3d4","data":'
        b'{"gameId":"g-1","incidentId":"i-1","type":"goal","occurredAt":"2026-11-23T19:45:00Z"}}'
    )
    validate_frame(raw, sender="server")


# --- known bugs -------------------------------------------------------------------------------


def test_identifier_with_trailing_newline_is_refused() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_payload("incident", json.dumps({**INCIDENT, "gameId": "g-1\n"}).encode())
    assert caught.value.field == "data.gameId"


def test_bad_dict_key_names_the_dict() -> None:
    data = {"scope": "game", "updatedAt": "2026-11-23T19:45:00Z", "values": {"Bad": 1}}
    with pytest.raises(ProtocolError) as caught:
        decode_payload("stats", json.dumps(data).encode())
    assert caught.value.field == "data.values"
    assert "`" not in caught.value.message.split(" at ")[-1]
