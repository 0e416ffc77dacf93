"""Session ids: fixed width, sortable by time, unique across workers and restarts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.core.session_id import (
    ID_LENGTH,
    MAX_WORKER,
    DecodedId,
    SessionIds,
    decode,
    encode,
)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_an_id_reads_back_as_its_time_worker_and_counter() -> None:
    ids = SessionIds(3, Clock(1_800_000_000.123))
    first, second = ids.next(), ids.next()
    assert len(first) == ID_LENGTH == 13
    assert decode(first).opened_ms == 1_800_000_000_123
    assert (decode(first).worker, decode(first).counter) == (3, 0)
    assert decode(second).counter == 1


@given(
    st.lists(
        st.tuples(st.floats(1e9, 3e10, allow_nan=False), st.integers(0, MAX_WORKER)),
        min_size=2,
        max_size=20,
    )
)
def test_ids_sort_as_their_sessions_opened(opens: list[tuple[float, int]]) -> None:
    """Sorting ids as strings sorts them by opening time (to the millisecond)."""
    made = [(int(t * 1000), SessionIds(worker, Clock(t)).next()) for t, worker in opens]
    by_id = sorted(made, key=lambda pair: pair[1])
    assert [ms for ms, _ in by_id] == sorted(ms for ms, _ in made)


@given(st.lists(st.floats(-5.0, 5.0, allow_nan=False), min_size=1, max_size=3000))
def test_one_process_makes_ever_growing_ids_whatever_the_clock_does(steps: list[float]) -> None:
    """Many sessions in one millisecond, a clock that stands still or steps back: each id sorts
    after the one before, so one process never repeats one."""
    clock = Clock(1_800_000_000.0)
    ids = SessionIds(7, clock)
    made = []
    for step in steps:
        clock.now += step / 1000  # up to 5 ms either way, often less than one
        made.append(ids.next())
    assert made == sorted(made) and len(set(made)) == len(made)


def test_the_1025th_session_in_one_millisecond_borrows_the_next() -> None:
    ids = SessionIds(0, Clock(1_800_000_000.0))
    made = [ids.next() for _ in range(1025)]
    assert decode(made[1023]) == DecodedId(1_800_000_000_000, 0, 1023)
    assert decode(made[1024]) == DecodedId(1_800_000_000_001, 0, 0)
    assert made == sorted(made)


def test_two_workers_in_the_same_millisecond_never_share_an_id() -> None:
    clock = Clock(1_800_000_000.0)
    one, two = SessionIds(1, clock), SessionIds(2, clock)
    made = [one.next() for _ in range(600)] + [two.next() for _ in range(600)]
    assert len(set(made)) == 1200


def test_a_restarted_worker_does_not_repeat_the_ids_of_the_one_before() -> None:
    clock = Clock(1_800_000_000.0)
    before = SessionIds(1, clock)
    old = []
    for n in range(5000):
        clock.now = 1_800_000_000.0 + n / 1_000_000  # 1,000 sessions a millisecond, for 5 ms
        old.append(before.next())
    clock.now += 0.002  # a new process starts: at least a millisecond later
    after = SessionIds(1, clock)
    new = [after.next() for _ in range(5000)]
    assert not set(old) & set(new)
    assert max(old) < min(new)


def test_a_busy_process_never_repeats_an_id() -> None:
    clock = Clock(1_800_000_000.0)
    ids = SessionIds(0, clock)
    made = set()
    for n in range(50_000):
        clock.now = 1_800_000_000.0 + n / 10_000  # 10,000 sessions a second, one process
        made.add(ids.next())
    assert len(made) == 50_000


@pytest.mark.parametrize("bad", ["", "01kbj9dq7010", "01kbj9dq70102x", "01kbj9dq7010u"])
def test_decode_refuses_what_is_not_an_id(bad: str) -> None:
    with pytest.raises(ValueError, match="not a session id"):
        decode(bad)


def test_out_of_range_values_are_refused() -> None:
    with pytest.raises(ValueError):
        encode(32**2, 2)
    with pytest.raises(ValueError):
        SessionIds(MAX_WORKER + 1)
