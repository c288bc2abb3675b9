"""docs/protocol.md against the code: the close-code table, the error codes and the events."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

from igratech_ws import contract
from igratech_ws.core import messages
from igratech_ws.core.close_codes import CLOSE_TABLE

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")


def test_close_code_table_matches_close_table() -> None:
    rows = {
        int(match["code"]): (match["reason"].strip(), match["reconnect"].strip())
        for match in re.finditer(
            r"^\| (?P<code>\d{4}) \|(?P<reason>[^|]+)\|(?P<reconnect>[^|]+)\|", DOC, re.MULTILINE
        )
    }
    expected = {
        int(code): (reason, "yes" if reconnect else "no")
        for code, (reason, reconnect) in CLOSE_TABLE.items()
    }
    assert rows == expected


def test_every_error_code_is_explained() -> None:
    for code in typing.get_args(messages.ErrorCode):
        assert re.search(rf"^\| `{code}` \|", DOC, re.MULTILINE), code


def test_every_event_and_message_is_listed() -> None:
    for message_id, frame in contract.examples():
        assert f"`{message_id}`" in DOC
        assert f"| `{frame['event']}` |" in DOC


def _json_blocks() -> list[str]:
    return re.findall(r"```json\n(.*?)```", DOC, re.DOTALL)


def test_every_example_frame_in_the_doc_is_valid() -> None:
    frames = []
    for block in _json_blocks():
        try:
            frames.append(json.loads(block))
        except json.JSONDecodeError:  # one frame per line
            frames.extend(json.loads(line) for line in block.splitlines() if line.strip())
    assert len(frames) >= 13
    for frame in frames:
        contract.validate_frame(frame)
