"""What every upstream call can come to, whichever API it goes to, and how calls are retried."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Answer:
    """What the upstream said: HTTP status and the JSON object, if the body was one."""

    status: int
    body: dict[str, Any] | None
    elapsed_ms: int


class CallNotSent(Exception):
    """The request cannot have reached the upstream (no connection was made)."""


class CallOutcomeUnknown(Exception):
    """The request may have reached the upstream, but no answer came back."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, within a number of attempts."""

    attempts: int = 3
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))
