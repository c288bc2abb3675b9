"""Fixtures of a real gateway on 127.0.0.1 (random ports); the helpers are in
`tests.support.gateway`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from igratech_ws.app import App, running_app
from tests.support.gateway import base_config


@pytest.fixture
async def gateway() -> AsyncIterator[App]:
    async with running_app(base_config()) as app:
        yield app


@pytest.fixture
def make_gateway() -> Callable[..., AbstractAsyncContextManager[App]]:
    """A factory for a gateway with other settings: `async with make_gateway(idle_timeout=2)`."""

    def make(**overrides: Any) -> AbstractAsyncContextManager[App]:
        return running_app(base_config(**overrides))

    return make
