"""Fixtures of the real services on 127.0.0.1, skipped (or failed in CI) when absent; and the order
of the files when pytest-xdist runs them in parallel (`make test`)."""

from __future__ import annotations

import pytest

from tests.support.schedule import slow_files_first
from tests.support.services import NATS_URL, POSTGRES_DSN, REDIS_URL, require_service


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture
def nats_url() -> str:
    require_service("NATS", "127.0.0.1", 4222)
    return NATS_URL


@pytest.fixture
def postgres_dsn() -> str:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_DSN


# --- parallel runs (pytest-xdist) --------------------------------------------------------------


def _distributed(config: pytest.Config) -> bool:
    return str(getattr(config.option, "dist", "no")) != "no"


def pytest_configure(config: pytest.Config) -> None:
    # xdist's loadfile/loadscope would otherwise hand out the files with the most tests first,
    # whatever their duration: keep the order `pytest_collection_modifyitems` makes.
    if _distributed(config):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _distributed(config):
        slow_files_first(items)
