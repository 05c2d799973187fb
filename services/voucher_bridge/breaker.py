"""What every request to one upstream passes before it goes out: a circuit breaker, then a rate
limit (`UpstreamGuard`). Each client sends through its guard in the one place all its requests
go through (`EvoucherClient.call`, `EpinClient._request`), so no handler can call around it.

The breaker opens after `failures` consecutive failures (no connection, a timeout, a dropped
connection, an answer that cannot be read, a 5xx). While open, a call is refused before
anything is sent (`UpstreamOpen`, a `CallNotSent`): a small shop site that is already struggling
gets no traffic from us, and a command learns at once what retries would have told it after
3 x (5 + 15) s. After `open_s` it is half-open: at most `half_open_probes` calls go through at
a time; the first that is answered (any status below 500: a 4xx is the upstream answering)
closes it, the first that fails opens it again. Results of calls let through under an earlier
state are not counted: that state's verdict is in.

When open, a call either fails at once (`when_open="fail"`: a customer is waiting at the till)
or waits for the breaker to let it through (`"wait"`), at most `max_wait_s` in all for one
command. Only a command that has sent nothing that cannot be sent again may wait: its bound
(COMMAND_TIMEOUT_S, in `once.py`) lends itself to the wait through `running_command`, paused
meanwhile, because time spent while nothing can have happened upstream is not time the command
spent on the upstream. Anything else (settling, recovering after a crash, a call after the
recovery point, a test calling a client bare) is refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

from voucher_bridge import metrics
from voucher_bridge.upstream import CallNotSent, CallOutcomeUnknown, UpstreamOpen

if TYPE_CHECKING:
    from voucher_bridge.settings import Settings

log = logging.getLogger(__name__)
A = TypeVar("A")

WhenOpen = Literal["fail", "wait"]


class BreakerState(IntEnum):
    """As the state gauge reports it."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Verdict(Enum):
    """What one call says about the upstream."""

    SUCCESS = "success"  # answered, below 500
    FAILURE = "failure"  # no connection, timeout, dropped connection, unreadable answer, 5xx
    NEUTRAL = "neutral"  # says nothing: a 429, a call cancelled, an error of our own


def verdict_of(status: int) -> Verdict:
    if status >= 500:
        return Verdict.FAILURE
    # A 429 is the upstream alive and turning calls away: not a failure (opening on it would
    # turn a rate problem into an outage; the rate limit is the remedy), and not a success
    # either (it does not show the upstream can do the work). In half-open the probe's slot is
    # given back and the next call probes.
    if status == 429:
        return Verdict.NEUTRAL
    return Verdict.SUCCESS


class CommandTime(Protocol):
    """A running command's bound, as `once.py` lends it to a wait for an open circuit."""

    @property
    def waited_s(self) -> float:
        """How long the command has waited for open circuits so far."""
        ...

    def may_wait(self) -> bool:
        """False once a call that cannot be sent again may have gone out."""
        ...

    def paused(self) -> AbstractContextManager[None]:
        """The command's bound stands still meanwhile."""
        ...


running_command: ContextVar[CommandTime | None] = ContextVar(
    "voucher_bridge_running_command", default=None
)


@dataclass(frozen=True, slots=True)
class Permit:
    """A call let through: under which state (`generation`), and whether as a probe."""

    generation: int
    probe: bool


class CircuitBreaker:
    def __init__(
        self,
        upstream: str,
        title: str,
        *,
        failures: int = 5,
        open_s: float = 10.0,
        half_open_probes: int = 1,
        when_open: WhenOpen = "fail",
        max_wait_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or half_open_probes < 1 or open_s <= 0:
            raise ValueError("failures and half_open_probes must be >= 1, open_s > 0")
        self.upstream = upstream
        self.title = title
        self.failures = failures
        self.open_s = open_s
        self.half_open_probes = half_open_probes
        self.when_open = when_open
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._failed = 0  # consecutive failures, while closed
        self._open_until = 0.0
        self._probes = 0  # probes under way, while half-open
        self._changed: asyncio.Event | None = None  # set (and replaced) at every change
        self._attributes = {"upstream": upstream}
        metrics.watch_breaker(upstream, lambda: int(self.state))

    @property
    def state(self) -> BreakerState:
        """The state as a caller would find it now. Changes nothing: the state gauge reads it
        from the metrics exporter's thread."""
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            return BreakerState.HALF_OPEN
        return self._state

    # -- letting calls through ------------------------------------------------------------------

    async def admit(self) -> Permit:
        """Let one call through, or wait until it may go (see the module's docstring); raises
        UpstreamOpen when it may not."""
        refusal = self._refusal()
        if refusal is None:
            return self._take()
        await self._wait(refusal)
        return self._take()

    async def ready(self) -> None:
        """Return once a call would be let through now, as `admit` would (waiting or raising),
        taking nothing. A handler passes this before its recovery point, so that a refusal
        comes before the store says the call may have gone out."""
        refusal = self._refusal()
        if refusal is not None:
            await self._wait(refusal)

    def record(self, permit: Permit, verdict: Verdict, detail: str = "") -> None:
        """What came of a call it let through."""
        if permit.generation != self._generation:
            return  # let through under an earlier state, whose verdict is in
        if self._state is BreakerState.HALF_OPEN:
            self._probes -= 1
            if verdict is Verdict.SUCCESS:
                self._to(BreakerState.CLOSED, "the probe was answered")
            elif verdict is Verdict.FAILURE:
                self._to(BreakerState.OPEN, f"the probe failed ({detail})")
            else:
                self._wake()  # its slot is free for the next probe
        elif verdict is Verdict.SUCCESS:
            self._failed = 0
        elif verdict is Verdict.FAILURE:
            self._failed += 1
            if self._failed >= self.failures:
                self._to(
                    BreakerState.OPEN,
                    f"{self._failed} consecutive failures (the last: {detail})",
                )

    def _refusal(self) -> UpstreamOpen | None:
        """None when a call may go now; else what refusing it says."""
        if self._state is BreakerState.OPEN:
            left = self._open_until - self._clock()
            if left > 0:
                return UpstreamOpen(
                    self.upstream, self.title, datetime.now(UTC) + timedelta(seconds=left)
                )
            self._to(BreakerState.HALF_OPEN, "")
        if self._state is BreakerState.HALF_OPEN and self._probes >= self.half_open_probes:
            return UpstreamOpen(self.upstream, self.title, None)
        return None

    def _take(self) -> Permit:
        probe = self._state is BreakerState.HALF_OPEN
        if probe:
            self._probes += 1
        return Permit(self._generation, probe)

    async def _wait(self, refusal: UpstreamOpen) -> None:
        """Until a call may go; raises `refusal` (or a later one) when it may not wait, or
        has waited `max_wait_s`."""
        lender = running_command.get()
        if self.when_open != "wait" or lender is None or not lender.may_wait():
            metrics.breaker_refused.add(1, self._attributes)
            raise refusal
        loop = asyncio.get_running_loop()
        started = loop.time()
        budget = self.max_wait_s - lender.waited_s
        try:
            with lender.paused():
                while True:
                    left = budget - (loop.time() - started)
                    if left <= 0:
                        metrics.breaker_refused.add(1, self._attributes)
                        raise refusal
                    if self._state is BreakerState.OPEN:
                        left = min(left, max(0.0, self._open_until - self._clock()))
                    if self._changed is None:
                        self._changed = asyncio.Event()
                    changed = self._changed
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(left):
                            await changed.wait()
                    next_refusal = self._refusal()
                    if next_refusal is None:
                        return
                    refusal = next_refusal
        finally:
            metrics.breaker_wait_duration.record(loop.time() - started, self._attributes)

    # -- state changes ----------------------------------------------------------------------------

    def _to(self, state: BreakerState, why: str) -> None:
        previous = self._state
        self._state = state
        self._generation += 1
        self._failed = 0
        self._probes = 0
        metrics.breaker_transitions.add(1, {**self._attributes, "to_state": _NAMES[state]})
        if state is BreakerState.OPEN:
            self._open_until = self._clock() + self.open_s
            again = " again" if previous is BreakerState.HALF_OPEN else ""
            log.warning(
                "%s: circuit open%s after %s; calls refused for %g s",
                self.title,
                again,
                why,
                self.open_s,
            )
        elif state is BreakerState.HALF_OPEN:
            log.info(
                "%s: circuit half-open; letting %d probe call(s) through",
                self.title,
                self.half_open_probes,
            )
        else:
            log.info("%s: circuit closed; %s", self.title, why)
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()


_NAMES = {
    BreakerState.CLOSED: "closed",
    BreakerState.HALF_OPEN: "half_open",
    BreakerState.OPEN: "open",
}


class TokenBucket:
    """At most `rate_per_s` calls a second on average, `burst` at once after a quiet spell.

    A call reserves the next token and sleeps until it is due, so calls go in the order they
    asked. A reservation that is cancelled (the command's time ran out) is not given back: the
    calls already waiting behind it keep their times, and the limit errs on the gentle side.
    """

    def __init__(
        self,
        upstream: str,
        rate_per_s: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)  # below zero: owed to callers already waiting
        self._stamp = clock()
        self._attributes = {"upstream": upstream}

    def reserve(self) -> float:
        """Take the next token; how long until it is due (0: now)."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate_per_s)
        self._stamp = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_per_s

    async def take(self) -> None:
        wait_s = self.reserve()
        if wait_s > 0:
            metrics.rate_limit_wait_duration.record(wait_s, self._attributes)
            await self._sleep(wait_s)


class UpstreamGuard:
    """One upstream's breaker and rate limit (either may be off), in its client's send path
    (`send`)."""

    def __init__(
        self, breaker: CircuitBreaker | None = None, rate: TokenBucket | None = None
    ) -> None:
        self.breaker = breaker
        self.rate = rate

    async def admit(self) -> Permit | None:
        return await self.breaker.admit() if self.breaker is not None else None

    async def ready(self) -> None:
        if self.breaker is not None:
            await self.breaker.ready()

    async def pace(self) -> None:
        # After the breaker: a call it refuses takes no token.
        if self.rate is not None:
            await self.rate.take()

    def done(self, permit: Permit | None, verdict: Verdict, detail: str = "") -> None:
        if permit is not None and self.breaker is not None:
            self.breaker.record(permit, verdict, detail)

    async def send(self, request: Callable[[], Awaitable[A]], status: Callable[[A], int]) -> A:
        """`request` once the breaker lets it through and the rate limit paces it; what came
        of it goes back to the breaker. `request` raises CallNotSent / CallOutcomeUnknown for
        a transport failure; anything else it raises says nothing about the upstream.

        A probe refused at connect, made for a command that waits, sent nothing: the command
        goes back to waiting for the next probe rather than spending a retry on it (otherwise
        a few failed probes would end a waiting command `failed` while the API is still down).
        """
        while True:
            permit = await self.admit()
            verdict, detail = Verdict.NEUTRAL, ""  # cancelled, or a failure of our own
            try:
                await self.pace()
                answer = await request()
                code = status(answer)
                verdict, detail = verdict_of(code), f"HTTP {code}"
                return answer
            except CallNotSent as exc:
                verdict, detail = Verdict.FAILURE, str(exc)
                if not (permit is not None and permit.probe and self._may_wait()):
                    raise
            except CallOutcomeUnknown as exc:
                verdict, detail = Verdict.FAILURE, str(exc)
                raise
            finally:
                self.done(permit, verdict, detail)

    def _may_wait(self) -> bool:
        lender = running_command.get()
        return (
            self.breaker is not None
            and self.breaker.when_open == "wait"
            and lender is not None
            and lender.may_wait()
        )


TITLES = {"evoucher": "eVOUCHER API", "epin": "Epin API"}


def guard_from_settings(settings: Settings, upstream: Literal["evoucher", "epin"]) -> UpstreamGuard:
    """The guard that `<UPSTREAM>_BREAKER_*` and `<UPSTREAM>_RATE_LIMIT_*` describe (a
    breaker with 0 failures, a rate of 0: off)."""
    if upstream == "evoucher":
        return build_guard(
            upstream,
            failures=settings.evoucher_breaker_failures,
            open_s=settings.evoucher_breaker_open_s,
            half_open_probes=settings.evoucher_breaker_half_open_probes,
            when_open=settings.evoucher_breaker_when_open,
            max_wait_s=settings.evoucher_breaker_max_wait_s,
            rate_per_s=settings.evoucher_rate_limit_rps,
            burst=settings.evoucher_rate_limit_burst,
        )
    return build_guard(
        upstream,
        failures=settings.epin_breaker_failures,
        open_s=settings.epin_breaker_open_s,
        half_open_probes=settings.epin_breaker_half_open_probes,
        when_open=settings.epin_breaker_when_open,
        max_wait_s=settings.epin_breaker_max_wait_s,
        rate_per_s=settings.epin_rate_limit_rps,
        burst=settings.epin_rate_limit_burst,
    )


def build_guard(
    upstream: str,
    *,
    failures: int,
    open_s: float,
    half_open_probes: int,
    when_open: WhenOpen,
    max_wait_s: float,
    rate_per_s: float,
    burst: int,
) -> UpstreamGuard:
    breaker = None
    if failures > 0:
        breaker = CircuitBreaker(
            upstream,
            TITLES.get(upstream, upstream),
            failures=failures,
            open_s=open_s,
            half_open_probes=half_open_probes,
            when_open=when_open,
            max_wait_s=max_wait_s,
        )
    rate = TokenBucket(upstream, rate_per_s, burst) if rate_per_s > 0 else None
    return UpstreamGuard(breaker, rate)
