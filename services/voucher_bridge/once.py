"""Exactly-once effect: every command applied to the upstream at most once, answered always.

Kafka redelivers (restarts, rebalances, producer retries) and no Kafka transaction covers an
HTTP call, so each command's (source, id) gets a durable record (`store.base`) that says what
was done about it. This module drives that record around one command:

- first time: act, store the result, publish it;
- seen and answered: publish the stored result again (same result id), no upstream call;
- same key, different content: `rejected`, `idempotency_key_reused`, no upstream call;
- held by a live instance (a copy in flight elsewhere): wait for it, then publish its result;
- held by a dead instance, or by this one with nothing running it any more: go on from where
  it got to; if a money-moving call may have gone out, find out what happened (the handler's
  `recover`) instead of sending it again.

Every command ends within a bound, whatever fails around it (`Timing.command_timeout_s`): the
handler is cancelled at the bound (`failed`, or `indeterminate` once a money-moving call may
have gone out); store operations are bounded and tried again until then; a result the store
cannot take is published anyway and stored later; a store that cannot be reached at all before
anything was sent gets a `failed` answer under a result id of its own
(`unrecorded_result_id`). A claim is never left without a worker: the instance knows which
commands it runs, gives up the claim of one cancelled (a drain that timed out), and frees any
other claim of its own that nothing runs (`store.release_stranded`, with the heartbeat).

Background work: the instance's heartbeat (how others tell it is alive), settling results that
were `indeterminate` (published again, superseding the earlier one, once the upstream can tell),
storing results the store could not take at once, and removing records past their retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from voucher_bridge import metrics
from voucher_bridge.breaker import running_command
from voucher_bridge.results import Decision, result
from voucher_bridge.store.base import (
    Claim,
    ClaimKind,
    CommandKey,
    CommandStore,
    LostClaim,
    NewCommand,
    State,
    Unsettled,
    UnsettledSummary,
)
from voucher_contracts import (
    CommandEnvelope,
    Outcome,
    ResultData,
    UpstreamReport,
    content_hash,
    result_id,
)
from voucher_contracts.envelope import expired_result_id, unrecorded_result_id

log = logging.getLogger(__name__)
T = TypeVar("T")

# The recovery point: called once, just before a money-moving call first goes out, with the
# handler's before-image (what the upstream said just before, as JSON) to keep beside it.
BeforeSend = Callable[[str | None], Awaitable[None]]


@dataclass(frozen=True)
class SentCall:
    """What the store knows of a money-moving call that went out: when (this service's clock),
    the handler's before-image, and the commands of its key (till, account) that came after
    it (None: not known). What the upstream shows now may be their doing, not this call's."""

    at: float | None = None
    before: str | None = None
    later: tuple[CommandEnvelope, ...] | None = None

    @property
    def followed(self) -> bool:
        """Whether the key may have moved on since (other commands, or nothing known)."""
        return self.later is None or bool(self.later)


class Handler(Protocol):
    money_moving: frozenset[str]

    def settle_window(self, command_type: str) -> float:
        """How long after its call an indeterminate command can still be settled."""
        ...

    async def handle(
        self, command: CommandEnvelope, record_key: str | None, before_send: BeforeSend | None
    ) -> ResultData: ...

    async def recover(
        self, command: CommandEnvelope, record_key: str | None, sent: SentCall
    ) -> ResultData: ...

    async def settle(
        self, command: CommandEnvelope, previous: ResultData, sent: SentCall
    ) -> ResultData | None: ...


class RoutedHandler:
    """One handler made of several, chosen by the command's type."""

    def __init__(self, routes: Mapping[str, Handler]) -> None:
        self._routes = dict(routes)
        self.money_moving = frozenset().union(*(h.money_moving for h in self._routes.values()))

    def settle_window(self, command_type: str) -> float:
        return self._routes[command_type].settle_window(command_type)

    async def handle(
        self, command: CommandEnvelope, record_key: str | None, before_send: BeforeSend | None
    ) -> ResultData:
        return await self._routes[command.type].handle(command, record_key, before_send)

    async def recover(
        self, command: CommandEnvelope, record_key: str | None, sent: SentCall
    ) -> ResultData:
        return await self._routes[command.type].recover(command, record_key, sent)

    async def settle(
        self, command: CommandEnvelope, previous: ResultData, sent: SentCall
    ) -> ResultData | None:
        return await self._routes[command.type].settle(command, previous, sent)


@dataclass(frozen=True)
class Origin:
    """Where a command was read: its settling runs in that partition's lane for its key, and
    its age is told from `timestamp_ms` when it has no `time`."""

    topic: str | None = None
    partition: int | None = None
    timestamp_ms: int | None = None


class OwnedPartitions(Protocol):
    def __call__(self) -> set[tuple[str, int]]: ...


class ScheduleJob(Protocol):
    """Runs `job` in the lane of `key` in that partition, between its commands; False when this
    instance does not own the partition now (see kafka.dispatcher)."""

    def __call__(
        self, topic: str, partition: int, key: bytes | None, job: Callable[[], Awaitable[None]]
    ) -> bool: ...


@dataclass(frozen=True)
class Answered:
    """A command's result, ready to publish under `result_id`."""

    data: ResultData
    result_id: str
    # Answered from the store, no upstream call this time: bookkeeping, not part of the answer.
    replayed: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Timing:
    heartbeat_interval_s: float = 2.0
    # An instance whose heartbeat is older than this (by the store's clock) is taken for dead;
    # keep it well above the heartbeat interval.
    stale_after_s: float = 15.0
    busy_poll_s: float = 0.2
    settle_interval_s: float = 5.0
    retention_s: float = 7 * 24 * 3600.0
    purge_interval_s: float = 600.0
    # The bound of one command, from its claim to its answer, whatever fails around it.
    command_timeout_s: float = 120.0
    # The bound of one store operation; a slower one counts as failed and is tried again.
    store_timeout_s: float = 5.0
    # How often claims of this instance that nothing runs are freed for the next owner.
    sweep_interval_s: float = 10.0
    # The longest a command may wait for an upstream's open circuit, beside its own time
    # (the largest `*_BREAKER_MAX_WAIT_S` of an upstream that waits; see `_CommandTime`).
    upstream_wait_s: float = 0.0

    @property
    def busy_limit_s(self) -> float:
        """How long a claim held by a live instance is waited for. The holder finishes within
        `command_timeout_s` (and what it may wait for an open circuit) and frees a claim it
        does not run within a sweep; one held for longer is stranded there (its sweep failing,
        say) and is taken over."""
        return (
            self.command_timeout_s
            + self.upstream_wait_s
            + self.sweep_interval_s
            + self.stale_after_s
        )


class NotResolvable(Exception):
    """An operator's resolution that cannot be made, and why."""


class StoreUnavailable(Exception):
    """The store did not answer within the command's time."""


class _CommandTime:
    """One command's bound (`command_timeout_s`), lent to a wait for an upstream's open circuit
    (breaker.py) through `breaker.running_command`.

    A command that waits for a circuit to close has sent nothing that cannot be sent again,
    so none of its time is spent on the upstream: the bound stands still meanwhile (the
    breaker bounds the wait itself, `*_BREAKER_MAX_WAIT_S`). Paused here rather than with a
    gate before the timed part because only the send path knows when a call would be refused
    (a command's third read may meet the circuit its second opened), and the send path has
    no other way to reach the command it serves. Once a call that cannot be sent again may
    have gone out (the recovery point), it may not wait: a wait then could only end in an
    `indeterminate` at the bound, for a call that was never sent.
    """

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline  # on the loop's clock; moved on by each pause
        self.waited_s = 0.0
        self.sent = False
        self.bound: asyncio.Timeout | None = None

    def may_wait(self) -> bool:
        return not self.sent and self.bound is not None and not self.bound.expired()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        bound = self.bound
        assert bound is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        left = self.deadline - started
        bound.reschedule(None)
        try:
            yield
        finally:
            now = loop.time()
            self.waited_s += now - started
            self.deadline = now + left
            bound.reschedule(self.deadline)


@dataclass(frozen=True)
class _Unstored:
    """A result published before the store took it; stored in the background."""

    content_hash: str
    token: str
    result: str
    unsettled: bool
    answered: Answered


class ExactlyOnce:
    def __init__(
        self,
        store: CommandStore,
        handler: Handler,
        timing: Timing | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._handler = handler
        self._timing = timing or Timing()
        self._clock = clock
        self.instance = uuid.uuid4().hex
        # Set by an operator's recheck: the settling loop runs at once rather than after its wait.
        self._settle_soon = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # The commands this instance runs now, each by one task at a time: a second copy of
        # one waits for the first here, never for its claim in the store.
        self._running: dict[CommandKey, asyncio.Event] = {}
        self._unstored: dict[CommandKey, _Unstored] = {}
        self._releases: set[asyncio.Task[None]] = set()
        self._last_sweep = 0.0
        self._store_answered_at = time.monotonic()
        self.unsettled: UnsettledSummary | None = None  # as last counted
        self._schedule: ScheduleJob | None = None
        self._owned: OwnedPartitions | None = None
        # Settle jobs queued or running here, and since when: one a drain dropped unstarted
        # is queued again once its lease would have run out.
        self._settling: dict[CommandKey, float] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(
        self,
        publish_superseding: PublishSuperseding,
        schedule: ScheduleJob | None = None,
        owned: OwnedPartitions | None = None,
        *,
        background: bool = True,
    ) -> None:
        """`schedule`: how settling jobs get into their key's lane, and `owned` the partitions
        this instance has now (None: jobs run in the settling loop itself, for any partition,
        as in a test with no dispatcher). `background=False` (a worker process, whose service
        settles, purges and counts for it): the heartbeat only."""
        self._schedule = schedule
        self._owned = owned
        await self.store.open()
        await self.store.heartbeat(self.instance)
        self._store_answered_at = time.monotonic()
        if background:
            try:
                await self._count_unsettled()  # the gauges have a value from the start
            except Exception as exc:
                log.warning("could not count the unsettled results (%s)", type(exc).__name__)
        self._tasks = [
            asyncio.create_task(
                self._every("heartbeat", self._timing.heartbeat_interval_s, self._beat)
            )
        ]
        if not background:
            return
        self._tasks += [
            asyncio.create_task(
                self._every(
                    "settling",
                    self._timing.settle_interval_s,
                    lambda: self.settle(publish_superseding),
                    wake=self._settle_soon,
                )
            ),
            asyncio.create_task(self._every("purge", self._timing.purge_interval_s, self.purge)),
            asyncio.create_task(self._every("counting unsettled", 15.0, self._count_unsettled)),
        ]

    async def stop(self) -> None:
        for task in [*self._tasks, *self._releases]:
            task.cancel()
        for task in [*self._tasks, *self._releases]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self._store_unstored()  # one last try
            await self.store.retire(self.instance)  # its claims are free at once, not after a wait
        except Exception:
            log.exception("could not retire this instance; its claims are free once it is stale")
        await self.store.close()

    async def _every(
        self,
        name: str,
        interval_s: float,
        work: Callable[[], Awaitable[object]],
        wake: asyncio.Event | None = None,
    ) -> None:
        """`work` every `interval_s`, and at once when `wake` is set (an operator's recheck)."""
        while True:
            if wake is None:
                await asyncio.sleep(interval_s)
            else:
                # asyncio.timeout, not wait_for: on 3.11 a stop (cancel) that meets wait_for's
                # own timeout comes out as TimeoutError, and this loop would never end.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval_s):
                        await wake.wait()
                wake.clear()
            try:
                await work()
            except Exception as exc:
                # Mostly the store away for a while: one line each time, the trace at debug.
                log.warning("%s failed (%s: %s); trying again", name, type(exc).__name__, exc)
                log.debug("%s failed", name, exc_info=True)

    async def _count_unsettled(self) -> None:
        # The whole store's (every instance reports the same): for the metrics and the alerts.
        async with asyncio.timeout(self._timing.store_timeout_s):
            self.unsettled = await self.store.unsettled_summary()

    @property
    def store_answered_s(self) -> float:
        """How long ago the store last took this instance's heartbeat (readiness)."""
        return time.monotonic() - self._store_answered_at

    async def _beat(self) -> None:
        async with asyncio.timeout(self._timing.store_timeout_s):
            await self.store.heartbeat(self.instance)
        self._store_answered_at = time.monotonic()
        now = time.monotonic()
        if now - self._last_sweep >= self._timing.sweep_interval_s:
            self._last_sweep = now
            async with asyncio.timeout(self._timing.store_timeout_s):
                freed = await self.store.release_stranded(
                    self.instance, [*self._running, *self._unstored]
                )
            if freed:
                log.warning("freed %d claims of this instance that nothing ran", freed)
                metrics.claims_released.add(freed, {"why": "stranded"})
        if self._unstored:
            await self._store_unstored()

    @property
    def running(self) -> int:
        """Commands this instance runs now."""
        return len(self._running)

    # -- one command --------------------------------------------------------------------------

    async def execute(
        self, command: CommandEnvelope, record_key: bytes | None, origin: Origin | None = None
    ) -> Answered:
        origin = origin or Origin()
        key = CommandKey(command.source, command.id)
        # One task per command at a time in this instance; the first runs within its bound.
        while (first := self._running.get(key)) is not None:
            await first.wait()
        digest = content_hash(command)
        unstored = self._unstored.get(key)
        if unstored is not None:  # answered here, not stored yet: answer the copy the same
            if unstored.content_hash != digest:
                return _key_reused_answer(command, digest)
            return replace(unstored.answered, replayed=True)
        done = self._running[key] = asyncio.Event()
        try:
            return await self._execute(command, key, digest, record_key, origin)
        finally:
            del self._running[key]
            done.set()

    async def _execute(
        self,
        command: CommandEnvelope,
        key: CommandKey,
        digest: str,
        record_key: bytes | None,
        origin: Origin,
    ) -> Answered:
        new = NewCommand(
            key=key,
            content_hash=digest,
            type=command.type,
            subject=command.subject,
            envelope=command.model_dump_json(),
            record_key=record_key,
            topic=origin.topic,
            partition=origin.partition,
        )
        text_key = record_key.decode("utf-8", "replace") if record_key is not None else None
        loop = asyncio.get_running_loop()
        if self._expired(command, origin):
            try:
                known = await self._store_op(
                    "known",
                    lambda: self.store.known(key),
                    loop.time() + self._timing.command_timeout_s,
                )
            except StoreUnavailable:
                known = False
            if not known:
                # Older than the store's memory and not in it: it may have been answered and
                # forgotten. Never sent, and not recorded: its id is none a recorded result had.
                return Answered(
                    _expired(command, self._timing.retention_s),
                    expired_result_id(command.source, command.id),
                )
        busy_since: float | None = None
        take_over = False
        while True:
            try:
                claim = await self._store_op(
                    "claim",
                    functools.partial(self._claim, new, take_over),
                    loop.time() + self._timing.command_timeout_s,
                )
            except StoreUnavailable:
                return self.unrecorded(command, "the idempotency store could not be reached")
            if claim.kind is ClaimKind.DONE:
                assert claim.result is not None
                data = ResultData.model_validate_json(claim.result)
                answer_id = result_id(key.source, key.id, claim.revision)
                return Answered(data, answer_id, replayed=True)
            if claim.kind is ClaimKind.CONFLICT:
                return _key_reused_answer(command, digest)
            if claim.kind is ClaimKind.BUSY:
                busy_since = self._note_busy(command, busy_since, loop.time())
                if loop.time() - busy_since > self._timing.busy_limit_s:
                    log.error(
                        "%s %s: held by another live instance for %.0f s, longer than a command "
                        "takes there; taking it over",
                        command.type,
                        command.id,
                        loop.time() - busy_since,
                    )
                    metrics.claims_taken_over.add(1, {"command_type": command.type})
                    take_over = True
                    continue
                await asyncio.sleep(self._timing.busy_poll_s)
                continue
            if busy_since is not None:
                metrics.busy_wait_duration.record(
                    loop.time() - busy_since, {"command_type": command.type}
                )
            try:
                return await self._run_claimed(command, key, digest, claim, text_key, origin)
            except LostClaim:
                # Taken over by another instance (this one was thought dead): its answer is
                # the one that counts. Ask the store again.
                log.warning("%s %s: claim lost to another instance", command.type, command.id)
                take_over = False
                continue

    async def _claim(self, new: NewCommand, take_over: bool) -> Claim:
        return await self.store.claim(
            new, self.instance, self._clock(), self._timing.stale_after_s, take_over
        )

    def _note_busy(self, command: CommandEnvelope, since: float | None, now: float) -> float:
        if since is None:
            metrics.busy_waits.add(1, {"command_type": command.type})
            log.info("%s %s: another instance runs it; waiting", command.type, command.id)
            return now
        waited = now - since
        if int(waited / 10) != int((waited - self._timing.busy_poll_s) / 10):
            log.warning(
                "%s %s: still held by another live instance after %.0f s",
                command.type,
                command.id,
                waited,
            )
        return since

    async def _run_claimed(
        self,
        command: CommandEnvelope,
        key: CommandKey,
        digest: str,
        claim: Claim,
        text_key: str | None,
        origin: Origin,
    ) -> Answered:
        assert claim.token is not None
        token = claim.token
        loop = asyncio.get_running_loop()
        bound = _CommandTime(loop.time() + self._timing.command_timeout_s)

        async def before_send(before: str | None) -> None:
            # Within the command's time as it stands (moved on by any wait for a circuit).
            await self._store_op(
                "mark_sent",
                lambda: self.store.mark_sent(key, token, self._clock(), before),
                bound.deadline,
            )

        resuming_sent = claim.kind is ClaimKind.RESUME and claim.previous is State.SENT
        # Resumed in its key's lane before any later command of the key: nothing came after.
        sent = SentCall(claim.sent_at, claim.before, later=()) if resuming_sent else None
        try:
            data = await self._act(command, text_key, before_send, sent, bound)
            unsettled = (
                data.outcome is Outcome.INDETERMINATE and command.type in self._handler.money_moving
            )
            stored = data.model_dump_json()
            answered = Answered(data, result_id(key.source, key.id))
            try:
                # A few tries even when the handler used up the command's time.
                until = max(bound.deadline, loop.time() + 3 * self._timing.store_timeout_s)
                await self._store_op(
                    "complete",
                    lambda: self.store.complete(key, token, stored, unsettled, self._clock()),
                    until,
                )
            except StoreUnavailable:
                log.error(
                    "%s %s: the store did not take the result; publishing it, storing it later",
                    command.type,
                    command.id,
                )
                self._unstored[key] = _Unstored(digest, token, stored, unsettled, answered)
        except asyncio.CancelledError:
            # A drain that timed out, or a shutdown: the next owner resumes it at once (a
            # claim already completed is not released).
            self._release_soon(key, token)
            raise
        return answered

    def _expired(self, command: CommandEnvelope, origin: Origin) -> bool:
        """Older than the store's retention, by the earlier of its `time` and its record's
        timestamp (a `time` ahead of the clock does not make it young)."""
        moments = []
        if command.time is not None:
            moments.append(command.time.timestamp())
        if origin.timestamp_ms is not None and origin.timestamp_ms >= 0:
            moments.append(origin.timestamp_ms / 1000)
        return bool(moments) and min(moments) < self._clock() - self._timing.retention_s

    async def _act(
        self,
        command: CommandEnvelope,
        text_key: str | None,
        before_send: BeforeSend,
        resuming: SentCall | None,
        time_: _CommandTime,
    ) -> ResultData:
        sent = time_.sent = resuming is not None

        async def mark_and_note(before: str | None) -> None:
            nonlocal sent
            # No wait for a circuit from here on, even if the store does not take the mark.
            time_.sent = True
            await before_send(before)
            sent = True

        bound = time_.bound = asyncio.timeout_at(time_.deadline)
        lent = running_command.set(time_)
        try:
            async with bound:
                if resuming is not None:
                    log.warning("%s %s: resuming after a crash mid-call", command.type, command.id)
                    return await self._handler.recover(command, text_key, resuming)
                return await self._handler.handle(command, text_key, mark_and_note)
        except LostClaim:
            raise
        except TimeoutError as exc:
            if not bound.expired():
                return self._internal_error(command, exc, sent)
            log.error(
                "%s %s: no answer within %g s; cancelled",
                command.type,
                command.id,
                self._timing.command_timeout_s,
            )
            metrics.commands_timed_out.add(1, {"command_type": command.type})
            decision = Decision(
                Outcome.INDETERMINATE if sent else Outcome.FAILED,
                "upstream_unavailable",
                f"no answer within {self._timing.command_timeout_s:g} s",
            )
            return result(command, decision, UpstreamReport())
        except Exception as exc:
            return self._internal_error(command, exc, sent)
        finally:
            running_command.reset(lent)

    def _internal_error(self, command: CommandEnvelope, exc: Exception, sent: bool) -> ResultData:
        # A bug must not stop the partition, and the sender must hear back. Whether a
        # money-moving call went out is known: it had if the recovery point was passed.
        log.error("handling %s %s failed", command.type, command.id, exc_info=exc)
        outcome = Outcome.INDETERMINATE if sent else Outcome.FAILED
        decision = Decision(outcome, "internal_error", type(exc).__name__)
        return result(command, decision, UpstreamReport())

    def unrecorded(self, command: CommandEnvelope, why: str) -> Answered:
        """The answer to a command that could not be recorded within its time (the store away,
        or a bug). This instance sent nothing for it; an earlier attempt of a money-moving
        command (a crashed owner's) may have, and nothing here can tell, so such a command is
        `indeterminate` for an operator to reconcile, any other `failed`. The result id is one no
        recorded result of the command has."""
        moves_money = command.type in self._handler.money_moving
        log.error(
            "%s %s: answered without a record (%s)%s",
            command.type,
            command.id,
            why,
            "; an operator must reconcile it" if moves_money else "",
        )
        metrics.unrecorded.add(1, {"command_type": command.type})
        outcome = Outcome.INDETERMINATE if moves_money else Outcome.FAILED
        data = result(command, Decision(outcome, "internal_error", why), UpstreamReport())
        return Answered(data, unrecorded_result_id(command.source, command.id))

    async def _store_op(
        self, name: str, operation: Callable[[], Awaitable[T]], deadline: float
    ) -> T:
        """One store operation (`name`, as metrics have it), each attempt bounded and timed,
        tried again until `deadline`. Claims, marks and completions are safe to repeat: a
        repeated claim finds its own earlier one (this instance's, nothing running it) and
        resumes it; the others are keyed by token."""
        loop = asyncio.get_running_loop()
        delay = 0.05
        attributes = {"db.system.name": self.store.system, "db.operation.name": name}
        while True:
            attempt_s = max(0.01, min(self._timing.store_timeout_s, deadline - loop.time()))
            started = loop.time()
            try:
                async with asyncio.timeout(attempt_s):
                    answer = await operation()
                metrics.store_duration.record(loop.time() - started, attributes)
                return answer
            except LostClaim:
                metrics.store_duration.record(loop.time() - started, attributes)
                raise
            except Exception as exc:
                error = {"error.type": type(exc).__qualname__}
                metrics.store_duration.record(loop.time() - started, attributes | error)
                metrics.store_errors.add(1, {"error": type(exc).__name__})
                if loop.time() + delay >= deadline:
                    raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
                log.warning(
                    "store operation failed (%s: %s); trying again", type(exc).__name__, exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _release_soon(self, key: CommandKey, token: str) -> None:
        async def release() -> None:
            loop = asyncio.get_running_loop()
            try:
                released = await self._store_op(
                    "release", lambda: self.store.release(key, token), loop.time() + 30
                )
            except StoreUnavailable:
                return  # the sweep frees it once the store answers
            if released:
                metrics.claims_released.add(1, {"why": "cancelled"})

        task = asyncio.create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _store_unstored(self) -> None:
        for key, pending in list(self._unstored.items()):
            try:
                async with asyncio.timeout(self._timing.store_timeout_s):
                    await self.store.complete(
                        key, pending.token, pending.result, pending.unsettled, self._clock()
                    )
            except LostClaim:
                log.warning("%s: taken over before its result was stored", key)
            except Exception as exc:
                log.warning("%s: result still not stored (%s)", key, type(exc).__name__)
                continue
            self._unstored.pop(key, None)

    # -- background ---------------------------------------------------------------------------

    async def settle(self, publish: PublishSuperseding) -> int:
        """Look again at indeterminate results: each as a job in its key's lane, between the
        key's commands and only where this instance owns the partition (so the settling scan
        of a redeem never runs beside the till's newer commands). Returns how many jobs ran
        here (no dispatcher) or were queued."""
        started = 0
        now = time.monotonic()
        owned = self._owned() if self._owned is not None else None
        for pending in await self.store.unsettled(limit=100, partitions=owned):
            queued = self._settling.get(pending.key)
            if queued is not None and now - queued < self._settle_lease_s:
                continue
            self._settling[pending.key] = now
            job = functools.partial(self._settle_job, pending, publish)
            if self._schedule is None or pending.topic is None or pending.partition is None:
                await job()  # no lane to run in (a test, or a record from before lanes did it)
            elif not self._schedule(pending.topic, pending.partition, pending.record_key, job):
                self._settling.pop(pending.key, None)  # another instance owns its partition
                continue
            started += 1
        return started

    @property
    def _settle_lease_s(self) -> float:
        return self._timing.command_timeout_s + 30

    async def _settle_job(self, pending: Unsettled, publish: PublishSuperseding) -> None:
        try:
            async with asyncio.timeout(self._timing.command_timeout_s):
                # One instance at a time, even in the moments a partition has two owners.
                if not await self.store.lease_settle(
                    pending.key, pending.revision, self.instance, self._settle_lease_s
                ):
                    return
                if not await self._settle_one(pending, publish):
                    # Looked at again after the interval, behind the others not looked at.
                    await self.store.postpone_settle(
                        pending.key,
                        pending.revision,
                        self.instance,
                        self._timing.settle_interval_s,
                    )
        except Exception as exc:
            # One record the upstream keeps failing on must not hold up the others.
            log.warning("settling %s failed (%s: %s)", pending.key, type(exc).__name__, exc)
        finally:
            self._settling.pop(pending.key, None)

    async def _settle_one(self, pending: Unsettled, publish: PublishSuperseding) -> int:
        previous = ResultData.model_validate_json(pending.result)
        command = CommandEnvelope.model_validate_json(pending.envelope)
        window = self._handler.settle_window(command.type)
        if pending.sent_at is not None and self._clock() - pending.sent_at >= window:
            await self._leave_to_an_operator(pending, command, previous, publish, window)
            return 1
        later = await self.store.later_commands(pending.subject, pending.created_at, limit=200)
        sent = SentCall(
            pending.sent_at,
            pending.before,
            tuple(CommandEnvelope.model_validate_json(e) for e in later),
        )
        data = await self._handler.settle(command, previous, sent)
        if data is None:
            return 0
        return await self._supersede(pending, command, data, publish)

    async def _leave_to_an_operator(
        self,
        pending: Unsettled,
        command: CommandEnvelope,
        previous: ResultData,
        publish: PublishSuperseding,
        window: float,
    ) -> None:
        """The upstream can no longer tell (the eVOUCHER scan lock ran out, say): the result
        stays `indeterminate`, now with reason `unsettled`, and waits for an operator."""
        log.error(
            "%s %s: still indeterminate %g s after the call; left to an operator",
            command.type,
            command.id,
            window,
        )
        metrics.unsettled.add(1, {"command_type": command.type})
        message = (
            f"the upstream could not tell within {window:g} s of the call; an operator decides"
        )
        data = previous.model_copy(update={"reason": "unsettled", "message": message})
        await self._supersede(pending, command, data, publish, needs_operator=True)

    async def _supersede(
        self,
        pending: Unsettled,
        command: CommandEnvelope,
        data: ResultData,
        publish: PublishSuperseding,
        needs_operator: bool = False,
    ) -> int:
        old_id = result_id(pending.key.source, pending.key.id, pending.revision)
        new_id = result_id(pending.key.source, pending.key.id, pending.revision + 1)
        data = data.model_copy(update={"supersedes": old_id})
        still_unsettled = data.outcome is Outcome.INDETERMINATE and not needs_operator
        # Published before it is stored as settled: a crash in between publishes it again
        # (same id) rather than never.
        await publish(pending.record_key, command, Answered(data, new_id))
        metrics.superseded.add(1, {"command_type": command.type})
        stored = await self.store.settle(
            pending.key,
            pending.revision,
            data.model_dump_json(),
            still_unsettled,
            self._clock(),
            needs_operator,
        )
        return 1 if stored else 0

    # -- an operator's hand (console/operations.py) -------------------------------------------

    async def recheck(self, key: CommandKey) -> bool:
        """Look again at an indeterminate result at the next settle, not after its wait; False
        when it is not being settled or is being looked at right now."""
        if not await self.store.recheck_now(key):
            return False
        self._settle_soon.set()  # the settling loop of this instance, if it runs, goes now
        return True

    async def resolve(
        self,
        key: CommandKey,
        outcome: Outcome,
        note: str,
        publish: PublishSuperseding,
    ) -> str:
        """Settle an indeterminate result by an operator's word (the upstream's support desk
        confirmed, say): a superseding result with reason `operator_resolved` and the note,
        published (the broker has it) before it is stored, like any superseding result, under
        the settle lease, so that no settle runs beside it. Returns the new result's id.
        Raises NotResolvable saying why not."""
        if outcome not in (Outcome.SUCCEEDED, Outcome.FAILED):
            raise NotResolvable("an operator resolves to succeeded or failed")
        row = await self.store.lookup(key)
        if row is None:
            raise NotResolvable("no such command in the store")
        if row.state is not State.DONE or not (row.unsettled or row.needs_operator):
            raise NotResolvable("its result is not indeterminate")
        if not await self.store.lease_resolve(
            key, row.revision, self.instance, self._settle_lease_s
        ):
            raise NotResolvable("it is being settled right now; try again in a moment")
        pending = row.as_unsettled()
        command = CommandEnvelope.model_validate_json(row.envelope)
        previous = ResultData.model_validate_json(pending.result)
        data = previous.model_copy(
            update={"outcome": outcome, "reason": "operator_resolved", "message": note}
        )
        if not await self._supersede(pending, command, data, publish):
            raise NotResolvable("its result moved on meanwhile (published, not stored)")
        return result_id(key.source, key.id, row.revision + 1)

    async def purge(self) -> int:
        before = self._clock() - self._timing.retention_s
        removed = 0
        while True:
            count = await self.store.purge(before, limit=1000)
            removed += count
            if count < 1000:
                return removed
            await asyncio.sleep(0)  # let commands through between batches


class PublishSuperseding(Protocol):
    async def __call__(
        self, record_key: bytes | None, command: CommandEnvelope, answered: Answered
    ) -> None: ...


def _expired(command: CommandEnvelope, retention_s: float) -> ResultData:
    decision = Decision(
        Outcome.REJECTED,
        "command_expired",
        f"older than the idempotency store's retention ({retention_s:g} s): never sent",
    )
    return result(command, decision, UpstreamReport())


def _key_reused_answer(command: CommandEnvelope, digest: str) -> Answered:
    decision = Decision(
        Outcome.REJECTED,
        "idempotency_key_reused",
        "another command with this source and id, with different content, came first",
    )
    data = result(command, decision, UpstreamReport())
    # Not the original's result id: this answers a different command.
    return Answered(data, result_id(command.source, f"{command.id}#{digest}"))
