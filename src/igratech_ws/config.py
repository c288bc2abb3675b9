"""One frozen settings object for a node, from defaults, a TOML file, environment and flags.

Precedence (lowest to highest): built-in defaults, the TOML file (``--config`` or
``IGRATECH_WS_CONFIG``; top-level keys named like the fields), environment variables
``IGRATECH_WS_<FIELD>``, command line flags. Secrets come only from the environment (or a file
named by ``IGRATECH_WS_<SECRET>_FILE``), never from the TOML file or flags, so they stay out of
process listings and configuration repositories.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class Config:
    """Everything a node needs. Build with `Config.from_env()` then `.with_overrides(...)`."""

    host: str = "0.0.0.0"
    port: int = 8080
    api_host: str = "127.0.0.1"
    api_port: int = 8081
    broker: str = "memory://"
    node_id: str | None = None
    # auth
    jwt_secret: str | None = field(default=None, repr=False)
    jwt_public_key: str | None = field(default=None, repr=False)
    #: Path of a JWKS file (public keys selected by the token's `kid`), read at start.
    jwt_jwks_file: str | None = None
    #: Seconds of clock skew allowed on a token's `exp` and `nbf`.
    jwt_leeway: float = 5.0
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    allow_anonymous: bool = True
    api_key: str | None = field(default=None, repr=False)
    # keep-alive
    ping_interval: int = 25
    idle_timeout: int = 60
    # history
    history_size: int = 1000
    history_ttl: float = 300.0
    # limits
    max_frame_bytes: int = 65_536
    max_games_per_connection: int = 100
    max_write_buffer_bytes: int = 1_048_576
    max_publish_body_bytes: int = 1_048_576
    max_batch_items: int = 1000
    recovery_limit: int = 1000
    #: Longest a flush of queued frames waits under load (seconds; see hub.py): the latency
    #: traded for throughput when one flush of the fan-out takes longer than 2 ms.
    max_flush_delay: float = 0.05
    #: Client messages per second per connection (token bucket), and the burst allowed.
    max_message_rate: float = 20.0
    message_burst: float = 40.0
    #: Connections this node accepts (503 beyond), and per client address (closed 1013 beyond).
    max_connections: int = 100_000
    max_connections_per_ip: int = 1000
    #: Browser origins allowed to open a WebSocket (comma-separated; empty: any origin).
    allowed_origins: str = ""
    outbox_dsn: str | None = field(default=None, repr=False)  # PostgreSQL outbox (outbox.py)
    outbox_table: str = "igratech_ws_outbox"
    # demo
    demo: bool = False
    log_level: str = "info"
    #: Listen with SO_REUSEPORT so that several worker processes share the ports (`--workers`).
    reuse_port: bool = False
    #: Serve WebSockets on aiofastnet's transports instead of uvloop's: less CPU per delivery,
    #: about 5 KB more memory per connection (docs/benchmarks.md).
    use_aiofastnet: bool = False

    @property
    def origin_allow_list(self) -> frozenset[str]:
        """The allowed origins, lowercased, without trailing slashes (empty: any origin)."""
        return frozenset(
            o.strip().rstrip("/").lower() for o in self.allowed_origins.split(",") if o.strip()
        )

    def with_overrides(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with every non-None value of `overrides` applied (unknown keys raise)."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def load(
        cls,
        *,
        file: str | None = None,
        environ: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> Config:
        """Defaults, then the TOML `file` (or ``IGRATECH_WS_CONFIG``), then the environment,
        then `flags` (None values ignored). Raises `ValueError` naming the offending setting."""
        env = os.environ if environ is None else environ
        path = file or env.get("IGRATECH_WS_CONFIG")
        config = cls.from_toml(path) if path else cls()
        config = config.with_overrides(cls._env_values(env))
        return config.with_overrides(dict(flags or {}))

    @classmethod
    def from_toml(cls, path: str) -> Config:
        """Defaults overridden by the settings of the TOML file at `path` (top-level keys named
        like the fields, e.g. ``port = 8080``). Secrets are refused there: keep them in the
        environment. Raises `ValueError` for unknown keys, wrong types and secrets."""
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except OSError as exc:
            raise ValueError(f"cannot read the configuration file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None
        defaults = cls()
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"{path}: unknown setting {key!r}")
            if name in _SECRETS:
                variable = "IGRATECH_WS_" + name.upper()
                raise ValueError(f"{path}: {key} is a secret; set {variable} instead")
            expected = type(getattr(defaults, name))
            if getattr(defaults, name) is None:
                expected = str
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ValueError(
                    f"{path}: {key} must be {expected.__name__}, not {type(value).__name__}"
                )
            values[name] = value
        return defaults.with_overrides(values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Defaults overridden by ``IGRATECH_WS_<NAME>`` variables (``..._FILE`` for secrets)."""
        env = os.environ if environ is None else environ
        return cls().with_overrides(cls._env_values(env))

    @classmethod
    def _env_values(cls, env: Mapping[str, str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for item in fields(cls):
            name = "IGRATECH_WS_" + item.name.upper()
            raw = env.get(name)
            if raw is None and item.name in _SECRETS and env.get(name + "_FILE"):
                with open(env[name + "_FILE"], encoding="utf-8") as handle:
                    raw = handle.read().strip()
            if raw is None:
                continue
            values[item.name] = _parse(item.name, raw, getattr(cls(), item.name))
        return values

    def validate(self) -> list[str]:
        """Every problem with this configuration, as sentences naming the setting."""
        problems = []
        for name in ("port", "api_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                problems.append(f"{name} must be between 0 and 65535, not {value}")
        if self.ping_interval <= 0 or self.idle_timeout <= self.ping_interval:
            problems.append("idle_timeout must be greater than ping_interval, both positive")
        if not self.allow_anonymous and not (
            self.jwt_secret or self.jwt_public_key or self.jwt_jwks_file
        ):
            problems.append(
                "allow_anonymous is off but no jwt_secret, jwt_public_key or jwt_jwks_file is set"
            )
        if not 0 <= self.jwt_leeway <= 300:
            problems.append("jwt_leeway must be between 0 and 300 seconds")
        if not (self.max_message_rate > 0 and self.message_burst >= 1):  # also refuses NaN
            problems.append("max_message_rate must be positive and message_burst at least 1")
        for name in (
            "max_connections",
            "max_connections_per_ip",
            "history_size",
            "max_frame_bytes",
            "max_games_per_connection",
            "max_write_buffer_bytes",
            "max_publish_body_bytes",
            "max_batch_items",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if not (0 <= self.max_flush_delay <= 1):
            problems.append("max_flush_delay must be between 0 and 1 second")
        if not (0 < self.history_ttl < math.inf):  # also refuses NaN
            problems.append("history_ttl must be positive (seconds)")
        return problems


_SECRETS = {"jwt_secret", "jwt_public_key", "api_key"}


def _parse(name: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"IGRATECH_WS_{name.upper()} must be true or false, not {raw!r}")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(
                f"IGRATECH_WS_{name.upper()} must be an integer, not {raw!r}"
            ) from None
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"IGRATECH_WS_{name.upper()} must be a number, not {raw!r}") from None
    return raw
