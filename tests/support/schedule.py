"""The order in which parallel workers take the test files (`make test`: pytest-xdist with
``--dist loadfile``, one file at a time per worker).

A worker that starts the longest file last finishes long after the other one, so the slowest files
go first (longest first: the classic greedy schedule) and the many short ones fill in behind them.
`SLOW_FILES` comes from a measured run (``--durations``; see the commit that last changed it); a
file not listed keeps its place in the collection, after all of them. tests/ops/test_test_layout.py
checks that every file named here exists, so a rename cannot silently drop one.
"""

from __future__ import annotations

import pytest

#: Test files, slowest first (wall time of the whole file under `make test`).
SLOW_FILES: tuple[str, ...] = (
    "tests/e2e/test_resume_faults.py",
    "tests/ops/test_container.py",
    "tests/e2e/test_resume_sdk.py",
    "tests/e2e/test_cluster.py",
    "tests/e2e/test_resume_properties.py",
    "tests/ops/test_docs_snippets.py",
    "tests/conformance/test_conformance.py",
    "tests/autobahn/test_autobahn.py",
    "tests/brokers/test_redis_sentinel.py",
    "tests/brokers/test_contract.py",
    "tests/e2e/test_connect_hole.py",
    "tests/outbox/test_outbox_cluster.py",
    "tests/contract/test_asyncapi_cli.py",
)


def slow_files_first(items: list[pytest.Item]) -> None:
    """Reorder `items` in place: the files of `SLOW_FILES` in its order, then every other file in
    collection order; the order of the tests within a file never changes (a stable sort)."""
    rank = {path: index for index, path in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
