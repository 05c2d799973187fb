"""Which offset of a partition may be committed.

An offset is committable only when it and every earlier offset of its partition are finished,
whatever order the work finishes in (records of different keys run concurrently).
"""

from __future__ import annotations

import time
from collections import deque


class PartitionOffsets:
    """Offsets of one partition: accepted in order, finished in any order."""

    __slots__ = ("_accepted_at", "_done", "_first", "_next", "_pending", "committed")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()  # accepted, in offset order
        self._accepted_at: deque[float] = deque()  # when each of `_pending` was (monotonic)
        self._done: set[int] = set()  # finished, but behind an unfinished one
        self._next: int | None = None  # one past the highest offset accepted
        self._first: int | None = None  # the first offset accepted
        self.committed: int | None = None  # what the group last stored for us

    def accept(self, offset: int) -> bool:
        """Start tracking `offset`; False when it was accepted already (a re-fetched copy)."""
        if self._next is not None and offset < self._next:
            return False
        self._pending.append(offset)
        self._accepted_at.append(time.monotonic())
        self._next = offset + 1
        if self._first is None:
            self._first = offset
        return True

    def finish(self, offset: int) -> None:
        if self._pending and self._pending[0] == offset:
            self._pending.popleft()
            self._accepted_at.popleft()
            while self._pending and self._pending[0] in self._done:
                self._done.discard(self._pending.popleft())
                self._accepted_at.popleft()
        else:
            self._done.add(offset)

    def oldest_unfinished(self) -> tuple[int, float] | None:
        """The lowest unfinished offset (where commits wait) and when it was accepted."""
        # The head of `_pending` is never finished: finishing it pops it and what follows.
        return (self._pending[0], self._accepted_at[0]) if self._pending else None

    @property
    def start(self) -> int | None:
        """Where this instance's reading stands committed: the committed offset, or before
        any commit the first offset it was given."""
        return self.committed if self.committed is not None else self._first

    def highest_finished_ahead(self) -> int | None:
        """The highest offset finished while an earlier one is not (None if there is none)."""
        return max(self._done) if self._done else None

    @property
    def in_flight(self) -> int:
        return len(self._pending) - len(self._done)

    def committable(self) -> int | None:
        """The offset to commit (the next one to read), or None when nothing new is finished."""
        position = self._pending[0] if self._pending else self._next
        if position is None or (self.committed is not None and position <= self.committed):
            return None
        return position
