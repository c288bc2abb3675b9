"""The NATS JetStream broker: channel history and state in one stream, live fan-out by republish.

Names are in `subjects` (stream ``IGWS_<P>``, appends on ``P.ch.<token>``, live delivery on
``P.live.<token>``, state slots on ``P.st.<token>.<event>``, control on ``P.control``).

A message on an append subject is one publication: the payload is the event's ``data`` (compact
JSON, verbatim) and the headers are::

    Igws-Offset   decimal offset, consecutive per channel from 1
    Igws-Epoch    the epoch of the channel's stream (random hex, chosen by its first message)
    Igws-Event    the event name
    Igws-Time     publication time, Unix seconds as a Python float repr
    Igws-Origin   the publishing node id (or any name a backend chooses)
    Nats-Expected-Last-Subject-Sequence   the stream sequence of the message it follows (0: none)
    Nats-Msg-Id   ``<token>/<idempotency key>``, on a publish with a key; a node-unique id
                  (no ``/``) on a chained one that another chained one follows
    Nats-Expected-Last-Msg-Id   instead of the sequence, on a chained publication after the
                  first: the id of the one it follows (see `appender`)

One stream holds every channel, bounded by ``MaxMsgsPerSubject = history_size`` and ``MaxAge``
(`BrokerOptions.retention`, or the URL's ``max_age``); a stream per channel would cost a stream
(and its server-side state and API calls) per game and user, which NATS does not scale to. How an
append stays atomic per channel, how keys are deduplicated and how state slots are written:
`append`; how a node does it in one round trip, with many publications of a channel in flight at
once (chains), and a state publication with its slot in one atomic batch on NATS 2.12+:
`appender`. Reads (`history`): nothing is created for a channel without messages (no epoch
marker, no consumer): its position is ``(0, EMPTY_EPOCH)``.

Epochs. The first message of a channel's (empty) subject picks a random epoch and every later
message copies it. When the channel's messages are all gone (idle longer than ``MaxAge``, or the
stream deleted or lost), the next message starts over at offset 1 with a new epoch, so a client
holding an old position is told recovery failed rather than receiving a wrong sequence; state
slots of the old epoch are ignored.

Expiry. History is cut at read time by ``history_ttl`` (from ``Igws-Time``) and state by
``state_ttl``, while the stream keeps messages for ``MaxAge``: expiry drops a channel's history but
not its position, which goes on until the channel has been idle for ``MaxAge``.

Publishing from a backend straight into NATS: `publish_event` with a connected nats-py client (it
does the read / expected-sequence / retry dance, keys and state slots); a plain publish without the
headers would break the offsets. A control message is the JSON of a `brokers.base.ControlMessage`
on ``P.control``, e.g. ``{"kind":"logout","origin":"backend","user_id":"u-1","reason":"forced"}``.
"""

from igratech_ws.brokers.nats.append import publish_event
from igratech_ws.brokers.nats.broker import NatsBroker
from igratech_ws.brokers.nats.subjects import (
    DEFAULT_PREFIX,
    append_subject,
    channel_from_token,
    channel_token,
    check_prefix,
    control_subject,
    live_subject,
    message_id,
    parse_url,
    state_subject,
    stream_name,
)

__all__ = [
    "DEFAULT_PREFIX",
    "NatsBroker",
    "append_subject",
    "channel_from_token",
    "channel_token",
    "check_prefix",
    "control_subject",
    "live_subject",
    "message_id",
    "parse_url",
    "publish_event",
    "state_subject",
    "stream_name",
]
