"""Every shell and Python snippet of README.md and docs/*.md runs as written after `make run`.

The test starts the demo exactly as `make run` does (`.venv/bin/igratech-ws demo`, default ports),
takes the `export` lines it prints, and runs each snippet in a directory that looks like the
checkout, with a PATH that has no virtualenv on it (the docs must not assume an activated one):

- ``sh``/``bash``/``shell`` blocks run with ``bash -eo pipefail``; a block made only of variable
  assignments (``API=...``) is kept as the prelude of the document's later blocks, as in a
  terminal. Output that is a JSON API error must be documented: the answer block that follows
  (```json or a plain block) or a ``# {...}`` comment of the snippet names that error's code;
  when the document shows a successful answer, one like it (same keys) must come out.
- ``python`` blocks run with ``.venv/bin/python``.
- A block marked ``<!-- streams -->`` on the line above runs until stopped: it must print
  something and not fail within a few seconds. A block marked ``<!-- not-run: reason -->`` is not
  run (keep them few: a reason is required, and the count is bounded below).

Every Python block, run or not, must compile as a script (no top-level ``await``); no block may
call ``igratech-ws`` without ``.venv/bin/`` or activate the virtualenv.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"sh", "bash", "shell"}
PYTHONS = {"python", "py", "python3"}
#: At most this many blocks may be marked not-run: the docs are meant to run.
MAX_NOT_RUN = 16
MARKER_RE = re.compile(r"^<!--\s*(not-run|streams)\s*(?::\s*(.*?))?\s*-->$")
FENCE_RE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)")
ASSIGNMENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*(\s+#.*)?$")
EXPORT_RE = re.compile(r"^\s+export (IGRATECH_WS_[A-Z_]+)=(\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class Snippet:
    doc: Path
    line: int
    lang: str
    code: str
    marker: str | None  # "not-run", "streams" or None
    reason: str
    answer: str | None  # the ```json or plain block right after, if any

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def extract(path: Path) -> list[Snippet]:
    """The fenced blocks of `path`, with the marker above each and the answer block after it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[tuple[int, int, str, str]] = []  # start line, end line, lang, code
    index = 0
    while index < len(lines):
        match = FENCE_RE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence, lang = match.groups()
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        code = "\n".join(line.removeprefix(indent) for line in lines[index + 1 : end])
        blocks.append((index, end, lang.lower(), code))
        index = end + 1
    snippets = []
    for number, (start, end, lang, code) in enumerate(blocks):
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        marker = MARKER_RE.match(lines[above].strip()) if above >= 0 else None
        answer = None
        if number + 1 < len(blocks):
            next_start, _, next_lang, next_code = blocks[number + 1]
            between = lines[end + 1 : next_start]
            if next_lang in ("json", "", "text") and all(not line.strip() for line in between):
                answer = next_code
        snippets.append(
            Snippet(
                path,
                start + 1,
                lang,
                code,
                marker.group(1) if marker else None,
                (marker.group(2) or "") if marker else "",
                answer,
            )
        )
    return snippets


SNIPPETS = [snippet for doc in DOCS for snippet in extract(doc)]
RUNNABLE = [s for s in SNIPPETS if s.lang in SHELLS | PYTHONS]


def test_the_extractor_finds_the_readme_snippets() -> None:
    readme = [s for s in RUNNABLE if s.doc.name == "README.md"]
    assert any("api/v1/publish" in s.code and s.lang == "sh" for s in readme)
    assert any(s.lang == "python" for s in readme)
    assert all(s.reason for s in SNIPPETS if s.marker == "not-run"), "a not-run needs a reason"


def test_few_snippets_are_not_run() -> None:
    not_run = [s.where for s in RUNNABLE if s.marker == "not-run"]
    assert len(not_run) <= MAX_NOT_RUN, not_run


@pytest.mark.parametrize(
    "snippet", [s for s in RUNNABLE if s.lang in PYTHONS], ids=lambda s: s.where
)
def test_python_snippets_are_scripts(snippet: Snippet) -> None:
    try:
        compile(snippet.code, snippet.where, "exec")
    except SyntaxError as exc:
        pytest.fail(
            f"{snippet.where}: not a runnable script ({exc.msg}; wrap awaits in asyncio.run)"
        )


BARE_COMMAND_RE = re.compile(
    r"(^|[\s;|&(`$])igratech-ws\s+(serve|demo|token|publish|listen|config|health)\b"
)
ACTIVATE_RE = re.compile(r"(^|\s)(source|\.)\s+\S*activate")


@pytest.mark.parametrize(
    "snippet", [s for s in RUNNABLE if s.lang in SHELLS], ids=lambda s: s.where
)
def test_shell_snippets_do_not_assume_an_activated_virtualenv(snippet: Snippet) -> None:
    code = "\n".join(
        line for line in snippet.code.splitlines() if not line.lstrip().startswith("#")
    )
    assert not BARE_COMMAND_RE.search(code), f"{snippet.where}: call .venv/bin/igratech-ws"
    assert not ACTIVATE_RE.search(code), f"{snippet.where}: do not activate the virtualenv"


def test_the_checks_catch_what_they_should() -> None:
    assert BARE_COMMAND_RE.search("igratech-ws listen --games g-1")
    assert BARE_COMMAND_RE.search("FOO=1 igratech-ws serve")
    assert not BARE_COMMAND_RE.search(".venv/bin/igratech-ws serve")
    assert not BARE_COMMAND_RE.search("docker build -t igratech-ws .")
    assert ACTIVATE_RE.search("source .venv/bin/activate")
    assert undocumented_errors('{"error":{"code":"unauthorized"}}', "", None) == ["unauthorized"]
    documented = '{"error":{"code":"unauthorized","message":"..."}}'
    assert undocumented_errors('{"error":{"code":"unauthorized"}}', "", documented) == []
    assert missing_answer('{"a":1}', "", '{"channel":"x","offset":1}') is not None
    assert missing_answer('{"channel":"y","offset":2}', "", '{"channel":"x","offset":1}') is None
    assert len(json_objects('{"a":1}{"b":{"c":2}}\n# {"d":3} and {oops')) == 3


# --- running them against the demo -----------------------------------------------------------


def json_objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects in `text`, wherever they start (curl prints answers back to back, and
    documents write them one per line or after ``# ``)."""
    decoder = json.JSONDecoder()
    found = []
    index = text.find("{")
    while index >= 0:
        try:
            value, end = decoder.raw_decode(text, index)
        except ValueError:
            index = text.find("{", index + 1)
            continue
        if isinstance(value, dict):
            found.append(value)
        index = text.find("{", end)
    return found


def _error_code(value: dict[str, Any]) -> str | None:
    error = value.get("error")
    return str(error.get("code")) if isinstance(error, dict) else None


def _documented(code: str, answer: str | None) -> list[dict[str, Any]]:
    comments = "\n".join(
        line.strip() for line in code.splitlines() if line.strip().startswith("# {")
    )
    return json_objects(comments) + json_objects(answer or "")


def undocumented_errors(output: str, code: str, answer: str | None) -> list[str]:
    """Error codes in `output` that the document does not show for this snippet."""
    documented = {_error_code(v) for v in _documented(code, answer)} - {None}
    actual = [c for v in json_objects(output) if (c := _error_code(v)) is not None]
    return [c for c in actual if c not in documented]


def missing_answer(output: str, code: str, answer: str | None) -> str | None:
    """When the document shows a successful answer, why `output` has none like it (an object
    with at least the keys shown)."""
    shown = [v for v in _documented(code, answer) if _error_code(v) is None]
    if not shown:
        return None
    actual = [set(v) for v in json_objects(output)]
    if any(set(v) <= keys for v in shown for keys in actual):
        return None
    return f"expected an answer with keys {sorted(shown[0])}, got {output[:300]!r}"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As the gateway binds: connections of an earlier run in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0" if port == 8080 else "127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory that looks like the checkout (links to its files) for snippets to run in,
    so that files they write (``big.json``) do not land in the repository."""
    if not (ROOT / ".venv" / "bin" / "igratech-ws").exists():
        pytest.skip("no .venv in the checkout: the docs' commands run after `make run`")
    work = tmp_path_factory.mktemp("checkout")
    for entry in ROOT.iterdir():
        if entry.name != ".git":
            (work / entry.name).symlink_to(entry)
    return work


@pytest.fixture(scope="module")
def demo(checkout: Path) -> Iterator[dict[str, str]]:
    """The environment of a terminal where the demo's exports were pasted (PATH without any
    virtualenv), while `make run`'s demo serves on 8080/8081."""
    if not (_port_free(8080) and _port_free(8081)):
        reason = "ports 8080/8081 are in use: the docs' commands need the demo there"
        if os.environ.get("IGRATECH_WS_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IGRATECH_WS_")}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(
        part for part in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in part + "/"
    )
    process = subprocess.Popen(
        [".venv/bin/igratech-ws", "demo", "--rate", "20"],
        cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        banner = ""
        deadline = time.monotonic() + 30
        while "Press Ctrl+C" not in banner and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            banner += line
        exports = dict(EXPORT_RE.findall(banner))
        assert set(exports) == {
            "IGRATECH_WS_API_KEY", "IGRATECH_WS_JWT_SECRET", "IGRATECH_WS_TOKEN",
        }, banner  # fmt: skip
        yield {**env, **exports}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _prelude(snippet: Snippet) -> str:
    """The document's earlier blocks made only of assignments, as typed in the same terminal."""
    lines = []
    for earlier in SNIPPETS:
        if earlier.doc != snippet.doc or earlier.line >= snippet.line or earlier.lang not in SHELLS:
            continue
        body = [ln for ln in earlier.code.splitlines() if ln.strip() and not ln.startswith("#")]
        if body and all(ASSIGNMENT_RE.match(ln.strip()) for ln in body):
            lines.extend(body)
    return "\n".join(lines)


def _command(snippet: Snippet) -> list[str]:
    if snippet.lang in PYTHONS:
        return [".venv/bin/python", "-c", snippet.code]
    return ["bash", "-eo", "pipefail", "-c", _prelude(snippet) + "\n" + snippet.code]


RUN = [s for s in RUNNABLE if s.marker != "not-run"]


@pytest.mark.slow
@pytest.mark.parametrize("snippet", RUN, ids=lambda s: s.where)
def test_the_snippet_runs_as_written(
    snippet: Snippet, checkout: Path, demo: dict[str, str]
) -> None:
    if snippet.marker == "streams":
        process = subprocess.Popen(
            _command(snippet), cwd=checkout, env=demo,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            out, err = process.communicate(timeout=6)
            finished = True
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            out, err = process.communicate(timeout=10)
            finished = False
        assert "Traceback" not in err, f"{snippet.where}:\n{err}"
        assert not finished or process.returncode == 0, f"{snippet.where} failed:\n{out}\n{err}"
        assert out.strip(), f"{snippet.where} printed nothing in 6 s:\n{err}"
        assert not undocumented_errors(out, snippet.code, snippet.answer), out
        return
    result = subprocess.run(
        _command(snippet), cwd=checkout, env=demo, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    report = f"{snippet.where}:\n{snippet.code}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, report
    assert "Traceback" not in result.stderr, report
    assert undocumented_errors(result.stdout, snippet.code, snippet.answer) == [], report
    assert missing_answer(result.stdout, snippet.code, snippet.answer) is None, report
