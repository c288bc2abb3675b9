"""Resume decisions: given where a client was and what history holds, what to deliver.

A stream position is (offset, epoch). Offsets grow by one per publication in a channel; the epoch
names one life of the stream and changes when the stream is lost (broker restarted without
persistence, history evicted). Recovery succeeds only within one epoch and only when history still
holds every publication after the client's offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

#: The epoch of a channel that has no stream (never published, or dropped): offset 0.
EMPTY_EPOCH = "none"


class HasOffset(Protocol):
    @property
    def offset(self) -> int: ...


P = TypeVar("P", bound=HasOffset)


@dataclass(frozen=True, slots=True)
class RecoveryOutcome(Generic[P]):
    """`recovered` tells the client whether the gap is closed; `missed` is what to send first."""

    recovered: bool
    missed: list[P]


def decide_recovery(
    client_offset: int,
    client_epoch: str,
    stream_epoch: str,
    stream_top: int,
    history: list[P],
) -> RecoveryOutcome[P]:
    """Decide whether a client at (`client_offset`, `client_epoch`) can be brought up to date.

    `history` is what the broker returned for offsets greater than `client_offset`, in order, up to
    `stream_top` (the offset of the newest publication). The caller sends `missed` before any live
    publication with a greater offset and drops live ones it already sent.
    """
    # A client at offset 0 has seen nothing, so its epoch does not matter (D1).
    if (client_offset != 0 and client_epoch != stream_epoch) or client_offset > stream_top:
        return RecoveryOutcome(False, [])
    missed = [p for p in history if p.offset > client_offset]
    expected = stream_top - client_offset
    if len(missed) != expected:
        return RecoveryOutcome(False, [])
    # History must be gap-free and ordered: offsets client_offset+1 .. stream_top.
    for index, publication in enumerate(missed, start=client_offset + 1):
        if publication.offset != index:
            return RecoveryOutcome(False, [])
    return RecoveryOutcome(True, missed)
