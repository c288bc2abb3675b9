"""The JavaScript client's TypeScript declarations against the contract, checked by `tsc`.

From ``asyncapi/igratech-ws.yaml`` this test writes a TypeScript file that the compiler must
accept, with one check per schema and property:

- every component schema ``foo-bar`` has a type ``FooBar`` in ``igratech-ws-client.d.ts``, with
  exactly the schema's properties (plus the few marked below as ahead of the document) and exactly
  its required ones;
- every type a property allows is accepted, every JSON type it does not allow is refused (by a
  ``@ts-expect-error`` line, which fails the compile if nothing is refused), as is a value outside
  an enum; an enum's type is exactly its values;
- every example of every message type-checks as its frame.

A usage file checks the client's API the same way (handlers receive the declared payloads).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from igratech_ws.contract import DOCUMENT_PATH
from tests.support.nodejs import JS_DIR, node, node_modules

DECLARATIONS = JS_DIR / "igratech-ws-client.d.ts"
PUSH_FRAMES = ("incident-frame", "bet-frame", "bets-result-frame", "balance-frame", "stats-frame")
#: Properties the declarations carry ahead of the document (checked once the document has them).
AHEAD = {
    "status": {"channels"},  # D5: positions in `connected` (the hub's half of issue 10)
    **{frame: {"snapshot", "conflated"} for frame in PUSH_FRAMES},  # D9: state frames (issue 12)
}
_JSON_SAMPLES = {"string": '"x"', "number": "1.5", "boolean": "true", "null": "null"}


def type_name(schema: str) -> str:
    return "".join(part.capitalize() for part in schema.split("-"))


class Generator:
    def __init__(self, document: dict[str, Any]) -> None:
        self.schemas: dict[str, Any] = document["components"]["schemas"]
        self.lines: list[str] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"_{prefix}{self.count}"

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        return self.schemas[ref.rsplit("/", 1)[1]] if ref else schema

    def sample(self, schema: dict[str, Any]) -> str:
        """A minimal valid value of `schema`, as a TypeScript literal."""
        return self.alternatives(schema)[0]

    def alternatives(self, schema: dict[str, Any]) -> list[str]:
        """One value per shape the schema allows (each enum value, each type)."""
        if "oneOf" in schema:
            return [v for option in schema["oneOf"] for v in self.alternatives(option)]
        schema = self.resolve(schema)
        if "const" in schema:
            return [json.dumps(schema["const"])]
        if "enum" in schema:
            return [json.dumps(value) for value in schema["enum"]]
        kinds = schema.get("type", "object")
        values = []
        for kind in [kinds] if isinstance(kinds, str) else kinds:
            if kind == "object":
                values.append(self.instance(schema))
            elif kind == "array":
                values.append(f"[{self.sample(schema.get('items', {}))}]")
            elif kind == "integer":
                values.append("1")
            else:
                values.append(_JSON_SAMPLES[kind])
        return values

    def instance(self, schema: dict[str, Any]) -> str:
        properties = schema.get("properties", {})
        fields = [
            f"{json.dumps(k)}: {self.sample(properties[k])}" for k in schema.get("required", [])
        ]
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and not properties:
            fields.append(f'"k": {self.sample(extra)}')
        return "{" + ", ".join(fields) + "}"

    def refused(self, schema: dict[str, Any]) -> list[str]:
        """Values of JSON types the schema does not allow (and one outside its enum)."""
        if "oneOf" in schema:
            allowed = {self.kind_of(option) for option in schema["oneOf"]}
        else:
            allowed = {self.kind_of(schema)} | set(self.types(self.resolve(schema)))
        resolved = self.resolve(schema)
        values = [
            v for k, v in _JSON_SAMPLES.items() if k not in allowed and not _numeric(k, allowed)
        ]
        if "enum" in resolved or "const" in resolved:
            values.append('"__not_allowed__"')
        return values

    def types(self, schema: dict[str, Any]) -> list[str]:
        kinds = schema.get("type", "object")
        return [kinds] if isinstance(kinds, str) else list(kinds)

    def kind_of(self, schema: dict[str, Any]) -> str:
        resolved = self.resolve(schema)
        if "const" in resolved:
            return type(resolved["const"]).__name__.replace("str", "string")
        return self.types(resolved)[0]

    def check_schema(self, schema_name: str) -> None:
        schema = self.schemas[schema_name]
        ts = type_name(schema_name)
        properties: dict[str, Any] = schema.get("properties", {})
        ahead = AHEAD.get(schema_name, set()) - set(properties)
        keys = " | ".join(json.dumps(k) for k in sorted(set(properties) | ahead)) or "never"
        required = " | ".join(json.dumps(k) for k in schema.get("required", [])) or "never"
        self.lines.append(f"const {self.name('keys')}: Exact<keyof {ts}, {keys}> = true;")
        self.lines.append(
            f"const {self.name('req')}: Exact<RequiredKeys<{ts}>, {required}> = true;"
        )
        self.lines.append(f"const {self.name('min')}: {ts} = {self.instance(schema)};")
        for prop, prop_schema in properties.items():
            slot = f"{ts}[{json.dumps(prop)}]"
            for value in self.alternatives(prop_schema):
                self.lines.append(f"const {self.name('ok')}: {slot} = {value};")
            for value in self.refused(prop_schema):
                self.lines.append(f"// @ts-expect-error {schema_name}.{prop} refuses {value}")
                self.lines.append(f"const {self.name('no')}: {slot} = {value};")
            resolved = self.resolve(prop_schema)
            if "enum" in resolved:  # exactly the schema's values: none missing, none added
                values = " | ".join(json.dumps(v) for v in resolved["enum"] if v is not None)
                self.lines.append(
                    f"const {self.name('enum')}: Exact<Exclude<{slot}, null | undefined>, {values}>"
                    " = true;"
                )
            extra = resolved.get("additionalProperties")
            if isinstance(extra, dict):
                for value in self.alternatives(extra):
                    self.lines.append(
                        f'const {self.name("map")}: NonNullable<{slot}> = {{"k": {value}}};'
                    )


def _numeric(kind: str, allowed: set[str]) -> bool:
    return kind == "number" and "integer" in allowed  # TypeScript has one number type


def contract_checks(
    document: dict[str, Any], module: Path = JS_DIR / "igratech-ws-client.js"
) -> str:
    generator = Generator(document)
    for schema_name in generator.schemas:
        generator.check_schema(schema_name)
    messages = document["components"]["messages"]
    for message_id, message in messages.items():
        frame = type_name(message["payload"]["$ref"].rsplit("/", 1)[1])
        for example in message.get("examples", []):
            payload = json.dumps(example["payload"])
            generator.lines.append(f"// {message_id}: {example['name']}")
            generator.lines.append(f"const {generator.name('ex')}: {frame} = {payload};")
    names = sorted({type_name(n) for n in generator.schemas})
    head = [
        f"import type {{ {', '.join(names)} }} from {json.dumps(str(module))};",
        "type Exact<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;",
        "type RequiredKeys<T> = { [K in keyof T]-?: {} extends Pick<T, K> ? never : K }[keyof T];",
    ]
    return "\n".join(head + generator.lines) + "\n"


USAGE = """
import { IgratechWsClient, Backoff, shouldReconnect } from %(module)s;
import type { GapDetail, StatsData, ServerFrame } from %(module)s;

const client = new IgratechWsClient("ws://127.0.0.1:8080/wspublic", { token: null, games: ["g-1"] });
client.on("incident", (frame) => {
  const minute: number | null | undefined = frame.data.minute;
  const channel: string = frame.channel;
  void minute, channel;
});
client.on("balance", (frame) => void (frame.data.balance.toUpperCase()));
client.on("gap", (gap: GapDetail) => void gap.reason);
client.on("close", ({ code, reconnect, delay }) => void [code, reconnect, delay]);
client.on("connected", (data) => void data.channels?.map((state) => state.offset));
client.on("frame", (frame: ServerFrame) => {
  if (frame.event === "stats") void frame.data.values;
});
const stats: StatsData | undefined = client.channelState("global").stats;
const off: () => void = client.on("push", (frame) => void frame.offset);
const sent: boolean = client.follow("g-2", "g-3");
const next: number | null = new Backoff({ initial: 100 }).next();
void [stats, off, sent, next, shouldReconnect(4001), client.positions.get("global")?.epoch];
client.settings({ recover: { "game:g-1": { offset: 1, epoch: "e" } } });
// @ts-expect-error an event the client does not emit
client.on("nonsense", () => {});
// @ts-expect-error incident frames carry IncidentData
client.on("incident", (frame) => void frame.data.balance);
// @ts-expect-error a settings request has no such field
client.settings({ games: ["g-1"], subscribe: true });
// @ts-expect-error positions need an epoch
client.settings({ recover: { "game:g-1": { offset: 1 } } });
"""


def run_tsc(directory: Path, files: list[Path]) -> subprocess.CompletedProcess[str]:
    config = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "target": "es2022",
            "module": "nodenext",
            "moduleResolution": "nodenext",
            "types": [],
            "lib": ["es2022"],
        },
        "files": [str(f) for f in files],
    }
    (directory / "tsconfig.json").write_text(json.dumps(config))
    tsc = node_modules() / "typescript" / "bin" / "tsc"
    return subprocess.run(
        [node(), str(tsc), "-p", str(directory / "tsconfig.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_declarations_match_the_contract(tmp_path: Path) -> None:
    document = yaml.safe_load(DOCUMENT_PATH.read_text())
    checks = tmp_path / "contract.mts"
    checks.write_text(contract_checks(document))
    usage = tmp_path / "usage.mts"
    usage.write_text(USAGE % {"module": json.dumps(str(JS_DIR / "igratech-ws-client.js"))})
    result = run_tsc(tmp_path, [checks, usage])
    assert result.returncode == 0, result.stdout + result.stderr + "\n" + checks.read_text()
    assert checks.read_text().count("@ts-expect-error") > 50  # the refusals were generated


@pytest.mark.slow
def test_a_wrong_declaration_is_caught(tmp_path: Path) -> None:
    """The check can fail: declarations that drop a field, make one optional, widen an enum or
    miss a schema are each refused."""
    document = yaml.safe_load(DOCUMENT_PATH.read_text())
    original = DECLARATIONS.read_text()
    mutants = {
        "dropped field": original.replace("  incidentId: string;\n", "", 1),
        "optional field": original.replace(
            "  gameId: string;\n  bets:", "  gameId?: string;\n  bets:"
        ),
        "wider enum": original.replace(
            '"home" | "away" | "none"', '"home" | "away" | "none" | "both"'
        ),
        "missing schema": original.replace("interface Score {", "interface MatchScore {").replace(
            "score?: Score", "score?: MatchScore"
        ),
        "wrong type": original.replace(
            "  offset: number;\n  epoch: string;\n}", "  offset: string;\n  epoch: string;\n}", 1
        ),
    }
    files = []
    for name, text in mutants.items():
        assert text != original, name
        work = tmp_path / name.replace(" ", "-")
        work.mkdir()
        (work / "igratech-ws-client.d.ts").write_text(text)
        checks = work / "contract.mts"
        checks.write_text(contract_checks(document, work / "igratech-ws-client.js"))
        files.append(checks)
    result = run_tsc(tmp_path, files)  # one compile for all: each mutant must show errors
    for name in mutants:
        assert f"{name.replace(' ', '-')}/contract.mts" in result.stdout, (
            f"the {name} mutant passed the check:\n{result.stdout}"
        )
