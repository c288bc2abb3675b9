"""``python -m bench.console_screenshot``: a fresh docs/console.png of the live console.

Starts ``igratech-ws demo`` (what ``make run`` starts) on 127.0.0.1 with free ports, opens its
console in Debian's Chromium through Playwright, waits until the page shows live data (every
scoreboard filled, goals scored, a bet ticker, the demo user's balance and a settled bet), writes
the screenshot and stops the demo. Nothing but 127.0.0.1 is contacted: any other request of the
page is refused and fails the run. Exits non-zero when the page does not get there in time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
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
#: What "live" means for the picture, as a predicate on the page's DOM.
LIVE_ENOUGH = """() => {
  const cards = [...document.querySelectorAll('#scoreboards article.game')];
  const goals = cards.reduce((sum, card) => sum + [...card.querySelectorAll('.score')]
    .reduce((s, n) => s + (Number(n.textContent) || 0), 0), 0);
  const incidents = cards.filter(card => card.querySelectorAll('.incidents li').length >= 3);
  return cards.length >= 3
    && cards.every(card => card.dataset.filled === 'true')
    && cards.some(card => card.dataset.period === 'first_half' || card.dataset.period === 'second_half')
    && goals >= %(goals)d
    && incidents.length === cards.length
    && document.querySelectorAll('#ticker tbody tr').length >= 10
    && document.querySelectorAll('#results li').length >= 3
    && document.querySelector('#balance').dataset.filled === 'true'
    && document.querySelector('[data-kpi="online_players"]').dataset.filled === 'true';
}"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout} s")
        time.sleep(0.2)


async def shoot(api_url: str, out: Path, *, goals: int, patience: float) -> None:
    from playwright.async_api import async_playwright

    outside: list[str] = []
    errors: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(
                viewport={"width": 1600, "height": 1000},
                device_scale_factor=1,
                reduced_motion="reduce",  # the page at rest: no fresh-row flashes in the picture
            )

            async def guard(route: Any) -> None:
                url = route.request.url
                if url.startswith(("http://127.0.0.1:", "ws://127.0.0.1:", "data:")):
                    await route.continue_()
                else:
                    outside.append(url)
                    await route.abort()

            await context.route("**/*", guard)
            page = await context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on(
                "console",
                lambda message: errors.append(message.text) if message.type == "error" else None,
            )
            await page.goto(api_url + "/console")
            await page.wait_for_function(
                LIVE_ENOUGH % {"goals": goals}, timeout=patience * 1000, polling=500
            )
            # The picture: from the top to the end of the ticker and wallet (the developer tools below are
            # for developers, not for this picture).
            bottom = await page.evaluate(
                "Math.ceil(document.querySelector('.lower').getBoundingClientRect().bottom)"
            )
            height = min(1000, int(bottom) + 18)
            await page.screenshot(
                path=str(out),
                animations="disabled",
                clip={"x": 0, "y": 0, "width": 1600, "height": height},
            )
        finally:
            await browser.close()
    if outside:
        raise RuntimeError(f"the console asked for something outside 127.0.0.1: {outside}")
    if errors:
        raise RuntimeError(f"the console logged errors: {errors}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console.png")
    parser.add_argument("--rate", type=float, default=12.0, help="the demo's publications/s")
    parser.add_argument("--goals", type=int, default=3, help="goals on the board, at least")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds to get there")
    args = parser.parse_args(argv)
    if not os.path.exists(CHROMIUM):
        print(f"{CHROMIUM} is missing (apt-get install chromium)", file=sys.stderr)
        return 2
    port, api_port = free_port(), free_port()
    env = {**os.environ, "IGRATECH_WS_LOG_LEVEL": "warning"}
    demo = subprocess.Popen(
        [sys.executable, "-m", "igratech_ws.cli", "demo", "--host", "127.0.0.1",
         "--port", str(port), "--api-host", "127.0.0.1", "--api-port", str(api_port),
         "--rate", str(args.rate)],
        env=env,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        api_url = f"http://127.0.0.1:{api_port}"
        wait_http(api_url + "/console/config.json", timeout=30)
        asyncio.run(shoot(api_url, args.out, goals=args.goals, patience=args.timeout))
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=15)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
