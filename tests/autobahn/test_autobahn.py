"""The Autobahn|Testsuite (every case file, run by kosoku) against the gateway's own listener.

The testee is `tests/support/autobahn_echo_server.py`: the /wspublic connection class with an echo for an
application, in its own process on uvloop (the production loop), once on uvloop's transports and
once on aiofastnet's. Every case must be OK, except the ones in `NOT_OK` (with the reason
written down). The verdict table of docs/reliability.md is written from this run, between its
markers; nobody types it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.files import replace_text

pytest.importorskip("kosoku")

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
BEGIN = "<!-- autobahn-results: written by tests/autobahn/test_autobahn.py; do not edit -->"
END = "<!-- /autobahn-results -->"
START_S = 20.0
RUN_S = 120.0  # the whole suite takes about 10 s here; the bound is for a machine under load

COMPRESSION = (
    "permessage-deflate (RFC 7692) is not negotiated, by design: a push is encoded once and the "
    "same bytes go to every follower, while compression would cost a zlib context (tens to "
    "hundreds of KB) and a compression per connection"
)
#: Cases that may end other than OK: (message verdict, close verdict, why).
NOT_OK: dict[str, tuple[str, str, str]] = {
    "7.1.6": (
        "INFORMATIONAL",
        "INFORMATIONAL",
        "the suite itself marks it informational: a 256 KiB message, a text, a close and a ping "
        "are sent back to back, and the order of the echo and the close is left to the "
        "implementation (here both messages are echoed, then the close is answered 1000)",
    ),
    "7.13.1": (
        "INFORMATIONAL",
        "INFORMATIONAL",
        "close code 5000, undefined by RFC 6455 (informational in the suite); answered 1002",
    ),
    "7.13.2": (
        "INFORMATIONAL",
        "INFORMATIONAL",
        "close code 65535, undefined by RFC 6455 (informational in the suite); answered 1002",
    ),
}


def expected(case_id: str) -> tuple[str, str, str | None]:
    if case_id.split(".")[0] in ("12", "13"):
        return "UNIMPLEMENTED", "OK", COMPRESSION
    if case_id in NOT_OK:
        return NOT_OK[case_id]
    return "OK", "OK", None


@pytest.fixture(params=["uvloop", "aiofastnet"])
def testee(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """The echo testee in its own process: (its ws:// URL, which transports it runs on)."""
    args = [sys.executable, "-m", "tests.support.autobahn_echo_server", "--port", "0"]
    if request.param == "aiofastnet":
        args.append("--aiofastnet")
    process = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = _readline(process, START_S)
        assert line.startswith("ready "), line
        yield f"ws://127.0.0.1:{int(line.split()[1])}", request.param
    finally:
        process.kill()
        _, stderr = process.communicate(timeout=10)
        # A testee that logged a traceback had a bug, whatever the verdicts say.
        assert "Traceback" not in stderr, stderr[-3000:]


def _readline(process: subprocess.Popen[str], timeout: float) -> str:
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    return lines[0].strip() if lines else "<nothing within the start-up bound>"


def test_every_autobahn_case_passes(testee: tuple[str, str]) -> None:
    url, transports = testee
    run = subprocess.run(
        [sys.executable, "-m", "tests.support.autobahn_run_suite", url, "--concurrency", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_S,
    )
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines and "categories" in lines[-1], run.stderr[-3000:]
    categories: dict[str, str] = lines[-1]["categories"]
    results = lines[:-1]
    assert len(results) >= 500, len(results)  # every case file, not a subset
    wrong = {
        r["case"]: (r["behavior"], r["close"], r["remote_close_code"], r["result_close"])
        for r in results
        if (r["behavior"], r["close"]) != expected(r["case"])[:2]
    }
    assert not wrong, wrong
    if transports == "uvloop":
        _write_table(results, categories)


def _write_table(results: list[dict[str, Any]], categories: dict[str, str]) -> None:
    by_category: dict[str, Counter[str]] = {}
    for r in results:
        by_category.setdefault(r["case"].split(".")[0], Counter())[r["behavior"]] += 1
    lines = [
        BEGIN,
        "",
        "| category | cases | verdicts |",
        "| --- | --- | --- |",
    ]
    for category in sorted(by_category, key=int):
        counts = by_category[category]
        verdicts = ", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        lines.append(
            f"| {category} {categories.get(category, '')} | {sum(counts.values())} | {verdicts} |"
        )
    lines += [
        "",
        "Cases not OK, and why:",
        "",
        "| case | verdict (message / close) | why |",
        "| --- | --- | --- |",
    ]
    for case_id, (message, close, why) in NOT_OK.items():
        lines.append(f"| {case_id} | {message} / {close} | {why} |")
    lines.append(f"| 12.\\*, 13.\\* | UNIMPLEMENTED / OK | {COMPRESSION} |")
    lines += ["", END]
    table = "\n".join(lines)
    text = DOC.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    assert pattern.search(text), f"{DOC} has no {BEGIN!r} ... {END!r} section"
    updated = pattern.sub(lambda _: table, text)
    if updated != text:
        replace_text(DOC, updated)  # in one step: other test processes read the docs
