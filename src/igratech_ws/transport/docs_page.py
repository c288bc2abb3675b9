"""``GET /docs``: the AsyncAPI document rendered as one self-contained HTML page.

The page is generated here from the parsed document (`igratech_ws.contract.document()`), with no
external assets and inline CSS only, so it works on a machine with no internet. It shows the
info, servers, the channel and its bindings, each operation, each message (payload as a nested
field table, examples pretty-printed), the component schemas, and the close and error codes.

Every string from the document is HTML-escaped; the Markdown in descriptions is rendered by
markdown-it-py (CommonMark and tables, raw HTML off). String patterns are shown in the contract's
words (`core.contract_words`), not as regular expressions.
"""

from __future__ import annotations

import functools
import html
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from markdown_it import MarkdownIt

from igratech_ws.core.contract_words import pattern_words

_SCHEMA_REF = "#/components/schemas/"
_MESSAGE_REFS = ("#/channels/wspublic/messages/", "#/components/messages/")
#: Schema keywords shown in the "constraints" column of a field table.
_CONSTRAINTS = (
    "const", "enum", "pattern", "format", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "minProperties",
    "maxProperties", "multipleOf", "uniqueItems", "default",
)  # fmt: skip
#: Nested schemas deeper than this are linked, not expanded (the document has no recursion, but
#: the renderer must not depend on that).
_MAX_DEPTH = 8

CSS = """
:root { --fg:#1d2330; --muted:#5b6474; --line:#dde2ea; --bg:#f7f8fb; --accent:#1f5fbf;
  --send:#1b7f4a; --recv:#8a4b00; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
  color:var(--fg); background:#fff; }
header { background:#162033; color:#fff; padding:20px 32px; }
header h1 { margin:0 0 4px; font-size:24px; }
header p { margin:0; color:#c6d0e0; }
.layout { display:flex; align-items:flex-start; }
nav { position:sticky; top:0; width:260px; flex:none; max-height:100vh; overflow:auto;
  padding:16px 12px 40px 24px; border-right:1px solid var(--line); background:var(--bg);
  font-size:13px; }
nav h2 { font-size:12px; text-transform:uppercase; color:var(--muted); margin:16px 0 4px; }
nav ul { list-style:none; margin:0; padding:0; }
nav a { color:var(--fg); text-decoration:none; display:block; padding:1px 0; }
nav a:hover { color:var(--accent); }
main { flex:1; min-width:0; padding:8px 40px 80px; max-width:1100px; }
h2.section { border-bottom:2px solid var(--line); padding-bottom:4px; margin-top:40px; }
section.card { border:1px solid var(--line); border-radius:8px; padding:12px 20px;
  margin:16px 0; }
section.card h3 { margin:4px 0 8px; }
code, pre { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; }
code { background:var(--bg); padding:1px 4px; border-radius:3px; }
pre { background:#0f1724; color:#e3e8f1; padding:12px 14px; border-radius:6px; overflow:auto; }
pre code { background:none; padding:0; }
table { border-collapse:collapse; width:100%; margin:8px 0 16px; font-size:13px; }
th, td { border:1px solid var(--line); padding:4px 8px; text-align:left; vertical-align:top; }
th { background:var(--bg); }
td.name { white-space:nowrap; font-family:ui-monospace,Menlo,Consolas,monospace; }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px;
  font-weight:600; color:#fff; vertical-align:middle; }
.badge.send { background:var(--send); }
.badge.receive { background:var(--recv); }
.req { color:#b3261e; font-weight:600; }
.muted { color:var(--muted); }
dl.kv { display:grid; grid-template-columns:max-content 1fr; gap:2px 16px; margin:8px 0; }
dl.kv dt { color:var(--muted); }
dl.kv dd { margin:0; }
td p { margin:0 0 4px; } td p:last-child { margin:0; }
"""


def _e(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape(str(value), quote=True)


def _anchor(kind: str, name: str) -> str:
    return kind + "-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# --- Markdown --------------------------------------------------------------------------------


@functools.cache
def _markdown_renderer() -> MarkdownIt:
    # CommonMark with tables; raw HTML off, so every string from the document is escaped, and
    # markdown-it refuses javascript:, vbscript:, file: and data: link targets.
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def markdown(text: str | None) -> str:
    """The Markdown of a description as HTML (escaped; headings shifted below the page's own:
    a description's ``#`` is an ``h3``)."""
    if not text:
        return ""
    renderer = _markdown_renderer()
    tokens = renderer.parse(str(text))
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(6, int(token.tag[1]) + 2)}"
    return str(renderer.renderer.render(tokens, renderer.options, {})).strip()


def _inline(text: str) -> str:
    """A one-line summary's Markdown (code, emphasis, links) as HTML, without a paragraph."""
    return str(_markdown_renderer().renderInline(text)) if text else ""


# --- schemas ---------------------------------------------------------------------------------


def _ref_name(ref: str) -> str:
    return ref.removeprefix(_SCHEMA_REF)


def _ref_link(ref: str) -> str:
    name = _ref_name(ref)
    return f'<a href="#{_anchor("schema", name)}"><code>{_e(name)}</code></a>'


def _type_of(schema: dict[str, Any]) -> str:
    """A short type label: ``string``, ``integer | null``, ``array of bet-data-item``, ..."""
    if "$ref" in schema:
        return _ref_link(schema["$ref"])
    for key in ("oneOf", "anyOf", "allOf"):
        if key in schema:
            sep = " &amp; " if key == "allOf" else " | "
            return sep.join(_type_of(option) for option in schema[key] if isinstance(option, dict))
    kind = schema.get("type")
    names = kind if isinstance(kind, list) else [kind] if kind else []
    labels = []
    for name in names:
        if name == "array" and isinstance(schema.get("items"), dict):
            labels.append("array of " + _type_of(schema["items"]))
        elif name == "object" and isinstance(schema.get("additionalProperties"), dict):
            labels.append("map of " + _type_of(schema["additionalProperties"]))
        else:
            labels.append(_e(name))
    if not labels and "const" in schema:
        labels.append(_e(type(schema["const"]).__name__.replace("str", "string")))
    return " | ".join(labels) or "any"


def _constraints(schema: dict[str, Any]) -> str:
    items = []
    for key in _CONSTRAINTS:
        if key in schema:
            value = schema[key]
            if key == "enum":
                shown = ", ".join(json.dumps(v) for v in value)
            elif key == "pattern" and isinstance(value, str):
                words = pattern_words(value)
                if words is not None:  # the contract's words, not the validator's regex
                    items.append(f"format: {_e(words)}")
                    continue
                # Python's `$(?!\n)` (no trailing newline) is how `$` reads everywhere else.
                shown = value.replace(r"$(?!\n)", "$")
            elif key == "format" and isinstance(value, str):
                shown = value
            else:
                shown = json.dumps(value)
            items.append(f"{_e(key)}: <code>{_e(shown)}</code>")
    if schema.get("additionalProperties") is False:
        items.append("no other fields")
    return "<br>".join(items)


def _nested(schema: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    """Schemas whose fields belong under `schema`'s own path: array items, map values, and the
    options of oneOf/anyOf/allOf; each with the path suffix to add."""
    items = schema.get("items")
    if isinstance(items, dict):
        yield "[]", items
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        yield ".<key>", extra
    for key in ("oneOf", "anyOf", "allOf"):
        for option in schema.get(key, ()):
            if isinstance(option, dict):
                yield "", option


def _field_rows(
    schema: dict[str, Any],
    prefix: str,
    schemas: dict[str, Any],
    depth: int,
    seen: frozenset[str],
) -> list[str]:
    """Rows for every field under `schema`, expanding `$ref`s to component schemas inline."""
    if depth >= _MAX_DEPTH:
        return []
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        target = schemas.get(name)
        if not isinstance(target, dict) or name in seen:
            return []
        return _field_rows(target, prefix, schemas, depth, seen | {name})
    required = set(schema.get("required", ()))
    rows = []
    properties = schema.get("properties")
    for name, sub in properties.items() if isinstance(properties, dict) else ():
        if not isinstance(sub, dict):
            continue
        path = f"{prefix}.{name}".lstrip(".")
        description = sub.get("description")
        if description is None and "$ref" in sub:
            target = schemas.get(_ref_name(sub["$ref"]), {})
            description = target.get("description") if isinstance(target, dict) else None
        rows.append(
            "<tr>"
            f'<td class="name">{_e(path)}'
            + (' <span class="req" title="required">*</span>' if name in required else "")
            + "</td>"
            f"<td>{_type_of(sub)}</td>"
            f"<td>{_constraints(sub)}</td>"
            f"<td>{markdown(description)}</td>"
            "</tr>"
        )
        rows.extend(_field_rows(sub, path, schemas, depth + 1, seen))
    for suffix, sub in _nested(schema):
        rows.extend(_field_rows(sub, prefix + suffix, schemas, depth + 1, seen))
    return rows


def field_table(schema: dict[str, Any], schemas: dict[str, Any]) -> str:
    """A nested field table of `schema` (field, type, constraints, description)."""
    rows = _field_rows(schema, "", schemas, 0, frozenset())
    if not rows:
        return f'<p class="muted">Type: {_type_of(schema)}. {_constraints(schema)}</p>'
    return (
        "<table><thead><tr><th>Field</th><th>Type</th><th>Constraints</th>"
        "<th>Description</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _pretty(value: Any) -> str:
    return "<pre><code>" + _e(json.dumps(value, indent=2, ensure_ascii=False)) + "</code></pre>"


# --- sections --------------------------------------------------------------------------------


def _kv(pairs: Iterable[tuple[str, str]]) -> str:
    body = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in pairs if v)
    return f'<dl class="kv">{body}</dl>' if body else ""


def _info(doc: dict[str, Any]) -> str:
    info = doc.get("info", {})
    contact = info.get("contact") or {}
    license_ = info.get("license") or {}
    pairs = [
        ("AsyncAPI", _e(doc.get("asyncapi", ""))),
        ("Version", _e(info.get("version", ""))),
        ("Id", _e(doc.get("id", ""))),
        ("Content type", _e(doc.get("defaultContentType", ""))),
        ("Contact", _e(" ".join(str(v) for v in contact.values())) if contact else ""),
        ("License", _e(license_.get("name", "")) if license_ else ""),
        ("Machine-readable", '<a href="/asyncapi.yaml"><code>/asyncapi.yaml</code></a>'),
    ]
    return (
        '<h2 class="section" id="info">Overview</h2>'
        + _kv(pairs)
        + markdown(info.get("description"))
    )


def _servers(doc: dict[str, Any]) -> str:
    out = ['<h2 class="section" id="servers">Servers</h2>']
    for name, server in (doc.get("servers") or {}).items():
        url = f"{server.get('protocol', '')}://{server.get('host', '')}{server.get('pathname', '')}"
        security = ", ".join(
            _ref_name(s.get("$ref", "")).rsplit("/", 1)[-1]
            for s in server.get("security", ())
            if isinstance(s, dict)
        )
        out.append(
            f'<section class="card" id="{_anchor("server", name)}">'
            f"<h3>{_e(server.get('title', name))} <code>{_e(name)}</code></h3>"
            + _kv(
                [
                    ("URL", f"<code>{_e(url)}</code>"),
                    ("Summary", _inline(str(server.get("summary", "")))),
                    ("Security", _e(security)),
                ]
            )
            + markdown(server.get("description"))
            + "</section>"
        )
    schemes = (doc.get("components") or {}).get("securitySchemes") or {}
    if schemes:
        out.append(
            "<h3>Security schemes</h3><table><thead><tr><th>Name</th><th>Type</th>"
            "<th>Where</th><th>Description</th></tr></thead><tbody>"
        )
        for name, scheme in schemes.items():
            where = " ".join(
                str(scheme[k]) for k in ("in", "name", "scheme", "bearerFormat") if k in scheme
            )
            out.append(
                f'<tr><td class="name">{_e(name)}</td><td>{_e(scheme.get("type", ""))}</td>'
                f"<td>{_e(where)}</td><td>{markdown(scheme.get('description'))}</td></tr>"
            )
        out.append("</tbody></table>")
    return "".join(out)


def _channels(doc: dict[str, Any], schemas: dict[str, Any]) -> str:
    out = ['<h2 class="section" id="channels">Channel</h2>']
    for name, channel in (doc.get("channels") or {}).items():
        out.append(
            f'<section class="card" id="{_anchor("channel", name)}">'
            f"<h3><code>{_e(channel.get('address', name))}</code></h3>"
            + _kv([("Summary", _inline(str(channel.get("summary", ""))))])
            + markdown(channel.get("description"))
        )
        for protocol, binding in (channel.get("bindings") or {}).items():
            if not isinstance(binding, dict):
                continue
            out.append(f"<h4>{_e(protocol)} binding</h4>")
            out.append(
                _kv(
                    [
                        ("Method", _e(binding.get("method", ""))),
                        ("Binding version", _e(binding.get("bindingVersion", ""))),
                    ]
                )
            )
            for part in ("query", "headers"):
                schema = binding.get(part)
                if isinstance(schema, dict):
                    out.append(f"<h5>{_e(part.capitalize())}</h5>")
                    out.append(markdown(schema.get("description")))
                    out.append(field_table(schema, schemas))
        messages = channel.get("messages") or {}
        if messages:
            links = ", ".join(
                f'<a href="#{_anchor("message", m)}"><code>{_e(m)}</code></a>' for m in messages
            )
            out.append(f"<p>Messages: {links}</p>")
        out.append("</section>")
    return "".join(out)


def _message_id(ref: str) -> str:
    for prefix in _MESSAGE_REFS:
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    return ref


def _operations(doc: dict[str, Any]) -> str:
    out = [
        '<h2 class="section" id="operations">Operations</h2>',
        '<p class="muted">Written from the server\'s point of view: '
        '<span class="badge send">send</span> is a frame the server sends to the client, '
        '<span class="badge receive">receive</span> one the server receives from it.</p>',
    ]
    for name, operation in (doc.get("operations") or {}).items():
        action = str(operation.get("action", ""))
        badge_class = "send" if action == "send" else "receive"
        messages = ", ".join(
            f'<a href="#{_anchor("message", mid)}"><code>{_e(mid)}</code></a>'
            for mid in (_message_id(m.get("$ref", "")) for m in operation.get("messages", ()))
        )
        tags = ", ".join(str(t.get("name", "")) for t in operation.get("tags", ()))
        out.append(
            f'<section class="card" id="{_anchor("operation", name)}">'
            f'<h3><span class="badge {badge_class}">{_e(action)}</span> '
            f"{_e(operation.get('title', name))} <code>{_e(name)}</code></h3>"
            + _kv(
                [
                    ("Summary", _inline(str(operation.get("summary", "")))),
                    ("Messages", messages),
                    ("Tags", _e(tags)),
                ]
            )
            + markdown(operation.get("description"))
            + "</section>"
        )
    return "".join(out)


def _messages(doc: dict[str, Any], schemas: dict[str, Any]) -> str:
    out = ['<h2 class="section" id="messages">Messages</h2>']
    for message_id, message in ((doc.get("components") or {}).get("messages") or {}).items():
        payload = message.get("payload") or {}
        payload_ref = (
            f"<p>Payload schema: {_ref_link(payload['$ref'])}</p>" if "$ref" in payload else ""
        )
        out.append(
            f'<section class="card" id="{_anchor("message", message_id)}">'
            f"<h3><code>{_e(message_id)}</code> {_e(message.get('title', ''))}</h3>"
            + _kv(
                [
                    ("Name", _e(message.get("name", ""))),
                    ("Summary", _inline(str(message.get("summary", "")))),
                    ("Content type", _e(message.get("contentType", ""))),
                ]
            )
            + markdown(message.get("description"))
            + payload_ref
            + field_table(payload, schemas)
        )
        for example in message.get("examples", ()):
            label = example.get("name", "example")
            out.append(
                f"<h4>Example <code>{_e(label)}</code></h4>"
                + (f"<p>{_inline(str(example['summary']))}</p>" if example.get("summary") else "")
                + _pretty(example.get("payload"))
            )
        out.append("</section>")
    return "".join(out)


def _schemas(schemas: dict[str, Any]) -> str:
    out = ['<h2 class="section" id="schemas">Schemas</h2>']
    for name, schema in schemas.items():
        if not isinstance(schema, dict):
            continue
        out.append(
            f'<section class="card" id="{_anchor("schema", name)}">'
            f'<h3><code>{_e(name)}</code> <span class="muted">{_e(schema.get("title", ""))}'
            "</span></h3>"
            + markdown(schema.get("description"))
            + field_table(schema, schemas)
            + "</section>"
        )
    return "".join(out)


def _codes(doc: dict[str, Any]) -> str:
    out = ['<h2 class="section" id="close-codes">Close codes</h2>']
    out.append(
        "<table><thead><tr><th>Code</th><th>Name</th><th>Reason</th><th>Reconnect</th>"
        "<th>Description</th></tr></thead><tbody>"
    )
    for row in doc.get("x-close-codes") or ():
        out.append(
            f'<tr id="{_anchor("close", str(row.get("code")))}"><td class="name">'
            f"{_e(row.get('code'))}</td><td><code>{_e(row.get('name', ''))}</code></td>"
            f"<td>{_e(row.get('reason', ''))}</td>"
            f"<td>{'yes' if row.get('reconnect') else 'no'}</td>"
            f"<td>{markdown(row.get('description'))}</td></tr>"
        )
    out.append("</tbody></table>")
    out.append('<h2 class="section" id="error-codes">Error codes</h2>')
    out.append(
        "<p>Sent in <code>error</code> frames (<code>data.code</code>); the connection stays "
        "open.</p><table><thead><tr><th>Code</th><th>Description</th></tr></thead><tbody>"
    )
    for row in doc.get("x-error-codes") or ():
        out.append(
            f'<tr id="{_anchor("error", str(row.get("code")))}"><td class="name">'
            f"{_e(row.get('code'))}</td><td>{markdown(row.get('description'))}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _nav(doc: dict[str, Any], schemas: dict[str, Any]) -> str:
    def group(title: str, kind: str, names: Iterable[str]) -> str:
        links = "".join(f'<li><a href="#{_anchor(kind, n)}">{_e(n)}</a></li>' for n in names)
        return f"<h2>{_e(title)}</h2><ul>{links}</ul>"

    top = (
        '<ul><li><a href="#info">Overview</a></li><li><a href="#servers">Servers</a></li>'
        '<li><a href="#channels">Channel</a></li><li><a href="#close-codes">Close codes</a></li>'
        '<li><a href="#error-codes">Error codes</a></li></ul>'
    )
    components = doc.get("components") or {}
    return (
        "<nav>"
        + top
        + group("Operations", "operation", (doc.get("operations") or {}).keys())
        + group("Messages", "message", (components.get("messages") or {}).keys())
        + group("Schemas", "schema", schemas.keys())
        + "</nav>"
    )


def render(doc: dict[str, Any]) -> str:
    """The whole HTML page for the parsed AsyncAPI document `doc`."""
    info = doc.get("info") or {}
    schemas = (doc.get("components") or {}).get("schemas") or {}
    title = f"{info.get('title', 'AsyncAPI')} {info.get('version', '')}".strip()
    body = (
        _info(doc)
        + _servers(doc)
        + _channels(doc, schemas)
        + _operations(doc)
        + _messages(doc, schemas)
        + _schemas(schemas)
        + _codes(doc)
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>{_e(info.get('summary', '') or 'WebSocket API reference')}"
        " &middot; generated from the AsyncAPI document</p></header>"
        f'<div class="layout">{_nav(doc, schemas)}<main>{body}</main></div>'
        "</body></html>\n"
    )


#: No scripts, no outside resources: only the inline style may apply.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'"


@functools.cache
def contract_page() -> bytes:
    """The page for the project's own contract, rendered once per process."""
    from igratech_ws.contract import document

    return render(document()).encode("utf-8")


def install(app: web.Application, document: Callable[[], dict[str, Any]] | None = None) -> None:
    """Add ``GET /docs`` to `app`, rendering the page now (a broken contract fails at startup).

    `document` returns the parsed AsyncAPI document; by default the project's contract
    (`igratech_ws.contract.document`), whose page is rendered once per process.
    """
    page = contract_page() if document is None else render(document()).encode("utf-8")

    async def docs(request: web.Request) -> web.Response:
        return web.Response(
            body=page,
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
        )

    app.router.add_get("/docs", docs)
