"""Resume decisions: recovered iff the epoch matches and history covers (client offset, top]."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from igratech_ws.core.recovery import RecoveryOutcome, decide_recovery


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
    # Offset 0 has seen nothing: its epoch does not matter (D1).
    assert outcome.recovered is ((same_epoch or client == 0) and covered)
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
