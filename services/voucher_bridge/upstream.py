"""What every upstream call can come to, whichever API it goes to, and how calls are retried."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Generic, TypeVar

from voucher_bridge import metrics
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


class UpstreamOpen(CallNotSent):
    """Refused by the upstream's open circuit (breaker.py) before anything was sent."""

    def __init__(self, upstream: str, title: str, until: datetime | None) -> None:
        self.upstream = upstream  # "evoucher", "epin": as in the metrics
        self.title = title  # "eVOUCHER API"
        self.until = until  # when it lets a probe through (None: a probe is under way)
        if until is not None:
            state = f"circuit open until {until:%Y-%m-%dT%H:%M:%SZ}"
        else:
            state = "circuit half-open, its probe call under way"
        super().__init__(f"the {title} is unavailable ({state})")


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
    """How a call went: its last answer (None if none came), whether it may have arrived, and
    the open circuit that refused the last attempt (None: not refused)."""

    outcome: T | None
    attempts: int  # sent, or tried to send; a refused attempt is not one
    may_have_reached: bool
    refused: UpstreamOpen | None = None

    @property
    def refusal(self) -> str | None:
        """What to tell the sender when an open circuit ended it: whether anything went out."""
        if self.refused is None:
            return None
        if self.attempts == 0:
            return f"{self.refused}: nothing was sent"
        return f"{self.refused}: not tried again after {self.attempts} attempt(s)"


async def call_with_retries(
    send: Callable[[], Awaitable[T]],
    status: Callable[[T], int],
    *,
    moves_money: bool,
    retry: RetryPolicy,
    upstream: str,
    ready: Callable[[], Awaitable[None]] | None = None,
) -> Attempts[T]:
    """Send, and again while it is safe and useful: after no connection, a 429 (turned away,
    not applied), or, for a call that does not move money, a timeout, a dropped connection or
    a 5xx. A call that moves money is never sent again once it may have arrived. An attempt
    refused by an open circuit ends it at once: no backoff is spent on an upstream known to
    be down (a breaker that waits has done its waiting before it refuses), and so does
    `ready` (the upstream's gate, `UpstreamGuard.ready`) refusing before a backoff: an attempt
    that opened the circuit is not followed by a sleep whose end is known to be refused."""
    attempts, outcome, may_have_reached = 0, None, False
    while True:
        attempts += 1
        try:
            outcome = await send()
        except UpstreamOpen as refused:
            return Attempts(None, attempts - 1, may_have_reached, refused)
        except CallNotSent:
            outcome, retryable = None, True  # an earlier attempt's answer is not the last word
            last = "not_sent"
        except CallOutcomeUnknown:
            outcome, may_have_reached = None, True
            retryable, last = not moves_money, "no_answer"
        else:
            code = status(outcome)
            last = str(code)
            retryable = code == 429 or (code >= 500 and not moves_money)
            if not retryable:
                return Attempts(outcome, attempts, may_have_reached)
        if not retryable or attempts >= retry.attempts:
            return Attempts(outcome, attempts, may_have_reached)
        if ready is not None:
            try:
                await ready()
            except UpstreamOpen as refused:
                return Attempts(None, attempts, may_have_reached, refused)
        await asyncio.sleep(retry.delay(attempts))
        metrics.upstream_retries.add(1, {"voucher_bridge.upstream": upstream, "after": last})


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
        amount = Decimal(str(value))
        # "NaN" and "Infinity" parse, but are no amount (and would break the result's schema).
        return amount.quantize(Decimal("0.01")) if amount.is_finite() else None
    except InvalidOperation:
        return None
