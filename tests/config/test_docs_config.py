"""Every setting is documented: docs/operations.md names each field of `Config`."""

from __future__ import annotations

from pathlib import Path

import msgspec

from igratech_ws.config import Config

ROOT = Path(__file__).resolve().parents[2]


def test_operations_guide_documents_every_setting() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    missing = [
        f.name
        for f in msgspec.structs.fields(Config)
        if f"IGRATECH_WS_{f.name.upper()}" not in text
    ]
    assert missing == []


def test_readme_starts_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().splitlines()[:8]
    assert any(line.startswith("make run") for line in head)
    assert any(line.startswith("make test") for line in head)
