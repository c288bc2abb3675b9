"""The NATS client a node uses: nats-py's, with a header parser that costs less per message.

Every publication a node receives is a JetStream message with a dozen headers (ours, the
republish headers, a batch's), and nats-py parses each header name with a Python generator: most
of the node's cost per received publication. `Client` parses the same block to the same result
with C-level byte operations (`tests/brokers/test_nats_client.py` compares the two on random
blocks). Everything else is nats-py's.
"""

from __future__ import annotations

import re

from nats.aio.client import Client as NatsClient

__all__ = ["Client", "parse_header_lines"]

_CRLF = b"\r\n"
# What str.isspace() calls whitespace among ASCII characters (a header name with any is skipped).
_SPACE = re.compile(rb"[\t\n\x0b\x0c\r\x1c-\x1f ]")


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """``Name: Value`` lines (CRLF-separated) as a dict, exactly as nats-py's own parser reads
    them: names stripped and ASCII (others skipped), a name with whitespace inside skipped,
    values stripped and decoded as UTF-8 (malformed bytes replaced), the last of a name winning."""
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip()
        if not name.isascii() or _SPACE.search(name):
            continue
        out[name.decode("ascii")] = value.strip().decode("utf-8", "replace")
    return out


class Client(NatsClient):
    """nats-py's client with `parse_header_lines` (see the module docstring)."""

    # nats-py calls it on itself, for every message with headers.
    _parse_header_lines = staticmethod(parse_header_lines)
