"""The JavaScript client in Chromium across a kill and restart of its node (issue 10's done-when).

Two `igratech-ws serve` processes on Redis: the page's client follows a game on node a while node
b publishes on it every 20 ms; node a is killed (SIGKILL: no close frame) and restarted on the same
port. The page must receive every publication exactly once and in order, or emit `gap`. The page
loads the module from node b's console (`/console/static/igratech-ws-client.js`), the copy every
node serves.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, require_browser
from tests.support.cluster import BrokerSpace, Publisher, stop
from tests.support.conformance_nodes import two_nodes
from tests.support.gateway import incident, token

EVENTS = 150
START_PAGE = """
async ([wsUrl, token, game]) => {
  const { IgratechWsClient } = await import("/console/static/igratech-ws-client.js");
  const log = (window.igratechLog = { pushes: [], gaps: [], closes: [], connected: 0 });
  const client = new IgratechWsClient(wsUrl, { token, games: [game], connectTimeout: 3000,
                                              backoff: { initial: 100, maximum: 1000 } });
  client.on("push", (f) => log.pushes.push([f.channel, f.offset, f.epoch]));
  client.on("gap", (g) => log.gaps.push(g));
  client.on("close", (c) => log.closes.push(c.code));
  client.on("connected", () => { log.connected += 1; });
  window.igratechClient = client;
  client.connect();
}
"""


async def _log(page: Any) -> dict[str, Any]:
    log: dict[str, Any] = await page.evaluate("window.igratechLog")
    return log


async def _until(page: Any, what: str, check: Any, timeout: float = 30.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            log = await _log(page)
            if check(log):
                return log
            await asyncio.sleep(0.05)
    raise AssertionError(what)


async def test_chromium_client_survives_a_node_kill_without_silent_loss(
    redis_space: BrokerSpace, tmp_path: Path
) -> None:
    require_browser()
    from playwright.async_api import async_playwright

    game = "g-browser"
    channel = f"game:{game}"
    async with two_nodes(redis_space, tmp_path) as (restart, nodes), async_playwright() as pw:
        a, b = nodes
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(b.api_url + "/console/static/igratech-ws-client.js")
            await page.evaluate(START_PAGE, [a.ws_url, token("u-browser"), game])
            await _until(page, "connected", lambda log: log["connected"] >= 1, 15)
            await page.wait_for_function(
                "channel => window.igratechClient.positions.has(channel)", arg=channel
            )

            publisher = Publisher(b, lambda n: incident(game, n))
            publishing = asyncio.create_task(publisher.run(limit=EVENTS, pause=0.02))
            await _until(page, "a third of the pushes", lambda log: len(log["pushes"]) >= 50)
            await stop(a.proc, signal.SIGKILL)
            await asyncio.sleep(1.0)  # the client finds its node gone and keeps trying
            await restart()
            async with asyncio.timeout(60):
                await publishing
            assert not publisher.unexpected, publisher.unexpected
            accepted = [p.offset for p in publisher.accepted_on(channel)]
            assert len(accepted) == EVENTS

            def done(log: dict[str, Any]) -> bool:
                offsets = [o for ch, o, _ in log["pushes"] if ch == channel]
                return bool(offsets) and offsets[-1] >= accepted[-1]

            log = await _until(page, "the last publication", done)
        finally:
            await browser.close()
    offsets = [offset for ch, offset, _ in log["pushes"] if ch == channel]
    assert len(offsets) == len(set(offsets)), f"duplicates: {offsets}"
    assert offsets == sorted(offsets), f"out of order: {offsets}"
    missing = sorted(set(accepted) - set(offsets))
    gaps = [g for g in log["gaps"] if g["channel"] == channel]
    assert not missing or gaps, f"lost {len(missing)} publications without a gap: {missing}"
    # Redis keeps the history: the resume must have recovered everything, with no gap at all.
    assert not missing and not gaps, f"missing {missing}, gaps {gaps}"
    assert log["connected"] >= 2 and log["closes"], log
    assert not errors, errors
