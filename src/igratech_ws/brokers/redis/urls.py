"""Redis broker URLs: the ``prefix`` query parameter, and ``redis+sentinel://`` URLs.

A plain URL (``redis://``, ``rediss://``, ``unix://``) goes to redis-py as it is once ``prefix`` is
removed. A Sentinel URL names the sentinels, the master's service name and db:
``redis+sentinel://[user:password@]host1:26379,host2:26379/<service>/<db>?prefix=`` (see
`parse_sentinel_url`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from redis.asyncio.connection import parse_url

from igratech_ws.brokers.redis.names import DEFAULT_PREFIX


def split_prefix(url: str) -> tuple[str, str]:
    """Return (`url` without its ``prefix`` query parameter, the prefix or ``igws:``)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = DEFAULT_PREFIX
    kept: list[tuple[str, str]] = []
    for name, value in query:
        if name == "prefix":
            prefix = value
        else:
            kept.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), prefix


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
# Query parameters of a sentinel URL meant for the sentinels rather than the master.
_SENTINEL_AUTH_PARAMS = {"sentinel_username": "username", "sentinel_password": "password"}


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names: where the sentinels are, and how to reach the master.

    `master_kwargs` are redis-py connection options for the master (db, credentials, ``ssl`` and
    every other query parameter, parsed as redis-py parses a ``redis://`` query);
    `sentinel_kwargs` are the options for the sentinels themselves (credentials and TLS).
    """

    sentinels: list[tuple[str, int]]
    service_name: str
    master_kwargs: dict[str, Any] = field(default_factory=dict)
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)


def _parse_sentinel_host(item: str) -> tuple[str, int]:
    host, port = item, ""
    if item.startswith("["):  # IPv6 literal: [::1]:26379
        host, _, rest = item[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad sentinel address {item!r}")
        port = rest[1:]
    elif ":" in item:
        host, _, port = item.rpartition(":")
    if not host:
        raise ValueError(f"bad sentinel address {item!r}")
    try:
        number = int(port) if port else DEFAULT_SENTINEL_PORT
    except ValueError:
        raise ValueError(f"bad sentinel port in {item!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"bad sentinel port in {item!r}")
    return unquote(host), number


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[user:password@]h1[:port],h2[:port]/<service>[/<db>][?query]``.

    The caller must have removed ``prefix`` (see `split_prefix`). ``rediss+sentinel://`` turns on
    TLS for both the sentinels and the master, with the same ``ssl_*`` query parameters.
    Raises ValueError for a malformed URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a sentinel URL: scheme {parts.scheme!r}")
    tls = parts.scheme == "rediss+sentinel"
    userinfo, _, hosts = parts.netloc.rpartition("@")
    sentinels = [_parse_sentinel_host(item) for item in hosts.split(",") if item]
    if not sentinels:
        raise ValueError("a sentinel URL needs at least one sentinel host")
    segments = parts.path.strip("/").split("/") if parts.path.strip("/") else []
    if not segments or len(segments) > 2 or not segments[0]:
        raise ValueError("a sentinel URL path is /<service_name> or /<service_name>/<db>")
    service_name = unquote(segments[0])
    db = segments[1] if len(segments) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"bad database number {db!r} in sentinel URL")

    query = parse_qsl(parts.query, keep_blank_values=True)
    sentinel_kwargs: dict[str, Any] = {
        _SENTINEL_AUTH_PARAMS[name]: value for name, value in query if name in _SENTINEL_AUTH_PARAMS
    }
    kept = [(name, value) for name, value in query if name not in _SENTINEL_AUTH_PARAMS]
    # redis-py's own query parsing, so the options mean what they mean in a redis:// URL.
    master_kwargs: dict[str, Any] = dict(
        parse_url(urlunsplit(("redis", "placeholder", f"/{db}", urlencode(kept), "")))
    )
    master_kwargs.pop("host", None)
    master_kwargs.pop("port", None)
    user, has_password, password = userinfo.partition(":")
    if user:
        master_kwargs["username"] = unquote(user)
    if has_password and password:
        master_kwargs["password"] = unquote(password)
    # The sentinels share the socket and TLS settings; the master's other options are its own.
    for name, value in master_kwargs.items():
        if name.startswith("socket_") or (tls and name.startswith("ssl_")):
            sentinel_kwargs.setdefault(name, value)
    if tls:
        master_kwargs["ssl"] = True
        sentinel_kwargs["ssl"] = True
    return SentinelTarget(sentinels, service_name, master_kwargs, sentinel_kwargs)


def describe_address(url: str) -> str:
    """Where `url` (without ``prefix``) points, for error messages: ``host:port`` or the
    sentinels' addresses and service, never credentials."""
    parts = urlsplit(url)
    if parts.scheme in SENTINEL_SCHEMES:
        target = parse_sentinel_url(url)
        hosts = ",".join(f"{host}:{port}" for host, port in target.sentinels)
        return f"sentinels {hosts} (service {target.service_name})"
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    host = parts.hostname or "localhost"
    return f"{host}:{parts.port or 6379}"
