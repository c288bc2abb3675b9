"""Fixtures of the transport tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from igratech_ws.brokers.memory import MemoryBroker
from tests.support.http_api import no_control, no_publication


@pytest.fixture
async def broker() -> AsyncIterator[MemoryBroker]:
    """A started MemoryBroker behind the API's fake node (`tests.support.http_api.FakeNode`)."""
    memory = MemoryBroker(node_id="node-test")
    await memory.start(no_publication, no_control)
    yield memory
    await memory.close()
