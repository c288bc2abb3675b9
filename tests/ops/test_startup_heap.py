"""A served node takes its start-up heap out of the garbage collector's full walks (`gc.freeze`),
and ``--log-level debug`` shows the node's own lines, not thousands of a library's."""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
import time

from igratech_ws.app import freeze_startup_heap

START_LIMIT_S = 30.0
FROZEN = "startup heap frozen"


def test_freezing_moves_the_heap_out_of_collections() -> None:
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 10_000
        # A full collection no longer walks them: what it finds tracked is what came later.
        assert len(gc.get_objects()) < frozen
    finally:
        gc.unfreeze()


def test_serve_freezes_its_start_up_heap_once_ready() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IGRATECH_WS_")}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "igratech_ws.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--api-port",
            "0",
            "--log-level",
            "debug",
        ],
        env=clean,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    records: list[dict[str, object]] = []
    try:
        assert server.stderr is not None
        deadline = time.monotonic() + START_LIMIT_S
        pending = b""
        while not any(record["msg"] == FROZEN for record in records):
            # Never block past the deadline on a server that hangs without a word.
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([server.stderr], [], [], left)[0]:
                break
            chunk = os.read(server.stderr.fileno(), 65536)
            if not chunk:
                break  # exited
            *lines, pending = (pending + chunk).split(b"\n")
            records += [json.loads(line) for line in lines if line]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
            if server.stderr is not None:
                server.stderr.close()
    messages = [record["msg"] for record in records]
    assert FROZEN in messages, messages[-20:]
    # Frozen once the node is ready (after its listeners and the /docs page), not before.
    assert "serving" in messages[: messages.index(FROZEN)]
    frozen = records[messages.index(FROZEN)]["objects"]
    assert isinstance(frozen, int) and frozen > 10_000
    assert not [r for r in records if str(r.get("logger", "")).startswith("markdown_it")]
