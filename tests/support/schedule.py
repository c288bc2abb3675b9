"""The order in which parallel workers take the test files (`make test`: pytest-xdist with
``--dist loadfile``, one file at a time per worker).

A worker that starts the longest file last finishes long after the other one, so the slowest files
go first (longest first: the classic greedy schedule) and the many short ones fill in behind them.
`SLOW_FILES` comes from a measured run (see below); a file not listed keeps its place in the
collection, after all of them. Re-measure when a file grows slow: run the suite as `make test` does
with ``--junitxml=FILE`` added, then sum the testcase times by file. tests/ops/test_test_layout.py
checks that every file named here exists, so a rename cannot silently drop one.
"""

from __future__ import annotations

import pytest

#: Test files, slowest first, from the per-file times of a whole parallel run (pytest
#: ``--junitxml``, summed by file); the image build and the AsyncAPI CLI come first whatever that
#: run says, since each takes minutes where its cache is cold (a fresh CI machine).
SLOW_FILES: tuple[str, ...] = (
    "tests/ops/test_container.py",
    "tests/contract/test_asyncapi_cli.py",
    "tests/e2e/test_cluster.py",
    "tests/ops/test_cli_errors.py",
    "tests/e2e/test_resume_faults.py",
    "tests/e2e/test_connect_hole.py",
    "tests/ops/test_docs_snippets.py",
    "tests/conformance/test_conformance.py",
    "tests/e2e/test_resume_sdk.py",
    "tests/publisher/test_idempotency_cluster.py",
    "tests/conformance/test_browser.py",
    "tests/outbox/test_outbox_cluster.py",
    "tests/e2e/test_console_browser.py",
    "tests/brokers/test_idempotency.py",
    "tests/autobahn/test_autobahn.py",
    "tests/client/test_js_types.py",
    "tests/e2e/test_fuzz_socket.py",
    "tests/adversarial/test_transport_keepalive.py",
    "tests/brokers/test_reads.py",
)


def slow_files_first(items: list[pytest.Item]) -> None:
    """Reorder `items` in place: the files of `SLOW_FILES` in its order, then every other file in
    collection order; the order of the tests within a file never changes (a stable sort)."""
    rank = {path: index for index, path in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
