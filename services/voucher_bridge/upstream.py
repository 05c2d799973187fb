"""What every upstream call can come to, whichever API it goes to, and how calls are retried."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Generic, TypeVar

from voucher_contracts.binding import decode_json

T = TypeVar("T")


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


@dataclass(frozen=True)
class Attempts(Generic[T]):
    """How a call went: its last answer (None if none came), and whether it may have arrived."""

    outcome: T | None
    attempts: int
    may_have_reached: bool


async def call_with_retries(
    send: Callable[[], Awaitable[T]],
    status: Callable[[T], int],
    *,
    moves_money: bool,
    retry: RetryPolicy,
) -> Attempts[T]:
    """Send, and again while it is safe and useful: after no connection, a 429 (turned away,
    not applied), or, for a call that does not move money, a timeout, a dropped connection or
    a 5xx. A call that moves money is never sent again once it may have arrived."""
    attempts, outcome, may_have_reached = 0, None, False
    while True:
        attempts += 1
        try:
            outcome = await send()
        except CallNotSent:
            outcome, retryable = None, True  # an earlier attempt's answer is not the last word
        except CallOutcomeUnknown:
            outcome, may_have_reached = None, True
            retryable = not moves_money
        else:
            code = status(outcome)
            retryable = code == 429 or (code >= 500 and not moves_money)
            if not retryable:
                return Attempts(outcome, attempts, may_have_reached)
        if not retryable or attempts >= retry.attempts:
            return Attempts(outcome, attempts, may_have_reached)
        await asyncio.sleep(retry.delay(attempts))


def json_object(raw: bytes) -> dict[str, Any] | None:
    """An answer's body as a JSON object, numbers exact (a price is never a float); None when
    the body is not a JSON object. Read leniently: a body is what the upstream said."""
    try:
        body = decode_json(raw, lenient=True)
    except ValueError:  # not JSON, not UTF-8, or nested too deeply
        return None
    return body if isinstance(body, dict) else None


def money(value: Any) -> Decimal | None:
    """An amount the upstream sent (a string, an integer or an exact decimal), to the cent;
    None for anything else, a float included."""
    if value is None or isinstance(value, bool | float):
        return None
    try:
        return Decimal(str(value)).quantize(Decimal("0.01"))
    except InvalidOperation:
        return None
