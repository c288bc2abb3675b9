"""Errors and /docs speak the contract's words ("an RFC 3339 UTC timestamp such as
2026-11-23T19:45:00Z"), never Python regular expressions (``$(?!\\n)``)."""

from __future__ import annotations

from typing import Any, get_args, get_origin

import aiohttp
import pytest
import yaml

from igratech_ws.app import running_app
from igratech_ws.config import Config
from igratech_ws.contract import document_text
from igratech_ws.core import messages
from igratech_ws.core.codec import ProtocolError, decode_client_frame
from igratech_ws.core.contract_words import PATTERN_WORDS, in_contract_words, pattern_of
from igratech_ws.transport import docs_page

TIMESTAMP_WORDS = "an RFC 3339 UTC timestamp such as 2026-11-23T19:45:00Z"


def _patterns(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["pattern"]} if isinstance(node.get("pattern"), str) else set()
        return found.union(*(_patterns(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_patterns(value) for value in node))
    return set()


def test_every_pattern_of_the_messages_has_words() -> None:
    aliases = [
        value
        for value in vars(messages).values()
        if get_origin(value) is not None and get_args(value) and get_args(value)[0] is str
        and any(getattr(m, "pattern", None) for m in getattr(value, "__metadata__", ()))
    ]  # fmt: skip
    assert len(aliases) >= 6
    assert [pattern_of(a) for a in aliases if pattern_of(a) not in PATTERN_WORDS] == []


def test_every_pattern_of_the_asyncapi_document_has_words() -> None:
    patterns = _patterns(yaml.safe_load(document_text()))
    assert patterns
    assert sorted(patterns - set(PATTERN_WORDS)) == []


def test_other_messages_are_left_alone() -> None:
    assert in_contract_words("Expected `int`, got `str`") == "Expected `int`, got `str`"
    unknown = "Expected `str` matching regex '^x$'"
    assert in_contract_words(unknown) == unknown


@pytest.mark.parametrize(
    ("frame", "words", "field"),
    [
        (
            '{"event":"settings","data":{"games":["g 1"]}}',
            "Expected an identifier of 1-64",
            "data.games[0]",
        ),
        (
            '{"event":"settings","data":{"games":["' + "g" * 65 + '"]}}',
            "length <= 64",
            "data.games[0]",
        ),
    ],
)
def test_websocket_errors_speak_the_contract(frame: str, words: str, field: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_client_frame(frame)
    assert words in caught.value.message and caught.value.field == field
    assert "regex" not in caught.value.message and "(?!" not in caught.value.message


async def test_api_errors_and_docs_speak_the_contract() -> None:
    config = Config(host="127.0.0.1", port=0, api_port=0, api_key="words-key")
    body = {
        "event": "bet", "gameId": "g-1",
        "data": {"gameId": "g-1", "bets": [{
            "betId": "b-1", "market": "match_winner", "selection": "home", "odds": "1,5",
            "stake": "10.00", "currency": "eur", "placedAt": "2026-11-23 19:45:00",
        }]},
    }  # fmt: skip
    async with running_app(config) as app, aiohttp.ClientSession() as http:
        headers = {"Authorization": "Bearer words-key"}
        async with http.post(app.api_url + "/api/v1/publish", json=body, headers=headers) as r:
            answer = await r.json()
        assert r.status == 400
        assert answer["error"]["message"] == (
            'Expected decimal odds of at least 1 written as a string, such as "2.10" '
            "at data.bets[0].odds"
        )
        body["data"]["bets"][0]["odds"] = "1.50"
        body["data"]["bets"][0]["currency"] = "EUR"
        async with http.post(app.api_url + "/api/v1/publish", json=body, headers=headers) as r:
            answer = await r.json()
        assert answer["error"]["message"] == f"Expected {TIMESTAMP_WORDS} at data.bets[0].placedAt"
        async with http.get(app.api_url + "/docs") as r:
            page = await r.text()
    assert "(?!" not in page
    assert f"format: {TIMESTAMP_WORDS}" in page


def test_docs_show_an_unknown_pattern_without_python_internals() -> None:
    html = docs_page.field_table(
        {"properties": {"x": {"type": "string", "pattern": "^[ab]+$(?!\\n)"}}}, {}
    )
    assert "pattern: <code>^[ab]+$</code>" in html
