"""A clock the sandbox tests move by hand (both sandboxes take `clock=`)."""

from __future__ import annotations

from datetime import UTC, datetime


class FakeClock:
    def __init__(self) -> None:
        # A date from the vendors' recorded answers.
        self.now = datetime(2025, 4, 13, 17, 28, 51, tzinfo=UTC).timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
