"""Fixtures of the hub and node tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.fakes import RecordingBroker


@pytest.fixture
async def broker() -> AsyncIterator[RecordingBroker]:
    """The memory broker, recording (un)subscribe calls; closed after the test."""
    broker = RecordingBroker()
    yield broker
    await broker.close()
