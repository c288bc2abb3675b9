"""Resume decisions: given where a client was and what history holds, what to deliver.

A stream position is (offset, epoch). Offsets grow by one per publication in a channel; the epoch
names one life of the stream and changes when the stream is lost (broker restarted without
persistence, history evicted). Recovery succeeds only when history still holds every publication
after the client's offset, and within one epoch, with one exception (decision D1): a channel that
has no stream is at (0, `EMPTY_EPOCH`), and a client there has seen nothing, so it continues into
whatever life the stream has by now, from offset 1 (`may_continue`; a connected follower does the
same with the first publication).

The exception's price, measured by `tests/e2e/test_resume_sdk.py`: a client at (0, `EMPTY_EPOCH`)
that was away while a first life of the stream was published *and lost* (a broker restart without
persistence) is told `recovered: true` into the next life and never learns of the first one. No
position can tell that case apart from the usual one (the first life is the current one), so the
rule stays as D1 has it, narrowed to `EMPTY_EPOCH`: a client at (0, e) for a real epoch e (which a
broker that follows D1 never reports) is held to e like any other position.

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
    """Whether a position (`offset`, `epoch`) continues into a stream of `next_epoch`: the same
    life, or any life from (0, `EMPTY_EPOCH`) (D1; see the module doc for its price). Used by
    resumes and by connected followers alike."""
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
    if not may_continue(client_offset, client_epoch, stream_epoch):
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
    if not may_continue(client_offset, client_epoch, stream_epoch) or client_offset > stream_top:
        return RecoveryOutcome(False, [])
    missed = [p for p in history if p.offset > client_offset]
    if len(missed) != stream_top - client_offset or not continues(client_offset, missed):
        return RecoveryOutcome(False, [])
    return RecoveryOutcome(True, missed)
