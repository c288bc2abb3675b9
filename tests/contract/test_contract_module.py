"""`igratech_ws.contract`: loading the document, validating frames, the fallback without it."""

from __future__ import annotations

import importlib.resources
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from igratech_ws import contract


@pytest.fixture
def without_jsonschema(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contract, "_validators", lambda: None)


@pytest.fixture
def uncached() -> Iterator[None]:
    contract.document_text.cache_clear()
    yield
    contract.document_text.cache_clear()


def test_document_text_is_the_file() -> None:
    text = contract.document_text()
    assert text == contract.DOCUMENT_PATH.read_text(encoding="utf-8")
    assert text.startswith("asyncapi: 3.0.0")


def test_missing_document_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, uncached: None
) -> None:
    monkeypatch.setattr(contract, "DOCUMENT_PATH", tmp_path / "absent.yaml")
    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"absent\.yaml"):
        contract.document_text()


def test_packaged_copy_is_used_when_the_checkout_has_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, uncached: None
) -> None:
    (tmp_path / "asyncapi.yaml").write_text("asyncapi: 3.0.0\n", encoding="utf-8")
    monkeypatch.setattr(contract, "DOCUMENT_PATH", tmp_path / "absent.yaml")
    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)
    assert contract.document_text() == "asyncapi: 3.0.0\n"


def test_importing_the_module_does_not_import_jsonschema() -> None:
    code = "import sys, igratech_ws.contract; print('jsonschema' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"


def test_copies_are_returned() -> None:
    contract.message_schemas()["publish-bet"]["properties"].clear()
    contract.examples()[0][1].clear()
    contract.document()["components"].clear()
    assert contract.message_schemas()["publish-bet"]["properties"]
    assert contract.examples()[0][1]
    assert contract.document()["components"]


def test_message_schemas_are_self_contained() -> None:
    text = json.dumps(contract.message_schemas())
    assert "$ref" not in text
    schema = contract.message_schemas()["publish-bet"]
    assert schema["$schema"] == contract.JSON_SCHEMA_DIALECT
    assert schema["properties"]["data"]["properties"]["bets"]["items"]["required"]


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "string `event`"),
        ({"data": {}}, "string `event`"),
        ({"event": "subscribe", "data": {}}, "No message of event 'subscribe'"),
        ({"event": "ping"}, None),
    ],
)
def test_validate_frame_envelopes(frame: Any, match: str | None) -> None:
    if match is None:
        contract.validate_frame(frame)
        return
    with pytest.raises(contract.ContractError, match=match):
        contract.validate_frame(frame)


def test_sender_selects_between_messages_of_one_event() -> None:
    query = {"event": "settings", "data": {}}
    contract.validate_frame(query, sender="client")
    contract.validate_frame(query)
    with pytest.raises(contract.ContractError, match="publish-settings") as refused:
        contract.validate_frame(query, sender="server")
    assert refused.value.message_id == "publish-settings"
    with pytest.raises(contract.ContractError, match="sent by the client"):
        contract.validate_frame({"event": "pong", "data": {}}, sender="client")


def test_error_names_the_path() -> None:
    frame = dict(contract.examples()[0][1])
    frame["data"] = {**frame["data"], "updatedAt": "yesterday"}
    with pytest.raises(contract.ContractError) as refused:
        contract.validate_frame(json.dumps(frame))
    assert refused.value.path == "data.updatedAt"


@pytest.mark.usefixtures("without_jsonschema")
def test_fallback_accepts_every_example() -> None:
    for message_id, frame in contract.examples():
        contract.validate_frame(frame, sender="client" if "subscribe" in message_id else "server")


@pytest.mark.usefixtures("without_jsonschema")
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"extra": 1}, "unknown field 'extra'"),
        ({"data": {"balance": 1}}, "Expected `str`"),
    ],
)
def test_fallback_refuses(change: dict[str, Any], match: str) -> None:
    frame = next(f for mid, f in contract.examples() if mid == "publish-balance")
    with pytest.raises(contract.ContractError, match=match):
        contract.validate_frame({**frame, **change})
    missing = {k: v for k, v in frame.items() if k != "epoch"}
    with pytest.raises(contract.ContractError, match="missing field 'epoch'"):
        contract.validate_frame(missing)
