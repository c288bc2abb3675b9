"""Resume decisions: given where a client was and what history holds, what to deliver.

A stream position is (offset, epoch). Offsets grow by one per publication in a channel; the epoch
names one life of the stream and changes when the stream is lost (broker restarted without
persistence, history evicted). Recovery succeeds only within one epoch, and only when history still
holds every publication after the client's offset. A channel that has no stream is at
(0, `EMPTY_EPOCH`): a client that joined it then recovers while it still has none.

Why not "from offset 0, any epoch" (decision D1 asked for it): a client at (0, e) that was away
while the stream got publications, and then lost them with the stream (a broker restart without
persistence), would be told `recovered: true` into the next life and never learn of the loss;
`tests/test_resume_sdk.py` found exactly that. A position of one life says nothing of another,
even at offset 0, so across lives the answer is `recovered: false`. A *connected* follower at
(0, `EMPTY_EPOCH`) does continue into the first life (the hub's rule, `may_continue`): it sees
every publication of it as it happens.

A replay may be delivered in pages (the hub does, so that its memory stays bounded): the decision
is taken on the first page (`resumable`), and every later page must continue the sequence exactly
(`continues`); a page that does not means history was trimmed under the replay, which must then be
abandoned (the client's next resume is told `recovered: false`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

#: The epoch reported for a channel that has no stream (never published, or expired): position
#: (0, EMPTY_EPOCH). A real stream's epoch is never this word.
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


def may_continue(offset: int, epoch: str, next_epoch: str) -> bool:
    """Whether a connected follower at (`offset`, `epoch`) may take the next publication from a
    stream of `next_epoch`: the same life, or the first life of a channel that had no stream when
    it joined (D1; it is live, so it sees that life from its first publication)."""
    return epoch == next_epoch or (offset == 0 and epoch == EMPTY_EPOCH)


def resumable(
    client_offset: int,
    client_epoch: str,
    stream_epoch: str,
    stream_top: int,
    first_offset: int | None,
    limit: int,
) -> bool:
    """Whether a replay can bring a client at (`client_offset`, `client_epoch`) up to `stream_top`.

    `first_offset` is the offset of the first publication history returned after `client_offset`
    (None: it returned none); `limit` caps how many publications one replay may deliver. The caller
    replays in pages and checks each with `continues`.
    """
    if client_epoch != stream_epoch:
        return False
    if client_offset > stream_top or stream_top - client_offset > limit:
        return False
    return client_offset == stream_top or first_offset == client_offset + 1


def continues(cursor: int, publications: Sequence[HasOffset]) -> bool:
    """Whether `publications` are exactly offsets `cursor`+1, `cursor`+2, ... (empty: True)."""
    for expected, publication in enumerate(publications, start=cursor + 1):
        if publication.offset != expected:
            return False
    return True


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
    if client_epoch != stream_epoch or client_offset > stream_top:
        return RecoveryOutcome(False, [])
    missed = [p for p in history if p.offset > client_offset]
    if len(missed) != stream_top - client_offset or not continues(client_offset, missed):
        return RecoveryOutcome(False, [])
    return RecoveryOutcome(True, missed)
