"""State and stream events in the contract: every push message says its kind, the code agrees,
and only state frames may be marked `conflated` (issue 12)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from igratech_ws import contract
from igratech_ws.core import channels, codec
from igratech_ws.core import messages as m

DOC = contract.document()
MESSAGES: dict[str, Any] = DOC["components"]["messages"]
PUSHES = {mid: event for mid, (event, _) in m.SEED_MESSAGES.items() if event in m.PUBLISHED_EVENTS}


def test_every_channel_push_message_has_a_kind_that_the_code_agrees_with() -> None:
    assert set(PUSHES.values()) == set(m.PUBLISHED_EVENTS)
    for message_id, event in PUSHES.items():
        kind = MESSAGES[message_id].get("x-event-kind")
        assert kind in ("state", "stream"), message_id
        assert kind == channels.event_kind(event), message_id
    assert set(m.PUBLISHED_EVENTS) == channels.STATE_EVENTS | channels.STREAM_EVENTS
    assert not channels.STATE_EVENTS & channels.STREAM_EVENTS


def test_messages_that_are_not_channel_pushes_have_no_kind() -> None:
    for message_id, message in MESSAGES.items():
        if message_id not in PUSHES:
            assert "x-event-kind" not in message, message_id


def _example(message_id: str) -> dict[str, Any]:
    return next(frame for mid, frame in contract.examples() if mid == message_id)


@pytest.mark.parametrize("message_id", sorted(PUSHES))
def test_every_push_may_be_a_snapshot_but_only_state_may_be_conflated(message_id: str) -> None:
    frame = _example(message_id)
    frame.pop("conflated", None)
    frame["snapshot"] = True
    contract.validate_frame(frame)
    del frame["snapshot"]
    frame["conflated"] = True
    if channels.event_kind(frame["event"]) == "state":
        contract.validate_frame(frame)
    else:
        with pytest.raises(contract.ContractError, match="conflated"):
            contract.validate_frame(frame)
    frame["conflated"] = False  # a mark is present and true, or absent
    with pytest.raises(contract.ContractError):
        contract.validate_frame(frame)


@pytest.mark.parametrize("mark", [codec.SNAPSHOT_MARK, codec.CONFLATED_MARK])
def test_a_marked_publication_frame_is_valid_json_of_the_contract(mark: bytes) -> None:
    built = codec.publication_frame(
        "stats",
        "game:g-1",
        7,
        "e1",
        b'{"scope":"game","gameId":"g-1","updatedAt":"2026-11-23T19:47:30Z","values":{"a":1}}',
        mark,
    )
    frame = json.loads(built)
    assert frame[mark.decode().split('"')[1]] is True
    contract.validate_frame(built)
