"""``GET /docs``: the AsyncAPI document as a self-contained, well-formed, escaped HTML page."""

from __future__ import annotations

import html
import json
from html.parser import HTMLParser
from typing import Any

import aiohttp
from aiohttp import web

from igratech_ws.app import running_app
from igratech_ws.config import Config
from igratech_ws.contract import document
from igratech_ws.transport import docs_page

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}  # fmt: skip


class _Checker(HTMLParser):
    """Checks that every element is closed in order, and collects links, ids and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.ids: list[str] = []
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.tags: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        if values.get("id"):
            self.ids.append(str(values["id"]))
        if values.get("href"):
            self.hrefs.append(str(values["href"]))
        if values.get("src"):
            self.srcs.append(str(values["src"]))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def check(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.problems, checker.problems[:5]
    assert not checker.stack, f"unclosed: {checker.stack}"
    return checker


def test_page_shows_every_message_schema_and_example() -> None:
    doc = document()
    page = docs_page.render(doc)
    checker = check(page)
    text = "".join(checker.text)
    components = doc["components"]
    for message_id in components["messages"]:
        assert f"message-{message_id}" in checker.ids, message_id
        assert message_id in text
    for name in components["schemas"]:
        assert f"schema-{name}" in checker.ids, name
    for operation_id, operation in doc["operations"].items():
        assert f"operation-{operation_id}" in checker.ids
        assert operation["title"] in text
        assert operation["action"] in text
    # Every example, pretty-printed as the page shows it (the text, once unescaped).
    for message in components["messages"].values():
        for example in message.get("examples", []):
            shown = json.dumps(example["payload"], indent=2, ensure_ascii=False)
            assert shown in text, example.get("name")
    for row in doc["x-close-codes"]:
        assert f"close-{row['code']}" in checker.ids
    for row in doc["x-error-codes"]:
        assert f"error-{row['code']}" in checker.ids
    for server in doc["servers"].values():
        assert server["host"] in text
    # The channel's bindings: the handshake's query parameters.
    assert "settings" in text and "token" in text


def test_page_is_self_contained() -> None:
    checker = check(docs_page.render(document()))
    assert "script" not in checker.tags
    assert not checker.srcs
    assert "link" not in checker.tags
    for href in checker.hrefs:
        assert href.startswith("#") or href == "/asyncapi.yaml", href
    # Every in-page link points at an element of the page.
    ids = set(checker.ids)
    missing = {h for h in checker.hrefs if h.startswith("#") and h[1:] not in ids}
    assert not missing, sorted(missing)[:5]


def test_text_from_the_document_is_escaped() -> None:
    hostile = "<script>alert('x')</script> & \"quotes\""
    doc: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {"title": hostile, "version": "1", "description": f"`{hostile}` and {hostile}"},
        "servers": {"s<1>": {"host": hostile, "protocol": "ws", "description": hostile}},
        "channels": {},
        "operations": {
            "op": {"action": "send", "title": hostile, "description": hostile, "messages": []}
        },
        "components": {
            "messages": {
                "m<1>": {
                    "title": hostile,
                    "payload": {
                        "type": "object",
                        "properties": {hostile: {"type": "string", "pattern": hostile}},
                    },
                    "examples": [{"name": hostile, "payload": {"k": hostile}}],
                }
            },
            "schemas": {"s": {"description": "[link](javascript:alert(1))"}},
        },
        "x-close-codes": [{"code": 4000, "name": hostile, "reason": hostile}],
        "x-error-codes": [{"code": hostile, "description": hostile}],
    }
    page = docs_page.render(doc)
    checker = check(page)
    assert "<script>" not in page
    assert "script" not in checker.tags
    assert not any(h.startswith("javascript:") for h in checker.hrefs)
    assert hostile in "".join(checker.text)
    assert html.escape(hostile) in page


def test_markdown_in_descriptions() -> None:
    rendered = docs_page.markdown(
        "## Title\n\nSome `code` and **bold** [a link](https://example.org).\n\n"
        '- one\n  continued\n- two\n\n```json\n{"a": 1}\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n'
    )
    checker = check(rendered)
    assert {"h4", "code", "strong", "a", "ul", "li", "pre", "table", "td"} <= checker.tags
    assert "one continued" in " ".join("".join(checker.text).split())
    assert checker.hrefs == ["https://example.org"]


async def test_docs_route_is_public_and_html() -> None:
    config = Config(host="127.0.0.1", port=0, api_host="127.0.0.1", api_port=0, api_key="k")
    async with running_app(config) as app, aiohttp.ClientSession() as http:
        async with http.get(app.api_url + "/docs") as answer:
            assert answer.status == 200
            assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
            assert "default-src 'none'" in answer.headers["Content-Security-Policy"]
            page = await answer.text()
        check(page)
        assert "publish-incident" in page


def test_install_with_another_document() -> None:
    app = web.Application()
    docs_page.install(app, lambda: {"asyncapi": "3.0.0", "info": {"title": "T", "version": "2"}})
    assert [r.resource.canonical for r in app.router.routes() if r.method == "GET"] == ["/docs"]
