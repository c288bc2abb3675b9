"""Imports go one way: core <- auth <- brokers <- hub/node <- transport <- app <- cli.

Checked with `ast` over the source (every import, including those inside functions and
`TYPE_CHECKING` blocks), so a lazy import cannot slip past.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import igratech_ws

PACKAGE_DIR = Path(igratech_ws.__file__).resolve().parent
PACKAGE = "igratech_ws"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, as absolute dotted names (`from a import b` gives a and a.b)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    package = module_name(path).split(".")
    if not is_package:
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(path): imports_of(path) for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _ours(prefix: str) -> list[str]:
    return [name for name in MODULES if _within(name, f"{PACKAGE}.{prefix}")]


def violations(modules: list[str], forbidden: list[str]) -> list[str]:
    return sorted(
        f"{module} imports {imported}"
        for module in modules
        for imported in MODULES[module]
        for prefix in forbidden
        if _within(imported, prefix)
    )


def test_the_scan_sees_the_package() -> None:
    for expected in (
        "core.session",
        "hub",
        "node",
        "auth",
        "brokers.memory",
        "transport.websocket",
    ):
        assert f"{PACKAGE}.{expected}" in MODULES
    assert "igratech_ws.core.codec" in MODULES["igratech_ws.core.session"]
    # the detector is not vacuous: an upward edge that exists is reported
    assert violations(_ours("transport"), [f"{PACKAGE}.node"])


def test_relative_imports_are_resolved() -> None:
    client = MODULES["igratech_ws.client.client"]
    assert "igratech_ws.client.backoff" in client


IO_LIBRARIES = ["asyncio", "socket", "picows", "aiohttp", "redis", "nats", "jwt", "uvloop"]


def test_core_is_pure() -> None:
    core = _ours("core")
    assert core
    assert violations(core, IO_LIBRARIES) == []
    outside = [
        f"{module} imports {imported}"
        for module in core
        for imported in MODULES[module]
        if _within(imported, PACKAGE) and not _within(imported, f"{PACKAGE}.core")
    ]
    assert outside == []


LAYER_RULES = [
    ("auth", ["brokers", "hub", "node", "transport", "app", "cli", "client"]),
    ("brokers", ["hub", "node", "transport", "app", "cli", "client"]),
    ("hub", ["transport", "app", "cli", "client"]),
    ("node", ["transport", "app", "cli", "client"]),
    ("transport", ["app", "cli", "client"]),
    ("app", ["cli"]),
]


@pytest.mark.parametrize(("layer", "above"), LAYER_RULES, ids=[r[0] for r in LAYER_RULES])
def test_layers_import_only_downward(layer: str, above: list[str]) -> None:
    modules = _ours(layer)
    assert modules, layer
    assert violations(modules, [f"{PACKAGE}.{name}" for name in above]) == []


def test_hub_does_not_import_node() -> None:
    # the node wires the hub, never the reverse
    assert violations(_ours("hub"), [f"{PACKAGE}.node"]) == []


def test_only_auth_imports_jwt() -> None:
    users = sorted(m for m, imported in MODULES.items() if any(_within(i, "jwt") for i in imported))
    assert users == [f"{PACKAGE}.auth"]


SERVER_MODULES = [
    "auth",
    "brokers",
    "hub",
    "node",
    "transport",
    "app",
    "cli",
    "config",
    "demo_feed",
    "logs",
]


def test_client_imports_no_server_module() -> None:
    modules = _ours("client")
    assert modules
    assert violations(modules, [f"{PACKAGE}.{name}" for name in SERVER_MODULES]) == []
