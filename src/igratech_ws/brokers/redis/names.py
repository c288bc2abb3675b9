"""Names of a channel's Redis keys and pub/sub channels (``P`` is the deployment's prefix).

For a channel ``C``, every key carries the hash tag ``{C}`` so that one channel's keys share one
Redis Cluster slot (each script touches only one channel's keys):

- ``P meta:{C}``: hash ``epoch``, ``top`` (the stream's position);
- ``P stream:{C}``: Redis Stream, the history (entry ID = offset);
- ``P state:{C}``: hash, state event -> its latest publication;
- ``P idem:{C}:<key>``: string, the first publication made with an idempotency key;
- ``P pub:C``: pub/sub channel of C's publications; ``P control``: node-to-node messages.
"""

from __future__ import annotations

DEFAULT_PREFIX = "igws:"


def meta_key(prefix: str, channel: str) -> str:
    return f"{prefix}meta:{{{channel}}}"


def stream_key(prefix: str, channel: str) -> str:
    return f"{prefix}stream:{{{channel}}}"


def state_key(prefix: str, channel: str) -> str:
    return f"{prefix}state:{{{channel}}}"


def idempotency_key(prefix: str, channel: str, key: str) -> str:
    return f"{prefix}idem:{{{channel}}}:{key}"


def pubsub_channel(prefix: str, channel: str) -> str:
    return f"{prefix}pub:{channel}"


def control_channel(prefix: str) -> str:
    return f"{prefix}control"
