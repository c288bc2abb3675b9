"""The real services on 127.0.0.1 the tests use: their URLs, and `require_service`, which skips
the calling test when one is absent (or fails it when CI requires services)."""

from __future__ import annotations

import os
import socket

import pytest

REDIS_URL = os.environ.get("IGRATECH_WS_TEST_REDIS", "redis://127.0.0.1:6379/11")
NATS_URL = os.environ.get("IGRATECH_WS_TEST_NATS", "nats://127.0.0.1:4222")
POSTGRES_DSN = os.environ.get(
    "IGRATECH_WS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip the calling test when `name` is not listening, or fail when CI requires services."""
    if _reachable(host, port):
        return
    reason = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("IGRATECH_WS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and IGRATECH_WS_REQUIRE_SERVICES=1 requires it")
    pytest.skip(reason)
