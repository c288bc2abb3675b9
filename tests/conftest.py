"""Fixtures of the real services on 127.0.0.1, skipped (or failed in CI) when absent."""

from __future__ import annotations

import pytest

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
