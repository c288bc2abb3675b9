"""The AsyncAPI document at run time: its text, one JSON Schema per message, its examples, and a
check of any frame against the message its `event` names.

The document (``asyncapi/igratech-ws.yaml``) is the contract; `igratech_ws.core.messages` mirrors it
and the contract tests keep the two equal. The server validates with msgspec (fast, in C); this
module is for tests, tools and clients that want the document's own word on a frame.

jsonschema is a development dependency, imported only when a frame is validated. Without it,
`validate_frame` falls back to the msgspec types: the `data` is checked in full, the envelope by its
keys and its `event` only.
"""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import yaml

from igratech_ws.core.messages import SEED_MESSAGES, ErrorData

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

#: Where the document lives in a source checkout; an installed package carries a copy instead.
DOCUMENT_PATH = Path(__file__).resolve().parents[2] / "asyncapi" / "igratech-ws.yaml"
#: AsyncAPI 3.0's Schema Object is a superset of JSON Schema draft-07.
JSON_SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"
_SCHEMA_REF = "#/components/schemas/"
_MESSAGE_REF = "#/channels/wspublic/messages/"

#: Who sends a frame: "server" for `send` operations, "client" for `receive` ones.
Sender = Literal["server", "client"]

#: Message id -> payload type of its `data` (the msgspec side of the contract).
MESSAGE_TYPES: dict[str, type[msgspec.Struct]] = {
    **{message_id: kind for message_id, (_, kind) in SEED_MESSAGES.items()},
    "publish-error": ErrorData,
}


class ContractError(ValueError):
    """A frame that breaks the contract, or a document that cannot be used.

    `message_id` is the message the frame was checked against (None when no message matched its
    event) and `path` the offending location in the frame (``data.bets[0].stake``), if known.
    """

    def __init__(self, text: str, *, message_id: str | None = None, path: str | None = None):
        super().__init__(text)
        self.message_id = message_id
        self.path = path


@functools.cache
def document_text() -> str:
    """The document as served at ``/asyncapi.yaml``. Raises `FileNotFoundError` if it is missing."""
    if DOCUMENT_PATH.is_file():
        return DOCUMENT_PATH.read_text(encoding="utf-8")
    packaged = resources.files("igratech_ws").joinpath("asyncapi.yaml")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    raise FileNotFoundError(f"AsyncAPI document not found at {DOCUMENT_PATH} nor in the package")


@functools.cache
def _document() -> dict[str, Any]:
    loaded = yaml.safe_load(document_text())
    if not isinstance(loaded, dict) or not str(loaded.get("asyncapi", "")).startswith("3."):
        raise ContractError("The AsyncAPI document is not an AsyncAPI 3 mapping")
    return loaded


def document() -> dict[str, Any]:
    """The parsed document (a fresh copy: the caller may change it)."""
    return copy.deepcopy(_document())


def _inline(node: Any, schemas: dict[str, Any], seen: frozenset[str]) -> Any:
    """`node` with every component-schema `$ref` replaced by a copy of its target."""
    if isinstance(node, list):
        return [_inline(item, schemas, seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        name = ref.removeprefix(_SCHEMA_REF)
        if name == ref or name not in schemas:
            raise ContractError(f"Unresolvable $ref {ref!r}")
        if name in seen:  # a recursive schema cannot be inlined; the document has none
            raise ContractError(f"Recursive schema {name!r}")
        return _inline(schemas[name], schemas, seen | {name})
    return {key: _inline(value, schemas, seen) for key, value in node.items()}


@functools.cache
def _message_schemas() -> dict[str, dict[str, Any]]:
    components = _document()["components"]
    schemas: dict[str, Any] = components["schemas"]
    result: dict[str, dict[str, Any]] = {}
    for message_id, message in components["messages"].items():
        schema = _inline(message["payload"], schemas, frozenset())
        result[message_id] = {"$schema": JSON_SCHEMA_DIALECT, **schema}
    return result


def message_schemas() -> dict[str, dict[str, Any]]:
    """Message id -> draft-07 JSON Schema of its complete frame, every `$ref` inlined (copies)."""
    return copy.deepcopy(_message_schemas())


def examples() -> list[tuple[str, dict[str, Any]]]:
    """Every example frame of the document as (message id, frame), in document order (copies)."""
    messages = _document()["components"]["messages"]
    return [
        (message_id, copy.deepcopy(example["payload"]))
        for message_id, message in messages.items()
        for example in message.get("examples", [])
    ]


@functools.cache
def _routes() -> dict[str, list[tuple[str, Sender]]]:
    """Event name -> [(message id, sender)], from each message's `event` const and operation."""
    senders: dict[str, Sender] = {}
    for operation in _document()["operations"].values():
        sender: Sender = "server" if operation["action"] == "send" else "client"
        for ref in operation["messages"]:
            senders[ref["$ref"].removeprefix(_MESSAGE_REF)] = sender
    routes: dict[str, list[tuple[str, Sender]]] = {}
    for message_id, schema in _message_schemas().items():
        event = schema["properties"]["event"]["const"]
        routes.setdefault(event, []).append((message_id, senders[message_id]))
    return routes


@functools.cache
def _validators() -> dict[str, Validator] | None:
    """Message id -> compiled validator, or None when jsonschema is not installed."""
    try:
        from jsonschema import Draft7Validator
    except ImportError:
        return None
    return {mid: Draft7Validator(schema) for mid, schema in _message_schemas().items()}


def _path(parts: Any) -> str | None:
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)
    return text.lstrip(".") or None


def _violation(message_id: str, frame: dict[str, Any]) -> ContractError | None:
    """Why `frame` breaks message `message_id`, or None if it conforms."""
    validators = _validators()
    if validators is not None:
        from jsonschema.exceptions import best_match

        error = best_match(validators[message_id].iter_errors(frame))
        if error is None:
            return None
        where = _path(error.absolute_path)
        text = f"{message_id}: {error.message}" + (f" at {where}" if where else "")
        return ContractError(text, message_id=message_id, path=where)
    # Fallback without jsonschema: the envelope by its keys, the data by its msgspec type.
    envelope = _message_schemas()[message_id]
    unknown = sorted(set(frame) - set(envelope["properties"]))
    missing = sorted(set(envelope.get("required", [])) - set(frame))
    if unknown or missing:
        problem = f"unknown field {unknown[0]!r}" if unknown else f"missing field {missing[0]!r}"
        return ContractError(f"{message_id}: {problem}", message_id=message_id)
    if frame["event"] != envelope["properties"]["event"]["const"]:
        return ContractError(f"{message_id}: wrong event", message_id=message_id, path="event")
    try:
        msgspec.convert(frame.get("data", {}), MESSAGE_TYPES[message_id])
    except msgspec.ValidationError as exc:
        return ContractError(f"{message_id}: {exc}", message_id=message_id, path="data")
    return None


def validate_frame(frame: bytes | str | dict[str, Any], *, sender: Sender | None = None) -> None:
    """Check one frame against the message schema its `event` names; raise `ContractError` if not.

    `sender` picks between messages that share an event (``settings`` is both the client's request
    and the server's answer); without it the frame passes if any of them accepts it, and the error
    raised is the first one's.
    """
    if isinstance(frame, dict):
        parsed: Any = frame
    else:
        try:
            parsed = json.loads(frame)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ContractError(f"Frame is not JSON: {exc}") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("event"), str):
        raise ContractError("A frame is a JSON object with a string `event`", path="event")
    event: str = parsed["event"]
    candidates = [mid for mid, who in _routes().get(event, []) if sender in (None, who)]
    if not candidates:
        by = f" sent by the {sender}" if sender else ""
        raise ContractError(f"No message of event {event[:64]!r}{by}", path="event")
    failures = [_violation(message_id, parsed) for message_id in candidates]
    if None in failures:
        return
    raise next(failure for failure in failures if failure is not None)
