"""Resume decisions: recovered iff history covers (client offset, top] in the client's epoch, or
from (0, "none") in any epoch (D1, `may_continue`); paged replays agree with the whole-history
decision."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from igratech_ws.core.recovery import (
    EMPTY_EPOCH,
    RecoveryOutcome,
    continues,
    decide_recovery,
    may_continue,
    resumable,
)


@dataclass(frozen=True)
class Pub:
    offset: int


def pubs(*offsets: int) -> list[Pub]:
    return [Pub(o) for o in offsets]


def test_recovered_with_exactly_the_missed_range() -> None:
    assert decide_recovery(5, "e", "e", 7, pubs(6, 7)) == RecoveryOutcome(True, pubs(6, 7))


def test_up_to_date_client_recovers_nothing() -> None:
    assert decide_recovery(7, "e", "e", 7, []) == RecoveryOutcome(True, [])


def test_empty_stream_from_zero() -> None:
    assert decide_recovery(0, "e", "e", 0, []) == RecoveryOutcome(True, [])


def test_offset_zero_of_no_stream_recovers_any_life() -> None:
    assert decide_recovery(0, EMPTY_EPOCH, EMPTY_EPOCH, 0, []) == RecoveryOutcome(True, [])
    assert decide_recovery(0, EMPTY_EPOCH, "e", 2, pubs(1, 2)) == RecoveryOutcome(True, pubs(1, 2))
    # ... while history still holds offset 1.
    assert decide_recovery(0, EMPTY_EPOCH, "e", 3, pubs(2, 3)) == RecoveryOutcome(False, [])
    # A real epoch at offset 0 (a broker before D1 reported those) is held to its life: the
    # client may have missed publications of it that were lost with it.
    assert decide_recovery(0, "lost", "e", 2, pubs(1, 2)) == RecoveryOutcome(False, [])


def test_a_connected_follower_from_no_stream_continues_into_its_first_life() -> None:
    assert may_continue(0, EMPTY_EPOCH, "e")
    assert may_continue(3, "e", "e")
    assert not may_continue(0, "e", "f")  # a life that ended: the follower must be told
    assert not may_continue(3, EMPTY_EPOCH, "e")


def test_other_epoch_is_not_recovered() -> None:
    assert decide_recovery(5, "old", "new", 7, pubs(6, 7)) == RecoveryOutcome(False, [])


def test_client_ahead_of_the_stream_is_not_recovered() -> None:
    assert decide_recovery(9, "e", "e", 7, []) == RecoveryOutcome(False, [])


def test_evicted_history_is_not_recovered() -> None:
    assert decide_recovery(2, "e", "e", 7, pubs(5, 6, 7)) == RecoveryOutcome(False, [])


def test_truncated_history_is_not_recovered() -> None:
    # a page cut by the broker's limit: the newest publications are missing
    assert decide_recovery(2, "e", "e", 7, pubs(3, 4)) == RecoveryOutcome(False, [])


def test_gap_or_disorder_in_history_is_not_recovered() -> None:
    assert decide_recovery(2, "e", "e", 5, pubs(3, 5, 5)).recovered is False
    assert decide_recovery(2, "e", "e", 5, pubs(4, 3, 5)).recovered is False


def test_older_publications_in_history_are_skipped() -> None:
    assert decide_recovery(2, "e", "e", 4, pubs(1, 2, 3, 4)) == RecoveryOutcome(True, pubs(3, 4))


@settings(max_examples=150, deadline=None)
@given(
    top=st.integers(0, 40),
    data=st.data(),
    same_epoch=st.booleans(),
)
def test_broker_windows(top: int, data: st.DataObject, same_epoch: bool) -> None:
    """A broker keeps a contiguous window [low, top] and returns at most `limit` after the client."""
    low = data.draw(st.integers(1, top + 1), label="oldest kept offset")
    limit = data.draw(st.integers(0, 50), label="limit")
    client = data.draw(st.integers(0, top + 5), label="client offset")
    window = [Pub(o) for o in range(low, top + 1)]
    history = [p for p in window if p.offset > client][:limit]
    outcome = decide_recovery(client, "e1", "e1" if same_epoch else "e2", top, history)
    wanted = list(range(client + 1, top + 1))
    covered = client <= top and (client + 1 >= low or client == top) and len(wanted) <= limit
    assert outcome.recovered is (same_epoch and covered)  # a real epoch, even at offset 0
    if outcome.recovered:
        assert [p.offset for p in outcome.missed] == wanted
        assert all(p is q for p, q in zip(outcome.missed, history[: len(wanted)], strict=True))
    else:
        assert outcome.missed == []


@settings(max_examples=150, deadline=None)
@given(
    client=st.integers(0, 20),
    top=st.integers(0, 20),
    offsets=st.lists(st.integers(0, 22), max_size=25),
    epochs=st.sampled_from([("a", "a"), ("a", "b")]),
)
def test_arbitrary_histories(
    client: int, top: int, offsets: list[int], epochs: tuple[str, str]
) -> None:
    """Whatever the history holds, recovery means missed == client+1 .. top, in order."""
    history = pubs(*offsets)
    outcome = decide_recovery(client, epochs[0], epochs[1], top, history)
    later = [o for o in offsets if o > client]
    expected = (
        epochs[0] == epochs[1] and client <= top and later == list(range(client + 1, top + 1))
    )
    assert outcome.recovered is expected
    assert [p.offset for p in outcome.missed] == (later if expected else [])


@settings(max_examples=300, deadline=None)
@given(
    top=st.integers(0, 60),
    data=st.data(),
    epochs=st.sampled_from([("e", "e"), ("old", "e"), (EMPTY_EPOCH, "e")]),
)
def test_a_paged_replay_agrees_with_the_whole_history(
    top: int, data: st.DataObject, epochs: tuple[str, str]
) -> None:
    """What the hub does (decide on the first page, check every next page with `continues`,
    abandon when one does not) delivers exactly what `decide_recovery` on the whole history
    would, or is abandoned, which the hub turns into a close (the next resume is not recovered).

    History may be trimmed between pages (`trim_at`), as a broker's size or age bound does."""
    low = data.draw(st.integers(1, top + 1), label="oldest kept offset")
    client = data.draw(st.integers(0, top + 3), label="client offset")
    limit = data.draw(st.integers(0, 80), label="recovery limit")
    page_size = data.draw(st.integers(1, 7), label="page size")
    trim_at = data.draw(st.integers(0, 10), label="pages before history is trimmed")
    trimmed_low = data.draw(st.integers(low, top + 2), label="oldest kept after the trim")

    def history(after: int, count: int, pages_read: int) -> list[Pub]:
        oldest = trimmed_low if pages_read >= trim_at else low
        return [Pub(o) for o in range(max(after + 1, oldest), top + 1)][:count]

    whole = decide_recovery(client, epochs[0], epochs[1], top, history(client, limit, 0))
    first = history(client, page_size, 0)
    start = resumable(client, epochs[0], epochs[1], top, first[0].offset if first else None, limit)
    assert start is whole.recovered
    if not start:
        return
    delivered: list[int] = []
    cursor, page, pages = client, first, 1
    abandoned = False
    while cursor < top:
        if not page or not continues(cursor, page):
            abandoned = True
            break
        delivered += [p.offset for p in page]
        cursor = page[-1].offset
        page = history(cursor, page_size, pages)
        pages += 1
    if abandoned:
        # Never a silent hole: what was delivered is a gap-free prefix of what was missed.
        assert delivered == [p.offset for p in whole.missed][: len(delivered)]
        assert pages > trim_at  # only a trim abandons a replay that could start
    else:
        assert delivered == [p.offset for p in whole.missed]
