"""The console as a live demo, in a real browser (Debian's Chromium through Playwright).

On first load in demo mode the console signs in as the demo user, follows the demo's games and
global stats, and renders what it receives: a scoreboard per game, a bet ticker, the demo user's
wallet, and every frame raw in a side panel. These tests drive it as a customer watching the demo
would, and as an unlucky or hostile one: a payload full of markup, a second login of the demo user,
a page that must not fetch anything from outside 127.0.0.1.

Without /usr/bin/chromium or the playwright package the tests skip, or fail when
IGRATECH_WS_REQUIRE_SERVICES=1 (CI installs both).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from igratech_ws.app import App, running_app
from igratech_ws.config import Config
from igratech_ws.core.publishing import PublishRequest, validate_publish
from igratech_ws.demo_feed import DEMO_GAMES, DEMO_USER, demo_player_name, run_demo_feed
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, require_browser
from tests.support.gateway import base_config

WAIT_MS = 15_000
API_KEY = "console-live-test-key"
SECRET = "console-live-test-secret-0123456789abcdef"
NOW = "2026-12-02T03:00:00Z"
GAME = DEMO_GAMES[0]
LOCAL = ("http://127.0.0.1:", "ws://127.0.0.1:", "data:")


def _config() -> Config:
    return base_config(jwt_secret=SECRET, api_key=API_KEY, demo=True)


@pytest.fixture
async def gateway() -> AsyncIterator[App]:
    async with running_app(_config()) as app:
        yield app


@dataclass
class Browser:
    page: Any
    errors: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)


@pytest.fixture
async def browser(gateway: App) -> AsyncIterator[Browser]:
    """A Chromium page that may reach 127.0.0.1 only; its errors fail the test."""
    require_browser()
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=WAIT_MS)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await chromium.new_context(viewport={"width": 1500, "height": 950})
            page = await context.new_page()
            page.set_default_timeout(WAIT_MS)
            seen = Browser(page)

            async def guard(route: Any) -> None:
                if route.request.url.startswith(LOCAL):
                    await route.continue_()
                else:
                    seen.outside.append(route.request.url)
                    await route.abort()

            await context.route("**/*", guard)
            page.on(
                "websocket",
                lambda ws: None if ws.url.startswith(LOCAL) else seen.outside.append(ws.url),
            )
            page.on("pageerror", lambda error: seen.errors.append(str(error)))
            page.on(
                "console",
                lambda message: (
                    seen.errors.append(message.text) if message.type == "error" else None
                ),
            )
            yield seen
            assert not seen.errors, seen.errors
            assert not seen.outside, seen.outside
        finally:
            await chromium.close()


async def publish(app: App, body: dict[str, Any]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            app.api_url + "/api/v1/publish",
            json=body,
            headers={"Authorization": f"Bearer {API_KEY}"},
        ) as answer,
    ):
        result: dict[str, Any] = await answer.json()
        assert answer.status == 200, result
        return result


def game_stats(
    game: str, home: str, away: str, score: tuple[int, int], minute: int
) -> dict[str, Any]:
    values = {
        "team_home": home,
        "team_away": away,
        "score_home": score[0],
        "score_away": score[1],
        "minute": minute,
        "period": "first_half" if minute <= 45 else "second_half",
        "possession_home": 58,
        "possession_away": 42,
        "shots_home": 4,
        "shots_away": 2,
    }
    return {
        "event": "stats",
        "gameId": game,
        "data": {"scope": "game", "gameId": game, "updatedAt": NOW, "values": values},
    }


def goal(
    game: str, n: int, side: str, score: tuple[int, int], minute: int, text: str
) -> dict[str, Any]:
    return {
        "event": "incident",
        "gameId": game,
        "data": {
            "gameId": game,
            "incidentId": f"inc-{n}",
            "type": "goal",
            "occurredAt": NOW,
            "minute": minute,
            "side": side,
            "score": {"home": score[0], "away": score[1]},
            "description": text,
        },
    }


def balance(amount: str, reason: str = "bet_settled") -> dict[str, Any]:
    return {
        "event": "balance",
        "userId": DEMO_USER,
        "data": {"balance": amount, "currency": "EUR", "updatedAt": NOW, "reason": reason},
    }


async def open_console(browser: Browser, app: App) -> Any:
    from playwright.async_api import expect

    page = browser.page
    await page.goto(app.api_url + "/console")
    await expect(page.locator("#state")).to_have_text("open")
    await expect(page.locator("#user-pill")).to_contain_text(DEMO_USER)
    return page


def card(page: Any, game: str) -> Any:
    return page.locator(f'#scoreboards article.game[data-game="{game}"]')


# --- follow ------------------------------------------------------------------------------------


async def test_first_load_follows_the_demo_games_as_the_demo_user(
    browser: Browser, gateway: App
) -> None:
    from playwright.async_api import expect

    page = await open_console(browser, gateway)
    # The games are followed, with the server's answer (a channel and its position each), and
    # the user's own channel and the global one are joined too.
    for game in DEMO_GAMES:
        await expect(page.locator(f'#positions tr[data-channel="game:{game}"]')).to_be_visible()
        await expect(card(page, game)).to_be_visible()
        await expect(card(page, game)).to_have_attribute("data-filled", "false")
    await expect(page.locator(f'#positions tr[data-channel="user:{DEMO_USER}"]')).to_be_visible()
    await expect(page.locator('#positions tr[data-channel="global"]')).to_be_visible()
    assert await page.evaluate("igratechConsole.client.games") == DEMO_GAMES
    # The raw panel shows the session's frames; it collapses and comes back.
    await expect(
        page.locator('details[data-channel="session"] li[data-event="settings"]')
    ).not_to_have_count(0)
    await page.click("#frames-toggle")
    await expect(page.locator("#frames-panel")).to_be_hidden()
    await page.click("#frames-toggle")
    await expect(page.locator("#frames-panel")).to_be_visible()


async def test_config_gives_the_demo_games_only_in_demo_mode(gateway: App) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.api_url + "/console/config.json") as answer:
            config = await answer.json()
        assert config["demoGames"] == DEMO_GAMES
        assert config["demoUser"] == DEMO_USER
        assert config["demoPlayer"] == demo_player_name(DEMO_USER)
        async with (
            running_app(_config().with_overrides({"demo": False})) as plain,
            http.get(plain.api_url + "/console/config.json") as answer,
        ):
            config = await answer.json()
    assert not {"demoGames", "demoUser", "demoToken", "demoPlayer"} & set(config)


# --- live updates ------------------------------------------------------------------------------


async def test_scoreboard_follows_the_pushes_and_escapes_them(
    browser: Browser, gateway: App
) -> None:
    from playwright.async_api import expect

    page = await open_console(browser, gateway)
    await expect(page.locator(f'#positions tr[data-channel="game:{GAME}"]')).to_be_visible()
    board = card(page, GAME)
    hostile = '<img src=x id=pwned onerror="window.pwned=1">'
    await publish(gateway, game_stats(GAME, hostile, "Chelsea", (0, 0), 12))
    await expect(board).to_have_attribute("data-filled", "true")
    await expect(board.locator(".score[data-side=home]")).to_have_text("0")
    await expect(board.locator(".period")).to_have_text("LIVE 12'")
    # The markup is shown as text, never parsed.
    await expect(board.locator(".team .name").first).to_have_text(hostile)
    assert await page.locator("#pwned").count() == 0
    assert await page.evaluate("window.pwned === undefined")

    await publish(gateway, goal(GAME, 1, "away", (0, 1), 13, "Goal for Chelsea!"))
    await publish(gateway, game_stats(GAME, hostile, "Chelsea", (0, 1), 13))
    await expect(board.locator(".score[data-side=away]")).to_have_text("1")
    await expect(board.locator(".period")).to_have_text("LIVE 13'")
    latest = board.locator(".incidents li").first
    await expect(latest).to_have_attribute("data-type", "goal")
    await expect(latest).to_contain_text("Goal for Chelsea! (0\u20131)")
    await expect(latest).to_contain_text("13'")
    # The other games are untouched.
    await expect(card(page, DEMO_GAMES[1])).to_have_attribute("data-filled", "false")


async def test_bet_ticker_balance_and_bet_results(browser: Browser, gateway: App) -> None:
    from playwright.async_api import expect

    page = await open_console(browser, gateway)
    await expect(page.locator(f'#positions tr[data-channel="game:{GAME}"]')).to_be_visible()
    await publish(gateway, game_stats(GAME, "Porto", "Ajax", (0, 0), 30))
    mine = demo_player_name(DEMO_USER)
    bets = [
        {"betId": "bet-1", "market": "match_result", "selection": "Porto", "odds": "2.10",
         "stake": "25.00", "currency": "EUR", "placedAt": NOW, "player": "ol***r7"},
        {"betId": "bet-2", "market": "next_goal", "selection": "Ajax", "odds": "3.40",
         "stake": "10.00", "currency": "EUR", "placedAt": NOW, "player": mine},
    ]  # fmt: skip
    await publish(gateway, {"event": "bet", "gameId": GAME, "data": {"gameId": GAME, "bets": bets}})
    rows = page.locator("#ticker tbody tr")
    await expect(rows).to_have_count(2)
    await expect(page.locator('#ticker tr[data-bet="bet-1"]')).to_contain_text("Porto v Ajax")
    await expect(page.locator('#ticker tr[data-bet="bet-1"]')).to_contain_text("€25.00")
    await expect(page.locator('#ticker tr[data-bet="bet-1"] .tag.you')).to_have_count(0)
    await expect(page.locator('#ticker tr[data-bet="bet-2"] .tag.you')).to_have_text("you")
    await expect(page.locator("#ticker-empty")).to_be_hidden()

    await publish(gateway, balance("990.00", "bet_placed"))
    await expect(page.locator("#balance")).to_have_text("€990.00")
    await expect(page.locator("#balance-meta")).to_contain_text("Bet placed")
    result = {"betId": "bet-2", "gameId": GAME, "status": "won", "stake": "10.00",
              "payout": "34.00", "currency": "EUR", "settledAt": NOW, "odds": "3.40"}  # fmt: skip
    await publish(
        gateway, {"event": "bets-result", "userId": DEMO_USER, "data": {"results": [result]}}
    )
    await publish(gateway, balance("1024.00"))
    await expect(page.locator("#balance")).to_have_text("€1,024.00")
    won = page.locator('#results li[data-status="won"]')
    await expect(won).to_contain_text("Porto v Ajax")
    await expect(won).to_contain_text("€10.00 → €34.00")
    # The raw panel shows the same frames, as they came.
    await expect(
        page.locator(f'details[data-channel="user:{DEMO_USER}"] li[data-event="balance"]')
    ).to_have_count(2)
    await expect(
        page.locator(f'details[data-channel="game:{GAME}"] li[data-event="bet"]')
    ).to_contain_text('"betId": "bet-2"')
    # Signed out (anonymous now): the demo user's wallet is not shown to the next user.
    await page.click("#disconnect")
    await expect(page.locator("#state")).to_have_text("closed")
    await expect(page.locator("#notice")).to_be_hidden()  # asked for: no alarm
    await page.fill("#token", "")
    await page.click("#connect")
    await expect(page.locator("#user-pill")).to_have_text("anonymous")
    await expect(page.locator("#balance")).to_have_attribute("data-filled", "false")
    await expect(page.locator("#balance")).not_to_contain_text("1,024")
    await expect(page.locator("#results li")).to_have_count(0)


async def test_the_demo_feed_makes_the_console_live(browser: Browser, gateway: App) -> None:
    from playwright.async_api import expect

    page = await open_console(browser, gateway)
    await expect(page.locator(f'#positions tr[data-channel="game:{GAME}"]')).to_be_visible()
    stop = asyncio.Event()

    async def publish_one(request: PublishRequest) -> None:
        await gateway.node.publish(validate_publish(request))

    feed = asyncio.create_task(
        run_demo_feed(
            publish_one,
            games=DEMO_GAMES,
            demo_user_id=DEMO_USER,
            rng=random.Random(3),
            rate=40,
            stop=stop,
        )
    )
    try:
        for game in DEMO_GAMES:
            await expect(card(page, game)).to_have_attribute("data-filled", "true", timeout=30_000)
        board = card(page, GAME)
        minute = int(await board.get_attribute("data-minute") or 0)
        # The clock runs: a later minute (or the break / a new match) shows up by itself.
        await page.wait_for_function(
            """([game, minute]) => {
                const card = document.querySelector(`article.game[data-game="${game}"]`);
                return card.dataset.minute !== String(minute) || card.dataset.period !== "first_half";
            }""",
            arg=[GAME, minute],
            timeout=30_000,
        )
        await expect(page.locator("#ticker tbody tr")).not_to_have_count(0)
        await expect(page.locator("#balance")).to_have_attribute(
            "data-filled", "true", timeout=30_000
        )
        await expect(page.locator('[data-kpi="live_games"]')).to_have_attribute(
            "data-filled", "true", timeout=30_000
        )
    finally:
        stop.set()
        await feed
    # What the page shows is what the client holds: once the page has taken in the last frames,
    # each scoreboard is the game's latest stats (compared inside the page, in one go).
    await page.wait_for_function(
        """(games) => games.every((game) => {
            const values = igratechConsole.client.channelState(`game:${game}`).stats.values;
            const card = document.querySelector(`article.game[data-game="${game}"]`);
            const score = (side) => card.querySelector(`.score[data-side=${side}]`).textContent;
            return score("home") === String(values.score_home)
                && score("away") === String(values.score_away)
                && card.querySelector(".team .name").textContent === values.team_home;
        })""",
        arg=DEMO_GAMES,
    )


# --- logout ------------------------------------------------------------------------------------


async def test_a_second_login_of_the_demo_user_logs_the_console_out(
    browser: Browser, gateway: App
) -> None:
    from playwright.async_api import expect

    page = await open_console(browser, gateway)
    await expect(page.locator("#notice")).to_be_hidden()
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.api_url + "/console/config.json") as answer:
            token = (await answer.json())["demoToken"]
        async with http.ws_connect(f"{gateway.ws_url}?token={token}") as other:
            hello = json.loads((await other.receive(timeout=5)).data)
            assert hello["event"] == "connected" and hello["data"]["userId"] == DEMO_USER
            await expect(page.locator("#notice")).to_be_visible()
            await expect(page.locator("#notice")).to_contain_text("logged in from another client")
            await expect(page.locator("#notice")).to_contain_text("4001")
            await expect(page.locator("#state")).to_have_text("closed")
            # It stays logged out (no reconnect that would log the other client out in turn).
            await page.wait_for_timeout(1500)
            await expect(page.locator("#state")).to_have_text("closed")
            await publish(gateway, balance("5.00"))
            frame = json.loads((await other.receive(timeout=5)).data)
            assert frame["event"] == "balance"
        # The user asks for it: connecting again works and the notice goes.
        await page.click("#notice-reconnect")
        await expect(page.locator("#state")).to_have_text("open")
        await expect(page.locator("#notice")).to_be_hidden()


# --- state at once on follow -------------------------------------------------------------------


async def test_scoreboard_is_filled_at_once_on_load(browser: Browser, gateway: App) -> None:
    from playwright.async_api import expect

    # Published before the page exists; nothing is published after: only the state sent on
    # follow can fill the scoreboard.
    await publish(gateway, game_stats(GAME, "Benfica", "Celtic", (2, 1), 67))
    page = await open_console(browser, gateway)
    board = card(page, GAME)
    await expect(board).to_have_attribute("data-filled", "true", timeout=5_000)
    await expect(board.locator(".score[data-side=home]")).to_have_text("2")
    await expect(board.locator(".period")).to_have_text("LIVE 67'")
    await expect(
        page.locator(f'details[data-channel="game:{GAME}"] li[data-snapshot="true"]')
    ).to_have_count(1)


async def test_balance_is_there_at_once_on_load(browser: Browser, gateway: App) -> None:
    from playwright.async_api import expect

    await publish(gateway, balance("321.00"))
    page = await open_console(browser, gateway)
    await expect(page.locator("#balance")).to_have_text("€321.00", timeout=5_000)


async def test_console_files_parse_no_html_and_load_nothing_remote(gateway: App) -> None:
    # Belt and braces for the browser tests above: the page's own files never hand payload text
    # to an HTML parser, and name no other origin (no CDN, no web font, no remote image).
    async with aiohttp.ClientSession() as http:
        texts = {}
        for path in ("/console", "/console/static/console.js", "/console/static/console.css"):
            async with http.get(gateway.api_url + path) as answer:
                assert answer.status == 200, path
                texts[path] = await answer.text()
    script = texts["/console/static/console.js"]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    for path, text in texts.items():
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path
        assert "@import" not in text and "url(" not in text, path
