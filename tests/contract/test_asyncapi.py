"""The AsyncAPI document against itself, its examples, and the msgspec types that mirror it.

If the document and `igratech_ws.core.messages` drift apart (a field added on one side, a pattern
changed, a bound relaxed), a test here fails and names the field.
"""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from jsonschema import Draft7Validator

from igratech_ws import contract
from igratech_ws.core import codec, publishing
from igratech_ws.core import messages as m
from igratech_ws.core.close_codes import CLOSE_TABLE

DOC = contract.document()
COMPONENTS = DOC["components"]
SCHEMAS: dict[str, Any] = COMPONENTS["schemas"]
MESSAGES: dict[str, Any] = COMPONENTS["messages"]
MESSAGE_SCHEMAS = contract.message_schemas()
EXAMPLES = contract.examples()

SEED_MESSAGE_IDS = [
    "publish-stats",
    "publish-balance",
    "publish-bets-result",
    "publish-bet",
    "publish-incident",
    "publish-connected",
    "publish-logout",
    "subscribe-settings",
    "publish-settings",
    "subscribe-ping",
    "publish-pong",
]
SEED_SCHEMA_NAMES = ["status", "incident-data", "bet-data-item", "bets-result-data", "stats-data"]
SEED_OPERATIONS = [
    "PUB connected",
    "PUB logout",
    "PUB ping-pong",
    "SUB ping-pong",
    "PUB settings",
    "SUB settings",
    "PUB incident",
    "PUB bet",
    "PUB bets-result",
    "PUB balance",
    "PUB stats",
]

#: Every msgspec payload struct and the component schema that mirrors it.
STRUCT_SCHEMAS: dict[type[msgspec.Struct], str] = {
    m.Status: "status",
    m.IncidentData: "incident-data",
    m.BetDataItem: "bet-data-item",
    m.BetsResultData: "bets-result-data",
    m.StatsData: "stats-data",
    m.ScoreData: "score",
    m.BetData: "bet-data",
    m.BetResultItem: "bet-result-item",
    m.BalanceData: "balance-data",
    m.StreamPositionData: "stream-position",
    m.SettingsRequest: "settings-request",
    m.ChannelState: "channel-state",
    m.Settings: "settings-data",
    m.Ping: "ping-data",
    m.Pong: "pong-data",
    m.ErrorData: "error-data",
}
MESSAGE_EVENTS: dict[str, str] = {
    **{mid: event for mid, (event, _) in m.SEED_MESSAGES.items()},
    "publish-error": "error",
}


def example_id(item: tuple[str, dict[str, Any]]) -> str:
    return item[0]


def client_sent(message_id: str) -> bool:
    return message_id.startswith("subscribe-")


def sender(message_id: str) -> contract.Sender:
    return "client" if client_sent(message_id) else "server"


# --- (a) the document's shape -------------------------------------------------------------------


def test_is_asyncapi_3_with_the_seed_names() -> None:
    assert DOC["asyncapi"] == "3.0.0"
    assert DOC["info"]["version"] == "1.0.0"
    assert list(MESSAGES) == [*SEED_MESSAGE_IDS, "publish-error"]
    for message_id, message in MESSAGES.items():
        assert message["name"] == message_id
    assert set(SEED_SCHEMA_NAMES) <= set(SCHEMAS)
    assert set(STRUCT_SCHEMAS.values()) <= set(SCHEMAS)
    assert "server's (the gateway's) point of view" in DOC["info"]["description"]


def test_servers_and_channel() -> None:
    servers = DOC["servers"]
    assert (servers["production"]["host"], servers["production"]["protocol"]) == (
        "ws.igratech.webspark.dev",
        "ws",
    )
    assert servers["local"]["host"] == "localhost:8080"
    channel = DOC["channels"]["wspublic"]
    assert channel["address"] == "/wspublic"
    assert set(channel["messages"]) == set(MESSAGES)
    for message_id, ref in channel["messages"].items():
        assert ref == {"$ref": f"#/components/messages/{message_id}"}
    binding = channel["bindings"]["ws"]
    assert set(binding["query"]["properties"]) == {"token", "settings"}
    assert set(binding["headers"]["properties"]) == {"Authorization"}


def test_operations_cover_the_seed_with_explicit_actions() -> None:
    operations = DOC["operations"]
    seeds = [op["x-seed-operation"] for op in operations.values() if "x-seed-operation" in op]
    assert sorted(seeds) == sorted(SEED_OPERATIONS)
    sent: set[str] = set()
    for name, operation in operations.items():
        assert operation["action"] in ("send", "receive"), name
        assert operation["channel"] == {"$ref": "#/channels/wspublic"}
        seed = operation.get("x-seed-operation", "PUB error")
        # The seed speaks for the client (PUB = server push); the document speaks for the server.
        assert operation["action"] == ("send" if seed.startswith("PUB") else "receive"), name
        for ref in operation["messages"]:
            message_id = ref["$ref"].removeprefix("#/channels/wspublic/messages/")
            assert message_id in MESSAGES
            assert client_sent(message_id) == (operation["action"] == "receive")
            sent.add(message_id)
    assert sent == set(MESSAGES)


def test_every_field_is_typed_and_described() -> None:
    for name, schema in SCHEMAS.items():
        assert schema.get("type") == "object" and schema.get("description"), name
        assert schema.get("additionalProperties") is False, name
        for field, prop in schema["properties"].items():
            if "$ref" in prop:  # draft-07 ignores siblings of $ref; the target is described
                continue
            assert "type" in prop or "oneOf" in prop, f"{name}.{field} has no type"
            assert prop.get("description"), f"{name}.{field} has no description"


def test_every_component_schema_is_valid_draft_07() -> None:
    for schema in SCHEMAS.values():
        Draft7Validator.check_schema(schema)
    for schema in MESSAGE_SCHEMAS.values():
        Draft7Validator.check_schema(schema)


def test_error_and_close_code_tables_match_the_code() -> None:
    error_codes = [row["code"] for row in DOC["x-error-codes"]]
    assert error_codes == list(typing.get_args(m.ErrorCode))
    assert SCHEMAS["error-data"]["properties"]["code"]["enum"] == error_codes
    close_rows = {row["code"]: (row["reason"], row["reconnect"]) for row in DOC["x-close-codes"]}
    assert close_rows == {int(code): row for code, row in CLOSE_TABLE.items()}
    for code in CLOSE_TABLE:
        assert f"| {int(code)} |" in DOC["info"]["description"]


# --- (b) examples against the schemas -------------------------------------------------------------


def test_every_message_has_examples() -> None:
    for message_id, message in MESSAGES.items():
        assert message.get("examples"), message_id
        for example in message["examples"]:
            assert example["name"] and example["summary"], message_id
    results = [ex for mid, ex in EXAMPLES if mid == "publish-bets-result"]
    statuses = {r["status"] for ex in results for r in ex["data"]["results"]}
    assert {"won", "lost", "void", "cashout"} <= statuses


@pytest.mark.parametrize("item", EXAMPLES, ids=example_id)
def test_example_validates_against_its_message(item: tuple[str, dict[str, Any]]) -> None:
    message_id, frame = item
    errors = list(Draft7Validator(MESSAGE_SCHEMAS[message_id]).iter_errors(frame))
    assert not errors, [e.message for e in errors]
    assert frame["event"] == MESSAGE_EVENTS[message_id]
    contract.validate_frame(frame, sender=sender(message_id))
    contract.validate_frame(json.dumps(frame).encode())


# --- (c) examples through msgspec and the codec ---------------------------------------------


@pytest.mark.parametrize("item", EXAMPLES, ids=example_id)
def test_example_round_trips_through_msgspec(item: tuple[str, dict[str, Any]]) -> None:
    message_id, frame = item
    event, data = frame["event"], frame["data"]
    kind = contract.MESSAGE_TYPES[message_id]
    events = m.CLIENT_EVENTS if client_sent(message_id) else m.SERVER_EVENTS
    assert events[event] is kind
    payload = msgspec.json.decode(json.dumps(data), type=kind)
    assert json.loads(codec.encode(payload)) == data
    if client_sent(message_id):
        decoded_event, decoded = codec.decode_client_frame(json.dumps(frame).encode())
        assert decoded_event == event
        assert json.loads(codec.encode(decoded)) == data
    elif "channel" in frame:
        mark = b""
        if frame.get("snapshot"):
            mark = codec.SNAPSHOT_MARK
        elif frame.get("conflated"):
            mark = codec.CONFLATED_MARK
        built = codec.publication_frame(
            event, frame["channel"], frame["offset"], frame["epoch"], codec.encode(payload), mark
        )
        assert json.loads(built) == frame
    else:
        assert json.loads(codec.event_frame(event, payload)) == frame


@pytest.mark.parametrize(
    "item", [(mid, f) for mid, f in EXAMPLES if "channel" in f], ids=example_id
)
def test_channel_example_is_publishable_to_its_channel(item: tuple[str, dict[str, Any]]) -> None:
    _, frame = item
    kind, _, target = frame["channel"].partition(":")
    body: dict[str, Any] = {"event": frame["event"], "data": frame["data"]}
    if kind == "game":
        body["gameId"] = target
    elif kind == "user":
        body["userId"] = target
    request = publishing.parse_publish_body(json.dumps(body).encode())
    validated = publishing.validate_publish(request)
    assert validated.channel == frame["channel"]


# --- (d) component schemas equal the msgspec structs ---------------------------------------------

_CONSTRAINTS = (
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "const",
)
_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number"}
_STRUCT_NAMES = {kind.__name__: name for kind, name in STRUCT_SCHEMAS.items()}


def canonical(node: dict[str, Any], ref_name: Callable[[str], str]) -> dict[str, Any]:
    """What a schema constrains, whatever its spelling: `anyOf [X, null]` and `type: [x, 'null']`
    compare equal; titles, descriptions and defaults are ignored; `$ref`s compare by target."""
    if "$ref" in node:
        return {"ref": ref_name(node["$ref"])}
    out: dict[str, Any] = {}
    types: set[str] = set()
    if "type" in node:
        types |= set(node["type"] if isinstance(node["type"], list) else [node["type"]])
    if "enum" in node:
        out["enum"] = frozenset(v for v in node["enum"] if v is not None)
        if "type" not in node:
            types |= {_JSON_TYPES[type(v)] for v in node["enum"]}
    for branch in node.get("anyOf", []) + node.get("oneOf", []):
        part = canonical(branch, ref_name)
        types |= part.pop("types", frozenset())
        for key, value in part.items():
            assert out.setdefault(key, value) == value, f"conflicting {key} in {node}"
    out.update({key: node[key] for key in _CONSTRAINTS if key in node})
    for key in ("items", "additionalProperties", "propertyNames"):
        if isinstance(node.get(key), dict):
            out[key] = canonical(node[key], ref_name)
        elif key in node:
            out[key] = node[key]
    if "properties" in node:
        out["properties"] = {k: canonical(v, ref_name) for k, v in node["properties"].items()}
        out["required"] = frozenset(node.get("required", []))
    out["types"] = frozenset(types)
    return out


def _document_ref(ref: str) -> str:
    return ref.removeprefix("#/components/schemas/")


def _msgspec_ref(ref: str) -> str:
    return _STRUCT_NAMES[ref.removeprefix("#/$defs/")]


def test_every_payload_struct_has_a_schema() -> None:
    structs = {
        value
        for value in vars(m).values()
        if isinstance(value, type) and issubclass(value, m._Payload) and value is not m._Payload
    }
    assert structs == set(STRUCT_SCHEMAS)


@pytest.mark.parametrize("kind", list(STRUCT_SCHEMAS), ids=lambda kind: STRUCT_SCHEMAS[kind])
def test_schema_mirrors_struct(kind: type[msgspec.Struct]) -> None:
    schema = SCHEMAS[STRUCT_SCHEMAS[kind]]
    (_,), definitions = msgspec.json.schema_components([kind])
    generated = definitions[kind.__name__]
    fields = msgspec.structs.fields(kind)
    assert list(schema["properties"]) == [f.encode_name for f in fields]
    required = {f.encode_name for f in fields if f.required}
    assert set(schema.get("required", [])) == required
    assert schema["additionalProperties"] is False
    assert kind.__struct_config__.forbid_unknown_fields
    ours = canonical(schema, _document_ref)
    theirs = canonical(generated, _msgspec_ref)
    for field in schema["properties"]:
        assert ours["properties"][field] == theirs["properties"][field], field
    assert ours == theirs


def test_canonical_form_notices_a_change() -> None:
    changed = copy.deepcopy(SCHEMAS["balance-data"])
    changed["properties"]["balance"]["pattern"] = "^[0-9]+$"
    (_,), definitions = msgspec.json.schema_components([m.BalanceData])
    generated = canonical(definitions["BalanceData"], _msgspec_ref)
    assert canonical(changed, _document_ref) != generated
    assert canonical(SCHEMAS["balance-data"], _document_ref) == generated


# --- (e) invalid frames are refused by both sides -------------------------------------------


def _example(message_id: str, index: int = 0) -> dict[str, Any]:
    return copy.deepcopy([f for mid, f in EXAMPLES if mid == message_id][index])


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        *parents, last = (int(p) if p.isdigit() else p for p in path.split("."))
        node: Any = data
        for part in parents:
            node = node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()

#: (message id, what is wrong, mutation of the example's `data`)
MUTATIONS: list[tuple[str, str, Callable[[dict[str, Any]], None]]] = [
    ("publish-balance", "money as a number", _set("balance", 974.5)),
    ("publish-balance", "money with a comma", _set("balance", "974,50")),
    ("publish-balance", "money with 9 decimals", _set("available", "1.123456789")),
    ("publish-balance", "money in exponent form", _set("balance", "1e3")),
    ("publish-balance", "missing currency", _set("currency", _DELETE)),
    ("publish-balance", "lowercase currency", _set("currency", "eur")),
    ("publish-balance", "unknown reason", _set("reason", "lottery")),
    ("publish-balance", "unknown field", _set("credit", "10.00")),
    ("publish-bets-result", "stake as a number", _set("results.0.stake", 50)),
    ("publish-bets-result", "missing payout", _set("results.0.payout", _DELETE)),
    ("publish-bets-result", "unknown status", _set("results.0.status", "refunded")),
    ("publish-bets-result", "odds below 1", _set("results.0.odds", "0.95")),
    ("publish-bets-result", "no results", _set("results", [])),
    ("publish-bet", "unknown field in an item", _set("bets.0.ip", "10.0.0.1")),
    ("publish-bet", "id with a space", _set("gameId", "g 1001")),
    ("publish-bet", "market not snake_case", _set("bets.0.market", "Match Winner")),
    ("publish-bet", "timestamp without T", _set("bets.0.placedAt", "2026-11-23 19:45:01Z")),
    ("publish-bet", "timestamp not UTC", _set("bets.0.placedAt", "2026-11-23T19:45:01+02:00")),
    ("publish-incident", "minute as a string", _set("minute", "63")),
    ("publish-incident", "minute above 300", _set("minute", 301)),
    ("publish-incident", "negative score", _set("score.home", -1)),
    ("publish-incident", "missing gameId", _set("gameId", _DELETE)),
    ("publish-incident", "unknown side", _set("side", "both")),
    ("publish-stats", "no values", _set("values", {})),
    ("publish-stats", "value name not snake_case", _set("values.Bets", 1)),
    ("publish-stats", "value as a list", _set("values.bets_count", [1])),
    ("publish-stats", "unknown scope", _set("scope", "region")),
    ("publish-connected", "missing serverTime", _set("serverTime", _DELETE)),
    ("publish-connected", "unknown status", _set("status", "online")),
    ("publish-connected", "unknown field", _set("token", "abc")),
    ("publish-logout", "unknown reason", _set("reason", "kicked")),
    ("publish-logout", "message too long", _set("message", "x" * 501)),
    ("subscribe-settings", "games as a string", _set("games", "g-1001")),
    ("subscribe-settings", "bad game id", _set("games.0", "-g")),
    ("subscribe-settings", "negative offset", _set("recover.game:g-1001.offset", -1)),
    ("subscribe-settings", "unknown field", _set("subscribe", ["g-1001"])),
    ("publish-settings", "missing channels", _set("channels", _DELETE)),
    ("publish-settings", "stats as a string", _set("stats", "yes")),
    ("subscribe-ping", "ts as a list", _set("ts", [1])),
    ("publish-pong", "missing serverTime", _set("serverTime", _DELETE)),
    ("publish-error", "unknown code", _set("code", "oops")),
]


@pytest.mark.parametrize(
    ("message_id", "mutate"),
    [(mid, mutate) for mid, _, mutate in MUTATIONS],
    ids=[f"{mid}: {what}" for mid, what, _ in MUTATIONS],
)
def test_mutated_example_is_refused_by_both(
    message_id: str, mutate: Callable[[dict[str, Any]], None]
) -> None:
    frame = _example(message_id)
    mutate(frame["data"])
    assert not Draft7Validator(MESSAGE_SCHEMAS[message_id]).is_valid(frame)
    with pytest.raises(contract.ContractError):
        contract.validate_frame(frame, sender=sender(message_id))
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(json.dumps(frame["data"]), type=contract.MESSAGE_TYPES[message_id])


def _required_paths(message_id: str) -> list[tuple[str, str]]:
    frame = _example(message_id)
    required = SCHEMAS[STRUCT_SCHEMAS[contract.MESSAGE_TYPES[message_id]]].get("required", [])
    return [(message_id, field) for field in required if field in frame["data"]]


@pytest.mark.parametrize(
    ("message_id", "field"),
    [pair for mid in MESSAGES for pair in _required_paths(mid)],
    ids=lambda value: str(value),
)
def test_every_required_field_is_required_by_both(message_id: str, field: str) -> None:
    frame = _example(message_id)
    del frame["data"][field]
    with pytest.raises(contract.ContractError, match=field):
        contract.validate_frame(frame, sender=sender(message_id))
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.json.decode(json.dumps(frame["data"]), type=contract.MESSAGE_TYPES[message_id])


@pytest.mark.parametrize("message_id", list(MESSAGES))
def test_an_unknown_data_field_is_refused_by_both(message_id: str) -> None:
    frame = _example(message_id)
    frame["data"]["unexpected"] = 1
    with pytest.raises(contract.ContractError, match="unexpected"):
        contract.validate_frame(frame)
    with pytest.raises(msgspec.ValidationError, match="unexpected"):
        msgspec.json.decode(json.dumps(frame["data"]), type=contract.MESSAGE_TYPES[message_id])


@pytest.mark.parametrize("message_id", ["subscribe-ping", "subscribe-settings"])
def test_a_client_envelope_with_an_unknown_field_is_refused_by_both(message_id: str) -> None:
    frame = _example(message_id)
    frame["id"] = 7
    with pytest.raises(contract.ContractError):
        contract.validate_frame(frame, sender="client")
    with pytest.raises(codec.ProtocolError) as refused:
        codec.decode_client_frame(json.dumps(frame).encode())
    assert refused.value.code == "bad_message"


@pytest.mark.parametrize(
    ("message_id", "key", "value"),
    [
        ("publish-incident", "channel", "user:u-42"),
        ("publish-balance", "channel", "game:g-1001"),
        ("publish-stats", "channel", "everyone"),
        ("publish-bet", "offset", 0),
        ("publish-bet", "epoch", ""),
        ("publish-bet", "offset", "18"),
    ],
)
def test_a_push_with_a_bad_position_is_refused(message_id: str, key: str, value: Any) -> None:
    frame = _example(message_id)
    frame[key] = value
    with pytest.raises(contract.ContractError, match=key):
        contract.validate_frame(frame)


def test_a_trailing_newline_is_refused_by_both() -> None:
    frame = _example("publish-balance")
    frame["data"]["currency"] = "EUR\n"
    with pytest.raises(contract.ContractError):
        contract.validate_frame(frame)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(json.dumps(frame["data"]), type=m.BalanceData)
