"""One frozen settings object for a node, from defaults, a TOML file, environment and flags.

`Config` is declared once, below: each field's type carries its constraints (a msgspec
`Meta`), and every source is converted and checked by that one declaration. A `Config` that
exists is valid: constructing one (directly, by `Config.load`, or by `with_overrides`) checks
every field and the rules between fields, and raises `ConfigError` listing every problem.

Precedence (lowest to highest): built-in defaults, the TOML file (``--config`` or
``IGRATECH_WS_CONFIG``; top-level keys named like the fields), environment variables
``IGRATECH_WS_<FIELD>``, command line flags. Secrets come only from the environment (or a file
named by ``IGRATECH_WS_<SECRET>_FILE``), never from the TOML file or flags, so they stay out of
process listings and configuration repositories.

To add a setting: one line in `Config` (name, type with its constraints, default) and its row
in ``docs/operations.md`` (a test checks that every field is documented there).
"""

import difflib
import functools
import os
import tomllib
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
from msgspec import Meta

from igratech_ws.core.client_address import DEFAULT_TRUSTED_PROXIES, TrustedProxies

ENV_PREFIX = "IGRATECH_WS_"
#: Variables with the prefix that are not settings: read by the CLI and the test suite.
OTHER_VARIABLES = frozenset(
    {
        "IGRATECH_WS_CONFIG",  # the TOML file
        "IGRATECH_WS_TOKEN",  # `igratech-ws listen`'s token
        "IGRATECH_WS_REQUIRE_SERVICES",  # tests: fail instead of skipping without Redis/NATS
        "IGRATECH_WS_TEST_REDIS",
        "IGRATECH_WS_TEST_NATS",
        "IGRATECH_WS_TEST_POSTGRES",
        "IGRATECH_WS_BENCH_POSTGRES",
        "IGRATECH_WS_SCREENSHOT_DIR",
        "IGRATECH_WS_ASYNCAPI_CLI_DIR",
    }
)

# --- field types: each carries its constraints, so a value is checked the same from any source

#: A secret: read from ``IGRATECH_WS_<NAME>`` or the file named by ``IGRATECH_WS_<NAME>_FILE``,
#: refused in the TOML file and never printed.
Secret = Annotated[str | None, Meta(extra={"secret": True})]
Port = Annotated[int, Meta(ge=0, le=65535)]
Count = Annotated[int, Meta(gt=0)]
#: A finite positive number of seconds (the upper bound refuses infinity, the lower one NaN).
Seconds = Annotated[float, Meta(gt=0, le=1e9)]
LogLevel = Literal["debug", "info", "warning", "error"]


class ConfigError(ValueError):
    """Settings that cannot make a `Config`. `problems` holds one sentence per problem, each
    naming where the value came from (variable, file, flag or field) and what it must be."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a node needs. Build with `Config.load(...)`, `Config(...)` or `with_overrides`;
    every way checks the values (`ConfigError`)."""

    host: str = "0.0.0.0"
    port: Port = 8080
    api_host: str = "127.0.0.1"
    api_port: Port = 8081
    broker: str = "memory://"
    node_id: str | None = None
    # auth
    jwt_secret: Secret = None
    jwt_public_key: Secret = None
    #: Path of a JWKS file (public keys selected by the token's `kid`), read at start.
    jwt_jwks_file: str | None = None
    #: Seconds of clock skew allowed on a token's `exp` and `nbf`.
    jwt_leeway: Annotated[float, Meta(ge=0, le=300)] = 5.0
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    allow_anonymous: bool = True
    #: The internal API's key: publish, logout, info (and /metrics unless metrics_key is set).
    api_key: Secret = None
    #: A read-only key for /metrics. Unset: /metrics answers without a key (the internal
    #: listener is private); set: /metrics needs this key or the API key.
    metrics_key: Secret = None
    # keep-alive
    ping_interval: Count = 25
    idle_timeout: Count = 60
    # history
    history_size: Count = 1000
    history_ttl: Seconds = 300.0
    #: Seconds a channel's latest state event (stats, balance) is kept after it was published.
    state_ttl: Seconds = 86_400.0
    #: Seconds an idempotency key is remembered per channel (a retry within it is a duplicate).
    idempotency_window: Seconds = 300.0
    # broker tuning (brokers/options.py): timeouts, Redis pool and pings, reconnect backoff
    broker_timeout: Seconds = 3.0
    broker_max_connections: Count = 32
    broker_ping_interval: Seconds = 5.0
    broker_backoff_min: Seconds = 0.1
    broker_backoff_max: Seconds = 5.0
    broker_sentinel_check_interval: Seconds = 1.0
    #: Memory broker bounds: streams kept (least recently published dropped first), and
    #: idempotency keys remembered (oldest forgotten first).
    broker_max_channels: Count = 100_000
    broker_max_idempotency_keys: Count = 100_000
    # limits
    max_frame_bytes: Count = 65_536
    max_games_per_connection: Count = 100
    max_write_buffer_bytes: Count = 1_048_576
    max_publish_body_bytes: Count = 1_048_576
    max_batch_items: Count = 1000
    recovery_limit: Annotated[int, Meta(ge=0)] = 1000
    #: Longest the next walk of writes waits under load (seconds; see hub.py): the latency
    #: traded for throughput when frames were queued during a walk that wrote for over 2 ms.
    max_flush_delay: Annotated[float, Meta(ge=0, le=1)] = 0.05
    #: How long a flush to 500 connections or more waits for the rest of a burst (seconds; 0: not
    #: at all; see hub.py): a broker delivers a burst in several reads. Not on the memory broker,
    #: which delivers a burst in one pass.
    flush_linger: Annotated[float, Meta(ge=0, le=0.1)] = 0.005
    #: Client messages per second per connection (token bucket), and the burst allowed.
    max_message_rate: Annotated[float, Meta(gt=0, le=1e9)] = 20.0
    message_burst: Annotated[float, Meta(ge=1, le=1e9)] = 40.0
    #: Connections this node accepts (503 beyond), and per client address (closed 1013 beyond).
    max_connections: Count = 100_000
    max_connections_per_ip: Count = 1000
    #: Browser origins allowed to open a WebSocket (comma-separated; empty: any origin).
    allowed_origins: str = ""
    #: Proxies whose X-Forwarded-For (and PROXY header) name the client: addresses and CIDRs,
    #: comma-separated (core/client_address.py); empty trusts nobody.
    trusted_proxies: str = DEFAULT_TRUSTED_PROXIES
    #: Connections from trusted proxies must start with a PROXY protocol v1/v2 header (TCP load
    #: balancers); a PROXY header from anyone else is refused (400 proxy_header_refused).
    proxy_protocol: bool = False
    #: PostgreSQL outbox (outbox.py, docs/publishing.md): connection string (it may hold a
    #: password) and table (a lowercase SQL identifier, optionally schema-qualified).
    outbox_dsn: Secret = None
    outbox_table: Annotated[
        str, Meta(pattern=r"^(?:[a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,57}$")
    ] = "igratech_ws_outbox"
    # demo
    demo: bool = False
    log_level: LogLevel = "info"
    #: Listen with SO_REUSEPORT so that several worker processes share the ports (`--workers`).
    reuse_port: bool = False
    #: Serve WebSockets on aiofastnet's transports instead of uvloop's: less CPU per delivery,
    #: about 5 KB more memory per connection (docs/benchmarks.md).
    use_aiofastnet: bool = False

    def __post_init__(self) -> None:
        problems = [
            problem
            for name, kind in _FIELD_TYPES.items()
            if (problem := _check(name, kind, getattr(self, name))) is not None
        ]
        if not problems:
            problems = self._cross_field_problems()
        if problems:
            raise ConfigError(problems)

    def _cross_field_problems(self) -> list[str]:
        problems = []
        if self.idle_timeout <= self.ping_interval:
            problems.append(
                f"idle_timeout ({self.idle_timeout}) must be greater than ping_interval "
                f"({self.ping_interval}), or every client would time out between two pings"
            )
        if not self.allow_anonymous and not (
            self.jwt_secret or self.jwt_public_key or self.jwt_jwks_file
        ):
            problems.append(
                "allow_anonymous is off but no jwt_secret, jwt_public_key or jwt_jwks_file is "
                "set: no client could connect; set one of IGRATECH_WS_JWT_SECRET, "
                "IGRATECH_WS_JWT_PUBLIC_KEY, IGRATECH_WS_JWT_JWKS_FILE"
            )
        try:
            TrustedProxies.parse(self.trusted_proxies)
        except ValueError as exc:
            problems.append(f"trusted_proxies: {exc}")
        return problems

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={'***' if name in SECRETS and value else repr(value)}"
            for name in _FIELD_TYPES
            if (value := getattr(self, name)) != _DEFAULTS[name]
        )
        return f"Config({shown})"

    @property
    def origin_allow_list(self) -> frozenset[str]:
        """The allowed origins, lowercased, without trailing slashes (empty: any origin)."""
        return frozenset(
            o.strip().rstrip("/").lower() for o in self.allowed_origins.split(",") if o.strip()
        )

    @property
    def trusted_proxy_list(self) -> TrustedProxies:
        """The parsed `trusted_proxies` (valid: checked when the config was made; parsed once
        per distinct value, since the listener asks for every connection)."""
        return _parse_trusted_proxies(self.trusted_proxies)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Config":
        """A copy with every non-None value of `overrides` applied (checked like any value;
        unknown keys raise `ConfigError`)."""
        unknown = sorted(set(overrides) - set(_FIELD_TYPES))
        if unknown:
            raise ConfigError([f"unknown settings: {', '.join(unknown)}"])
        changes = {name: value for name, value in overrides.items() if value is not None}
        return msgspec.structs.replace(self, **changes)

    @classmethod
    def load(
        cls,
        *,
        file: str | None = None,
        environ: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> "Config":
        """Defaults, then the TOML `file` (or ``IGRATECH_WS_CONFIG``), then the environment,
        then `flags` (None values ignored). Raises `ConfigError` naming each offending value."""
        return resolve(file=file, environ=environ, flags=flags).config

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Config":
        """Defaults overridden by ``IGRATECH_WS_<NAME>`` variables (``..._FILE`` for secrets)."""
        return resolve(environ=environ, read_config_variable=False).config


_parse_trusted_proxies = functools.lru_cache(maxsize=8)(TrustedProxies.parse)

_FIELD_TYPES: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(Config)}
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in msgspec.structs.fields(Config)}
SECRETS = frozenset(
    name
    for name, kind in _FIELD_TYPES.items()
    if any(isinstance(m, Meta) and (m.extra or {}).get("secret") for m in get_args(kind)[1:])
)

# --- converting and describing values --------------------------------------------------------

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def _base(kind: Any) -> tuple[Any, Meta | None]:
    """The type under `Annotated` and its `Meta`, if any."""
    if get_origin(kind) is Annotated:
        base, *extras = get_args(kind)
        return base, next((m for m in extras if isinstance(m, Meta)), None)
    return kind, None


def _optional(kind: Any) -> bool:
    base, _ = _base(kind)
    return get_origin(base) in (Union, types.UnionType) and type(None) in get_args(base)


def describe(kind: Any) -> str:
    """What a value of field type `kind` must be, in words: ``an integer from 0 to 65535``."""
    base, meta = _base(kind)
    if get_origin(base) in (Union, types.UnionType):
        options = [option for option in get_args(base) if option is not type(None)]
        return describe(options[0]) if len(options) == 1 else "a value"
    if get_origin(base) is Literal:
        return "one of " + ", ".join(str(option) for option in get_args(base))
    if base is bool:
        return "true or false"
    noun = {int: "an integer", float: "a number", str: "text"}.get(base, str(base))
    if meta is None:
        return noun
    low, high = meta.ge if meta.ge is not None else meta.gt, meta.le
    if high is not None and high >= 1e9:
        high = None  # a bound that only refuses infinity is not worth saying
    if meta.gt == 0 and high is None:
        return noun.replace("an integer", "a positive integer").replace(
            "a number", "a positive number"
        )
    if low is not None and high is not None:
        return f"{noun} from {low:g} to {high:g}"
    if low is not None:
        return f"{noun} {'above' if meta.gt is not None else 'of at least'} {low:g}"
    return noun


def _check(name: str, kind: Any, value: Any, label: str | None = None) -> str | None:
    """None when `value` fits field `name`, else the sentence that says what it must be."""
    try:
        msgspec.convert(value, kind)
    except msgspec.ValidationError:
        return f"{label or name} must be {describe(kind)}, not {value!r}"
    return None


def _convert(name: str, value: Any, label: str, *, from_text: bool) -> Any:
    """`value` converted to field `name`'s type; `from_text` for environment and flag strings
    (numbers and booleans written as text). Raises `ConfigError` with one problem."""
    kind = _FIELD_TYPES[name]
    if from_text and isinstance(value, str):
        base, _ = _base(kind)
        if base is bool:
            word = value.strip().lower()
            value = True if word in _TRUE_WORDS else False if word in _FALSE_WORDS else value
        elif value == "" and _optional(kind):
            value = None  # an empty variable unsets an optional setting
        elif base in (int, float):
            value = value.strip()
    try:
        converted = msgspec.convert(value, kind, strict=not from_text)
    except msgspec.ValidationError:
        raise ConfigError([f"{label} must be {describe(kind)}, not {value!r}"]) from None
    if name == "trusted_proxies":
        try:
            _parse_trusted_proxies(converted)
        except ValueError as exc:  # named by its source here, not only by the field
            raise ConfigError([f"{label}: {exc}"]) from None
    return converted


def variable(name: str) -> str:
    """The environment variable of setting `name`."""
    return ENV_PREFIX + name.upper()


def flag(name: str) -> str:
    """The command line flag of setting `name` (where the command has one)."""
    return "--" + name.replace("_", "-")


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


# --- resolving every source ------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """A loaded `Config`, where each value came from, and warnings for the operator.

    `sources` maps each field to ``default``, ``file <path>``, ``environment <VARIABLE>`` or
    ``flag --name``. `warnings` are sentences about variables that look like settings but are
    not (a misspelling, with the closest setting).
    """

    config: Config
    sources: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def resolve(
    *,
    file: str | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    read_config_variable: bool = True,
) -> Resolved:
    """Load a `Config` from every source, remembering where each value came from.

    Raises `ConfigError` with every problem found (bad values in any source, unknown keys in the
    file, secrets outside the environment, unreadable files), each naming its source.
    """
    env = os.environ if environ is None else environ
    problems: list[str] = []
    values: dict[str, Any] = {}
    sources = dict.fromkeys(_FIELD_TYPES, "default")

    def take(name: str, value: Any, source: str, label: str, *, from_text: bool) -> None:
        try:
            values[name] = _convert(name, value, label, from_text=from_text)
            sources[name] = source
        except ConfigError as exc:
            problems.extend(exc.problems)

    path = file or (env.get("IGRATECH_WS_CONFIG") if read_config_variable else None)
    if path:
        for key, value in _read_toml(path, problems).items():
            name = key.replace("-", "_")
            if name not in _FIELD_TYPES:
                hint = did_you_mean(name, _FIELD_TYPES)
                problems.append(f"{path}: unknown setting {key!r}{hint}")
            elif name in SECRETS:
                problems.append(f"{path}: {key} is a secret; set {variable(name)} instead")
            else:
                take(name, value, f"file {path}", f"{path}: {key}", from_text=False)

    for name in _FIELD_TYPES:
        var = variable(name)
        raw = env.get(var)
        if raw is None and name in SECRETS and env.get(var + "_FILE"):
            raw = _read_secret(env[var + "_FILE"], var + "_FILE", problems)
            if raw is None:
                continue
            var += "_FILE"
        if raw is not None:
            take(name, raw, f"environment {var}", var, from_text=True)

    for name, value in (flags or {}).items():
        if name not in _FIELD_TYPES:
            raise ConfigError([f"unknown settings: {name}"])
        if value is not None:
            take(name, value, f"flag {flag(name)}", flag(name), from_text=isinstance(value, str))

    if problems:
        raise ConfigError(problems)
    return Resolved(Config(**values), sources, unknown_variables(env))


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Warnings for ``IGRATECH_WS_*`` variables that are not settings (typos are silently
    ignored otherwise), each with the closest setting's variable when one is close."""
    known = {variable(name) for name in _FIELD_TYPES}
    known |= {variable(name) + "_FILE" for name in SECRETS}
    warnings = []
    for var in sorted(environ):
        if var.startswith(ENV_PREFIX) and var not in known and var not in OTHER_VARIABLES:
            # Compare what follows the prefix: the shared prefix would make anything look close.
            suffixes = {name.removeprefix(ENV_PREFIX) for name in known | OTHER_VARIABLES}
            hint = did_you_mean(var.removeprefix(ENV_PREFIX), suffixes).replace(
                "mean ", "mean " + ENV_PREFIX
            )
            warnings.append(f"{var} is not a setting and is ignored{hint}")
    return warnings


def _read_toml(path: str, problems: list[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        problems.append(
            f"cannot read the configuration file {path}: {exc.strerror}; check --config or "
            "IGRATECH_WS_CONFIG"
        )
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"{path} is not valid TOML: {exc}")
    return {}


def _read_secret(path: str, var: str, problems: list[str]) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        problems.append(f"{var}: cannot read {path}: {reason}")
        return None
