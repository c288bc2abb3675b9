"""The system Chromium that browser tests drive through Playwright (never a browser it downloads).

Without it, or without the playwright package, `require_browser` skips the calling test, or fails
it when IGRATECH_WS_REQUIRE_SERVICES=1 (CI installs Debian's chromium).
"""

from __future__ import annotations

import os

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_browser() -> None:
    """Skip the calling test without the system Chromium or Playwright (fail in CI)."""
    missing = None
    if not os.path.exists(CHROMIUM):
        missing = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.async_api  # noqa: F401
        except ImportError:
            missing = "the playwright package is missing (pip install -e '.[dev]')"
    if missing is None:
        return
    if os.environ.get("IGRATECH_WS_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{missing}, and IGRATECH_WS_REQUIRE_SERVICES=1 requires the browser tests")
    pytest.skip(missing)
