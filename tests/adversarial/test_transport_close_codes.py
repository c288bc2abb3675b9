"""Close codes chosen by clients (issue 9, class 8).

On the old listener close frames with invalid codes (5000-65535 among them) were echoed back,
which RFC 6455 section 7.4 forbids, and every distinct code a client sent became a new
`closes_total` series: metrics cardinality chosen by anonymous clients. Now an invalid code is
answered 1002, a valid one is echoed, and the metric's labels come only from the documented
table (everything else is `other`).
"""

from __future__ import annotations

import asyncio
import re
import struct

import aiohttp
import pytest

from igratech_ws.app import App, running_app
from igratech_ws.core.close_codes import CLOSE_TABLE
from tests.support.gateway import API_KEY, base_config
from tests.support.raw_ws import LOOPS, close, connect, in_thread, read_frames, run_on

INVALID = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 5001, 65535]
VALID_UNDOCUMENTED = [1003, 1010, 1014, 3000, 3999, 4000, 4999]


def closing_with(port: int, code: int) -> int | None:
    sock = connect(port)
    try:
        sock.sendall(close(code, b"bye"))
        _frames, answer = read_frames(sock)
    finally:
        sock.close()
    return answer


async def close_series(app: App) -> set[str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            app.api_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}
        ) as answer,
    ):
        text = await answer.text()
    return set(re.findall(r'^igratech_ws_closes_total\{[^}]*code="([^"]+)"', text, re.MULTILINE))


async def _codes(aiofastnet: bool) -> None:
    async with running_app(base_config(use_aiofastnet=aiofastnet)) as app:
        for code in INVALID:
            assert await in_thread(closing_with, app.port, code) == 1002, code
        for code in VALID_UNDOCUMENTED:
            assert await in_thread(closing_with, app.port, code) == code, code


@pytest.mark.parametrize("loop", LOOPS)
def test_invalid_close_codes_get_1002_and_valid_ones_are_echoed(loop: str) -> None:
    run_on(loop, _codes)


async def test_distinct_client_codes_create_no_metric_series() -> None:
    documented = {str(int(code)) for code in CLOSE_TABLE}
    async with running_app(base_config()) as app:
        codes = [*range(3000, 3150), *range(5000, 5150), *struct.unpack("!10H", bytes(range(20)))]
        for code in codes:
            await in_thread(closing_with, app.port, code)
        for _ in range(500):  # bounded: the node forgets every connection
            if not app.node.connection_count:
                break
            await asyncio.sleep(0.01)
        series = await close_series(app)
        assert series, "no closes_total series at all"
        assert series <= documented | {"other"}, series - documented
        assert len(app.node.closes) <= len(CLOSE_TABLE) + 1, app.node.closes
