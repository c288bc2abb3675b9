"""Fixtures of the conformance scenarios."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.cluster import BrokerSpace


@pytest.fixture
async def redis_space(redis_url: str) -> AsyncIterator[BrokerSpace]:
    """A private namespace on the test Redis, deleted afterwards."""
    space = BrokerSpace("redis", redis_url)
    yield space
    await space.cleanup()
