"""NATS names: the stream, subjects, channel tokens, headers, and the broker URL.

``P`` is the prefix (the URL's ``prefix``, ``igws`` by default: subject tokens of
``A-Z a-z 0-9 _ -`` joined by ``.``)::

    stream            IGWS_<P with "." replaced by "_">
    append subject    P.ch.<token>            a channel's publications (history)
    live subject      P.live.<token>          the stream republishes every stored append here
    state subject     P.st.<token>.<event>    a channel's state slot for one state event
    control subject   P.control               core NATS, no storage

``<token>`` is the channel name as one subject token: every character outside
``A-Z a-z 0-9 _ - :`` becomes ``%XX`` (the hex of its UTF-8 bytes), so ``game:g-1.5`` is
``game:g-1%2E5`` (`channel_token` / `channel_from_token`). NATS splits subjects on ``.`` and treats
``*`` / ``>`` as wildcards; ``%`` itself is escaped, so the mapping is reversible.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit, urlunsplit

DEFAULT_PREFIX = "igws"

#: Headers of a stored publication (see the package docstring).
H_OFFSET = "Igws-Offset"
H_EPOCH = "Igws-Epoch"
H_EVENT = "Igws-Event"
H_TIME = "Igws-Time"
H_ORIGIN = "Igws-Origin"
H_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
H_MSG_ID = "Nats-Msg-Id"
H_EXPECTED_LAST_MSG_ID = "Nats-Expected-Last-Msg-Id"
H_ROLLUP = "Nats-Rollup"

#: URL query options that are ours (stripped before nats-py sees the URL).
URL_OPTIONS = frozenset({"prefix", "storage", "replicas", "timeout", "max_age", "chain"})

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-:")
_ESCAPE_RE = re.compile(r"%([0-9A-F]{2})")


def channel_token(channel: str) -> str:
    """`channel` as one valid NATS subject token (reversible; see the module docstring)."""
    if not channel:
        raise ValueError("a channel name is not empty")
    raw = channel.encode()
    if all(b in _SAFE for b in raw):
        return channel
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


def channel_from_token(token: str) -> str:
    """The channel name that `channel_token` turned into `token`."""
    if "%" not in token:
        return token
    out = bytearray()
    index = 0
    while index < len(token):
        char = token[index]
        if char == "%":
            match = _ESCAPE_RE.match(token, index)
            if match is None:
                raise ValueError(f"bad escape in subject token {token!r}")
            out.append(int(match.group(1), 16))
            index += 3
        else:
            out.extend(char.encode())
            index += 1
    return out.decode()


def stream_name(prefix: str) -> str:
    """The JetStream stream that holds the channels of `prefix`."""
    return "IGWS_" + prefix.replace(".", "_")


def check_prefix(prefix: str) -> str:
    """Return `prefix` if it is valid subject tokens, else raise ValueError."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"NATS prefix {prefix!r} must be tokens of A-Z a-z 0-9 _ - joined by '.'")
    return prefix


def append_subject(prefix: str, channel: str) -> str:
    return f"{prefix}.ch.{channel_token(channel)}"


def live_subject(prefix: str, channel: str) -> str:
    return f"{prefix}.live.{channel_token(channel)}"


def state_subject(prefix: str, channel: str, event: str) -> str:
    return f"{prefix}.st.{channel_token(channel)}.{channel_token(event)}"


def message_id(channel: str, key: str) -> str:
    """The JetStream message id of a publish with idempotency `key` to `channel`.

    JetStream deduplicates ids per stream, so the channel is part of the id; the token has no
    ``/``, so the first ``/`` separates the two and distinct pairs give distinct ids.
    """
    return f"{channel_token(channel)}/{key}"


def control_subject(prefix: str) -> str:
    return f"{prefix}.control"


def parse_url(url: str) -> tuple[list[str], dict[str, str]]:
    """Split a broker URL into the server URLs for nats-py and our own query options.

    The host part may list several servers of a cluster, ``nats://[user:pw@]h1:4222,h2:4222``
    (credentials written once apply to every server): a node connects to any of them and
    reconnects to another when its server goes. Options: ``prefix`` (subject/stream namespace),
    ``storage`` (``file`` or ``memory``), ``replicas`` (stream replicas), ``timeout`` (seconds
    per request), ``max_age`` (seconds the stream keeps messages, hence an idle channel's
    position), ``chain`` (publications per channel in flight at once at most; 1 turns chains
    off). Unknown ones are refused so that a typo is not silently ignored; so is a port that is
    not a number.
    """
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(options) - URL_OPTIONS
    if unknown:
        raise ValueError(f"unknown NATS URL option(s): {', '.join(sorted(unknown))}")
    credentials, _, hosts = parts.netloc.rpartition("@")
    servers = []
    for host in hosts.split(","):
        if not host:
            raise ValueError(f"empty server in the NATS URL's host list {hosts!r}")
        netloc = f"{credentials}@{host}" if credentials else host
        server = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
        urlsplit(server).port  # noqa: B018 - raises ValueError for a port that is not a number
        servers.append(server)
    return servers, options


def describe_server(servers: list[str]) -> str:
    """``host:port`` of each server URL, for error messages (never their credentials)."""
    named = []
    for server in servers:
        parts = urlsplit(server)
        named.append(f"{parts.hostname or 'localhost'}:{parts.port or 4222}")
    return ",".join(named)
