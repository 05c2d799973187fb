"""The circuit breaker's state machine and the token bucket, on clocks the tests move; waiting
for an open circuit, on the loop's own clock with short intervals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from voucher_bridge import metrics
from voucher_bridge.breaker import (
    BreakerState,
    CircuitBreaker,
    Permit,
    TokenBucket,
    UpstreamGuard,
    Verdict,
    build_guard,
    guard_from_settings,
    running_command,
    verdict_of,
)
from voucher_bridge.settings import Settings
from voucher_bridge.upstream import CallNotSent, UpstreamOpen

S, F, N = Verdict.SUCCESS, Verdict.FAILURE, Verdict.NEUTRAL


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorded:
    """Stands in for a counter or histogram: what was added or recorded, with attributes."""

    def __init__(self) -> None:
        self.values: list[tuple[float, dict[str, Any]]] = []

    def add(self, value: float, attributes: dict[str, Any] | None = None) -> None:
        self.values.append((value, dict(attributes or {})))

    record = add


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, Recorded]:
    names = [
        "breaker_transitions",
        "breaker_refused",
        "breaker_wait_duration",
        "rate_limit_wait_duration",
    ]
    instruments = {name: Recorded() for name in names}
    for name, instrument in instruments.items():
        monkeypatch.setattr(metrics, name, instrument)
    return instruments


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, **kw: Any) -> CircuitBreaker:
    kw.setdefault("failures", 3)
    kw.setdefault("open_s", 10.0)
    return CircuitBreaker("evoucher", "eVOUCHER API", clock=clock, **kw)


async def run(b: CircuitBreaker, *verdicts: Verdict) -> None:
    for verdict in verdicts:
        b.record(await b.admit(), verdict, "HTTP 503")


# -- what a call says ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [(200, S), (400, S), (401, S), (404, S), (429, N), (500, F), (503, F), (504, F)],
)
def test_verdict_of_a_status(status: int, verdict: Verdict) -> None:
    assert verdict_of(status) is verdict


# -- closed → open -------------------------------------------------------------------------------


async def test_it_opens_after_n_consecutive_failures(clock: Clock) -> None:
    b = breaker(clock)
    await run(b, F, F)
    assert b.state is BreakerState.CLOSED
    await run(b, F)
    assert b.state is BreakerState.OPEN


async def test_a_success_ends_the_run_of_failures(clock: Clock) -> None:
    b = breaker(clock)
    await run(b, F, F, S, F, F)
    assert b.state is BreakerState.CLOSED
    await run(b, F)
    assert b.state is BreakerState.OPEN


async def test_a_429_neither_counts_nor_ends_the_run(clock: Clock) -> None:
    b = breaker(clock)
    await run(b, N, N, N, N, N, N)
    assert b.state is BreakerState.CLOSED  # alive: never opens on 429s
    await run(b, F, F, N, F)
    assert b.state is BreakerState.OPEN  # nor do they reset the run


async def test_while_open_a_call_is_refused_before_anything_is_sent(
    clock: Clock, recorded: dict[str, Recorded]
) -> None:
    b = breaker(clock, open_s=10.0)
    await run(b, F, F, F)
    clock.now += 4
    with pytest.raises(UpstreamOpen) as refused:
        await b.admit()
    exc = refused.value
    assert isinstance(exc, CallNotSent)
    assert (exc.upstream, exc.title) == ("evoucher", "eVOUCHER API")
    assert exc.until is not None
    expected = datetime.now(UTC) + timedelta(seconds=6)
    assert abs((exc.until - expected).total_seconds()) < 1
    assert str(exc).startswith("the eVOUCHER API is unavailable (circuit open until ")
    assert recorded["breaker_refused"].values == [(1, {"upstream": "evoucher"})]
    with pytest.raises(UpstreamOpen):
        await b.ready()  # the gate refuses the same


# -- open → half-open → closed or open again ----------------------------------------------------


async def test_after_the_open_interval_it_lets_a_bounded_number_of_probes_through(
    clock: Clock,
) -> None:
    b = breaker(clock, half_open_probes=2)
    await run(b, F, F, F)
    clock.now += 10
    assert b.state is BreakerState.HALF_OPEN
    first, second = await b.admit(), await b.admit()
    assert first.probe and second.probe
    with pytest.raises(UpstreamOpen) as refused:
        await b.admit()
    assert refused.value.until is None  # a probe is under way
    assert "half-open" in str(refused.value)


async def test_an_answered_probe_closes_it(clock: Clock) -> None:
    b = breaker(clock)
    await run(b, F, F, F)
    clock.now += 10
    probe = await b.admit()
    b.record(probe, S)
    assert b.state is BreakerState.CLOSED
    assert not (await b.admit()).probe
    await run(b, F, F)
    assert b.state is BreakerState.CLOSED  # a fresh run of failures


async def test_a_failed_probe_opens_it_again_for_a_whole_interval(clock: Clock) -> None:
    b = breaker(clock, open_s=10.0)
    await run(b, F, F, F)
    clock.now += 12
    b.record(await b.admit(), F, "ConnectError")
    assert b.state is BreakerState.OPEN
    clock.now += 9.9
    with pytest.raises(UpstreamOpen):
        await b.admit()
    clock.now += 0.1
    assert b.state is BreakerState.HALF_OPEN


async def test_a_probe_answered_429_frees_its_slot_and_leaves_it_half_open(clock: Clock) -> None:
    b = breaker(clock)
    await run(b, F, F, F)
    clock.now += 10
    b.record(await b.admit(), N)
    assert b.state is BreakerState.HALF_OPEN
    assert (await b.admit()).probe  # the next call probes


async def test_results_of_calls_let_through_under_an_earlier_state_do_not_count(
    clock: Clock,
) -> None:
    b = breaker(clock)
    slow = await b.admit()  # let through while closed, answered after it opened
    await run(b, F, F, F)
    b.record(slow, S)
    assert b.state is BreakerState.OPEN
    clock.now += 10
    probe = await b.admit()
    b.record(slow, F)  # nor does it reopen a half-open breaker
    assert b.state is BreakerState.HALF_OPEN
    b.record(probe, S)
    assert b.state is BreakerState.CLOSED


async def test_reading_the_state_changes_nothing(
    clock: Clock, recorded: dict[str, Recorded]
) -> None:
    # The state gauge reads it from the exporter's thread.
    b = breaker(clock)
    await run(b, F, F, F)
    clock.now += 10
    assert b.state is BreakerState.HALF_OPEN
    assert [a["to_state"] for _, a in recorded["breaker_transitions"].values] == ["open"]


async def test_one_log_line_per_state_change_none_per_refused_call(
    clock: Clock, caplog: pytest.LogCaptureFixture, recorded: dict[str, Recorded]
) -> None:
    b = breaker(clock)
    with caplog.at_level(logging.INFO, logger="voucher_bridge.breaker"):
        await run(b, F, F, F)
        for _ in range(20):
            with pytest.raises(UpstreamOpen):
                await b.admit()
        clock.now += 10
        b.record(await b.admit(), S)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO, logging.INFO]
    assert lines[0][1] == (
        "eVOUCHER API: circuit open after 3 consecutive failures (the last: HTTP 503); "
        "calls refused for 10 s"
    )
    assert "half-open" in lines[1][1] and "circuit closed" in lines[2][1]
    transitions = [(v, a) for v, a in recorded["breaker_transitions"].values]
    assert transitions == [
        (1, {"upstream": "evoucher", "to_state": "open"}),
        (1, {"upstream": "evoucher", "to_state": "half_open"}),
        (1, {"upstream": "evoucher", "to_state": "closed"}),
    ]
    assert len(recorded["breaker_refused"].values) == 20  # counted, not logged


async def test_the_state_gauge_reports_each_upstream(clock: Clock) -> None:
    b = breaker(clock)
    other = CircuitBreaker("epin", "Epin API", failures=1, clock=clock)

    def observed() -> dict[str, float]:
        return {
            o.attributes["upstream"]: o.value
            for o in metrics._breaker_states(None)  # type: ignore[arg-type]
            if o.attributes
        }

    assert observed()["evoucher"] == 0 and observed()["epin"] == 0
    await run(b, F, F, F)
    assert observed()["evoucher"] == 2
    clock.now += 10
    assert observed()["evoucher"] == 1
    await run(other, F)
    assert observed()["epin"] == 2


# -- waiting for an open circuit ---------------------------------------------------------------


class Lent:
    """A command's bound as once.py lends it: `paused` counts how long it stood still."""

    def __init__(self, may: bool = True) -> None:
        self.may = may
        self.waited_s = 0.0
        self.pauses = 0

    def may_wait(self) -> bool:
        return self.may

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.pauses += 1
        try:
            yield
        finally:
            self.waited_s += loop.time() - started


@contextlib.contextmanager
def lent(time_: Lent) -> Iterator[Lent]:
    token = running_command.set(time_)
    try:
        yield time_
    finally:
        running_command.reset(token)


async def opened(open_s: float, **kw: Any) -> CircuitBreaker:
    b = CircuitBreaker("epin", "Epin API", failures=1, open_s=open_s, when_open="wait", **kw)
    b.record(await b.admit(), F, "ConnectError")
    return b


async def test_a_waiting_breaker_refuses_at_once_where_no_command_lends_its_time() -> None:
    # A settling job, a recovery, a bare client: nothing to pause, so no waiting.
    b = await opened(5.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamOpen):
        await b.admit()
    with lent(Lent(may=False)), pytest.raises(UpstreamOpen):
        await b.admit()  # past the recovery point
    assert loop.time() - started < 0.05


async def test_a_command_waits_until_a_probe_may_go(recorded: dict[str, Recorded]) -> None:
    b = await opened(0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with lent(Lent()) as time_:
        permit = await b.admit()
    waited = loop.time() - started
    assert permit.probe and 0.25 <= waited < 1.0
    assert time_.pauses == 1 and time_.waited_s == pytest.approx(waited, abs=0.02)
    [(duration, attributes)] = recorded["breaker_wait_duration"].values
    assert duration == pytest.approx(waited, abs=0.02) and attributes == {"upstream": "epin"}
    assert recorded["breaker_refused"].values == []


async def test_the_wait_is_bounded_by_its_own_setting_for_the_whole_command() -> None:
    b = await opened(30.0, max_wait_s=0.4)
    loop = asyncio.get_running_loop()
    with lent(Lent()) as time_:
        time_.waited_s = 0.2  # waited before, for an earlier call of the same command
        started = loop.time()
        with pytest.raises(UpstreamOpen) as refused:
            await b.admit()
    assert 0.15 <= loop.time() - started < 0.5
    assert refused.value.until is not None  # still open: until when


async def test_waiters_go_one_probe_at_a_time_and_all_once_it_closes() -> None:
    b = await opened(0.2)
    admitted: list[Permit] = []

    async def wait() -> None:
        with lent(Lent()):
            admitted.append(await b.admit())

    waiters = [asyncio.create_task(wait()) for _ in range(5)]
    await asyncio.sleep(0.4)
    assert len(admitted) == 1 and admitted[0].probe  # the rest wait for its verdict
    b.record(admitted[0], S)
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert len(admitted) == 5 and not any(p.probe for p in admitted[1:])


async def test_waiters_wait_on_through_a_failed_probe() -> None:
    b = await opened(0.2)
    with lent(Lent()):
        probe = await b.admit()
    follower = asyncio.create_task(_admit_lent(b))
    await asyncio.sleep(0.05)
    b.record(probe, F, "ConnectError")  # open again for 0.2 s
    loop = asyncio.get_running_loop()
    started = loop.time()
    second = await asyncio.wait_for(follower, 2)
    assert second.probe and loop.time() - started >= 0.15


async def _admit_lent(b: CircuitBreaker) -> Permit:
    with lent(Lent()):
        return await b.admit()


async def test_a_wait_cancelled_takes_nothing() -> None:
    b = await opened(0.2)
    waiting = asyncio.create_task(_admit_lent(b))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(0.2)
    assert (await _admit_lent(b)).probe  # the probe slot is still there


async def test_ready_waits_like_admit_but_takes_no_probe() -> None:
    b = await opened(0.2)
    with lent(Lent()):
        await b.ready()
        assert (await b.admit()).probe


# -- the token bucket -----------------------------------------------------------------------------


class Sleeper:
    """asyncio.sleep on the fake clock: each sleep moves it on."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.clock.now += seconds


def test_a_burst_at_once_then_one_token_every_1_over_rate(clock: Clock) -> None:
    bucket = TokenBucket("evoucher", 10.0, burst=3, clock=clock)
    waits = [bucket.reserve() for _ in range(6)]
    assert waits == pytest.approx([0, 0, 0, 0.1, 0.2, 0.3])


def test_tokens_come_back_with_time_up_to_the_burst(clock: Clock) -> None:
    bucket = TokenBucket("evoucher", 10.0, burst=2, clock=clock)
    assert [bucket.reserve() for _ in range(2)] == [0, 0]
    clock.now += 0.1
    assert bucket.reserve() == 0
    assert bucket.reserve() == pytest.approx(0.1)
    clock.now += 60  # a quiet minute: still only a burst's worth
    assert [bucket.reserve() for _ in range(3)] == pytest.approx([0, 0, 0.1])


async def test_take_sleeps_its_turn_and_records_only_waits(
    clock: Clock, recorded: dict[str, Recorded]
) -> None:
    sleeper = Sleeper(clock)
    bucket = TokenBucket("epin", 4.0, burst=1, clock=clock, sleep=sleeper)
    started = clock.now
    for _ in range(9):
        await bucket.take()
    assert sleeper.slept == pytest.approx([0.25] * 8)
    assert clock.now - started == pytest.approx(2.0)  # 9 calls: 1 at once, 8 at 4/s
    assert [a for _, a in recorded["rate_limit_wait_duration"].values] == [{"upstream": "epin"}] * 8


async def test_at_most_the_rate_in_any_window(clock: Clock) -> None:
    # Calls at random moments: in every window, at most burst + rate x window went out.
    import random

    rng = random.Random(5)
    sleeper = Sleeper(clock)
    bucket = TokenBucket("evoucher", 5.0, burst=2, clock=clock, sleep=sleeper)
    went: list[float] = []
    for _ in range(200):
        clock.now += rng.choice([0.0, 0.0, 0.01, 0.3, 1.0])
        await bucket.take()
        went.append(clock.now)
    for i, start in enumerate(went):
        for window in (0.5, 1.0, 3.0):
            count = sum(1 for t in went[i:] if t < start + window)
            assert count <= 2 + 5.0 * window + 1e-9


def test_bad_rates_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket("x", 0.0)
    with pytest.raises(ValueError):
        CircuitBreaker("x", "X", failures=0)


# -- the guard, from the settings ------------------------------------------------------------------


def test_the_defaults_per_upstream() -> None:
    settings = Settings()
    evoucher, epin = (
        guard_from_settings(settings, "evoucher"),
        guard_from_settings(settings, "epin"),
    )
    assert evoucher.breaker is not None and epin.breaker is not None
    assert (evoucher.breaker.failures, evoucher.breaker.open_s) == (5, 10.0)
    assert evoucher.breaker.half_open_probes == 1
    assert (evoucher.breaker.when_open, epin.breaker.when_open) == ("fail", "wait")
    assert epin.breaker.max_wait_s == 600.0
    assert evoucher.rate is None and epin.rate is None  # no limit unless one is set


def test_settings_turn_the_breaker_off_and_the_rate_limit_on() -> None:
    settings = Settings(
        evoucher_breaker_failures=0,
        evoucher_rate_limit_rps=2.5,
        evoucher_rate_limit_burst=4,
        epin_breaker_when_open="fail",
        epin_breaker_failures=7,
        epin_breaker_half_open_probes=3,
    )
    evoucher, epin = (
        guard_from_settings(settings, "evoucher"),
        guard_from_settings(settings, "epin"),
    )
    assert evoucher.breaker is None
    assert evoucher.rate is not None and (evoucher.rate.rate_per_s, evoucher.rate.burst) == (2.5, 4)
    assert epin.breaker is not None and epin.breaker.when_open == "fail"
    assert (epin.breaker.failures, epin.breaker.half_open_probes) == (7, 3)


@pytest.mark.parametrize(
    "bad",
    [
        {"evoucher_breaker_when_open": "retry"},
        {"epin_breaker_open_s": 0},
        {"epin_breaker_half_open_probes": 0},
        {"evoucher_rate_limit_rps": -1},
        {"epin_rate_limit_burst": 0},
    ],
)
def test_settings_out_of_range_are_refused(bad: dict[str, Any]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Settings(**bad)


async def test_a_guard_with_both_off_lets_everything_through() -> None:
    guard = UpstreamGuard()
    permit = await guard.admit()
    await guard.ready()
    await guard.pace()
    guard.done(permit, F)
    assert permit is None


async def test_a_refused_call_takes_no_token(clock: Clock) -> None:
    guard = build_guard(
        "evoucher",
        failures=1,
        open_s=10,
        half_open_probes=1,
        when_open="fail",
        max_wait_s=0,
        rate_per_s=1,
        burst=1,
    )
    assert guard.rate is not None and guard.breaker is not None
    guard.done(await guard.admit(), F, "HTTP 503")
    for _ in range(5):
        with pytest.raises(UpstreamOpen):
            await guard.admit()
    assert guard.rate.reserve() == 0  # its one token still there
