"""The live console in a real browser (system Chromium through Playwright), against a real gateway.

Playwright drives Debian's ``/usr/bin/chromium`` (never a browser it downloads). Without it the
browser tests skip, or fail when IGRATECH_WS_REQUIRE_SERVICES=1 (CI installs it). Set
IGRATECH_WS_SCREENSHOT_DIR to keep the screenshots (``docs/console.png`` comes from
``python -m bench.console_screenshot``, not from here).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from igratech_ws.app import App, running_app
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, require_browser
from tests.support.gateway import API_KEY, base_config, incident, publish

#: Milliseconds Playwright waits for the page to show something (generous: CI machines are slow).
WAIT_MS = 15_000


@pytest.fixture
async def demo_gateway() -> AsyncIterator[App]:
    async with running_app(base_config(demo=True)) as app:
        yield app


@pytest.fixture
async def page(demo_gateway: App) -> AsyncIterator[Any]:
    """A browser page; the gateway outlives it, so the page never sees the gateway go away."""
    require_browser()
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=WAIT_MS)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1360, "height": 900})
            page = await context.new_page()
            page.set_default_timeout(WAIT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))

            def on_console(message: Any) -> None:
                # Refused publications (tested on purpose) show up as failed loads of that URL.
                if message.type == "error" and "/console/publish" not in message.location["url"]:
                    errors.append(message.text)

            page.on("console", on_console)
            yield page
            assert not errors, errors
        finally:
            await browser.close()


def _keep_screenshot(path: Path) -> None:
    keep = os.environ.get("IGRATECH_WS_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)


async def _open_console(page: Any, app: App) -> None:
    from playwright.async_api import expect

    await page.goto(app.api_url + "/console")
    await expect(page.locator("#state")).to_have_text("open")
    await expect(page.locator("#connected")).to_contain_text("sessionId")


async def test_console_follows_a_game_and_shows_a_published_event(
    page: Any, demo_gateway: App, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    app = demo_gateway
    await _open_console(page, app)
    await page.fill("#game", "g-1001")
    await page.click("#follow")
    await expect(page.locator('#games li[data-game="g-1001"]')).to_be_visible()
    # The settings answer lists the channel with its starting position: the follow is in force.
    await expect(page.locator('#positions tr[data-channel="game:g-1001"]')).to_be_visible()

    status, answer = await publish(app, incident("g-1001", 7))
    assert status == 200, answer
    channel = page.locator('details[data-channel="game:g-1001"]')
    pushed = channel.locator('li[data-event="incident"]')
    await expect(pushed).to_have_count(1)
    await expect(pushed).to_contain_text('"incidentId": "inc-7"')
    await expect(pushed).to_have_attribute("data-offset", str(answer["offset"]))
    await expect(page.locator('#positions tr[data-channel="game:g-1001"]')).to_contain_text(
        str(answer["offset"])
    )

    # Stats on: the global channel joins.
    await page.check("#stats")
    await expect(page.locator('#positions tr[data-channel="global"]')).to_be_visible()

    shot = tmp_path / "console.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    _keep_screenshot(shot)


async def test_demo_token_console_publish_and_logout(
    page: Any, demo_gateway: App, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    app = demo_gateway
    await _open_console(page, app)
    await page.click("#demo-token")
    await expect(page.locator("#connected")).to_contain_text("demo-user")
    await expect(page.locator('#positions tr[data-channel="user:demo-user"]')).to_be_visible()

    # Publish through the console's demo panel (no API key): a balance for the demo user.
    body = (
        '{"event": "balance", "userId": "demo-user", "data": {"balance": "12.50", '
        '"currency": "EUR", "updatedAt": "2026-11-23T19:45:00Z", "reason": "deposit"}}'
    )
    await page.fill("#publish-body", body)
    await page.click("#publish")
    await expect(page.locator("#publish-result")).to_contain_text("200")
    pushed = page.locator('details[data-channel="user:demo-user"] li[data-event="balance"]')
    await expect(pushed).to_contain_text('"balance": "12.50"')

    # An invalid publication is refused with the API's error shape, shown on the page.
    await page.fill("#publish-body", '{"event": "balance", "userId": "demo-user", "data": {}}')
    await page.click("#publish")
    await expect(page.locator("#publish-result")).to_contain_text("400")

    # A forced logout: the page shows the logout and the close code, and does not reconnect.
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            app.api_url + "/api/v1/users/demo-user/logout",
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as answer,
    ):
        assert answer.status == 200
    await expect(page.locator("#log")).to_contain_text("logout (forced), close code 4002")
    await expect(page.locator("#log")).to_contain_text("closed with 4002")
    await expect(page.locator("#state")).to_have_text("closed")
    shot = tmp_path / "console-logout.png"
    await page.screenshot(path=str(shot), full_page=True)
    _keep_screenshot(shot)


async def test_console_client_resumes_after_a_dropped_connection(
    page: Any, demo_gateway: App
) -> None:
    from playwright.async_api import expect

    app = demo_gateway
    await _open_console(page, app)
    await page.fill("#game", "g-7")
    await page.click("#follow")
    await expect(page.locator('#positions tr[data-channel="game:g-7"]')).to_be_visible()
    await publish(app, incident("g-7", 1))
    pushed = page.locator('details[data-channel="game:g-7"] li[data-event="incident"]')
    await expect(pushed).to_have_count(1)

    # Drop the link from the browser side (3000: reconnectable), publish while it may be down:
    # the client reconnects with `recover` and gets the missed push exactly once.
    await page.evaluate("igratechConsole.client.ws.close(3000, 'test drop')")
    status, _ = await publish(app, incident("g-7", 2))
    assert status == 200
    await expect(page.locator("#log")).to_contain_text("game:g-7@")
    await expect(page.locator("#log")).to_contain_text(" recovered")
    await expect(pushed).to_have_count(2)
    await expect(page.locator("#state")).to_have_text("open")
    offsets = await pushed.evaluate_all("items => items.map(i => i.dataset.offset)")
    assert sorted(offsets) == ["1", "2"]


# --- the console's HTTP side, without a browser ----------------------------------------------


async def _get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as answer:
        return answer.status, answer.headers.get("Content-Type", ""), await answer.text()


async def test_console_files_and_config(demo_gateway: App) -> None:
    app = demo_gateway
    status, kind, text = await _get(app.api_url + "/console")
    assert status == 200 and kind.startswith("text/html")
    assert "/console/static/console.js" in text
    for name in ("console.js", "console.css", "igratech-ws-client.js"):
        status, kind, _ = await _get(f"{app.api_url}/console/static/{name}")
        assert status == 200, name
        assert kind.startswith("text/javascript" if name.endswith(".js") else "text/css")
    status, _, _ = await _get(app.api_url + "/console/static/..%2Fconsole.py")
    assert status == 404
    async with aiohttp.ClientSession() as http, http.get(app.api_url + "/console/config.json") as r:
        config = await r.json()
    assert config["wsUrl"] == app.ws_url
    assert config["demo"] is True
    assert config["demoUser"] == "demo-user" and config["demoToken"].count(".") == 2
    assert {"incident", "bet", "balance", "bets-result"} <= set(config["examples"])


async def test_console_publish_exists_only_in_demo_mode() -> None:
    body = incident("g-1", 1)
    async with running_app(base_config()) as app, aiohttp.ClientSession() as http:
        async with http.post(app.api_url + "/console/publish", json=body) as answer:
            assert answer.status == 404
        async with http.get(app.api_url + "/console/config.json") as answer:
            config = await answer.json()
        assert config["demo"] is False and "demoToken" not in config
    async with running_app(base_config(demo=True)) as app, aiohttp.ClientSession() as http:
        async with http.post(app.api_url + "/console/publish", json=body) as answer:
            assert answer.status == 200
            assert (await answer.json())["channel"] == "game:g-1"
        async with http.post(app.api_url + "/console/publish", data="x") as answer:
            assert answer.status == 415
