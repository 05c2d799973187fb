"""PartitionOffsets: accepted in order, finished in any order, committed as a finished prefix."""

from __future__ import annotations

import random

import pytest

from voucher_bridge.kafka.offsets import PartitionOffsets


def accepted(*offsets: int) -> PartitionOffsets:
    tracker = PartitionOffsets()
    for offset in offsets:
        assert tracker.accept(offset)
    return tracker


def test_fresh_tracker_has_nothing_to_commit() -> None:
    tracker = PartitionOffsets()
    assert tracker.committable() is None
    assert tracker.in_flight == 0
    assert tracker.committed is None


def test_in_order() -> None:
    tracker = accepted(0, 1, 2)
    assert tracker.in_flight == 3
    assert tracker.committable() == 0  # the next to read is still 0: nothing is skipped
    tracker.finish(0)
    assert tracker.committable() == 1
    tracker.finish(1)
    tracker.finish(2)
    assert tracker.committable() == 3
    assert tracker.in_flight == 0


def test_slow_head_holds_the_commit() -> None:
    tracker = accepted(*range(10))
    for offset in range(1, 10):
        tracker.finish(offset)
        assert tracker.committable() == 0
    assert tracker.in_flight == 1
    tracker.finish(0)
    assert tracker.committable() == 10
    assert tracker.in_flight == 0


def test_hole_in_the_middle() -> None:
    tracker = accepted(*range(6))
    for offset in (0, 1, 3, 4, 5):
        tracker.finish(offset)
    assert tracker.committable() == 2
    assert tracker.in_flight == 1
    tracker.finish(2)
    assert tracker.committable() == 6


def test_gaps_between_offsets() -> None:
    # Compacted topics and transaction markers leave holes in a partition's offsets.
    tracker = accepted(10, 12, 15)
    assert tracker.committable() == 10
    tracker.finish(12)
    assert tracker.committable() == 10
    tracker.finish(10)
    assert tracker.committable() == 15
    tracker.finish(15)
    assert tracker.committable() == 16


def test_refetched_copies_are_refused() -> None:
    tracker = accepted(5, 6)
    assert not tracker.accept(5)
    assert not tracker.accept(6)
    assert not tracker.accept(0)
    assert tracker.in_flight == 2
    tracker.finish(5)
    assert not tracker.accept(5)  # finished ones too
    assert tracker.accept(7)


def test_committed_suppresses_repeats() -> None:
    tracker = accepted(0, 1, 2)
    tracker.finish(0)
    assert tracker.committable() == 1
    tracker.committed = 1
    assert tracker.committable() is None
    tracker.finish(2)  # behind the unfinished 1: nothing new
    assert tracker.committable() is None
    tracker.finish(1)
    assert tracker.committable() == 3
    tracker.committed = 3
    assert tracker.committable() is None
    assert tracker.accept(3)
    assert tracker.committable() is None  # 3 is not finished: still nothing new
    tracker.finish(3)
    assert tracker.committable() == 4


def test_committed_ahead_of_the_tracker() -> None:
    tracker = accepted(0)
    tracker.committed = 100  # e.g. the group already stored a later position
    tracker.finish(0)
    assert tracker.committable() is None


@pytest.mark.parametrize("seed", range(20))
def test_random_finish_order_commits_exactly_the_finished_prefix(seed: int) -> None:
    rng = random.Random(seed)
    offsets = sorted(rng.sample(range(200), 40))
    tracker = accepted(*offsets)
    order = offsets[:]
    rng.shuffle(order)
    finished: set[int] = set()
    last_position = -1
    for offset in order:
        tracker.finish(offset)
        finished.add(offset)
        unfinished = [o for o in offsets if o not in finished]
        expected = unfinished[0] if unfinished else offsets[-1] + 1
        position = tracker.committable()
        assert position == expected
        assert position >= last_position  # never goes back
        last_position = position
        assert tracker.in_flight == len(unfinished)
        # Every offset below the position is finished; the position itself is not.
        assert all(o in finished for o in offsets if o < position)
        if unfinished:
            assert position not in finished
    assert tracker.in_flight == 0


def test_interleaved_accept_and_finish() -> None:
    tracker = PartitionOffsets()
    for offset in range(100):
        assert tracker.accept(offset)
        if offset % 3 == 0:
            tracker.finish(offset)
    # 0 finished, 1 not: held at 1.
    assert tracker.committable() == 1
    for offset in range(100):
        if offset % 3:
            tracker.finish(offset)
    assert tracker.committable() == 100
    assert tracker.in_flight == 0
